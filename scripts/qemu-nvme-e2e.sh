#!/usr/bin/env bash
# NVMe end to end: QEMU 11.1's vfio-user-pci with `vfio-user-server nvme`,
# driven by an unmodified Linux guest (Debian trixie's kernel and its own
# nvme driver) with 2 vCPUs on shared memfd RAM, every DMA of the
# controller through the server's compat IOAS in iommu-core.
#   1. First boot: the guest finds /dev/nvme0n1 of the backing file's size
#      with two I/O queues; writes a pattern over the last quarter of the
#      disk with O_DIRECT from each vCPU (so both I/O queues carry I/O and
#      raise their interrupts) and reads it back; makes an ext4 file system
#      (the root's mke2fs) on the first three quarters, mounts it, copies
#      files in, drops its caches and checks them, unmounts, reboots.
#      Meanwhile `ioasidctl status` must show the nvme device's session and
#      ioasid-fs the guest's RAM in its IOAS.
#   2. Second boot (QEMU resets the controller): the guest mounts the file
#      system again, checks every file and the pattern, writes one more
#      file, unmounts and powers off.
#   3. On the host, after QEMU exits 0: the backing file holds the pattern
#      (recomputed here), a clean ext4 (e2fsck -fn) and the files the guest
#      wrote, byte for byte (debugfs).
#   4. Performance (unless IOASID_NVME_PERF=0): one guest with both our
#      controller and QEMU's built-in `-device nvme`, each on a file of the
#      same size in the same directory; O_DIRECT 4 KiB random reads at queue
#      depth 1 and 32 (threads), 1 MiB sequential reads and writes, each on
#      both, printed as a table with our ratio to QEMU's, beside the
#      server's CPU time and the vfio-user messages QEMU sent per I/O.
#
# The QEMU, kernel, busybox and e2fsprogs: scripts/qemu-root.sh.
# Environment: IOASID_E2E_KEEP=1 keeps the logs (/tmp/ioasid-nvme-e2e.*);
# IOASID_NVME_PERF=0 skips stage 4; IOASID_NVME_PERF_COUNT=N the 4 KiB
# reads per figure (default 4000); RUST_LOG=debug for the server's log.
#
# Usage: scripts/qemu-nvme-e2e.sh    (as root; prints PASS or FAIL)
set -euo pipefail

cd "$(dirname "$0")/.."
say() { echo "qemu-nvme-e2e: $*"; }
fail() { echo "qemu-nvme-e2e: FAIL: $*"; exit 1; }
. scripts/qemu-root.sh

cargo build --release --locked --bins -p iommu_core -p vfio_user_server -p fuse_fs >/dev/null 2>&1 || fail "cargo build failed"
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/ioasid-nvme-e2e.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    grep -q " $work/mnt " /proc/mounts && umount -l "$work/mnt"
    if [ "${IOASID_E2E_KEEP:-0}" = 1 ]; then echo "qemu-nvme-e2e: logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# A program of the trixie root (e2fsprogs), run through the root's loader.
# `in_root --list PROG` lists its libraries.
in_root() {
    local prog=$1
    shift
    [ "$prog" = --list ] || prog=$root/$prog
    "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
        "$prog" "$@"
}
wait_guest() { wait_guest_for "$1" "$2" "$3" "$4" "NVME-TEST FAIL"; }
guest_lines() { tr -d '\r' <"$1" | grep -a "NVME-TEST" | sed 's/^.*NVME-TEST/NVME-TEST/'; }

disk_mib=64
fs_mib=48
pattern_off=$((fs_mib << 20))
pattern_len=$(((disk_mib - fs_mib) << 20))

