#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first.
# Used as is by .ci/run; safe to run by hand from any directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

need_rust="1.87"
if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is not installed; this project needs Rust $need_rust or newer (rustup's stable toolchain)." >&2
  exit 1
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$need_rust" "$have" | sort -V | head -1)" != "$need_rust" ]; then
  echo "test.sh: rustc $have is older than the $need_rust this project needs." >&2
  exit 1
fi

# The multi-process tests use memfd, SCM_RIGHTS and Unix sockets only: no
# packages beyond the toolchain are needed yet.
cargo test --workspace --locked
