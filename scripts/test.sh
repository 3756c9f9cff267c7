#!/usr/bin/env bash
# Installs what the tests need, builds every binary and runs the whole test
# suite: unit tests, and end-to-end tests on real network-namespace labs
# (those need root; they fail, not skip, without it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The end-to-end tests start the binaries (ztunnel, kanava-control-plane,
# labapp, kanava), so they are built first, in the same invocation as the
# tests: one feature resolution, so `cargo test` builds nothing twice.
cargo build --locked --workspace --bins --tests
cargo test --locked --workspace "$@"
