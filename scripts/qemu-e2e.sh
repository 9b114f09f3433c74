#!/usr/bin/env bash
# QEMU end to end: a real QEMU (10.1+, vfio-user-pci) with the dma-engine
# of vfio-user-server.
#   1. Firmware only: QEMU realizes the device, the firmware programs its
#      BARs, the core's compat IOAS holds QEMU's guest-RAM mappings, a
#      system reset goes through, QEMU's exit leaves nothing mapped.
#   2. A Linux guest (Debian's kernel, busybox, and scripts/guest/engine-test.c
#      built static) on shared memfd RAM finds the device in sysfs, maps its
#      BARs, and runs copies, fills, compares and CRC-32C by RID DMA,
#      checking each; then `engine-test sizes`: single copies of 4 KiB up to
#      the device's largest (16 MiB), copies per second of 64 KiB and 1 MiB
#      ("ENGINE-TEST RATE"), 4 MiB on four queues at once, queue disables
#      during copies and a copy after them; then a reset (reboot) and the
#      first checks again; then a boot that, after the same
#      checks, keeps copying while iommu-core is killed (SIGKILL) and a new
#      one started on the same socket: the device server reconnects and
#      rebuilds its compat IOAS from QEMU's DMA table, and the guest's
#      copies work again with nothing done by QEMU (scripts/guest/engine-test.c
#      says what the guest sees meanwhile); then poweroff. Then the same
#      checks and `sizes` on QEMU's default RAM (no memory backend: QEMU's
#      DMA_MAPs carry no fd and the server reaches guest memory with
#      DMA_READ/DMA_WRITE messages), with its own server on the same core;
#      while that guest runs, ioasidctl status must list its RAM in the
#      server's compat IOAS; it powers off. The final PASS line gives both
#      runs' copies/s.
#   3. Hot-plug: a guest on q35 with a PCIe root port, an emulated VT-d
#      and a QMP socket. The VT-d gives the guest's vfio-pci an IOMMU group
#      (Debian's kernel has no VFIO_NOIOMMU) and interrupt remapping (x86
#      gives a device more than one MSI vector only with it); the guest
#      runs it with iommu=pt, so the sysfs checks keep using physical
#      addresses. Per cycle the script hot-adds a vfio-user-pci (QMP
#      device_add on the root port), the guest's pciehp finds it and
#      `engine-test hotplug` checks it through sysfs and then through its
#      vfio-pci as a user-space driver (type-1 container, a buffer at an
#      IOVA through the VT-d; bus mastering off holds a queued copy, on
#      lets it run; MSI, one eventfd per vector, queue q on vector q; then
#      INTx with INTX_STATUS, Status bit 3 and an unmask per interrupt),
#      printing the device's /proc/interrupts lines, whose counts the
#      script checks too; the server's IOAS must have dropped the guest's
#      unmapped IOVA buffer; then device_del, the
#      DEVICE_DELETED event once the guest let go, the guest sees it gone,
#      the server sees its client leave and takes the next one. Two cycles
#      with `vfio-user-server dma-engine --no-msix` (MSI capability), then
#      two with the MSI-X device if the QEMU can unplug one (below). QEMU
#      must still run after each device_del, with no assertion on stderr,
#      and exit 0 on QMP quit.
# The script exits 0 only if every check passes, and prints the vfio-user
# commands QEMU sent, with counts, and the hot-plug cycles' log lines.
#
# Environment:
#   IOASID_QEMU=/abs/path/to/qemu-system-x86_64  run that QEMU (10.1+ with
#       vfio-user-pci) instead of Debian's. It must find its own firmware
#       (installed, or run from its build directory, which finds pc-bios/).
#       Debian's 11.1.3 aborts on device_del of a vfio-user-pci that has
#       MSI-X (memory_region_del_subregion: Assertion 'subregion->container
#       == mr' failed); upstream fixed it with "vfio-user: Do not delete the
#       subregion" (October 2025). With IOASID_QEMU set the hot-plug stage
#       takes the QEMU to have that fix and also runs the MSI-X cycles; a
#       QEMU built from upstream after that commit:
#         git clone https://gitlab.com/qemu-project/qemu.git && cd qemu
#         ./configure --target-list=x86_64-softmmu   # vfio-user-pci is in the default Linux build
#         make -j"$(nproc)"
#         IOASID_QEMU=$PWD/build/qemu-system-x86_64 scripts/qemu-e2e.sh
#   IOASID_QEMU_MSIX_UNPLUG=1|0  run (1) or skip (0) the MSI-X cycles
#       whichever the QEMU; the default is by binary (an env flag, not the
#       version string): skipped for Debian's, run for IOASID_QEMU's.
#   IOASID_E2E_HOTPLUG=pciehp|acpi  how the guest learns of stage 3's
#       hot-plugs: the root port's native PCIe hot-plug (pciehp; the
#       default, with its 5 s attention-button wait per removal) or QEMU's
#       ACPI hot-plug (acpiphp; q35's own default).
#   IOASID_E2E_ONLY=hotplug  run only stage 3; IOASID_E2E_ONLY=default-ram
#       only stage 2's default-RAM run (a quick reproduction of the message
#       DMA path). IOASID_E2E_KEEP=1  keep the logs (in
#       /tmp/ioasid-qemu-e2e.*). IOASID_QEMU_KVM=1  use KVM.
#   IOASID_E2E_RATE=N64K,N1M  the rate workload of `engine-test sizes`
#       (default 4096,512 copies of 64 KiB and of 1 MiB).
#   IOASID_E2E_BACKTRACES=1  each time (at most 3) the default-RAM guest's
#       `sizes` prints nothing for 4 s, gdb backtraces of the server's and QEMU's threads
#       (and the server threads' wchan) go to the kept log directory.
#   IOASID_QEMU_DEVPROPS='"x-msg-timeout":12000'  more JSON properties of
#       stage 2's vfio-user-pci devices. IOASID_QEMU_TRACE=PATTERN  enable
#       QEMU trace events in stage 2 (on QEMU's stderr: the memfd guest's log,
#       or qemu5.err for the default-RAM guest). RUST_LOG=debug  the
#       servers' log level (their logs: dev*.log).
#
# The QEMU, the guest kernel and busybox: scripts/qemu-root.sh (a Debian
# trixie root with QEMU from trixie-backports, cached in /var/cache/ioasid-qemu).
#
# The binaries come from $CARGO_TARGET_DIR/release (target/release without
# it), built by the script's own `cargo build --release`.
#
# Usage: scripts/qemu-e2e.sh            (as root; prints PASS or FAIL)
set -euo pipefail

