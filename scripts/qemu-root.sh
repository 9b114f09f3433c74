# Sourced by scripts/qemu-e2e.sh and scripts/qemu-nvme-e2e.sh, after each
# defines say() and fail(): the QEMU they run and the guest's kernel.
#
# Bookworm's QEMU (7.2) has no vfio-user client, so this makes a Debian
# trixie root with debootstrap and installs QEMU from trixie-backports into
# it, with Debian's kernel, busybox and e2fsprogs for the guests, all from
# Debian's archive, cached in $IOASID_QEMU_CACHE (default
# /var/cache/ioasid-qemu) so that a second run skips the downloads. QEMU
# runs from that root through the root's own loader, without a chroot.
# IOASID_QEMU=/abs/path/to/qemu-system-x86_64 runs that QEMU instead.
#
# Sets: cache, root, kernel, version; defines qemu() (exec: run it in the
# background, and the job's pid is QEMU's own).

cache=${IOASID_QEMU_CACHE:-/var/cache/ioasid-qemu}
root=$cache/trixie
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

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
if ! ls "$root"/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -x "$root/bin/busybox" ] || [ ! -x "$root/sbin/mke2fs" ]; then
    say "installing Debian's kernel, busybox and e2fsprogs into the root (once)"
    chroot "$root" apt-get install -y -q --no-install-recommends linux-image-amd64 busybox-static e2fsprogs \
        >>"$cache/apt.log" 2>&1 || fail "installing the kernel, busybox and e2fsprogs failed; see $cache/apt.log"
fi
kernel=$(ls "$root"/boot/vmlinuz-* | head -n 1)
qemu() {
    if [ -n "${IOASID_QEMU:-}" ]; then
        exec "$IOASID_QEMU" "$@"
    fi
    exec "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
}
if [ -n "${IOASID_QEMU:-}" ]; then
    [ -x "$IOASID_QEMU" ] || fail "IOASID_QEMU=$IOASID_QEMU is not an executable"
fi
version=$( (qemu --version) | head -n 1)
say "$version${IOASID_QEMU:+ ($IOASID_QEMU)}"

# Waits (polling every 0.1 s, ceiling $3 seconds) for a line matching $2 in
# the guest log $1; stops early when the guest prints $5 (a failure line)
# or QEMU ($4) is gone.
wait_guest_for() {
    local i
    for i in $(seq $(($3 * 10))); do
        grep -aqE "$2" "$1" && return 0
        grep -aq "$5" "$1" && return 1
        kill -0 "$4" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# The guest kernel's modules $@ (names as in modules.dep, `-` or `_`) and
# every module they need, decompressed into directory $1 (first argument),
# with $1/order listing them in load order. Modules built into the kernel
# are skipped.
guest_modules() {
    local out=$1 kver moddir m
    shift
    kver=${kernel##*/vmlinuz-}
    moddir=$root/lib/modules/$kver
    local mods=()
    add_mod() {
        local d
        for d in $(grep -m1 "^$1:" "$moddir/modules.dep" | cut -d: -f2); do add_mod "$d"; done
        case " ${mods[*]} " in *" $1 "*) ;; *) mods+=("$1") ;; esac
    }
    for m in "$@"; do
        local pat=${m//[-_]/[-_]}
        local f
        f=$(grep -oE "^[^:]*/$pat\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" | tr -d :)
        if [ -z "$f" ]; then
            grep -qE "/$pat\.ko$" "$moddir/modules.builtin" && continue
            fail "the guest kernel $kver has no module $m (modules.dep, modules.builtin)"
        fi
        add_mod "$f"
    done
    mkdir -p "$out"
    : >"$out/order"
    for m in "${mods[@]}"; do
        local base=${m##*/}
        base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
        case "$m" in
        *.xz) xz -dc "$moddir/$m" ;;
        *.zst) zstd -qdc "$moddir/$m" ;;
        *.gz) gzip -dc "$moddir/$m" ;;
        *) cat "$moddir/$m" ;;
        esac >"$out/$base" || fail "cannot decompress $m"
        echo "$base" >>"$out/order"
    done
}