# The initramfs: busybox, nvme-test, mke2fs and its libraries from the
# root, and the nvme and ext4 modules (with what they need).
build_initrd() {
    command -v gcc >/dev/null || { apt-get update -q && apt-get install -y -q gcc libc6-dev; }
    local irfs=$work/irfs lib
    mkdir -p "$irfs/bin" "$irfs/sbin" "$irfs/lib" "$irfs/lib64" "$irfs/proc" "$irfs/sys" "$irfs/dev" "$irfs/mnt"
    gcc -static -O2 -pthread -o "$irfs/nvme-test" scripts/guest/nvme-test.c || fail "cannot build the guest program"
    cp "$root/bin/busybox" "$irfs/bin/busybox"
    cp "$root/sbin/mke2fs" "$irfs/sbin/mke2fs"
    for lib in $(in_root --list "$root/sbin/mke2fs" | awk '$2 == "=>" { print $3 }'); do
        cp "$lib" "$irfs/lib/"
    done
    cp "$root/lib64/ld-linux-x86-64.so.2" "$irfs/lib64/"
    guest_modules "$irfs/modules" nvme ext4 crc32c_generic
    cat >"$irfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
export LD_LIBRARY_PATH=/lib
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "NVME-TEST FAIL: insmod $m"
done
end() {
    echo "NVME-TEST INTERRUPTS:"
    grep nvme /proc/interrupts | sed 's/^/NVME-TEST IRQ /'
    [ "$1" = reboot ] && reboot -f
    poweroff -f
}
failed() { echo "NVME-TEST FAIL: $*"; dmesg | tail -n 30 | sed 's/^/NVME-TEST KLOG /'; end poweroff; }
# Our controller: the nvme device whose model is not QEMU's.
dev=""
for i in $(seq 100); do
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/model" ] || continue
        grep -q "QEMU NVMe" "$c/model" && continue
        n=${c##*/}
        [ -b "/dev/${n}n1" ] && dev=/dev/${n}n1
    done
    [ -n "$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || failed "no namespace of the vfio-user controller appeared"
b=${dev#/dev/}
echo "NVME-TEST DEVICE $dev model '$(cat /sys/class/nvme/${b%n1}/model | tr -s ' ')' sectors $(cat /sys/block/$b/size) io-queues $(ls /sys/block/$b/mq | wc -l) lbs $(cat /sys/block/$b/queue/logical_block_size)"
if grep -q nvme_perf /proc/cmdline; then
    qemu_dev=""
    for c in /sys/class/nvme/nvme*; do
        grep -q "QEMU NVMe" "$c/model" && qemu_dev=/dev/${c##*/}n1
    done
    [ -b "$qemu_dev" ] || failed "no namespace of QEMU's built-in nvme"
    n4k=$(sed -n 's/.*nvme_perf=\([0-9]*\).*/\1/p' /proc/cmdline)
    for d in "$dev" "$qemu_dev"; do
        /nvme-test rate "$d" randread 4096 $((n4k / 4)) 1 >/dev/null || failed "warm-up of $d"
    done
    # Three rounds, the two controllers in turn within each.
    for round in 1 2 3; do
        for run in "randread 4096 $n4k 1" "randread 4096 $((n4k * 4)) 32" "seqread 1048576 256 1" "seqwrite 1048576 256 1"; do
            for d in "$dev" "$qemu_dev"; do
                /nvme-test rate "$d" $run || failed "rate $run on $d"
            done
        done
    done
    echo "NVME-TEST PERF DONE"
    end poweroff
fi
if mount -t ext4 "$dev" /mnt 2>/dev/null && [ -e /mnt/SUMS ]; then
    echo "NVME-TEST SECOND BOOT"
    (cd /mnt && sha256sum -c SUMS) | sed 's/^/NVME-TEST /' || failed "the files differ after the reboot"
    /nvme-test check "$dev" PATTERN_OFF PATTERN_LEN 7 || failed "pattern after the reboot"
    echo "written on the second boot" >/mnt/second-boot
    umount /mnt || failed "umount"
    echo "NVME-TEST SECOND BOOT PASS"
    end poweroff
fi
echo "NVME-TEST FIRST BOOT"
half=$((PATTERN_LEN / 2))
taskset 1 /nvme-test write "$dev" PATTERN_OFF $half 7 || failed "pattern on CPU 0"
taskset 2 /nvme-test write "$dev" $((PATTERN_OFF + half)) $half 7 || failed "pattern on CPU 1"
taskset 2 /nvme-test check "$dev" PATTERN_OFF PATTERN_LEN 7 || failed "pattern read back"
/sbin/mke2fs -t ext4 -F -q "$dev" FS_MIBM 2>/mke2fs.err || failed "mke2fs: $(cat /mke2fs.err)"
mount -t ext4 "$dev" /mnt 2>/mount.err || failed "mount: $(cat /mount.err)"
cp /bin/busybox /mnt/busybox
mkdir -p /mnt/dir/sub
dd if=/dev/urandom of=/mnt/dir/sub/random bs=1M count=8 2>/dev/null || failed "writing random"
for i in $(seq 200); do echo "file $i" >"/mnt/dir/f$i"; done
(cd /mnt && sha256sum busybox dir/sub/random dir/f1 dir/f200 >SUMS)
sed 's/^/NVME-TEST SUM /' /mnt/SUMS
sync
echo 3 >/proc/sys/vm/drop_caches
(cd /mnt && sha256sum -c SUMS) >/dev/null || failed "the files read back differ"
umount /mnt || failed "umount"
echo "NVME-TEST FIRST BOOT PASS"
end reboot
INIT
    sed -i -e "s/PATTERN_OFF/$pattern_off/g" -e "s/PATTERN_LEN/$pattern_len/g" -e "s/FS_MIB/$fs_mib/g" "$irfs/init"
    chmod +x "$irfs/init"
    (cd "$irfs" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip >"$work/initrd.gz")
}
build_initrd

"$bin"/iommu-core --socket "$work/core.sock" 2>"$work/core.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/core.sock" ] && break; sleep 0.05; done
[ -S "$work/core.sock" ] || fail "iommu-core did not start: $(cat "$work/core.log")"
start_server() { # socket, backing file, log
    "$bin"/vfio-user-server nvme --backing "$2" --socket-path "$1" --core "$work/core.sock" 2>"$3" &
    server=$!
    pids+=($server)
    for _ in $(seq 100); do [ -S "$1" ] && break; sleep 0.05; done
    [ -S "$1" ] || fail "vfio-user-server nvme did not start: $(cat "$3")"
}
accel=tcg
if [ -w /dev/kvm ] && [ "${IOASID_QEMU_KVM:-0}" = 1 ]; then accel=kvm; fi
guest() { # log, cmdline, more QEMU arguments...
    local log=$1 cmdline=$2
    shift 2
    qemu -machine q35,accel=$accel -smp 2 -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        "$@" -kernel "$kernel" -initrd "$work/initrd.gz" \
        -append "console=ttyS0 quiet panic=-1 $cmdline" -nographic -monitor none >"$log" 2>"$log.err"
}
vfio_user_dev() { echo '{"driver":"vfio-user-pci","socket":{"path":"'"$1"'","type":"unix"}}'; }

# Stages 1 and 2.
truncate -s "${disk_mib}M" "$work/disk.img"
start_server "$work/nvme.sock" "$work/disk.img" "$work/nvme.log"
nvme_server=$server
mkdir -p "$work/mnt"
"$bin"/ioasid-fs --core "$work/core.sock" "$work/mnt" 2>"$work/fs.log" &
fs=$!
pids+=($fs)
t0=$(date +%s)
(guest "$work/guest.log" "" -device "$(vfio_user_dev "$work/nvme.sock")") &
qpid=$!
pids+=($qpid)
wait_guest "$work/guest.log" "NVME-TEST DEVICE" 300 "$qpid" \
    || fail "the guest did not find the controller: $(guest_lines "$work/guest.log" | tail -n 30; tail -n 5 "$work/guest.log.err" "$work/nvme.log")"
status=$("$bin"/ioasidctl --socket "$work/core.sock" status) || fail "ioasidctl status failed"
grep -q "nvme" <<<"$status" || fail "ioasidctl status does not show the nvme device: $status"
grep -qs -- "-0x1fffffff " "$work"/mnt/ioas/*/mappings || fail "ioasid-fs does not show the guest's RAM mappings"
say "while the guest runs: ioasidctl status shows the nvme device, ioasid-fs its IOAS with the guest's RAM"
for _ in $(seq 6000); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$qpid" 2>/dev/null && fail "the guest did not power off within 10 minutes: $(guest_lines "$work/guest.log" | tail -n 30)"
wait "$qpid" || fail "QEMU exited with status $?: $(tail -n 5 "$work/guest.log.err")"
guest_lines "$work/guest.log" | grep -vE "^NVME-TEST (SUM|IRQ|KLOG|[0-9a-z/_]+: OK)" | sed 's/^/qemu-nvme-e2e: guest: /'
grep -aq "NVME-TEST FAIL" "$work/guest.log" && fail "$(guest_lines "$work/guest.log" | grep -E "FAIL|KLOG")"
grep -aq "NVME-TEST FIRST BOOT PASS" "$work/guest.log" || fail "the first boot did not pass: $(guest_lines "$work/guest.log" | tail -n 20)"
grep -aq "NVME-TEST SECOND BOOT PASS" "$work/guest.log" || fail "the second boot did not pass: $(guest_lines "$work/guest.log" | tail -n 20)"
t1=$(date +%s)
# The size and queues the guest saw.
dev_line=$(guest_lines "$work/guest.log" | grep -m1 "NVME-TEST DEVICE")
sectors=$(sed -n 's/.* sectors \([0-9]*\).*/\1/p' <<<"$dev_line")
queues=$(sed -n 's/.* io-queues \([0-9]*\).*/\1/p' <<<"$dev_line")
[ "$sectors" = $((disk_mib << 11)) ] || fail "the guest saw $sectors sectors, not $((disk_mib << 11))"
[ "$queues" = 2 ] || fail "the guest uses $queues I/O queues, not 2"
# Both I/O queues' interrupts fired (first boot's counts, summed over CPUs).
for q in 1 2; do
    n=$(guest_lines "$work/guest.log" | grep -m1 -E "IRQ .*nvme[0-9]+q$q\$" \
        | awk '{ s = 0; for (i = 4; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break; print s }')
    [ "${n:-0}" -gt 0 ] || fail "I/O queue $q raised no interrupt: $(guest_lines "$work/guest.log" | grep IRQ)"
done

# Stage 3: the backing file, on the host.
python3 - "$work/disk.img" "$pattern_off" "$pattern_len" 7 <<'PY' || fail "the backing file does not hold the guest's pattern"
import sys
path, off, length, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, "rb") as f:
    f.seek(off)
    data = f.read(length)
want = bytearray()
for w in range(off // 8, (off + length) // 8):
    x = (w * 0x9E3779B97F4A7C15 + seed) & (2**64 - 1)
    x ^= x >> 29
    want += x.to_bytes(8, "little")
if data != bytes(want):
    bad = next(i for i in range(len(data)) if data[i] != want[i])
    sys.exit("first difference at disk offset %d" % (off + bad))
PY
in_root sbin/e2fsck -fn "$work/disk.img" >"$work/e2fsck.log" 2>&1 || fail "e2fsck on the host: $(tail -n 10 "$work/e2fsck.log")"
second=$(in_root sbin/debugfs -R "cat /second-boot" "$work/disk.img" 2>/dev/null)
[ "$second" = "written on the second boot" ] || fail "the second boot's file reads '$second' on the host"
while read -r sum name; do
    got=$(in_root sbin/debugfs -R "cat /$name" "$work/disk.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "/$name on the host has sha256 $got, the guest wrote $sum"
done < <(guest_lines "$work/guest.log" | sed -n 's/^NVME-TEST SUM //p')
say "the backing file holds the pattern, a clean ext4 and every file the guest wrote"
grep -o "the client sent: .*" "$work/nvme.log" | head -n 1 | sed 's/^/qemu-nvme-e2e: server: /'
kill -TERM "$fs"
wait "$fs" || fail "ioasid-fs did not unmount cleanly"
kill -TERM "$nvme_server"
wait "$nvme_server" || fail "vfio-user-server nvme did not exit cleanly: $(tail -n 5 "$work/nvme.log")"
summary="boot, mkfs, files, reboot and poweroff in $((t1 - t0)) s; $sectors sectors, $queues I/O queues"

# Stage 4: ours against QEMU's built-in NVMe, in one guest.
if [ "${IOASID_NVME_PERF:-1}" != 0 ]; then
    n4k=${IOASID_NVME_PERF_COUNT:-4000}
    truncate -s 256M "$work/ours.img" "$work/qemus.img"
    start_server "$work/perf.sock" "$work/ours.img" "$work/perf.log"
    perf_server=$server
    cpu0=$(awk '{ print $14 + $15 }' "/proc/$perf_server/stat")
    (guest "$work/perf.log.guest" "nvme_perf=$n4k" -device "$(vfio_user_dev "$work/perf.sock")" \
        -drive "file=$work/qemus.img,if=none,id=qd,format=raw" -device nvme,drive=qd,serial=ioasid-ref) &
    qpid=$!
    pids+=($qpid)
    wait_guest "$work/perf.log.guest" "NVME-TEST PERF DONE" 1800 "$qpid" \
        || fail "the performance guest failed: $(guest_lines "$work/perf.log.guest" | tail -n 20)"
    cpu1=$(awk '{ print $14 + $15 }' "/proc/$perf_server/stat")
    for _ in $(seq 600); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$perf_server"
    wait "$perf_server" || true
    python3 - "$work/perf.log.guest" "$work/perf.log" "$(( (cpu1 - cpu0) * 1000 / $(getconf CLK_TCK) ))" <<'PY' || fail "no performance table"
import re, statistics, sys
runs = {}  # (mode, size, depth) -> {"ours": [...], "qemu": [...]}
ours_dev, ios = None, 0
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"NVME-TEST RATE (\S+) (\S+) (\d+) x(\d+): (\d+) in [\d.]+ s, (\d+) IOPS, ([\d.]+) MB/s", line)
    if not m:
        continue
    dev, mode, size, depth, count, iops, mbs = m.groups()
    ours_dev = ours_dev or dev  # the guest runs ours first
    who = "ours" if dev == ours_dev else "qemu"
    if who == "ours":
        ios += int(count)
    runs.setdefault((mode, size, depth), {"ours": [], "qemu": []})[who].append(float(iops if mode == "randread" else mbs))
print("| workload (O_DIRECT, in the guest; 3 rounds, the two in turn) | ours: median (min-max) | QEMU's nvme: median (min-max) | ours ÷ QEMU's, median |")
print("|---|---|---|---|")
for (mode, size, depth), r in runs.items():
    unit = "IOPS" if mode == "randread" else "MB/s"
    o, q = r["ours"], r["qemu"]
    print("| %s %s B, queue depth %s | %.0f %s (%.0f-%.0f) | %.0f %s (%.0f-%.0f) | %.2f |" % (
        mode, size, depth, statistics.median(o), unit, min(o), max(o), statistics.median(q), unit, min(q), max(q),
        statistics.median(o) / statistics.median(q)))
msgs = 0
for line in open(sys.argv[2], errors="replace"):
    m = re.search(r"the client sent: (.*)", line)
    if m:
        msgs = sum(int(n) for n in re.findall(r"(\d+)", m.group(1)))
print("server CPU: %s ms for %d I/Os of ours (%.1f µs each, warm-up included); vfio-user messages from QEMU: %d (%.3f per I/O)"
      % (sys.argv[3], ios, int(sys.argv[3]) * 1000.0 / max(ios, 1), msgs, msgs / max(ios, 1)))
PY
fi
say "PASS ($version, accel $accel; $summary)"