cd "$(dirname "$0")/.."
say() { echo "qemu-e2e: $*"; }
fail() { echo "qemu-e2e: FAIL: $*"; exit 1; }
. scripts/qemu-root.sh
only=${IOASID_E2E_ONLY:-}
case "$only" in "" | hotplug | default-ram) ;; *) fail "IOASID_E2E_ONLY=$only: the stages that run alone are hotplug and default-ram" ;; esac

cargo build --release --locked --bins -p iommu_core -p vfio_user_server -p fuse_fs >/dev/null 2>&1 || fail "cargo build failed"
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/ioasid-qemu-e2e.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${IOASID_E2E_KEEP:-0}" = 1 ]; then echo "qemu-e2e: logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# ioasidctl status, read whole before any grep: `status | grep -q` would
# let grep end the pipe at its first match, ioasidctl fail writing the rest,
# and pipefail count the check as failed.
core_status() { "$bin"/ioasidctl --socket "$work/core.sock" status; }
# Whether the compat IOAS of the server on socket $1 (its session in
# ioasidctl status) holds a mapping ending at the top of a 512 MiB guest's
# RAM (0x1fffffff).
server_maps_guest_ram() {
    local st
    st=$(core_status) || return 1
    awk -v sock="socket $1 " '
        /^session / { if (s && m) found = 1; s = 0; m = 0 }
        index($0, sock) { s = 1 }
        /^ +0x[0-9a-f]+-0x1fffffff / { m = 1 }
        END { if (s && m) found = 1; exit !found }' <<<"$st"
}
# After QEMU leaves, the server must unmap its guest RAM (within 5 s): no
# session holds any mapping.
no_guest_ram_left() {
    local st
    for _ in $(seq 50); do
        st=$(core_status)
        grep -qE '^ +0x[0-9a-f]+-0x[0-9a-f]+ ' <<<"$st" || return 0
        sleep 0.1
    done
    fail "guest RAM is still mapped after QEMU left: $st"
}

"$bin"/iommu-core --socket "$work/core.sock" 2>"$work/core.log" &
core=$!
pids+=($core)
for _ in $(seq 100); do [ -S "$work/core.sock" ] && break; sleep 0.05; done

accel=tcg
# KVM only where it really runs a guest here (a paravirtual /dev/kvm may not).
if [ -w /dev/kvm ] && [ "${IOASID_QEMU_KVM:-0}" = 1 ]; then accel=kvm; fi
ms() { echo $(( $(date +%s%N) / 1000000 )); }

# The guest's initramfs: busybox, engine-test, and for the hot-plug stage
# the guest kernel's vfio-pci and type-1 IOMMU modules with what they need
# (from modules.dep), decompressed here, loaded by /init in that order.
build_initrd() {
    [ -e "$work/initrd.gz" ] && return 0
    command -v gcc >/dev/null || { apt-get update -q && apt-get install -y -q gcc libc6-dev; }
    gcc -static -O2 -o "$work/engine-test" scripts/guest/engine-test.c || fail "cannot build the guest program"
    mkdir -p "$work/irfs/bin" "$work/irfs/proc" "$work/irfs/sys" "$work/irfs/dev" "$work/irfs/modules"
    cp "$root/bin/busybox" "$work/irfs/bin/busybox"
    cp "$work/engine-test" "$work/irfs/engine-test"
    guest_modules "$work/irfs/modules" vfio_iommu_type1 vfio-pci
    cat >"$work/irfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
if grep -q ioasid_hotplug /proc/cmdline; then
    for m in $(cat /modules/order); do
        insmod "/modules/$m" || echo "ENGINE-TEST FAIL: insmod $m"
    done
    echo "ENGINE-TEST MODULES: $(cat /modules/order | tr '\n' ' ')"
    /engine-test hotplug
elif grep -q ioasid_restart /proc/cmdline; then /engine-test restart
else
    /engine-test
    if grep -q ioasid_sizes /proc/cmdline; then /engine-test sizes; fi
fi
echo "ENGINE-TEST DONE"
# Reboot (QEMU resets the machine and the device; the test runs again),
# or power off when asked to.
if grep -q ioasid_poweroff /proc/cmdline; then poweroff -f; fi
reboot -f
INIT
    chmod +x "$work/irfs/init"
    (cd "$work/irfs" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null | gzip >"$work/initrd.gz")
}

