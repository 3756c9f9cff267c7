#!/usr/bin/env bash
# The benchmark: installs what is missing, builds in release mode and runs
# kanava-bench, which writes benches/RESULTS.md and benches/results.json
# (about 35 minutes with the soak, `--soak-minutes 0` skips it; `--quick`
# for a run of seconds). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "==> building Kanava (release)"
cargo build --locked --release --workspace --bins --quiet
exec target/release/kanava-bench "$@"
