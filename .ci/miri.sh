#!/usr/bin/env bash
# Runs the tests of the unsafe core (tests/miri_core.rs) and of the small-object layer
# (tests/miri_slab.rs) under Miri, on a heap-backed region. Needs the nightly toolchain
# with the miri component:
#   rustup component add --toolchain nightly miri
# Without it, prints why and exits 0, so CI passes on machines without nightly.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rustup >/dev/null 2>&1; then
    echo "miri: skipped: rustup is not installed"
    exit 0
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^miri'; then
    echo "miri: skipped: the nightly toolchain or its miri component is not installed" \
        "(rustup component add --toolchain nightly miri)"
    exit 0
fi

# Miri keeps its own build products, apart from normal and loom builds.
export CARGO_TARGET_DIR="${MIRI_TARGET_DIR:-$PWD/target/miri}"
# The heap advisor turns a frame address back into a pointer; the address was exposed by
# the pool, so permissive provenance is the honest model (and silences the warning).
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-permissive-provenance}"
start=$(date +%s)
cargo +nightly miri setup
cargo +nightly miri test --test miri_core --test miri_slab
echo "miri: passed in $(( $(date +%s) - start )) s"
