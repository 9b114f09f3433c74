#!/usr/bin/env bash
# Measures every performance figure of the stack in one run and prints one
# table (Markdown), each figure beside the reference it is judged against,
# measured in the same run: an echo server of the harness's own for round
# trips, memcpy of the same bytes for copies (benches/table.rs says how).
# Needs root and /dev/fuse for the file-system rows. Takes a few minutes.
#
#   scripts/bench.sh                      # every section
#   IOASID_BENCH_ONLY=rt,tu scripts/bench.sh   # some: rt many tu engine fs
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo build --release --locked --workspace --bins >&2
load=$(cut -d' ' -f1-3 /proc/loadavg)
echo "scripts/bench.sh on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load average before: $load"
echo
cargo bench --locked -p ioasid-stack --bench table -- --bench
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
