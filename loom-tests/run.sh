#!/usr/bin/env bash
# Runs the loom models in loom-tests/tests/ against the real pagepool code built with
# --cfg loom (the `sync` facade swaps in loom's atomics, locks and threads).
#
#   loom-tests/run.sh                 # every model
#   loom-tests/run.sh capture         # only the models whose names contain "capture"
#
# LOOM_MAX_PREEMPTIONS (default 2) bounds the preemptions explored per execution; raise
# it for a deeper, much longer search. The build has its own target directory so that
# switching between normal and loom builds does not rebuild everything.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export RUSTFLAGS="--cfg loom ${RUSTFLAGS:-}"
# Debug assertions stay on: the models drive the real code, and its assertions check
# the protocols from inside.
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export CARGO_TARGET_DIR="${LOOM_TARGET_DIR:-$root/target/loom}"
start=$(date +%s)
cargo test -p pagepool-loom-tests --release -- "$@"
# In-crate models: src/percpu/loom_models.rs and src/slab/loom_models.rs.
cargo test -p pagepool --lib --release -- percpu slab
echo "loom: all models passed in $(( $(date +%s) - start )) s (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
