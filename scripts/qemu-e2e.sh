#!/usr/bin/env bash
# QEMU end to end: a real QEMU (10.1+, vfio-user-pci) with the dma-engine
# of vfio-user-server.
#   1. Firmware only: QEMU realizes the device, the firmware programs its
#      BARs, the core's compat IOAS holds QEMU's guest-RAM mappings, a
#      system reset goes through, QEMU's exit leaves nothing mapped.
#   2. A Linux guest (Debian's kernel, busybox, and scripts/guest/engine-test.c
#      built static) finds the device in sysfs, maps its BARs, and runs
#      copies, fills, compares and CRC-32C by RID DMA, checking each; then a
#      reset (reboot) and the same again; then a boot that, after the same
#      checks, keeps copying while iommu-core is killed (SIGKILL) and a new
#      one started on the same socket: the device server reconnects and
#      rebuilds its compat IOAS from QEMU's DMA table, and the guest's
#      copies work again with nothing done by QEMU (scripts/guest/engine-test.c
#      says what the guest sees meanwhile); then poweroff.
# The script exits 0 only if every check passes, and prints the vfio-user
# commands QEMU sent, with counts.
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
    ok=""
    for attempt in 1 2 3; do
        rm -rf "$root.tmp"
        if debootstrap --variant=minbase trixie "$root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1; then
            ok=yes
            break
        fi
        say "debootstrap attempt $attempt failed; retrying"
        sleep 5
    done
    [ -n "$ok" ] || fail "debootstrap failed three times; see $cache/debootstrap.log"
    echo "deb $mirror trixie-backports main" >"$root.tmp/etc/apt/sources.list.d/backports.list"
    chroot "$root.tmp" apt-get update -q >"$cache/apt.log" 2>&1 || fail "apt-get update in the root failed"
    chroot "$root.tmp" apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 \
        >>"$cache/apt.log" 2>&1 || fail "installing qemu-system-x86 failed; see $cache/apt.log"
    mv "$root.tmp" "$root"
fi
if ! ls "$root"/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -x "$root/bin/busybox" ]; then
    say "installing Debian's kernel and busybox into the root (once)"
    chroot "$root" apt-get install -y -q --no-install-recommends linux-image-amd64 busybox-static \
        >>"$cache/apt.log" 2>&1 || fail "installing the kernel and busybox failed; see $cache/apt.log"
fi
kernel=$(ls "$root"/boot/vmlinuz-* | head -n 1)
# exec: run in the background, the job's pid is QEMU's own.
qemu() {
    exec "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
}
version=$( (qemu --version) | head -n 1)
say "$version"