# A QMP command on QEMU's QMP socket (one connection per call); with an
# event name and a ceiling in seconds, also waits for that event of the
# device named by the command's "id" and prints how long it took.
cat >"$work/qmp.py" <<'QMP'
import json, socket, sys, time
path, cmd = sys.argv[1], json.loads(sys.argv[2])
event = sys.argv[3] if len(sys.argv) > 3 else None
ceiling = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(path)
f = s.makefile("r")
def recv():
    line = f.readline()
    if not line:
        sys.exit("QMP: QEMU closed the connection")
    return json.loads(line)
events = []
def execute(c):
    # Sends one command and waits for its return, keeping events that come.
    s.sendall((json.dumps(c) + "\n").encode())
    while True:
        m = recv()
        if "event" in m:
            events.append(m)
        elif "return" in m:
            return
        elif "error" in m:
            sys.exit("QMP: %s: %s" % (c["execute"], m["error"].get("desc", m["error"])))
recv()  # greeting
execute({"execute": "qmp_capabilities"})
t0 = time.monotonic()
execute(cmd)
if event:
    dev = cmd.get("arguments", {}).get("id")
    def match(m):
        return m["event"] == event and (dev is None or m.get("data", {}).get("device") == dev)
    deadline = t0 + ceiling
    while not any(match(m) for m in events):
        left = deadline - time.monotonic()
        if left <= 0:
            sys.exit("QMP: no %s for %s within %.0f s" % (event, dev, ceiling))
        s.settimeout(left)
        try:
            events.append(recv())
        except socket.timeout:
            continue
    print("%s %s after %.1f s" % (event, dev, time.monotonic() - t0))
QMP
qmp() { python3 "$work/qmp.py" "$work/qmp.sock" "$@"; }

