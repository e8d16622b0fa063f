#!/usr/bin/env bash
# Drive the real Linux kernel NBD client (nbd.ko) against a running nbd-mirror site.
#
# The host kernel may have no nbd module, so this boots Debian's cloud kernel (which ships
# nbd.ko) under QEMU with TCG (software emulation, no KVM needed) on a tiny initramfs:
# busybox-static, nbd-client and mke2fs (from e2fsprogs) with the shared libraries they need,
# and the virtio-net + nbd modules. QEMU user networking lets the guest reach the host's
# 127.0.0.1:PORT as 10.0.2.2:PORT; nothing else is contacted.
#
# In the guest: nbd-client connects /dev/nbd0 to the export (one connection), checks the size,
# makes an ext4 file system, mounts it, writes a random file (20 MiB by default) and a small file
# with a known string, unmounts and disconnects; then connects again with -C N connections,
# checks both files, writes another one, unmounts and disconnects. The guest reports each step
# as "KTEST PASS <step>: ..." / "KTEST FAIL <step>: ..." on the serial console; this script
# parses those lines and exits non-zero unless every step passed.
#
# Everything comes from Debian's apt repositories: qemu-system-x86 is installed if missing; the
# kernel, busybox-static, nbd-client and e2fsprogs packages are only downloaded (apt-get
# download) and unpacked (dpkg -x) into a cache folder that later runs reuse:
#   $NBD_MIRROR_VM_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/nbd-mirror-vm
#
# Usage: scripts/kernel-client-vm.sh --port PORT [--export lun0] [--connections 2]
#          [--expect-size BYTES] [--tag STRING] [--big-mib 20] [--timeout 300] [--verbose]
#        scripts/kernel-client-vm.sh --prepare     (fill the cache and build the initramfs only)
# Exit status: 0 every step passed; 1 a guest step failed or the VM did not finish; 2 bad usage/setup
set -euo pipefail

T0=$(date +%s.%N)
CLEANUP=()   # temp files and folders removed on exit, whatever happens
on_exit() { [ ${#CLEANUP[@]} -eq 0 ] || rm -rf "${CLEANUP[@]}"; }
trap on_exit EXIT
PROG=$(basename "$0")
PORT=""
EXPORT_NAME="lun0"
CONNS=2
EXPECT_SIZE=""
TAG=""
BIG_MIB=20
TIMEOUT=300
VERBOSE=0
PREPARE_ONLY=0
HOST_ADDR=10.0.2.2       # QEMU user networking: the host's loopback as seen from the guest
CACHE=${NBD_MIRROR_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/nbd-mirror-vm}

usage() {
  sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "$PROG: $*" >&2; exit 2; }
log() { echo "$PROG: $*" >&2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=${2:-}; shift 2 ;;
    --export) EXPORT_NAME=${2:-}; shift 2 ;;
    --connections|-C) CONNS=${2:-}; shift 2 ;;
    --expect-size) EXPECT_SIZE=${2:-}; shift 2 ;;
    --tag) TAG=${2:-}; shift 2 ;;
    --big-mib) BIG_MIB=${2:-}; shift 2 ;;
    --timeout) TIMEOUT=${2:-}; shift 2 ;;
    --verbose|-v) VERBOSE=1; shift ;;
    --prepare) PREPARE_ONLY=1; shift ;;
    -h|--help) usage ;;
    *) echo "$PROG: unknown argument: $1" >&2; usage ;;
  esac
done

isnum() { [[ $1 =~ ^[0-9]+$ ]]; }
if [ "$PREPARE_ONLY" -eq 0 ]; then
  isnum "$PORT" && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port PORT is required (1-65535)"
