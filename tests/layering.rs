//! The crate's layers, checked: every `crate::` path in `src/` may name only its own layer or
//! a layer below it (see "Design: one way down" in the crate docs). Comments are ignored, so
//! doc links may point anywhere.
//!
//! A module that needs something from a layer above must instead define a small trait or
//! report a result that the layer above acts on (as `shard::Handoff` and
//! `Locked::listed_hintable` do).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers, lowest first. Units of equal rank must not use each other.
const LAYERS: &[(&str, u32)] = &[
    ("sync", 0),
    ("os", 1),
    ("percpu", 2),
    ("error", 2),
    ("config", 3),
    ("frame_table", 4),
    ("shard", 5),
    ("policy::hint", 6),
    ("policy::capture", 6),
    ("policy", 7),
    ("pool", 8),
    ("slab", 9),
    ("front::block", 10),
    ("front::page_pool", 11),
    ("front::guard", 12),
    ("front::alloc_async", 12),
    ("front::local_cache", 12),
    ("front::pressure", 12),
    ("front::global", 13),
    ("front::allocator_api", 14),
    ("front", 15),
];

/// Items at the crate root that every layer may use: constants and size helpers in
/// `lib.rs`, and the crate root itself.
const ROOT_ITEMS: &[&str] = &[
    "FRAME_SHIFT",
    "FRAME_SIZE",
    "MAX_SUPPORTED_ORDER",
    "MAX_SHARDS",
    "block_size",
    "order_for",
];

/// Public names re-exported at the root, with the unit that defines them: naming
/// `crate::PagePool` from below is as upward as naming `crate::front::PagePool`.
const REEXPORTS: &[(&str, &str)] = &[
    ("AllocPolicy", "config"),
    ("Backing", "os"),
    ("DEFAULT_MAX_ORDER", "config"),
    ("CpuCacheMode", "config"),
    ("DEFAULT_CPU_CACHE_BYTES", "config"),
    ("MAX_HINT_DURATION", "config"),
    ("HintMode", "os"),
    ("PoolBuilder", "config"),
    ("AllocError", "error"),
    ("BuildError", "error"),
    ("FreeError", "error"),
    ("Block", "front::block"),
    ("PagePool", "front::page_pool"),
    ("HintReport", "pool"),
    ("Advice", "pool"),
    ("BatchError", "pool"),
    ("LocalCache", "front::local_cache"),
    ("AllocAsync", "front::alloc_async"),
    ("BlockGuard", "front::guard"),
    ("OwnedBlock", "front::guard"),
    ("DEFAULT_LOCAL_CACHE_BLOCKS", "front::local_cache"),
    ("PoolAlloc", "front::global"),
    ("PoolAllocStats", "front::global"),
    ("DEFAULT_MIN_POOL_SIZE", "front::global"),
    ("GLOBAL_MAX_ORDER", "front::global"),
    ("DIRECT_MAP_MIN", "front::global"),
    ("GLOBAL_HINT_MIN_ORDER", "front::global"),
    ("GLOBAL_IDLE_HINT_MIN_ORDER", "front::global"),
    ("ProcessMemory", "os"),
    ("minor_faults", "os"),
    ("Advisor", "os"),
    ("Stats", "pool"),
    ("PressureStats", "pool"),
    ("MAX_PRESSURE_SOURCES", "pool"),
    ("PressureSource", "config"),
    ("PressureLevel", "config"),
    ("PressureSourceError", "error"),
    ("DEFAULT_PRESSURE_SETTLE", "config"),
    ("DEFAULT_PSI_STALL", "config"),
    ("DEFAULT_PSI_WINDOW", "config"),
    ("PSI_MIN_WINDOW", "config"),
    ("PSI_MAX_WINDOW", "config"),
    ("OrderStats", "pool"),
    ("HintStats", "pool"),
    ("CaptureStats", "pool"),
    ("RECLAIM_STALL_ROUNDS", "pool"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/pool/alloc.rs` -> `pool::alloc`; `src/shard/mod.rs` -> `shard`.
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<_> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p != "mod")
        .collect();
    parts.join("::")
}

/// The unit (an entry of [`LAYERS`]) a module path belongs to: its longest listed prefix.
fn unit_of(path: &str) -> Option<(&'static str, u32)> {
    LAYERS
        .iter()
        .filter(|(unit, _)| path == *unit || path.starts_with(&format!("{unit}::")))
        .max_by_key(|(unit, _)| unit.len())
        .copied()
}

/// The code of a file without comments (line comments, doc comments, block comments).
fn code_only(text: &str) -> String {
    let mut out = String::new();
    let mut in_block = 0;
    for line in text.lines() {
        let mut line = line;
        if in_block > 0 {
            match line.find("*/") {
                Some(end) => {
                    in_block -= 1;
                    line = &line[end + 2..];
                }
                None => continue,
            }
        }
        if let Some(start) = line.find("/*") {
            in_block += 1;
            line = &line[..start];
        }
        if let Some(start) = line.find("//") {
            line = &line[..start];
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every path named after `crate::`, with brace groups expanded one level:
/// `crate::{a::b, c}` gives `a::b` and `c`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    paths.push(item.split_whitespace().next().unwrap().to_string());
                }
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(after.len());
            paths.push(after[..end].trim_end_matches(':').to_string());
        }
        rest = after;
    }
    paths
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut edges: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for file in &files {
        let module = module_path(&src, file);
        if module == "lib" {
            continue; // the root declares and re-exports every layer
        }
        let (unit, rank) = unit_of(&module)
            .unwrap_or_else(|| panic!("{module}: not in any layer; add it to LAYERS"));
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for path in crate_paths(&code) {
            let first = path.split("::").next().unwrap_or("");
            if first.is_empty() || ROOT_ITEMS.contains(&first) {
                continue;
            }
            let target = match REEXPORTS.iter().find(|(name, _)| *name == first) {
                Some(&(_, unit)) => unit.to_string(),
                None => path.clone(),
            };
            let Some((target_unit, target_rank)) = unit_of(&target) else {
                violations.push(format!("{module}: `crate::{path}` names no known layer"));
                continue;
            };
            if target_unit == unit {
                continue;
            }
            edges.entry(unit).or_default().insert(target_unit);
            if target_rank >= rank {
                violations.push(format!(
                    "{module} (layer {unit}) uses `crate::{path}` (layer {target_unit}), which is not below it"
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward or sideways imports:\n{}",
        violations.join("\n")
    );
    // Print the picture the docs describe, for a reader running the test with --nocapture.
    for (unit, uses) in &edges {
        println!(
            "{unit} -> {}",
            uses.iter().copied().collect::<Vec<_>>().join(", ")
        );
    }
}

#[test]
fn the_checker_sees_paths_in_use_groups_and_expressions() {
    let code = code_only(
        "use crate::{pool::PoolCore, FRAME_SIZE};\n// crate::front::x\nlet a = crate::sync::now_ms();",
    );
    assert_eq!(
        crate_paths(&code),
        vec!["pool::PoolCore", "FRAME_SIZE", "sync::now_ms"]
    );
    assert_eq!(unit_of("policy::hint::pass"), Some(("policy::hint", 6)));
    assert_eq!(unit_of("front::global::init"), Some(("front::global", 13)));
    assert_eq!(unit_of("slab::heap"), Some(("slab", 9)));
}