# Waits (polling every 0.1 s, ceiling $3 seconds) for a line matching $2 in
# the guest log $1; stops early when the guest fails or QEMU ($4) is gone.
wait_guest() { wait_guest_for "$1" "$2" "$3" "$4" "ENGINE-TEST FAIL"; }
# Waits until the server's log $1 counts $2 lines matching $3 (ceiling 30 s).
wait_server_log() {
    local i
    for i in $(seq 300); do
        [ "$(grep -c "$3" "$1")" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}

# The guest prints the device's /proc/interrupts lines before its
# interrupts ("ENGINE-TEST IRQ-BEFORE:") and after ("ENGINE-TEST IRQ:").
# irq_counts: for the lines containing $1 in a section of its log on
# stdin, what each line counted in between (summed over CPUs), separated
# by spaces.
irq_counts() {
    tr -d '\r' | awk -v pat="$1" '
        function sum(   s, i) { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; return s }
        sub(/^.*ENGINE-TEST IRQ-BEFORE: */, "") && index($0, pat) { before[nb++] = sum(); next }
        sub(/^.*ENGINE-TEST IRQ: */, "") && index($0, pat) { printf "%d ", sum() - before[na++] }'
}

# Stage 3: hot-plug. A guest on q35 with a PCIe root port (rp1), an
# emulated VT-d (interrupt remapping, which multi-vector MSI needs on x86;
# caching mode, which QEMU's vfio needs; the guest runs it with iommu=pt)
# and a QMP socket. Each cycle: device_add of a vfio-user-pci on rp1, the
# guest (engine-test hotplug) sees it, checks it through sysfs and through
# its vfio-pci (MSI, then INTx, counted in /proc/interrupts), device_del,
# DEVICE_DELETED once the guest's pciehp let go, the guest sees it gone, the
# server sees its client leave, QEMU still runs with nothing on stderr.
# Twice with a --no-msix device (MSI capability); twice more with an MSI-X
# device when the QEMU can unplug one (see the top of this script).
irq_rounds=8 # IRQ_ROUNDS in scripts/guest/engine-test.c
# QEMU's stderr without the DMA_UNMAP refusals (see unmap_noise below).
qemu3_err() { grep -avE "vfio_container_dma_unmap|error reply on async request" "$work/qemu3.err" | tail -n 5; }
hotplug_cycle() { # n, server socket, server log, cycles on this server so far, kind (MSI or MSI-X)
    local n=$1 sock=$2 slog=$3 k=$4 kind=$5 t0 t_add t_used t_del out sums want
    t0=$(ms)
    qmp '{"execute":"device_add","arguments":{"driver":"vfio-user-pci","id":"hp'"$n"'","bus":"rp1","socket":{"path":"'"$sock"'","type":"unix"}}}' \
        || fail "hot-plug $n: device_add failed; QEMU: $(qemu3_err)"
    t_add=$(ms)
    wait_server_log "$slog" "$k" "client connected" || fail "hot-plug $n: the server did not take QEMU as its client"
    wait_guest "$work/guest3.log" "ENGINE-TEST HOTPLUG USED $n:" 300 "$qpid3" \
        || fail "hot-plug $n: the guest did not use the device: $(tail -n 25 "$work/guest3.log"; qemu3_err)"
    t_used=$(ms)
    # The guest's vfio-pci mapped its buffer at IOVA 0x1000000000 through
    # the emulated VT-d (QEMU passed the map on as DMA_MAP) and unmapped it
    # before reporting: the device must not reach it any more.
    ioas=$("$bin"/ioasidctl --socket "$work/core.sock" status)
    if grep -q -- " 0x1000000000-" <<<"$ioas"; then
        fail "hot-plug $n: the guest unmapped IOVA 0x1000000000 but the server's compat IOAS still maps it: $(grep -- " 0x1000000000-" <<<"$ioas")"
    fi
    out=$(sed -n "/ENGINE-TEST HOTPLUG ADDED $n:/,/ENGINE-TEST HOTPLUG USED $n:/p" "$work/guest3.log")
    grep -aq "ENGINE-TEST PASS:" <<<"$out" || fail "hot-plug $n: no sysfs PASS"
    grep -aq "ENGINE-TEST $kind PASS:" <<<"$out" || fail "hot-plug $n: no $kind PASS"
    grep -aq "ENGINE-TEST INTX PASS:" <<<"$out" || fail "hot-plug $n: no INTX PASS"
    grep -aq "ENGINE-TEST BME PASS:" <<<"$out" || fail "hot-plug $n: no BME PASS"
    # The host's own look at the guest's /proc/interrupts lines: one per
    # vector, IRQ_ROUNDS interrupts each (queue q on vector q); INTx: one
    # line, all of them.
    if [ "$kind" = MSI-X ]; then pat='vfio-msix['; else pat='vfio-msi['; fi
    sums=$(irq_counts "$pat" <<<"$out")
    want="$irq_rounds $irq_rounds $irq_rounds $irq_rounds "
    [ "$sums" = "$want" ] || fail "hot-plug $n: $kind counts in /proc/interrupts are '$sums', expected '$want'"
    sums=$(irq_counts "vfio-intx" <<<"$out")
    [ "$sums" = "$((4 * irq_rounds)) " ] || fail "hot-plug $n: INTx count in /proc/interrupts is '$sums', expected $((4 * irq_rounds))"
    tr -d '\r' <<<"$out" | sed -n 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/p'
    t_del=$(ms)
    out=$(qmp '{"execute":"device_del","arguments":{"id":"hp'"$n"'"}}' DEVICE_DELETED 120 2>&1) \
        || fail "hot-plug $n: device_del: $out; QEMU: $(qemu3_err)"
    wait_guest "$work/guest3.log" "ENGINE-TEST HOTPLUG REMOVED $n:" 60 "$qpid3" \
        || fail "hot-plug $n: the guest still sees the device: $(tail -n 5 "$work/guest3.log")"
    sed -n "/ENGINE-TEST HOTPLUG USED $n:/,/ENGINE-TEST HOTPLUG REMOVED $n:/p" "$work/guest3.log" \
        | grep -aE "ENGINE-TEST (HOTPLUG REMOVED|KLOG)" | tr -d '\r' | sed 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/'
    kill -0 "$qpid3" 2>/dev/null || fail "hot-plug $n: QEMU died: $(qemu3_err)"
    grep -qiE "assert|abort" "$work/qemu3.err" && fail "hot-plug $n: QEMU: $(grep -aiE "assert|abort" "$work/qemu3.err")"
    wait_server_log "$slog" "$k" "client disconnected" || fail "hot-plug $n: the server did not see QEMU leave"
    say "hot-plug $n ($kind): device_add answered in $((t_add - t0)) ms; the guest's checks done $((t_used - t_add)) ms later; device_del: $out; the guest saw it gone and the server its client leave $(($(ms) - t_del)) ms after device_del"
}

hotplug_stage() {
    local t_start server3 server4 msix_reason="" msix=${IOASID_QEMU_MSIX_UNPLUG:-}
    t_start=$(ms)
    build_initrd
    "$bin"/vfio-user-server dma-engine --no-msix --socket-path "$work/dev3.sock" --core "$work/core.sock" 2>"$work/dev3.log" &
    server3=$!
    pids+=($server3)
    for _ in $(seq 100); do [ -S "$work/dev3.sock" ] && break; sleep 0.05; done
    [ -S "$work/dev3.sock" ] || fail "vfio-user-server --no-msix did not start: $(cat "$work/dev3.log")"
    # Which QEMU can unplug an MSI-X device: an env flag, else by which
    # binary: Debian's cannot (checked with 11.1.3), one named by IOASID_QEMU
    # is taken to have the fix (that is what it is for).
    if [ -z "$msix" ]; then
        if [ -n "${IOASID_QEMU:-}" ]; then msix=1; else
            msix=0
            msix_reason="Debian's QEMU ($version) aborts on device_del of a vfio-user-pci with MSI-X (memory_region_del_subregion assertion; upstream fix \"vfio-user: Do not delete the subregion\"); set IOASID_QEMU to a QEMU with that fix, or IOASID_QEMU_MSIX_UNPLUG=1 to run it anyway"
        fi
    elif [ "$msix" != 1 ]; then
        msix_reason="IOASID_QEMU_MSIX_UNPLUG=$msix"
    fi
    if [ "$msix" = 1 ]; then
        "$bin"/vfio-user-server dma-engine --socket-path "$work/dev4.sock" --core "$work/core.sock" 2>"$work/dev4.log" &
        server4=$!
        pids+=($server4)
        for _ in $(seq 100); do [ -S "$work/dev4.sock" ] && break; sleep 0.05; done
        [ -S "$work/dev4.sock" ] || fail "vfio-user-server did not start: $(cat "$work/dev4.log")"
    fi
    local machine="q35,accel=$accel" slots=()
    [ "$accel" = kvm ] && machine="$machine,kernel-irqchip=split"
    # q35 hot-plugs on root ports through ACPI (the guest's acpiphp) by
    # default; without it the root port's native PCIe hot-plug (pciehp).
    case "${IOASID_E2E_HOTPLUG:-pciehp}" in
    pciehp) slots=(-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off) ;;
    acpi) ;;
    *) fail "IOASID_E2E_HOTPLUG must be pciehp or acpi" ;;
    esac
    (qemu -machine "$machine" -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
        -device intel-iommu,intremap=on,caching-mode=on \
        "${slots[@]}" -device pcie-root-port,id=rp1,slot=1,chassis=1 \
        -qmp "unix:$work/qmp.sock,server=on,wait=off" \
        -kernel "$kernel" -initrd "$work/initrd.gz" \
        -append "console=ttyS0 quiet panic=-1 ioasid_hotplug ioasid_poweroff intel_iommu=on iommu=pt" \
        -nographic -monitor none >"$work/guest3.log" 2>"$work/qemu3.err") &
    qpid3=$!
    pids+=($qpid3)
    wait_guest "$work/guest3.log" "ENGINE-TEST HOTPLUG WAITING 1:" 300 "$qpid3" \
        || fail "the hot-plug guest did not get ready: $(tail -n 20 "$work/guest3.log"; qemu3_err)"
    local t_ready=$(ms)
    grep -a "ENGINE-TEST MODULES" "$work/guest3.log" | tr -d '\r' | sed 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/'
    say "hot-plug: the guest is ready $((t_ready - t_start)) ms after the stage began"
    hotplug_cycle 1 "$work/dev3.sock" "$work/dev3.log" 1 MSI
    hotplug_cycle 2 "$work/dev3.sock" "$work/dev3.log" 2 MSI
    local cycles="two cycles with a --no-msix device (sysfs; vfio-pci: bus mastering, MSI, INTx)"
    if [ "$msix" = 1 ]; then
        hotplug_cycle 3 "$work/dev4.sock" "$work/dev4.log" 1 MSI-X
        hotplug_cycle 4 "$work/dev4.sock" "$work/dev4.log" 2 MSI-X
        cycles="$cycles and two with an MSI-X device (the same with MSI-X)"
    else
        say "hot-plug: the MSI-X device's cycle skipped: $msix_reason"
    fi
    qmp '{"execute":"quit"}' >/dev/null || fail "QMP quit failed"
    for _ in $(seq 300); do kill -0 "$qpid3" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$qpid3" 2>/dev/null && fail "QEMU did not quit"
    wait "$qpid3" || fail "QEMU exited with status $? after quit: $(qemu3_err)"
    grep -qiE "assert|abort" "$work/qemu3.err" && fail "QEMU: $(grep -aiE "assert|abort" "$work/qemu3.err")"
    grep -aq "ENGINE-TEST FAIL" "$work/guest3.log" && fail "the guest: $(grep -a "ENGINE-TEST FAIL" "$work/guest3.log")"
    # Each server is still there, serving no one, and stops cleanly.
    for s in "$server3" ${server4:-}; do
        kill -TERM "$s"
        wait "$s" || fail "a hot-plug stage server did not exit cleanly"
    done
    # What QEMU sent each hot-plugged device (one line per client).
    cat "$work/dev3.log" ${server4:+"$work/dev4.log"} | grep -o "the client sent: .*" | sed 's/^/qemu-e2e: hot-plugged device: /'
    # unmap_noise: QEMU's VT-d unmaps the whole IOVA space in power-of-two
    # pieces when the guest switches the device's domain (vfio-pci taking
    # it, and giving it back); the server refuses each piece that is not a
    # region it has (ENOENT), and QEMU prints a line for each and goes on.
    local unmap_noise
    unmap_noise=$(grep -ac "vfio_container_dma_unmap" "$work/qemu3.err" || true)
    hotplug_summary="hot-plug stage (${IOASID_E2E_HOTPLUG:-pciehp}): $cycles in $(($(ms) - t_start)) ms (guest boot $((t_ready - t_start)) ms; QEMU printed $unmap_noise refused DMA_UNMAPs)"
    say "$hotplug_summary"
}

