#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 30), one after another, and prints the
# executions each made. Crashes fail the run and leave their input under fuzz/artifacts/.
# New corpus entries go to target/fuzz-corpus/, never into the committed seeds (fuzz/corpus/).
# The pinned stable toolchain builds the sanitizer flags with RUSTC_BOOTSTRAP=1 (no nightly is
# fetched on these machines). Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# FUZZ_QUICK=1 (the test command's short pass) builds without optimization or AddressSanitizer:
# about 3 minutes to build on 2 cores instead of 10; the long runs use the release ASan build.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
if ! command -v cargo-fuzz >/dev/null; then
  cargo install --locked cargo-fuzz@0.13.2
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then mapfile -t targets < <(cargo fuzz list); fi
if [[ ${FUZZ_QUICK:-0} == 1 ]]; then
  flags=(--dev --sanitizer none --target-dir ../target/fuzz-quick)
else
  flags=(-O)
fi
cargo fuzz build "${flags[@]}"
# The targets' temporary directories (the ingest target's node data directory) go under one
# directory of this run, removed at exit: a target stopped at its time limit cannot remove its own.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  work=../target/fuzz-corpus/$t
  mkdir -p "$work"
  log=../target/fuzz-${FUZZ_QUICK:+quick-}$t.log
  if ! TMPDIR=$scratch cargo fuzz run "${flags[@]}" "$t" "$work" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed; input saved under fuzz/artifacts/$t/" >&2
    exit 1
  fi
  stats=$(grep -E '^Done [0-9]+ runs|stat::number_of_executed_units' "$log" | tail -1)
  echo "fuzz $t: ${seconds}s: $stats"
done
