#!/usr/bin/env bash
# Runs a third-party crate's own test suite with pagepool::PoolAlloc as the global
# allocator of every test binary, and checks that PoolAlloc really served requests.
#
# What it does, in a temporary folder (nothing is written into this repository):
#   1. fetches the crate's published source at a pinned version through cargo (a scratch
#      project depending on it, `cargo fetch`), and copies it out of cargo's registry;
#   2. patches the copy: appends to its src/lib.rs
#        #[global_allocator] pub static PAGEPOOL_ALLOC: pagepool::PoolAlloc = PoolAlloc::new();
#      (a global allocator declared in a library applies to every binary linking it, so
#      all of the crate's test binaries use it) plus one unit test that allocates 1 MiB
#      and asserts the block came from the pool and the pool's counter grew; and adds
#      `pagepool = { path = <this repository> }` to its [dependencies];
#   3. runs the crate's `cargo test` under a time limit; fails if it fails, times out, or
#      the allocator check did not run and pass.
#
# Needs only cargo and access to crates.io. Settings (environment):
#   CRATE, VERSION          the crate [hashbrown 0.15.5]; its library must be src/lib.rs.
#                           Also checked: regex-syntax 0.8.12, indexmap 2.14.2.
#   TEST_ARGS               arguments of `cargo test` [hashbrown: --features rayon,serde,
#                           so its rayon and serde tests run too; other crates: none.
#                           --lib runs the unit tests only]
#   TIME_LIMIT              seconds for `cargo test` (build included) [900]
#   MIN_POOL_SIZE           if set, appended as `.min_pool_size(N)`: 1 sends every
#                           request to the pool instead of only those of 2 KiB and more
#   WORK_DIR                where to work [a new temporary folder, removed at the end]
#   KEEP_WORK_DIR=1         keep the folder
#   CARGO_TARGET_DIR        reuse a build folder between runs [inside WORK_DIR]
set -euo pipefail

repo=$(cd "$(dirname "$0")/../../.." && pwd)
crate=${CRATE:-hashbrown}
version=${VERSION:-0.15.5}
if [ "$crate" = hashbrown ]; then
    test_args=${TEST_ARGS---features rayon,serde}
else
    test_args=${TEST_ARGS:-}
fi
limit=${TIME_LIMIT:-900}
start=$(date +%s)
say() { echo "thirdparty: $* ($(( $(date +%s) - start )) s)"; }

work=${WORK_DIR:-$(mktemp -d -t pagepool-thirdparty.XXXXXX)}
if [ -z "${WORK_DIR:-}" ] && [ "${KEEP_WORK_DIR:-0}" != 1 ]; then
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$work/target}

# 1. Fetch the published source.
fetch="$work/fetch"
mkdir -p "$fetch/src"
cat > "$fetch/Cargo.toml" <<TOML
[package]
name = "pagepool-thirdparty-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$crate = "=$version"

[workspace]
TOML
: > "$fetch/src/lib.rs"
say "fetching $crate $version"
cargo fetch --quiet --manifest-path "$fetch/Cargo.toml"
cargo_home=${CARGO_HOME:-$HOME/.cargo}
src=""
for d in "$cargo_home"/registry/src/*/"$crate-$version"; do
    if [ -f "$d/Cargo.toml" ]; then src=$d; break; fi
done
if [ -z "$src" ]; then
    echo "thirdparty: $crate-$version not found under $cargo_home/registry/src" >&2
    exit 1
fi
copy="$work/$crate-$version"
rm -rf "$copy"
cp -r "$src" "$copy"
chmod -R u+w "$copy"
lib="$copy/src/lib.rs"
if [ ! -f "$lib" ]; then
    echo "thirdparty: $crate has no src/lib.rs" >&2
    exit 1
fi

# 2. Patch the copy.
init="pagepool::PoolAlloc::new()"
if [ -n "${MIN_POOL_SIZE:-}" ]; then
    init="$init.min_pool_size($MIN_POOL_SIZE)"
fi
cat >> "$lib" <<RUST

/// The global allocator of every binary linking this crate: pagepool's \`PoolAlloc\`
/// (added by pagepool's benches/apps/thirdparty/run.sh; not part of $crate).
#[doc(hidden)]
#[global_allocator]
pub static PAGEPOOL_ALLOC: pagepool::PoolAlloc = $init;

#[cfg(test)]
mod pagepool_allocator_check {
    extern crate std;

    #[test]
    fn pagepool_serves_this_test_binary() {
        let before = crate::PAGEPOOL_ALLOC.stats().pool_allocs;
        let block = self::std::vec![7u8; 1 << 20];
        assert!(
            crate::PAGEPOOL_ALLOC.contains(block.as_ptr()),
            "a 1 MiB vector comes from the pool"
        );
        assert!(crate::PAGEPOOL_ALLOC.stats().pool_allocs > before);
        self::std::eprintln!("{}", crate::PAGEPOOL_ALLOC.stats());
    }
}
RUST
cat >> "$copy/Cargo.toml" <<TOML

[dependencies.pagepool]
path = "$repo"
TOML
# The same check as an integration test, so integration test binaries prove it too.
lib_name=${crate//-/_}
if [ -d "$copy/tests" ] || grep -q '^autotests = false' "$copy/Cargo.toml"; then
    mkdir -p "$copy/tests"
    cat > "$copy/tests/pagepool_allocator_check.rs" <<RUST
//! Added by pagepool's benches/apps/thirdparty/run.sh: this binary links $crate, so its
//! global allocator is pagepool's.
#[test]
fn pagepool_serves_integration_tests() {
    let block = vec![7u8; 1 << 20];
    assert!($lib_name::PAGEPOOL_ALLOC.contains(block.as_ptr()));
}
RUST
    if grep -q '^autotests = false' "$copy/Cargo.toml"; then
        cat >> "$copy/Cargo.toml" <<TOML

[[test]]
name = "pagepool_allocator_check"
path = "tests/pagepool_allocator_check.rs"
TOML
    fi
fi
# Start from the repository's lock file, so pagepool's own dependencies are the tested ones.
cp "$repo/Cargo.lock" "$copy/Cargo.lock"

# 3. The crate's own tests.
say "running cargo test $test_args in $copy (limit ${limit} s)"
log="$work/test.log"
rc=0
# shellcheck disable=SC2086 # TEST_ARGS is a list of arguments
timeout "$limit" cargo test --manifest-path "$copy/Cargo.toml" $test_args 2>&1 \
    | tee "$log" || rc=$?
if [ "$rc" -eq 124 ]; then
    say "FAILED: cargo test ran past ${limit} s"
    exit 1
elif [ "$rc" -ne 0 ]; then
    say "FAILED: cargo test exited with $rc"
    exit 1
fi
if ! grep -q "pagepool_serves_this_test_binary ... ok" "$log"; then
    say "FAILED: the allocator check did not run"
    exit 1
fi
if [ -f "$copy/tests/pagepool_allocator_check.rs" ] && [[ " $test_args " != *" --lib "* ]] \
    && ! grep -q "pagepool_serves_integration_tests ... ok" "$log"; then
    say "FAILED: the integration-test allocator check did not run"
    exit 1
fi
passed=$(grep -Eo "test result: ok\. [0-9]+ passed" "$log" | awk '{s += $4} END {print s + 0}')
say "passed: $crate $version, $passed tests with pagepool::PoolAlloc as the global allocator"
