#!/usr/bin/env bash
# QEMU end to end, first stage: a real QEMU (10.1+, vfio-user-pci) realizes
# the dma-engine device against vfio-user-server, the firmware enumerates
# and programs it, the core's compat IOAS holds QEMU's guest-RAM mappings,
# a system reset goes through, and QEMU's exit leaves nothing behind.
#
# Bookworm's QEMU (7.2) has no vfio-user client, so the script makes a
# Debian trixie root with debootstrap and installs QEMU from trixie-backports
# into it, all from Debian's archive, cached in $IOASID_QEMU_CACHE (default
# /var/cache/ioasid-qemu) so that a second run skips the downloads. QEMU runs
# from that root through the root's own loader, without a chroot.
#
# Usage: scripts/qemu-e2e.sh            (as root; prints PASS or FAIL)
set -euo pipefail

cd "$(dirname "$0")/.."
cache=${IOASID_QEMU_CACHE:-/var/cache/ioasid-qemu}
root=$cache/trixie
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "qemu-e2e: $*"; }
fail() { echo "qemu-e2e: FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and /dev/kvm checks need it)"

if [ ! -x "$root/usr/bin/qemu-system-x86_64" ]; then
    say "making a trixie root with QEMU from trixie-backports in $root (downloads, once)"
    command -v debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
    mkdir -p "$cache"
    rm -rf "$root.tmp"
    debootstrap --variant=minbase trixie "$root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || fail "debootstrap failed; see $cache/debootstrap.log"
    echo "deb $mirror trixie-backports main" >"$root.tmp/etc/apt/sources.list.d/backports.list"
    chroot "$root.tmp" apt-get update -q >"$cache/apt.log" 2>&1 || fail "apt-get update in the root failed"
    chroot "$root.tmp" apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 \
        >>"$cache/apt.log" 2>&1 || fail "installing qemu-system-x86 failed; see $cache/apt.log"
    mv "$root.tmp" "$root"
fi
qemu() {
    "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
}
version=$(qemu --version | head -n 1)
say "$version"

cargo build --release --locked --bins -p iommu_core -p vfio_user_server >/dev/null 2>&1 || fail "cargo build failed"
work=$(mktemp -d /tmp/ioasid-qemu-e2e.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

target/release/iommu-core --socket "$work/core.sock" 2>"$work/core.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/core.sock" ] && break; sleep 0.05; done
target/release/vfio-user-server dma-engine --socket-path "$work/dev.sock" --core "$work/core.sock" 2>"$work/dev.log" &
server=$!
pids+=($server)
for _ in $(seq 100); do [ -S "$work/dev.sock" ] && break; sleep 0.05; done
[ -S "$work/dev.sock" ] || fail "vfio-user-server did not start: $(cat "$work/dev.log")"

accel=tcg
# KVM only where it really runs a guest here (a paravirtual /dev/kvm may not).
if [ -w /dev/kvm ] && [ "${IOASID_QEMU_KVM:-0}" = 1 ]; then accel=kvm; fi

mkfifo "$work/mon.in"
qemu -machine q35,accel=$accel -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
    -device '{"driver":"vfio-user-pci","socket":{"path":"'"$work/dev.sock"'","type":"unix"}}' \
    -display none -monitor stdio <"$work/mon.in" >"$work/qemu.out" 2>&1 &
qpid=$!
pids+=($qpid)
exec 3>"$work/mon.in"

# Firmware runs: it sizes and programs the BARs.
sleep 4
echo "info pci" >&3
sleep 1
grep -q "PCI device 1b36:d3a0" "$work/qemu.out" || fail "QEMU does not show the dma-engine: $(cat "$work/qemu.out")"
grep -A6 "PCI device 1b36:d3a0" "$work/qemu.out" | grep -q "BAR0: 32 bit memory at 0x" \
    || fail "the firmware did not program BAR0: $(grep -A6 1b36:d3a0 "$work/qemu.out")"
status=$(target/release/ioasidctl --socket "$work/core.sock" status)
echo "$status" | grep -q "0x100000-" || fail "the compat IOAS holds no guest RAM: $status"
maps=$(echo "$status" | grep -cE '^ +0x[0-9a-f]+-0x[0-9a-f]+ ')
say "compat IOAS holds $maps mappings of QEMU's guest RAM"
echo "system_reset" >&3
sleep 2
echo "quit" >&3
exec 3>&-
for _ in $(seq 100); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$qpid" 2>/dev/null && fail "QEMU did not quit"
if grep -qiE "vfio-user.*(error|fail)|error:" "$work/qemu.out"; then
    fail "QEMU reported: $(grep -iE 'error|fail' "$work/qemu.out")"
fi
# QEMU's exit: the server released its DMA and keeps serving.
sleep 0.5
status=$(target/release/ioasidctl --socket "$work/core.sock" status)
echo "$status" | grep -q "0x100000-" && fail "guest RAM is still mapped after QEMU left"
kill -TERM "$server"
wait "$server" || fail "vfio-user-server did not exit cleanly on SIGTERM"
[ -e "$work/dev.sock" ] && fail "the server left its socket behind"
say "PASS ($version, accel $accel: realize, firmware BAR programming, guest RAM in the compat IOAS, reset, clean exit)"