# Stage 2's QEMU: a 512 MiB guest on RAM $1 (memfd: a shared memfd, so
# QEMU's DMA_MAPs carry fds; default: QEMU's own RAM, no fds, and the server
# reaches it with DMA_READ/DMA_WRITE messages), the dma-engine on socket $2,
# $3 added to the kernel command line. Runs in the foreground (exec).
stage2_qemu() {
    local ram=()
    [ "$1" = memfd ] && ram=(-object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem)
    qemu -machine q35,accel=$accel -m 512M "${ram[@]}" \
        -device '{"driver":"vfio-user-pci"'"${IOASID_QEMU_DEVPROPS:+,$IOASID_QEMU_DEVPROPS}"',"socket":{"path":"'"$2"'","type":"unix"}}' \
        ${IOASID_QEMU_TRACE:+-trace "$IOASID_QEMU_TRACE"} \
        -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1 $3" \
        -nographic -monitor none
}
# `engine-test sizes` copies 4 KiB to 16 MiB (MAX_XFER) between two halves
# of a run of 2 MiB huge pages (48 of them: 96 MiB), then the rate workload:
# IOASID_E2E_RATE (N64K,N1M) copies of 64 KiB and of 1 MiB, 8 in flight.
rate_counts=${IOASID_E2E_RATE:-4096,512}
sizes_cmdline="ioasid_sizes hugepages=48 ioasid_rate=$rate_counts"
# The guest's "ENGINE-TEST RATE <len> <copies/s> ..." figure for len $2 in log $1.
rate_of() { tr -d '\r' <"$1" | awk -v len="$2" '$0 ~ "ENGINE-TEST RATE " len " [0-9]" { sub(/^.*ENGINE-TEST RATE /, ""); print $2; exit }'; }
# Checks a `sizes` run in guest log $1 (what: $2): every size up to 16 MiB
# copied with SUCCESS and matching contents, both rate figures, the four
# queues, the queue disables and a copy after them, SIZE PASS. Prints the
# problems, one a line; nothing when all is well.
sizes_problems() {
    local log=$1 len
    for len in 4096 65536 262157 1048576 16777216; do
        grep -aqE "ENGINE-TEST SIZE $len: status 1 in .* contents match" "$log" \
            || echo "$2: no good copy of $len bytes: $(tr -d '\r' <"$log" | grep -a "ENGINE-TEST SIZE $len" | sed 's/^.*ENGINE-TEST //')"
    done
    for len in 65536 1048576; do
        [ -n "$(rate_of "$log" $len)" ] || echo "$2: no copies/s figure for $len bytes: $(tr -d '\r' <"$log" | grep -a "ENGINE-TEST RATE $len" | sed 's/^.*ENGINE-TEST //')"
    done
    grep -aq "ENGINE-TEST SIZE PARALLEL:" "$log" || echo "$2: the copies on four queues at once did not finish"
    grep -aq "ENGINE-TEST SIZE CTRL AFTER: a 4 KiB copy: status 1 " "$log" \
        || echo "$2: the queue did not copy after the queue disables during copies"
    grep -aq "ENGINE-TEST SIZE PASS" "$log" || echo "$2: no ENGINE-TEST SIZE PASS"
}

