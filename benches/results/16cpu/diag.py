# rayon and larson on 16 CPUs: user/sys time, TLB shootdown and function-call IPIs per run.
import json, os, resource, subprocess, sys
def irq():
    t = c = 0
    for l in open('/proc/interrupts'):
        f = l.split()
        if f and f[0] in ('TLB:', 'CAL:'):
            n = sum(int(x) for x in f[1:] if x.isdigit())
            if f[0] == 'TLB:': t = n
            else: c = n
    return t, c
variants = [('jemalloc', {}), ('system', {}), ('pagepool', {}),
            ('pagepool', {'PAGEPOOL_CPU_CACHE': 'off'}), ('pagepool', {'PAGEPOOL_CPU_CACHE': 'portable'})]
for w in ['rayon', 'larson']:
    for r in range(3):
        for a, env in variants:
            e = dict(os.environ, **env)
            t0, c0 = irq(); u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(['./apps-' + a, w, '--idle-ms', '0'], env=e, capture_output=True, text=True).stdout
            u1 = resource.getrusage(resource.RUSAGE_CHILDREN); t1, c1 = irq()
            d = json.loads(out.strip().splitlines()[-1])
            print(f"{w} r{r} {a}{'+'+list(env.values())[0] if env else ''}: wall {d['wall_s']:.3f} cpu {d['cpu_s']:.3f} "
                  f"proc user {u1.ru_utime-u0.ru_utime:.3f} sys {u1.ru_stime-u0.ru_stime:.3f} TLB-IPI {t1-t0} CAL-IPI {c1-c0} "
                  f"minflt {d['minflt']} nvcsw {u1.ru_nvcsw-u0.ru_nvcsw} nivcsw {u1.ru_nivcsw-u0.ru_nivcsw}", flush=True)
