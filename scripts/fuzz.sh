#!/usr/bin/env bash
# Builds every cargo-fuzz target under fuzz/ and runs each for a bounded
# time: FUZZ_SECS seconds each (default 20), starting from the committed
# seeds in fuzz/seeds/<target>. Any crash, hang (-timeout) or allocation
# over -malloc_limit_mb fails the run and leaves the input in
# fuzz/artifacts/<target>/. Used by scripts/test.sh; by hand, FUZZ_SECS=600
# gives a longer run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# cargo fuzz needs nightly flags (-Zsanitizer); the stable toolchain takes
# them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
secs="${FUZZ_SECS:-20}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked --version 0.13.2
fi

cargo fuzz build
summary=()
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t" "seeds/$t"
  log="$(mktemp)"
  if ! cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -malloc_limit_mb=1024 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $t found a failure; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs="$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}')"
  cov="$(grep -a -o 'cov: [0-9]*' "$log" | tail -n 1 | awk '{print $2}')"
  summary+=("$t: ${runs:-?} executions in ${secs} s, ${cov:-?} edges covered, no failure")
  rm -f "$log"
done
printf 'fuzz.sh: %s\n' "${summary[@]}"