# Stage 2, default RAM: the same guest checks on QEMU's default RAM (no
# memory backend: QEMU's DMA_MAPs carry no fd, and the server reaches the
# guest's memory with DMA_READ and DMA_WRITE messages), on the core that is
# running, with its own vfio-user-server: `engine-test` (copies, fill,
# CRC-32C, compare), then `engine-test sizes` (4 KiB to 16 MiB, the rate
# workload, four queues at once, queue disables during copies, a copy after
# them); the server's compat IOAS must list the guest's RAM while the guest
# runs. The guest powers off; QEMU must exit 0 and leave nothing mapped.
# Every problem is gathered and the run fails at the end with all of them.
# IOASID_E2E_BACKTRACES=1: each time the guest prints nothing for 4 s
# during `sizes` (a stall, or a slow workload), gdb backtraces of the
# server's and QEMU's threads go to the log directory (kept), three times
# at most.
default_ram_run() {
    local t_start t_pass="" t_sizes="" server5 qpid5 problems=() line outcome="" captured=0 size=0 quiet=0
    t_start=$(ms)
    build_initrd
    "$bin"/vfio-user-server dma-engine --socket-path "$work/dev5.sock" --core "$work/core.sock" 2>"$work/dev5.log" &
    server5=$!
    pids+=($server5)
    for _ in $(seq 100); do [ -S "$work/dev5.sock" ] && break; sleep 0.05; done
    [ -S "$work/dev5.sock" ] || fail "default RAM: vfio-user-server did not start: $(cat "$work/dev5.log")"
    (stage2_qemu default "$work/dev5.sock" "$sizes_cmdline ioasid_poweroff" >"$work/guest5.log" 2>"$work/qemu5.err") &
    qpid5=$!
    pids+=($qpid5)
    wait_guest "$work/guest5.log" "ENGINE-TEST PASS" 300 "$qpid5" \
        || fail "default RAM: the guest's checks did not pass: $(tail -n 20 "$work/guest5.log"; tail -n 5 "$work/qemu5.err")"
    t_pass=$(ms)
    # While the guest runs: its RAM in the server's compat IOAS.
    if server_maps_guest_ram "$work/dev5.sock"; then
        # What an observer sees: the server's client memory objects and its
        # compat IOAS's mappings of them.
        core_status | awk -v sock="socket $work/dev5.sock " '
            function flush() { if (s) for (i = 1; i <= n; i++) print "qemu-e2e: default RAM: ioasidctl status: " b[i]; n = 0; s = 0 }
            /^session / { flush() }
            index($0, sock) { s = 1 }
            /^ +0x[0-9a-f]+-0x[0-9a-f]+ / || /MEMORY|IOAS|client at/ { line = $0; sub(/^ +/, "", line); b[++n] = line }
            END { flush() }' | head -n 16
    else
        problems+=("ioasidctl status does not list the guest's RAM in the server's compat IOAS while the guest runs: $(core_status | tr '\n' '|')")
    fi
    # `sizes`: at most 240 s (tens of seconds when all goes well).
    for _ in $(seq 2400); do
        if grep -aqE "ENGINE-TEST SIZE (PASS|FAIL)" "$work/guest5.log"; then outcome=done; break; fi
        if [ "$(stat -c %s "$work/guest5.log")" = "$size" ]; then quiet=$((quiet + 1)); else quiet=0; size=$(stat -c %s "$work/guest5.log"); fi
        if [ "${IOASID_E2E_BACKTRACES:-0}" = 1 ] && [ "$quiet" = 40 ] && [ "$captured" -lt 3 ]; then
            captured=$((captured + 1))
            IOASID_E2E_KEEP=1
            gdb -p "$server5" -batch -ex 'thread apply all bt' >"$work/server-bt-$captured.txt" 2>&1 || true
            for t in /proc/$server5/task/*; do echo "${t##*/} $(cat "$t/comm") wchan=$(cat "$t/wchan")"; done >"$work/server-wchan-$captured.txt"
            gdb -p "$qpid5" -batch -ex 'thread apply all bt' >"$work/qemu-bt-$captured.txt" 2>&1 || true
            say "default RAM: the guest has printed nothing for 4 s after: $(tr -d '\r' <"$work/guest5.log" | grep -a "ENGINE-TEST" | tail -n 1 | sed 's/^.*ENGINE-TEST //'); backtraces in $work/{server,qemu}-bt-$captured.txt"
        fi
        kill -0 "$qpid5" 2>/dev/null || { outcome="QEMU exited"; break; }
        sleep 0.1
    done
    t_sizes=$(ms)
    tr -d '\r' <"$work/guest5.log" | grep -a "ENGINE-TEST" | sed 's/^.*ENGINE-TEST/qemu-e2e: default RAM: guest: ENGINE-TEST/'
    [ -n "$outcome" ] || problems+=("engine-test sizes did not finish within 240 s: $(tr -d '\r' <"$work/guest5.log" | grep -a "ENGINE-TEST" | tail -n 1)")
    while IFS= read -r line; do [ -n "$line" ] && problems+=("$line"); done < <(sizes_problems "$work/guest5.log" "sizes")
    # The guest powers off: QEMU exits by itself, with status 0.
    if [ "$outcome" = done ]; then
        for _ in $(seq 600); do kill -0 "$qpid5" 2>/dev/null || break; sleep 0.1; done
    fi
    if kill -0 "$qpid5" 2>/dev/null; then
        problems+=("QEMU did not exit after the guest's run (killed)")
        kill -TERM "$qpid5"
        wait "$qpid5" || true
    elif ! wait "$qpid5"; then
        problems+=("QEMU exited with a failure status: $(tail -n 5 "$work/qemu5.err" | tr '\n' '|')")
    fi
    grep -aq "ENGINE-TEST FAIL" "$work/guest5.log" && problems+=("the guest: $(grep -a "ENGINE-TEST FAIL" "$work/guest5.log" | tr -d '\r')")
    grep -aq "ENGINE-TEST DONE" "$work/guest5.log" || problems+=("the guest's init did not finish (no ENGINE-TEST DONE)")
    no_guest_ram_left
    kill -TERM "$server5"
    wait "$server5" || problems+=("the default-RAM vfio-user-server did not exit cleanly")
    [ -e "$work/dev5.sock" ] && problems+=("the default-RAM server left its socket behind")
    grep -o "the client sent: .*" "$work/dev5.log" | head -n 1 | sed 's/^/qemu-e2e: default RAM: /'
    if [ "${#problems[@]}" -gt 0 ]; then
        say "default RAM: QEMU's stderr: $(tail -n 5 "$work/qemu5.err" | tr '\n' '|')"
        for line in "${problems[@]}"; do say "default RAM: problem: $line"; done
        fail "default RAM: ${#problems[@]} problems (above)"
    fi
    default_rates="64 KiB $(rate_of "$work/guest5.log" 65536) copies/s, 1 MiB $(rate_of "$work/guest5.log" 1048576) copies/s"
    default_summary="default RAM (DMA by messages): checks passed $((t_pass - t_start)) ms after boot, sizes to 16 MiB, four queues and queue disables in $((t_sizes - t_pass)) ms, $default_rates"
    say "$default_summary"
}

