#!/usr/bin/env bash
# Runs Kanava's fuzz targets under libFuzzer (cargo-fuzz, nightly Rust).
#
#   scripts/fuzz.sh                   # every target, 10 million runs each (FUZZING.md)
#   scripts/fuzz.sh --runs N          # every target, N runs each
#   scripts/fuzz.sh --smoke           # every target for a few seconds, unoptimised (CI)
#   scripts/fuzz.sh --runs N TARGET   # one target
#
# New inputs that reach new code are added to fuzz/corpus/<target>/; commit
# them (after `cargo +nightly fuzz cmin TARGET` to keep the corpus small).
# The smoke run starts from the same corpus but keeps what it finds in a
# temporary directory, so a checkout is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=10000000
seconds=""
build=(-O --debug-assertions)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --smoke) seconds=5; build=(--dev); shift ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(handoff discovery identity csr policy_proto manifests lab_file upgrade)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "kanava fuzz: no nightly Rust toolchain; libFuzzer needs it (the replay test in fuzzing/ still runs every target on stable)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "kanava fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet
fi

for target in "${targets[@]}"; do
  if [ -n "$seconds" ]; then
    limit=(-max_total_time="$seconds")
  else
    limit=(-runs="$runs")
  fi
  echo "==> fuzzing $target (${limit[*]})"
  # Optimised, with debug assertions (-O alone turns them off). The smoke
  # run builds unoptimised (--dev, debug assertions on): it only shows that
  # every target builds and runs under libFuzzer, and an optimised build
  # took 11 of CI's 30 minutes, against 5. Sanitizer: address (the default).
  log=$(mktemp)
  corpus=()
  found=""
  if [ -n "$seconds" ]; then
    # libFuzzer adds new inputs to the first corpus directory it is given.
    found=$(mktemp -d)
    corpus=("$found" "fuzz/corpus/$target")
  fi
  status=0
  cargo +nightly fuzz run "${build[@]}" "$target" "${corpus[@]}" -- "${limit[@]}" -print_final_stats=1 >"$log" 2>&1 || status=$?
  if [ -n "$found" ]; then
    rm -rf "$found"
  fi
  grep -E "^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY)" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "kanava fuzz: $target failed (exit $status)" >&2
    exit "$status"
  fi
  rm -f "$log"
done
