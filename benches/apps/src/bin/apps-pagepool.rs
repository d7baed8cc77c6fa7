//! The workloads under `pagepool::PoolAlloc`, used as documented: installed as the global
//! allocator, with the background hinter started first thing in `main`.
//!
//! With `PAGEPOOL_APPS_POOL=off` in the environment the adapter sends every request to
//! the system allocator (`set_pool_enabled(false)`): what is left is the cost of the
//! adapter's routing (the runner's `pagepool-off` variant).

use pagepool::PoolAlloc;
use serde_json::Value;

#[global_allocator]
static A: PoolAlloc = PoolAlloc::new();

fn main() {
    if std::env::var_os("PAGEPOOL_APPS_POOL").is_some_and(|v| v == "off") {
        A.set_pool_enabled(false);
    }
    A.start_hinter().expect("start the pagepool hinter");
    pagepool_apps::main("pagepool", &|| {
        let s = A.stats();
        let mut fields: Vec<(&'static str, Value)> = vec![
            ("pool_allocs", s.pool_allocs.into()),
            ("pool_frees", s.pool_frees.into()),
            ("pool_too_large", s.too_large.into()),
            ("pool_exhausted", s.exhausted.into()),
            ("pool_grown_in_place", s.grown_in_place.into()),
            (
                "pool_moved",
                (s.moved_within_pool + s.moved_to_pool + s.moved_to_fallback).into(),
            ),
        ];
        if let Some(p) = A.pool_stats() {
            fields.push(("pool_allocated_kib", (p.allocated_bytes >> 10).into()));
            fields.push(("pool_hinted_kib", (p.hinted_bytes >> 10).into()));
        }
        fields
    });
}
