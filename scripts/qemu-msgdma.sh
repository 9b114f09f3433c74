#!/usr/bin/env bash
# Reproduction aid for DMA through client messages: a Linux guest on plain
# QEMU RAM (no memory-backend, so QEMU's DMA_MAPs carry no fds and the
# server reaches guest memory with DMA_READ/DMA_WRITE), running
# `engine-test sizes`. On a copy without completion it captures every
# server thread's backtrace and QEMU's. Logs stay in $work.
# Not part of scripts/test.sh: its copies of 4 KiB to 16 MiB pass, but its
# rounds of queue disables during a copy still stall 5 s each and then lose
# the connection (the device thread waits for a DMA reply that QEMU serves
# only once the vCPU's register access was answered); that cycle is open.
# Usage: scripts/qemu-msgdma.sh   (as root; after `cargo build --release`)
# IOASID_QEMU_DEVPROPS='"x-msg-timeout":12000' adds JSON properties to the
# vfio-user-pci device; IOASID_QEMU_TRACE=vfio_user_send_write enables QEMU
# trace events (on its stderr, $work/qemu.err).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${IOASID_QEMU_CACHE:-/var/cache/ioasid-qemu}/trixie
kernel=$(ls "$root"/boot/vmlinuz-* | head -n 1)
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/ioasid-msgdma.XXXXXX)
echo "msgdma: logs in $work"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
gcc -static -O2 -o "$work/engine-test" scripts/guest/engine-test.c
mkdir -p "$work/irfs/bin" "$work/irfs/proc" "$work/irfs/sys" "$work/irfs/dev"
cp "$root/bin/busybox" "$work/irfs/bin/busybox"
cp "$work/engine-test" "$work/irfs/engine-test"
cat >"$work/irfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
/engine-test sizes
echo "ENGINE-TEST DONE"
poweroff -f
INIT
chmod +x "$work/irfs/init"
(cd "$work/irfs" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip >"$work/initrd.gz")

"$bin/iommu-core" --socket "$work/core.sock" 2>"$work/core.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/core.sock" ] && break; sleep 0.05; done
RUST_LOG=${RUST_LOG:-debug} "$bin/vfio-user-server" dma-engine --socket-path "$work/dev.sock" --core "$work/core.sock" 2>"$work/dev.log" &
server=$!
pids+=($server)
for _ in $(seq 100); do [ -S "$work/dev.sock" ] && break; sleep 0.05; done
"$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" \
    -machine q35,accel=tcg -m 512M \
    -device '{"driver":"vfio-user-pci"'"${IOASID_QEMU_DEVPROPS:+,$IOASID_QEMU_DEVPROPS}"',"socket":{"path":"'"$work/dev.sock"'","type":"unix"}}' \
    -kernel "$kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 hugepages=48" \
    -nographic -monitor none ${IOASID_QEMU_TRACE:+-trace "$IOASID_QEMU_TRACE"} >"$work/guest.log" 2>"$work/qemu.err" &
qpid=$!
pids+=($qpid)
captured=""
sampled=""
for _ in $(seq 6000); do
    # During the register-write phase: sample the server's threads until one
    # sample shows the device thread waiting for a queue step (at most 20).
    if [ -z "$sampled" ] && grep -aq "SIZE PARALLEL:" "$work/guest.log"; then
        sampled=yes
        for i in $(seq 20); do
            gdb -p "$server" -batch -ex 'thread apply all bt' >"$work/sample.txt" 2>&1 || true
            if grep -A12 '"vfio-user-devic"' "$work/sample.txt" | grep -q "void\|quiesce\|RwLock.*write"; then
                cp "$work/sample.txt" "$work/server-bt-stall.txt"
                gdb -p "$qpid" -batch -ex 'thread apply all bt' >"$work/qemu-bt-stall.txt" 2>&1 || true
                echo "msgdma: sample $i shows the device thread waiting for a queue step"
                break
            fi
            grep -aq "CTRL LOOP" "$work/guest.log" && break
            sleep 0.3
        done
    fi
    if [ -z "$captured" ] && grep -aq "NO COMPLETION" "$work/guest.log"; then
        captured=yes
        sleep 2
        echo "msgdma: capturing threads"
        gdb -p "$server" -batch -ex 'thread apply all bt' >"$work/server-bt.txt" 2>&1 || true
        for t in /proc/$server/task/*; do
            echo "$(basename "$t") $(cat "$t/comm") wchan=$(cat "$t/wchan")"
        done >"$work/server-wchan.txt"
        gdb -p "$qpid" -batch -ex 'thread apply all bt' >"$work/qemu-bt.txt" 2>&1 || true
        ss -xp 2>/dev/null | grep -E "dev.sock|vfio-user|qemu" >"$work/sockets.txt" || true
    fi
    grep -aq "ENGINE-TEST DONE\|ENGINE-TEST FAIL\|SIZE AFTER" "$work/guest.log" && break
    kill -0 "$qpid" 2>/dev/null || break
    sleep 0.1
done
sleep 1
grep -a "ENGINE-TEST" "$work/guest.log" | tr -d '\r'
