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

# The file-system tests mount with FUSE: they need root and /dev/fuse (as CI
# has). Everything else uses memfd, SCM_RIGHTS and Unix sockets only.
cargo test --workspace --locked

# Fuzz targets: built with cargo fuzz and run briefly each (FUZZ_SECS).
scripts/fuzz.sh

# QEMU end to end: a Linux guest drives the dma-engine through QEMU's
# vfio-user-pci. The script fetches QEMU, a kernel and busybox from Debian's
# archive into /var/cache/ioasid-qemu (once) and needs root.
# The NVMe controller under the same QEMU: a Linux guest's own nvme driver,
# a file system made, checked across a reboot and on the host, and the
# controller beside QEMU's built-in NVMe.
if [ "$(id -u)" = 0 ]; then
  scripts/qemu-e2e.sh
  scripts/qemu-nvme-e2e.sh
else
  echo "test.sh: scripts/qemu-e2e.sh and scripts/qemu-nvme-e2e.sh need root; not run." >&2
fi