if [ "$only" = default-ram ]; then
    default_ram_run
    say "PASS ($version, accel $accel; only stage 2's default-RAM run; $default_summary)"
    exit 0
fi
if [ "$only" = hotplug ]; then
    hotplug_stage
    say "PASS ($version, accel $accel; only the hot-plug stage; $hotplug_summary)"
    exit 0
fi

"$bin"/vfio-user-server dma-engine --socket-path "$work/dev.sock" --core "$work/core.sock" 2>"$work/dev.log" &
server=$!
pids+=($server)
for _ in $(seq 100); do [ -S "$work/dev.sock" ] && break; sleep 0.05; done
[ -S "$work/dev.sock" ] || fail "vfio-user-server did not start: $(cat "$work/dev.log")"

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
    if grep -A6 "PCI device 1b36:d3a0" "$work/qemu.out" | grep "BAR0: 32 bit memory at 0x" >/dev/null; then
        programmed=yes
        break
    fi
    kill -0 "$qpid" 2>/dev/null || break
done
grep -q "PCI device 1b36:d3a0" "$work/qemu.out" || fail "QEMU does not show the dma-engine: $(cat "$work/qemu.out")"
[ -n "$programmed" ] || fail "the firmware did not program BAR0: $(grep -A6 1b36:d3a0 "$work/qemu.out" | tail -n 7)"
status=$(core_status)
grep -q "0x100000-" <<<"$status" || fail "the compat IOAS holds no guest RAM: $status"
maps=$(grep -cE '^ +0x[0-9a-f]+-0x[0-9a-f]+ ' <<<"$status")
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
build_initrd

