#!/usr/bin/env bash
# Installs the Debian client tools the tests drive (real NBD clients, fio, FUSE, e2fsprogs).
# Idempotent: runs apt only when one of the commands is missing.
set -euo pipefail

# command -> package that provides it
declare -A need=(
  [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=nbdfuse
  [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils [fio]=fio [fusermount3]=fuse3
  [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [nbd-client]=nbd-client [iptables]=iptables
  [ss]=iproute2 [losetup]=mount [systemd-analyze]=systemd [qemu-system-x86_64]=qemu-system-x86
)
extra=("$@")   # callers may ask for more packages (e.g. bench: nbd-server)

missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
for pkg in "${extra[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "setup: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