fi
[[ $EXPORT_NAME =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "--export: use letters, digits, '.', '_', '-' (got '$EXPORT_NAME')"
isnum "$CONNS" && [ "$CONNS" -ge 1 ] && [ "$CONNS" -le 16 ] || die "--connections: 1-16 (got '$CONNS')"
[ -z "$EXPECT_SIZE" ] || isnum "$EXPECT_SIZE" || die "--expect-size: a byte count (got '$EXPECT_SIZE')"
isnum "$BIG_MIB" && [ "$BIG_MIB" -ge 1 ] && [ "$BIG_MIB" -le 200 ] || die "--big-mib: 1-200 (got '$BIG_MIB')"
isnum "$TIMEOUT" && [ "$TIMEOUT" -ge 10 ] || die "--timeout: seconds, at least 10 (got '$TIMEOUT')"
[ -n "$TAG" ] || TAG=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
[[ $TAG =~ ^[A-Za-z0-9_-]{1,64}$ ]] || die "--tag: letters, digits, '_', '-' (got '$TAG')"
STRING="nbd-mirror-kernel-test-$TAG"

[ "$(uname -m)" = x86_64 ] || die "needs an x86_64 Debian host (apt packages are amd64)"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (a Debian host)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------------------------------------
# apt helpers: 'apt-get update' at most once per run, and only when something is missing.
# (A flag file, since fetch runs in command substitutions: a variable would not survive them.)
APT_FLAG="${TMPDIR:-/tmp}/nbd-mirror-vm-apt-updated.$$"
CLEANUP+=("$APT_FLAG")
apt_update_once() {
  [ ! -e "$APT_FLAG" ] || return 0
  : > "$APT_FLAG"
  log "apt-get update"
  $SUDO apt-get update -qq >&2 || log "apt-get update failed (continuing with the lists there are)"
}
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'; }
# apt-cache is slow to start (~0.5 s): look up all candidates with one call first.
declare -A CAND=()
prime_candidates() {
  local line pkg=""
  while IFS= read -r line; do
    case "$line" in
      [!\ ]*:) pkg=${line%:} ;;
      *Candidate:*) [ -z "$pkg" ] || CAND[$pkg]=${line##* } ;;
    esac
  done < <(apt-cache policy "$@" 2>/dev/null)
}
candidate_or_update() {
  local v=${CAND[$1]:-}
  [ -n "$v" ] && [ "$v" != "(none)" ] || v=$(candidate "$1")
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    apt_update_once
    v=$(candidate "$1")
  fi
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "apt has no candidate for package $1"
  echo "$v"
}

# ---------------------------------------------------------------------------------------------
# 1. qemu-system-x86 on the host.
T_PREP=$(date +%s.%N)
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  apt_update_once
  log "installing qemu-system-x86"
  $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2 ||
    die "apt-get install qemu-system-x86 failed"
fi
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found after install"

mkdir -p "$CACHE/pkgs"
# One preparation at a time per cache folder (concurrent test runs share it).
exec 9>"$CACHE/.lock"
flock -w 600 9 || die "cannot lock $CACHE/.lock"
# Leftovers of a run killed while preparing.
find "$CACHE" "$CACHE/pkgs" -maxdepth 1 \( -name '.tmp-*' -o -name '.initrd-*' -o -name '*.gz.tmp' \) -exec rm -rf {} + 2>/dev/null || true

# 2. The guest's packages: downloaded (not installed) and unpacked, one folder per version.
# fetch PKG -> prints the folder holding the unpacked package
fetch() {
  local pkg=$1 ver dir tmp deb
  ver=$(candidate_or_update "$pkg")
  dir="$CACHE/pkgs/${pkg}_${ver//:/%3a}"
  if [ ! -f "$dir/.done" ]; then
    tmp=$(mktemp -d "$CACHE/pkgs/.tmp-$pkg-XXXXXX")
    chmod 755 "$tmp"   # let apt's sandbox user write there (else it warns and runs unsandboxed)
    log "downloading $pkg=$ver"
    if ! (cd "$tmp" && apt-get download -qq "$pkg=$ver" >&2 2>/dev/null); then
      apt_update_once   # an old list can name a file the mirror no longer has
      unset "CAND[$pkg]"
      ver=$(candidate_or_update "$pkg")
      dir="$CACHE/pkgs/${pkg}_${ver//:/%3a}"
      (cd "$tmp" && apt-get download -qq "$pkg=$ver" >&2) || { rm -rf "$tmp"; die "apt-get download $pkg failed"; }
    fi
    deb=$(ls "$tmp"/*.deb)
    mkdir "$tmp/root"
    dpkg -x "$deb" "$tmp/root" || { rm -rf "$tmp"; die "dpkg -x $deb failed"; }
    rm -f "$deb"
    echo "$pkg $ver" > "$tmp/root/.pkg"
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    touch "$dir/.done"
  fi
  echo "$dir"
}

# The versioned kernel package behind the linux-image-cloud-amd64 metapackage.
kernel_pkg() {
  local p
  p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  if [ -z "$p" ]; then
    apt_update_once
    p=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$p" ] || die "cannot resolve linux-image-cloud-amd64 to a versioned kernel package"
  echo "$p"
}

KPKG=$(kernel_pkg)
prime_candidates "$KPKG" busybox-static nbd-client e2fsprogs
KDIR=$(fetch "$KPKG")
BBDIR=$(fetch busybox-static)
NBDDIR=$(fetch nbd-client)
E2DIR=$(fetch e2fsprogs)

KVER=$(ls "$KDIR/lib/modules" | head -n1)
[ -n "$KVER" ] || die "no lib/modules in $KPKG"
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] || die "no $VMLINUZ"
BUSYBOX="$BBDIR/bin/busybox"
[ -x "$BUSYBOX" ] || die "no busybox in busybox-static"
NBD_CLIENT=$(ls "$NBDDIR"/sbin/nbd-client "$NBDDIR"/usr/sbin/nbd-client 2>/dev/null | head -n1 || true)
[ -n "$NBD_CLIENT" ] || die "no nbd-client binary in the nbd-client package"
MKE2FS=$(ls "$E2DIR"/sbin/mke2fs "$E2DIR"/usr/sbin/mke2fs 2>/dev/null | head -n1 || true)
[ -n "$MKE2FS" ] || die "no mke2fs in e2fsprogs"

# 3. Shared libraries: resolved with ldd against the host's libraries. That is sound only when
# the host is the same Debian release the packages come from (it is: apt on this host chose
# them); a library the host lacks is installed (the package's lib* dependencies) and ldd re-run.
host_release=$(. /etc/os-release 2>/dev/null; echo "${ID:-?} ${VERSION_CODENAME:-?}")
libs_of() {   # BIN -> absolute paths of the loader and libraries, one a line
  ldd "$1" | awk '/=>/ && $3 ~ /^\// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }'
}
check_libs() {  # BIN PKG
  # "lib.so => not found", or "version `GLIBC_2.xx' not found" (on stderr) when the package is
  # from a newer release than the host's libraries.
  if ldd "$1" 2>&1 | grep -q 'not found'; then
    local deps
    deps=$(apt-cache depends --important "$2" | awk '/Depends: lib/ { print $2 }' | tr -d '<>' | sort -u)
    log "host lacks libraries of $2 ($(ldd "$1" 2>&1 | grep 'not found' | xargs)): installing $deps"
    apt_update_once
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq --no-install-recommends $deps >&2 || die "cannot install $deps"
    ! ldd "$1" 2>&1 | grep 'not found' >&2 ||
      die "$1: libraries still missing on this $host_release host (is it the release apt downloads from?)"
  fi
}
check_libs "$NBD_CLIENT" nbd-client
check_libs "$MKE2FS" e2fsprogs

# 4. Kernel modules: virtio-net (PCI) and nbd with their dependencies, in load order.
MODROOT="$KDIR/lib/modules/$KVER/kernel"
declare -A MODPATH=()
while IFS= read -r f; do
  n=${f##*/}; n=${n%%.ko*}; n=${n//-/_}
  MODPATH[$n]=$f
done < <(find "$MODROOT" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
ko_cat() {   # decompress on the host: busybox insmod may not read compressed modules
  case "$1" in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
declare -A SEEN=()
MODORDER=()
add_mod() {   # depth-first: dependencies first
  local n=${1//-/_} d deps
  [ -z "${SEEN[$n]:-}" ] || return 0
  SEEN[$n]=1
  [ -n "${MODPATH[$n]:-}" ] || die "kernel $KVER has no module $n"
  deps=$(ko_cat "${MODPATH[$n]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
  for d in ${deps//,/ }; do add_mod "$d"; done
  MODORDER+=("$n")
}
for m in virtio_pci virtio_net nbd; do add_mod "$m"; done

# 5. The initramfs, cached by everything that goes into it.
INIT_SCRIPT=$(cat <<'EOF_INIT'
#!/bin/sh
# /init of the nbd-mirror kernel-client test VM (generated by scripts/kernel-client-vm.sh).
export PATH=/opt/bin:/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
/bin/busybox mkdir -p /dev /proc /sys /tmp /mnt /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys

arg() { sed -n "s/.*[[:space:]]ktest_$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline; }
HOST=$(arg host); PORT=$(arg port); EXPORT=$(arg export); CONNS=$(arg conns)
TAG=$(arg tag); SIZE=$(arg size); BIG=$(arg big)
STRING="nbd-mirror-kernel-test-$TAG"
STEP=boot
now() { cut -d' ' -f1 /proc/uptime; }
T_START=$(now)
took() { awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
finish() {
  echo "KTEST DONE $1 after $(took)s in the guest"
  sync
  poweroff -f
  sleep 5
  exit 1
}
fail() {
  echo "KTEST FAIL $STEP: $*"
  dmesg | sed -n '/Run \/init/,$p' | tail -n 25 | sed 's/^/KTEST DMESG /'
  finish fail
}
pass() { echo "KTEST PASS $STEP: $* [t=$(took)s]"; }
info() { echo "KTEST INFO $*"; }
# run SECONDS CMD...: run with a time limit; fail the step with its output on error.
run() {
  t=$1; shift
  OUT=$(timeout "$t" "$@" 2>&1); rc=$?
  [ $rc -eq 0 ] || fail "'$*' exited $rc: $(echo "$OUT" | tail -n 5 | tr '\n' ' ')"
}
# wait_size SECONDS WANT: poll /sys/block/nbd0/size until it is WANT ("nonzero" or "0").
wait_size() {
  i=0
  while [ $i -lt $(($1 * 10)) ]; do
    s=$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)
    if [ "$2" = nonzero ] && [ "$s" != 0 ]; then return 0; fi
    if [ "$2" = 0 ] && [ "$s" = 0 ]; then return 0; fi
    usleep 100000; i=$((i + 1))
  done
  return 1
}
connect() {   # connect N [extra nbd-client args]: expect N TCP connections to the server
  want=$1; shift
  run 90 /opt/bin/nbd-client "$HOST" "$PORT" /dev/nbd0 -N "$EXPORT" "$@"
  wait_size 30 nonzero || fail "/sys/block/nbd0/size still 0 after nbd-client returned"
  NCONN=$(netstat -tn 2>/dev/null | grep -c " $HOST:$PORT .*ESTABLISHED")
  [ "$NCONN" = "$want" ] || fail "$NCONN TCP connections to $HOST:$PORT, expected $want: $(netstat -tn | tr '\n' ' ')"
}
disconnect() {
  run 60 /opt/bin/nbd-client -d /dev/nbd0
  wait_size 30 0 || fail "/dev/nbd0 still has a size after nbd-client -d"
}
check_dmesg() {
  bad=$(dmesg | grep -iE 'I/O error|EXT4-fs error|EXT4-fs warning|nbd.*(timed out|error|fail)|blk_update_request' | head -n 5)
  [ -z "$bad" ] || fail "kernel log: $(echo "$bad" | tr '\n' ' ')"
}

echo
echo "KTEST START kernel $(uname -r)"
info "export=$EXPORT host=$HOST port=$PORT connections=$CONNS tag=$TAG"

STEP=modules
while read -r m args; do
  run 60 insmod "/lib/ktest-modules/$m.ko" $args
done < /lib/ktest-modules/order
[ -e /sys/module/nbd ] || fail "nbd not loaded"
pass "loaded $(cut -d' ' -f1 /lib/ktest-modules/order | tr '\n' ' ')"

STEP=network
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
[ -e /sys/class/net/eth0 ] || fail "no eth0 (virtio-net did not probe)"
ip link set eth0 up || fail "ip link set eth0 up"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr add"
ip route add default via 10.0.2.2 || fail "ip route add"
pass "eth0 10.0.2.15/24 via 10.0.2.2"

STEP=connect-1
connect 1
pass "nbd-client $HOST $PORT /dev/nbd0 -N $EXPORT: $NCONN connection"

STEP=size
bytes=$(blockdev --getsize64 /dev/nbd0) || fail "blockdev --getsize64"
sectors=$(cat /sys/block/nbd0/size)
[ "$bytes" = $((sectors * 512)) ] || fail "blockdev says $bytes bytes, sysfs $sectors sectors"
[ -z "$SIZE" ] || [ "$bytes" = "$SIZE" ] || fail "size $bytes, expected $SIZE"
pass "$bytes bytes"

STEP=mkfs
run 180 /opt/bin/mke2fs -t ext4 -F -q -L ktest /dev/nbd0
pass "mke2fs -t ext4 /dev/nbd0"

STEP=mount-1
run 60 mount -t ext4 /dev/nbd0 /mnt
pass "mounted"

STEP=write
run 120 dd if=/dev/urandom of=/tmp/big.bin bs=1048576 count="$BIG"
BIGSUM=$(sha256sum /tmp/big.bin | cut -d' ' -f1)
run 120 cp /tmp/big.bin /mnt/big.bin
rm -f /tmp/big.bin
echo "$STRING" > /mnt/hello.txt || fail "write hello.txt"
run 120 sync
info "big.sha256=$BIGSUM"
pass "big.bin ($BIG MiB, sha256 $BIGSUM) and hello.txt"

STEP=umount-1
run 120 umount /mnt
check_dmesg
pass "unmounted"

STEP=disconnect-1
disconnect
echo 3 > /proc/sys/vm/drop_caches
pass "nbd-client -d /dev/nbd0"

STEP=connect-2
if [ "$CONNS" -gt 1 ]; then connect "$CONNS" -C "$CONNS"; else connect 1; fi
pass "nbd-client $HOST $PORT /dev/nbd0 -N $EXPORT -C $CONNS: $NCONN connections"

STEP=mount-2
run 60 mount -t ext4 /dev/nbd0 /mnt
pass "mounted again"

STEP=verify
sum=$(sha256sum /mnt/big.bin | cut -d' ' -f1) || fail "read big.bin"
[ "$sum" = "$BIGSUM" ] || fail "big.bin sha256 $sum, wrote $BIGSUM"
got=$(cat /mnt/hello.txt) || fail "read hello.txt"
[ "$got" = "$STRING" ] || fail "hello.txt has '$got', wrote '$STRING'"
pass "big.bin sha256 and hello.txt match"

STEP=write-2
echo "$STRING-connections-$CONNS" > /mnt/second.txt || fail "write second.txt"
run 60 sync
pass "second.txt"

STEP=umount-2
run 120 umount /mnt
check_dmesg
pass "unmounted"

STEP=disconnect-2
disconnect
pass "nbd-client -d /dev/nbd0"

finish ok
EOF_INIT
)

mods_sig=$(for n in "${MODORDER[@]}"; do echo "$n ${MODPATH[$n]#"$CACHE"/}"; done)
KEY=$( { echo "v1 $host_release"; echo "$INIT_SCRIPT"; echo "$mods_sig"; cat "$BBDIR/.pkg" "$NBDDIR/.pkg" "$E2DIR/.pkg" "$KDIR/.pkg";
         for b in "$NBD_CLIENT" "$MKE2FS"; do libs_of "$b" | while read -r l; do echo "$l $(stat -Lc '%s %Y' "$l")"; done; done; } |
       sha256sum | cut -c1-16)
INITRD="$CACHE/initrd-$KVER-$KEY.gz"
if [ ! -f "$INITRD" ]; then
  log "building initramfs $INITRD"
  tree=$(mktemp -d "$CACHE/.initrd-XXXXXX")
  CLEANUP+=("$tree" "$INITRD.tmp")
  mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,opt/bin,etc,dev,proc,sys,tmp,mnt,lib/ktest-modules}
  cp "$BUSYBOX" "$tree/bin/busybox"
  ln -s busybox "$tree/bin/sh"
  cp "$NBD_CLIENT" "$MKE2FS" "$tree/opt/bin/"
  [ -f "$E2DIR/etc/mke2fs.conf" ] && cp "$E2DIR/etc/mke2fs.conf" "$tree/etc/"
  for b in "$NBD_CLIENT" "$MKE2FS"; do
    libs_of "$b" | while read -r l; do
      mkdir -p "$tree$(dirname "$l")"
      cp -L "$l" "$tree$l"
    done
  done
  for n in "${MODORDER[@]}"; do ko_cat "${MODPATH[$n]}" > "$tree/lib/ktest-modules/$n.ko"; done
  for n in "${MODORDER[@]}"; do
    if [ "$n" = nbd ]; then echo "nbd nbds_max=2"; else echo "$n"; fi
  done > "$tree/lib/ktest-modules/order"
  printf '%s\n' "$INIT_SCRIPT" > "$tree/init"
  chmod 755 "$tree/init"
  (cd "$tree" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$tree"
  # Older initramfs images of this cache are dead weight.
  find "$CACHE" -maxdepth 1 -name 'initrd-*.gz' ! -path "$INITRD" -mmin +60 -delete 2>/dev/null || true
fi
flock -u 9
PREP_S=$(elapsed "$T_PREP")
log "prepared in ${PREP_S}s: kernel $KVER ($KPKG), initramfs $(du -k "$INITRD" | cut -f1) KiB, modules ${MODORDER[*]}"
if [ "$PREPARE_ONLY" -eq 1 ]; then
  echo "cache: $CACHE"
  echo "kernel: $VMLINUZ"
  echo "initrd: $INITRD"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# 6. Boot. The guest powers off at the end (QEMU exits 0); a panic reboots and -no-reboot exits.
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nbd-mirror-vm-run-XXXXXX")
CLEANUP+=("$RUN_DIR")
CONSOLE="$RUN_DIR/console.log"
APPEND="console=ttyS0 quiet panic=-1 ipv6.disable=1 mitigations=off"
APPEND+=" ktest_host=$HOST_ADDR ktest_port=$PORT ktest_export=$EXPORT_NAME ktest_conns=$CONNS"
APPEND+=" ktest_tag=$TAG ktest_big=$BIG_MIB ktest_size=$EXPECT_SIZE"

log "booting $KVER under TCG: nbd://$HOST_ADDR:$PORT/$EXPORT_NAME from the guest = 127.0.0.1:$PORT here, connections 1 then $CONNS"
T_BOOT=$(date +%s.%N)
RAW="$RUN_DIR/console.raw"
# QEMU runs in the background so that a signal to this script (a test runner giving up) can
# stop it: timeout(1) sits in its own process group, so only an explicit kill reaches it.
: > "$RAW"   # before tail -f below opens it
timeout --kill-after=10 "$TIMEOUT" "$QEMU" -accel tcg -cpu max -m 512 -smp 1 \
  -nographic -no-reboot -monitor none -serial stdio \
  -kernel "$VMLINUZ" -initrd "$INITRD" -append "$APPEND" \
  -netdev user,id=n0,ipv6=off -device virtio-net-pci,netdev=n0,romfile= \
  </dev/null >>"$RAW" 2>&1 &
QPID=$!
stop_vm() {
  trap - INT TERM HUP
  log "interrupted: stopping the VM"
  kill -TERM "$QPID" 2>/dev/null
  wait "$QPID" 2>/dev/null
  exit 130
}
trap stop_vm INT TERM HUP
clean_console() { sed -u 's/\r$//; s/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
# Live progress on stderr: the KTEST lines (or the whole console with --verbose) as they come.
tail -s 0.2 -n +1 -f --pid="$QPID" "$RAW" 2>/dev/null | clean_console |
  if [ "$VERBOSE" -eq 1 ]; then sed -u 's/^/  console: /'; else sed -un 's/^.*\(KTEST .*\)$/  guest: \1/p'; fi >&2 &
TAILPID=$!
set +e
wait "$QPID"
QEMU_RC=$?
wait "$TAILPID"
set -e
trap - INT TERM HUP
clean_console < "$RAW" > "$CONSOLE"
VM_S=$(elapsed "$T_BOOT")

# 7. Verdict, from the whole console log.
KT="$RUN_DIR/ktest.log"
sed -n 's/^.*\(KTEST .*\)$/\1/p' "$CONSOLE" > "$KT"
PASSES=$(grep -c '^KTEST PASS ' "$KT" || true)
FAILS=$(grep '^KTEST FAIL ' "$KT" || true)
DONE=$(grep -m1 '^KTEST DONE ' "$KT" || true)
BIGSUM=$(sed -n 's/^KTEST INFO big.sha256=\([0-9a-f]*\).*/\1/p' "$KT" | head -n1)
TOTAL_S=$(elapsed "$T0")
echo "kernel-client-vm: kernel $KVER, export '$EXPORT_NAME' on 127.0.0.1:$PORT, connections 1 then $CONNS"
sed -n 's/^KTEST PASS \(.*\) \[t=\(.*\)\]$/kernel-client-vm: ok \1 (guest t=\2)/p' "$KT"
echo "kernel-client-vm: string: $STRING"
[ -z "$BIGSUM" ] || echo "kernel-client-vm: big.bin sha256: $BIGSUM"
echo "kernel-client-vm: time: prepare ${PREP_S}s, VM ${VM_S}s, total ${TOTAL_S}s"
if [ -z "$FAILS" ] && [[ $DONE == "KTEST DONE ok"* ]] && [ "$QEMU_RC" -eq 0 ]; then
  echo "kernel-client-vm: PASS ($PASSES steps)"
  exit 0
fi
reason="guest reported failure"
[ -n "$FAILS" ] || reason="VM ended without finishing (qemu exit $QEMU_RC$([ "$QEMU_RC" -eq 124 ] && echo ", timed out after ${TIMEOUT}s"))"
echo "kernel-client-vm: FAIL: $reason"
[ -z "$FAILS" ] || echo "$FAILS"
grep '^KTEST DMESG ' "$KT" || true
echo "--- last console lines (other than KTEST) ---"
grep -v 'KTEST ' "$CONSOLE" | tail -n 40 || true
exit 1