cargo build --release --locked --bins -p iommu_core -p vfio_user_server -p fuse_fs >/dev/null 2>&1 || fail "cargo build failed"
work=$(mktemp -d /tmp/ioasid-qemu-e2e.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# After QEMU leaves, the server must unmap its guest RAM (within 5 s).
no_guest_ram_left() {
    for _ in $(seq 50); do
        target/release/ioasidctl --socket "$work/core.sock" status | grep -q "0x100000-" || return 0
        sleep 0.1
    done
    fail "guest RAM is still mapped after QEMU left"
}

target/release/iommu-core --socket "$work/core.sock" 2>"$work/core.log" &
core=$!
pids+=($core)
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
(qemu -machine q35,accel=$accel -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
    -device '{"driver":"vfio-user-pci","socket":{"path":"'"$work/dev.sock"'","type":"unix"}}' \
    -display none -monitor stdio <"$work/mon.in" >"$work/qemu.out" 2>&1) &
qpid=$!
pids+=($qpid)
exec 3>"$work/mon.in"

# Firmware runs: it sizes and programs the BARs (asked every second, 60 s
# at most, so that a slow machine is not a failure).
programmed=""
for _ in $(seq 60); do
    sleep 1
    echo "info pci" >&3
    sleep 0.3
    if grep -A6 "PCI device 1b36:d3a0" "$work/qemu.out" | grep -q "BAR0: 32 bit memory at 0x"; then
        programmed=yes
        break
    fi
    kill -0 "$qpid" 2>/dev/null || break
done
grep -q "PCI device 1b36:d3a0" "$work/qemu.out" || fail "QEMU does not show the dma-engine: $(cat "$work/qemu.out")"
[ -n "$programmed" ] || fail "the firmware did not program BAR0: $(grep -A6 1b36:d3a0 "$work/qemu.out" | tail -n 7)"
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
no_guest_ram_left
kill -TERM "$server"
wait "$server" || fail "vfio-user-server did not exit cleanly on SIGTERM"
[ -e "$work/dev.sock" ] && fail "the server left its socket behind"
say "stage 1 passed: realize, firmware BAR programming, guest RAM in the compat IOAS, reset, clean exit"
grep -o "the client sent: .*" "$work/dev.log" | tail -n 1 | sed 's/^/qemu-e2e: stage 1: /'

# Stage 2: a Linux guest drives the device.
command -v gcc >/dev/null || { apt-get update -q && apt-get install -y -q gcc libc6-dev; }
gcc -static -O2 -o "$work/engine-test" scripts/guest/engine-test.c || fail "cannot build the guest program"
mkdir -p "$work/irfs/bin" "$work/irfs/proc" "$work/irfs/sys" "$work/irfs/dev"
cp "$root/bin/busybox" "$work/irfs/bin/busybox"
cp "$work/engine-test" "$work/irfs/engine-test"
cat >"$work/irfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
if grep -q ioasid_restart /proc/cmdline; then /engine-test restart; else /engine-test; fi
echo "ENGINE-TEST DONE"
# Reboot (QEMU resets the machine and the device; the test runs again),
# or power off when asked to.
if grep -q ioasid_poweroff /proc/cmdline; then poweroff -f; fi
reboot -f
INIT
chmod +x "$work/irfs/init"
(cd "$work/irfs" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip >"$work/initrd.gz")

target/release/vfio-user-server dma-engine --socket-path "$work/dev2.sock" --core "$work/core.sock" 2>"$work/dev2.log" &
server2=$!
pids+=($server2)
for _ in $(seq 100); do [ -S "$work/dev2.sock" ] && break; sleep 0.05; done
guest_boot() {
    exec "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" \
        -machine q35,accel=$accel -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        -device '{"driver":"vfio-user-pci","socket":{"path":"'"$work/dev2.sock"'","type":"unix"}}' \
        -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1 $1" \
        -nographic -monitor none
}
mkdir -p "$work/mnt"
target/release/ioasid-fs --core "$work/core.sock" "$work/mnt" 2>"$work/fs.log" &
fs=$!
pids+=($fs)
start=$(date +%s%N)
(guest_boot "" >"$work/guest.log" 2>&1) &
guest=$!
pids+=($guest)
t1=""
checked=""
for _ in $(seq 1200); do
    passes=$(grep -ac "ENGINE-TEST PASS" "$work/guest.log" || true)
    if [ -z "$t1" ] && [ "$passes" -ge 1 ]; then
        t1=$(( ($(date +%s%N) - start) / 1000000 ))
    fi
    if [ -z "$checked" ] && [ "$passes" -ge 1 ]; then
        # While the guest runs: its RAM in the compat IOAS, in ioasidctl and
        # in the file system.
        target/release/ioasidctl --socket "$work/core.sock" status | grep -qE -- "-0x1fffffff +" \
            || fail "ioasidctl status does not show the guest RAM in the compat IOAS: $(target/release/ioasidctl --socket "$work/core.sock" status)"
        cat "$work"/mnt/ioas/*/mappings 2>/dev/null | grep -q -- "-0x1fffffff " \
            || fail "ioasid-fs does not show the guest's RAM mappings"
        checked=yes
    fi
    [ "$passes" -ge 2 ] && break
    grep -aq "ENGINE-TEST FAIL" "$work/guest.log" && break
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.1
done
grep -a "ENGINE-TEST" "$work/guest.log" | sed 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/'
[ "$(grep -ac 'ENGINE-TEST PASS' "$work/guest.log")" -ge 2 ] \
    || fail "the guest test did not pass before and after a reboot: $(tail -n 20 "$work/guest.log")"
# QEMU exits on SIGTERM, closing the socket without unmapping.
kill -TERM "$guest"
wait "$guest" || true
# A guest that passes, then copies while the core is restarted, then powers
# off: QEMU exits by itself.
(guest_boot "ioasid_poweroff ioasid_restart" >"$work/guest2.log" 2>&1) &
guest=$!
pids+=($guest)
ms() { echo $(( $(date +%s%N) / 1000000 )); }
for _ in $(seq 1200); do
    grep -aq "ENGINE-TEST RESTART READY" "$work/guest2.log" && break
    grep -aq "ENGINE-TEST FAIL" "$work/guest2.log" && break
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.1
done
grep -aq "ENGINE-TEST RESTART READY" "$work/guest2.log" \
    || fail "the guest did not get to its restart phase: $(tail -n 20 "$work/guest2.log")"
# The guest copies; the core dies under it. One second without a core, then
# a new one on the same socket (the server polls for it: 50 ms, doubling up
# to 1 s).
{ kill -KILL "$core"; wait "$core"; } 2>/dev/null || true
# Its pid may be reused: cleanup must not signal it.
alive=()
for p in "${pids[@]}"; do [ "$p" = "$core" ] || alive+=("$p"); done
pids=("${alive[@]}")
t_kill=$(ms)
sleep 1
target/release/iommu-core --socket "$work/core.sock" 2>"$work/core2.log" &
core=$!
pids+=($core)
for _ in $(seq 200); do
    target/release/ioasidctl --socket "$work/core.sock" status >/dev/null 2>&1 && break
    sleep 0.01
done
t_new=$(ms)
t_back=""
for _ in $(seq 3000); do
    if grep -aq "ENGINE-TEST RESTART RECOVERED" "$work/guest2.log"; then t_back=$(ms); break; fi
    grep -aq "ENGINE-TEST FAIL" "$work/guest2.log" && break
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.02
done
[ -n "$t_back" ] || fail "the guest's DMA did not come back after the core restart: $(tail -n 20 "$work/guest2.log"; tail -n 5 "$work/dev2.log")"
# The new core holds the guest's RAM in the server's rebuilt compat IOAS.
target/release/ioasidctl --socket "$work/core.sock" status | grep -qE -- "-0x1fffffff +" \
    || fail "the new core does not show the guest RAM in the compat IOAS: $(target/release/ioasidctl --socket "$work/core.sock" status)"
for _ in $(seq 1200); do kill -0 "$guest" 2>/dev/null || break; sleep 0.1; done
kill -0 "$guest" 2>/dev/null && fail "QEMU did not exit after the guest powered off"
wait "$guest" || fail "QEMU exited with status $? after the guest powered off: $(tail -n 5 "$work/guest2.log")"
grep -aq "ENGINE-TEST PASS" "$work/guest2.log" || fail "the guest test failed: $(tail -n 20 "$work/guest2.log")"
grep -aq "ENGINE-TEST RESTART PASS" "$work/guest2.log" \
    || fail "the guest's copies across the core restart failed: $(tail -n 20 "$work/guest2.log")"
grep -a "ENGINE-TEST RESTART" "$work/guest2.log" | sed 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/'
grep -o "reconnected to the core .* without one" "$work/dev2.log" | head -n 1 | sed 's/^/qemu-e2e: server: /'
restart="core killed, new core answering $((t_new - t_kill)) ms later; the guest's DMA back $((t_back - t_new)) ms after that (host clock, 20 ms polling)"
say "$restart"
kill -TERM "$fs"
wait "$fs" || fail "ioasid-fs did not unmount cleanly"
grep -q " $work/mnt " /proc/mounts && fail "ioasid-fs left its mount behind"
no_guest_ram_left
kill -TERM "$server2"
wait "$server2" || fail "the second vfio-user-server did not exit cleanly"
[ -e "$work/dev2.sock" ] && fail "the server left its socket behind"
grep -o "the client sent: .*" "$work/dev2.log" | head -n 1 | sed 's/^/qemu-e2e: guest boot: /'
say "PASS ($version, accel $accel; boot to the first PASS in ${t1} ms; passed again after a guest reboot, and in a guest that copied across a core restart and powered off; $restart)"
