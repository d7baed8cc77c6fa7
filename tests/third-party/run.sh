#!/usr/bin/env bash
# Third-party crates' own test suites with `PoolAlloc` as the global allocator of every
# test binary:
# - regex-syntax (a regex parser: ASTs, HIRs, Unicode class tables, string building;
#   its unit tests);
# - indexmap (hash maps and sets in insertion order: its unit tests and its integration
#   tests, among them quickcheck properties over random operation sequences).
#
#   tests/third-party/run.sh
#   PAGEPOOL_CPU_CACHE=portable tests/third-party/run.sh
#
# How: cargo fetches each crate's published source (from its cache, else crates.io) at a
# pinned version; the script copies it, adds pagepool as a dependency and a
# `#[global_allocator]` static to the crate's library, so every binary that links the
# library allocates through the pool, plus one unit test that checks so. The crates' own
# code and tests are unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="${PAGEPOOL_THIRD_PARTY_DIR:-${TMPDIR:-/tmp}/pagepool-third-party}"
export CARGO_TARGET_DIR="${PAGEPOOL_THIRD_PARTY_TARGET:-$work/target}"
mkdir -p "$work"

# The published source of `$1` version `$2`, copied to $work/$1 (writable).
fetch() {
    local crate=$1 version=$2
    rm -rf "$work/fetch" "$work/$crate"
    mkdir -p "$work/fetch/src"
    printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n%s = "=%s"\n\n[workspace]\n' \
        "$crate" "$version" > "$work/fetch/Cargo.toml"
    touch "$work/fetch/src/lib.rs"
    (cd "$work/fetch" && cargo fetch --quiet)
    local src
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$crate-$version" | head -n 1)
    if [ ! -f "$src/Cargo.toml" ]; then
        echo "third-party: could not find the source of $crate $version after cargo fetch" >&2
        exit 1
    fi
    cp -r "$src" "$work/$crate"
    chmod -R u+w "$work/$crate"
    rm -f "$work/$crate/Cargo.lock"
}

# Makes PoolAlloc the global allocator of every binary that links crate `$1`'s library.
install_pool() {
    local dir="$work/$1"
    printf '\n[dependencies.pagepool]\npath = "%s"\n\n[workspace]\n' "$root" >> "$dir/Cargo.toml"
    # Both crates are no_std and deny unsafe code; the static needs neither.
    cat >> "$dir/src/lib.rs" <<'RUST'

/// Added by pagepool's tests/third-party/run.sh: every allocation of every binary that
/// links this library goes through the pool.
#[global_allocator]
static PAGEPOOL_GLOBAL: pagepool::PoolAlloc = pagepool::PoolAlloc::new();

#[cfg(test)]
mod pagepool_is_the_global_allocator {
    extern crate std;
    use std::vec;

    #[test]
    fn objects_and_pages_come_from_the_pool() {
        for len in [16usize, 200, 3000, 40_000, 300_000] {
            let v = vec![7u8; len];
            assert!(super::PAGEPOOL_GLOBAL.contains(v.as_ptr()), "{len} bytes");
        }
    }
}
RUST
}

# Runs `cargo test --release $3...` in crate `$1`'s copy and checks every suite passed.
suite() {
    local crate=$1 version=$2
    shift 2
    fetch "$crate" "$version"
    install_pool "$crate"
    echo "third-party: $crate $version's own tests ($*), PoolAlloc as the global allocator"
    local log="$work/$crate.log"
    if ! (cd "$work/$crate" && cargo test --release "$@") > "$log" 2>&1; then
        grep -E "panicked|FAILED|^error" "$log" | head -20 >&2 || true
        echo "third-party: $crate's tests failed under PoolAlloc (full log: $log)" >&2
        exit 1
    fi
    if ! grep -q "pagepool_is_the_global_allocator::objects_and_pages_come_from_the_pool ... ok" "$log"; then
        echo "third-party: $crate: the check that PoolAlloc served the tests did not run" >&2
        exit 1
    fi
    grep -E "^test result: ok" "$log" | awk -v c="$crate" \
        '{ n += $4 } END { printf "third-party: %s: %d tests passed in %d test binaries\n", c, n, NR }'
}

suite regex-syntax 0.8.12 --lib
suite indexmap 2.14.2 --lib --tests
