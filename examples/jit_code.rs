//! A JIT-style user of a pool: code blocks come from a pool dedicated to code, are written
//! while read+write, switched to read+execute with `mprotect`, called, and switched back
//! to read+write before they are freed.
//!
//! Run: `cargo run --example jit_code` (x86-64 Linux; elsewhere it prints why it skips).
//!
//! What a JIT must do with pool blocks (see also the crate docs, "For JIT runtimes"):
//! - never leave a block writable and executable at once: write, then protect read+execute;
//! - know that every protection change splits the mapping into more kernel VMAs (the count
//!   is printed below; a process may have at most `vm.max_map_count` of them);
//! - restore read+write before freeing: the pool will hand the block to the next user, who
//!   expects to write to it;
//! - keep code in a pool of its own: all its blocks lie in one region, so with a capacity
//!   up to 2 GiB every block can reach every other with a `rel32` call, as the second
//!   function below does.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use pagepool::{Block, PagePool};

    /// The mappings of this process (VMAs), from /proc/self/maps.
    fn vmas() -> usize {
        std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
    }

    /// Sets the protection of a whole block.
    fn protect(block: &Block, prot: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the block is a page-aligned range of the pool's own mapping that we own.
        let rc = unsafe { libc::mprotect(block.as_ptr().cast(), block.len(), prot) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    // A small pool for code only: 64 MiB, so any two blocks are within rel32 reach.
    let code = PagePool::builder()
        .capacity(64 << 20)
        .max_order(9)
        .shards(1)
        .hint_thread(false)
        .build()?;

    // f: mov eax, 42 ; ret
    let mut f = code.alloc(0)?;
    f.as_mut_slice()[..6].copy_from_slice(&[0xB8, 0x2A, 0x00, 0x00, 0x00, 0xC3]);

    // g: sub rsp, 8 ; call f (rel32) ; add rsp, 8 ; add eax, 1 ; ret
    let mut g = code.alloc(0)?;
    let call_at = g.as_ptr() as i64 + 4; // the call instruction starts at byte 4
    let rel = f.as_ptr() as i64 - (call_at + 5);
    let rel32 = i32::try_from(rel).expect("blocks of one 64 MiB pool are within rel32 reach");
    let mut body = vec![0x48, 0x83, 0xEC, 0x08, 0xE8];
    body.extend_from_slice(&rel32.to_le_bytes());
    body.extend_from_slice(&[0x48, 0x83, 0xC4, 0x08, 0x83, 0xC0, 0x01, 0xC3]);
    g.as_mut_slice()[..body.len()].copy_from_slice(&body);
    println!(
        "f at {:p}, g at {:p}: call distance {rel} bytes",
        f.as_ptr(),
        g.as_ptr()
    );

    let before = vmas();
    if let Err(err) = protect(&f, libc::PROT_READ | libc::PROT_EXEC)
        .and_then(|()| protect(&g, libc::PROT_READ | libc::PROT_EXEC))
    {
        println!("skipping: mprotect(PROT_EXEC) refused here ({err})");
        protect(&f, libc::PROT_READ | libc::PROT_WRITE)?;
        code.free(f);
        code.free(g);
        return Ok(());
    }
    println!(
        "mappings: {before} before protecting, {} with two read+execute blocks",
        vmas()
    );

    // SAFETY: each block holds a complete function in the System V calling convention,
    // taking no arguments and returning an i32, and is read+execute now.
    let (rf, rg) = unsafe {
        let f_fn: extern "C" fn() -> i32 = std::mem::transmute(f.as_ptr());
        let g_fn: extern "C" fn() -> i32 = std::mem::transmute(g.as_ptr());
        (f_fn(), g_fn())
    };
    println!("f() = {rf}, g() = f() + 1 = {rg}");
    assert_eq!((rf, rg), (42, 43));

    // Back to read+write before the pool takes the blocks back.
    protect(&f, libc::PROT_READ | libc::PROT_WRITE)?;
    protect(&g, libc::PROT_READ | libc::PROT_WRITE)?;
    println!(
        "mappings after restoring read+write: {} (the kernel merges them again)",
        vmas()
    );
    code.free(f);
    code.free(g);
    code.check_consistency()?;
    Ok(())
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!("skipping: this example writes x86-64 machine code and needs x86-64 Linux");
}
