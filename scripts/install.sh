#!/usr/bin/env bash
# Install nbd-mirror on a storage site, for systemd.
#
#   sudo scripts/install.sh                         # install (or upgrade) from this source tree
#   DESTDIR=/tmp/root scripts/install.sh            # stage everything under /tmp/root instead
#
# What goes where (paths below are under $DESTDIR when it is set):
#   $PREFIX (/usr/lib/nbd-mirror)     the package: dist/, production node_modules/, package.json,
#                                     README.md, docs/, examples/, systemd/ (unit and host files)
#   $BINDIR/nbd-mirror (/usr/bin)     launcher: exec node $PREFIX/dist/cli.js "$@"
#   $UNITDIR (/etc/systemd/system)    nbd-mirror@.service, nbd-client@.service (host-side example)
#   $CONFDIR (/etc/nbd-mirror)        site-a.json from examples/site-a.json, only if absent
#
# How the package is installed: the package directory is staged next to $PREFIX, then swapped in
# (an upgrade never leaves a half-copied tree; a running site keeps what it loaded until it is
# restarted). Its node_modules is this tree's node_modules pruned to production dependencies
# (`npm prune --omit=dev --offline`: no network) when this tree has one, else
# `npm ci --omit=dev` (from the npm registry, pinned by package-lock.json). NBD_MIRROR_NPM=ci
# forces the latter. dist/ is built first (`npm run build`) unless NBD_MIRROR_SKIP_BUILD=1.
#
# Environment: DESTDIR, PREFIX, BINDIR, UNITDIR, CONFDIR, NODE (the node binary the launcher
# runs; default: the one on PATH), NBD_MIRROR_NPM (auto|ci), NBD_MIRROR_SKIP_BUILD (0|1).
# systemctl is only called (daemon-reload) without DESTDIR, when systemd is running.
set -euo pipefail

cd "$(dirname "$0")/.."
SRC=$PWD

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/lib/nbd-mirror}
BINDIR=${BINDIR:-/usr/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/nbd-mirror}
NPM_MODE=${NBD_MIRROR_NPM:-auto}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

NODE=${NODE:-$(command -v node || true)}
[ -n "$NODE" ] && [ -x "$NODE" ] || die "node not found (set NODE=/path/to/node; Node >= 20.19 is required)"
NODE=$(readlink -f "$NODE")
"$NODE" -e '
  const [maj, min] = process.versions.node.split(".").map(Number);
  if (maj < 20 || (maj === 20 && min < 19)) { console.error(`Node ${process.versions.node}: >= 20.19 required`); process.exit(1); }
' || die "unsupported node version at $NODE"
case "$NODE" in
  /root/*|/home/*) say "warning: $NODE is under /root or /home, which the unit hides (ProtectHome=yes); install node system-wide (e.g. /usr/bin/node) or relax ProtectHome in a drop-in" ;;
esac
command -v npm >/dev/null || die "npm not found"

# ---- build ------------------------------------------------------------------------------------
if [ "${NBD_MIRROR_SKIP_BUILD:-0}" != 1 ]; then
  say "building dist/"
  npm run -s deps
  npm run -s build
fi
[ -f "$SRC/dist/cli.js" ] || die "dist/cli.js missing: run 'npm run build' (or unset NBD_MIRROR_SKIP_BUILD)"

# ---- stage the package next to its final place, then swap ---------------------------------------
TARGET=$DESTDIR$PREFIX
STAGE=$TARGET.new.$$
OLD=$TARGET.old.$$
cleanup() { rm -rf "$STAGE" "$OLD"; }
trap cleanup EXIT
mkdir -p "$(dirname "$TARGET")"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -a "$SRC/package.json" "$SRC/package-lock.json" "$SRC/README.md" "$SRC/dist" "$SRC/systemd" "$STAGE/"
for d in docs examples; do
  [ -d "$SRC/$d" ] && cp -a "$SRC/$d" "$STAGE/"
done

if [ "$NPM_MODE" != ci ] && [ -f "$SRC/node_modules/.package-lock.json" ]; then
  say "production dependencies: copying this tree's node_modules, pruning dev dependencies (offline)"
  cp -a "$SRC/node_modules" "$STAGE/"
  (cd "$STAGE" && npm prune --omit=dev --offline --no-audit --no-fund --loglevel=error >/dev/null)
else
  say "production dependencies: npm ci --omit=dev"
  (cd "$STAGE" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >/dev/null)
fi
# The installed copy must load, native modules (koffi, crc32) included.
(cd "$STAGE" && "$NODE" dist/cli.js --help >/dev/null) || die "the staged package does not run: $STAGE"

if [ -e "$TARGET" ]; then mv "$TARGET" "$OLD"; fi
mv "$STAGE" "$TARGET"
rm -rf "$OLD"
trap - EXIT

# ---- launcher -------------------------------------------------------------------------------
mkdir -p "$DESTDIR$BINDIR"
LAUNCHER=$DESTDIR$BINDIR/nbd-mirror
cat > "$LAUNCHER.tmp.$$" <<EOF
#!/bin/sh
# nbd-mirror launcher (installed by scripts/install.sh)
exec "$NODE" "$PREFIX/dist/cli.js" "\$@"
EOF
chmod 0755 "$LAUNCHER.tmp.$$"
mv "$LAUNCHER.tmp.$$" "$LAUNCHER"

# ---- units ----------------------------------------------------------------------------------
mkdir -p "$DESTDIR$UNITDIR"
for unit in nbd-mirror@.service nbd-client@.service; do
  install -m 0644 "$SRC/systemd/$unit" "$DESTDIR$UNITDIR/$unit"
done

# ---- configuration (never overwritten) --------------------------------------------------------
mkdir -p "$DESTDIR$CONFDIR"
chmod 0755 "$DESTDIR$CONFDIR"
if [ -e "$DESTDIR$CONFDIR/site-a.json" ]; then
  say "keeping the existing $CONFDIR/site-a.json"
else
  install -m 0644 "$SRC/examples/site-a.json" "$DESTDIR$CONFDIR/site-a.json"
  say "sample configuration: $CONFDIR/site-a.json (from examples/site-a.json)"
fi

# ---- systemd --------------------------------------------------------------------------------
RELOADED=no
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload && RELOADED=yes
fi

VERSION=$("$NODE" -p 'require(process.argv[1]).version' "$TARGET/package.json")
cat <<EOF

nbd-mirror $VERSION installed${DESTDIR:+ under $DESTDIR}:
  package    $PREFIX
  launcher   $BINDIR/nbd-mirror  (node: $NODE)
  units      $UNITDIR/nbd-mirror@.service, $UNITDIR/nbd-client@.service
  config     $CONFDIR/site-a.json

Next steps:
  1. Edit $CONFDIR/site-a.json: site names, addresses, LUN paths. The other site gets the
     mirror image of it (see $PREFIX/examples/site-b.json). Image files go under
     /srv/nbd-mirror (the unit may write there; add other directories with ReadWritePaths=).
  2. nbd-mirror config check $CONFDIR/site-a.json
EOF
if [ "$RELOADED" = yes ]; then
  echo "  3. (systemctl daemon-reload: done)"
else
  echo "  3. systemctl daemon-reload"
fi
cat <<EOF
  4. systemctl enable --now nbd-mirror@site-a
  5. nbd-mirror status --config $CONFDIR/site-a.json     journalctl -u nbd-mirror@site-a -f
After an upgrade: systemctl restart nbd-mirror@site-a (hosts lose their connections for the moment).
EOF