"$bin"/vfio-user-server dma-engine --socket-path "$work/dev2.sock" --core "$work/core.sock" 2>"$work/dev2.log" &
server2=$!
pids+=($server2)
for _ in $(seq 100); do [ -S "$work/dev2.sock" ] && break; sleep 0.05; done
guest_boot() {
    stage2_qemu memfd "$work/dev2.sock" "$1"
}
mkdir -p "$work/mnt"
"$bin"/ioasid-fs --core "$work/core.sock" "$work/mnt" 2>"$work/fs.log" &
fs=$!
pids+=($fs)
start=$(date +%s%N)
(guest_boot "$sizes_cmdline" >"$work/guest.log" 2>&1) &
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
        server_maps_guest_ram "$work/dev2.sock" \
            || fail "ioasidctl status does not show the guest RAM in the server's compat IOAS: $(core_status)"
        grep -qs -- "-0x1fffffff " "$work"/mnt/ioas/*/mappings \
            || fail "ioasid-fs does not show the guest's RAM mappings"
        checked=yes
    fi
    [ "$passes" -ge 2 ] && break
    grep -aq "ENGINE-TEST FAIL" "$work/guest.log" && break
    kill -0 "$guest" 2>/dev/null || break
    sleep 0.1
done
grep -a "ENGINE-TEST" "$work/guest.log" | tr -d '\r' | sed 's/^.*ENGINE-TEST/qemu-e2e: guest: ENGINE-TEST/'
[ "$(grep -ac 'ENGINE-TEST PASS' "$work/guest.log")" -ge 2 ] \
    || fail "the guest test did not pass before and after a reboot: $(tail -n 20 "$work/guest.log")"
problems=$(sizes_problems "$work/guest.log" "memfd RAM, sizes")
[ -z "$problems" ] || fail "$problems"
memfd_rates="64 KiB $(rate_of "$work/guest.log" 65536) copies/s, 1 MiB $(rate_of "$work/guest.log" 1048576) copies/s"
say "memfd RAM: sizes to 16 MiB, four queues and queue disables passed; $memfd_rates"
# QEMU exits on SIGTERM, closing the socket without unmapping.
kill -TERM "$guest"
wait "$guest" || true
# A guest that passes, then copies while the core is restarted, then powers
# off: QEMU exits by itself.
(guest_boot "ioasid_poweroff ioasid_restart" >"$work/guest2.log" 2>&1) &
guest=$!
pids+=($guest)
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
"$bin"/iommu-core --socket "$work/core.sock" 2>"$work/core2.log" &
core=$!
pids+=($core)
for _ in $(seq 200); do
    "$bin"/ioasidctl --socket "$work/core.sock" status >/dev/null 2>&1 && break
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
server_maps_guest_ram "$work/dev2.sock" \
    || fail "the new core does not show the guest RAM in the server's compat IOAS: $(core_status)"
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

default_ram_run

hotplug_stage
say "PASS ($version, accel $accel; memfd RAM: boot to the first PASS in ${t1} ms, sizes to 16 MiB, $memfd_rates; passed again after a guest reboot, and in a guest that copied across a core restart and powered off; $restart; $default_summary; $hotplug_summary)"
