#!/usr/bin/env bash
# Same-sitting bench comparison of two revisions ("no row more than 5% below the same run of
# the previous main").
#
#   scripts/bench-compare.sh [OLD [NEW]]      (defaults: OLD=main, NEW=HEAD; after a merge: main~1 main)
#
# Each revision is checked out in a temporary worktree (node_modules symlinked from this
# checkout) and built there. Then ONE bench script, this checkout's scripts/bench.js, runs
# against each revision's own dist/cli.js (BENCH_NBD_MIRROR_CLI), interleaved OLD NEW OLD NEW
# ... for BENCH_ROUNDS rounds, all with the same BENCH_* settings, so the jobs are identical
# and only the server differs. The table (scripts/bench/compare.js) has per row the old
# median, the new median, new/old and a WORSE flag where new is more than 5% worse.
#
# Environment (besides every BENCH_* of scripts/bench.js, passed to each run unchanged):
#   BENCH_ROUNDS          rounds (one run of each revision per round)        (default 2)
#   BENCH_TARGETS         default here: the nbd-mirror targets plus nbdkit, not the outage
#                         bench: "nbd-mirror,nbdkit,nbd-mirror sync,nbd-mirror async,nbd-mirror sync plain"
#                         (the reference servers are the same for both revisions; nbdkit stays
#                         in as the noise gauge: it is added if no reference server is listed)
#   BENCH_COMPARE_LIMIT   the flag threshold, a fraction                     (default 0.05)
#   BENCH_COMPARE_KEEP    a directory to keep each run's JSON and log in      (default: none)
# A short sitting: BENCH_SECONDS=3 BENCH_SIZE_MB=512 BENCH_COPY_MB=256 scripts/bench-compare.sh
# (about 2 min per run with the default targets on a 2-CPU machine, so ~9 min for 2 rounds; the
# full default bench, all targets at 10 s per job, takes several minutes per run).
# The machine should be otherwise idle: an A/A run (the same revision twice) shows the noise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OLD_REV=${1:-main}
NEW_REV=${2:-HEAD}
ROUNDS=${BENCH_ROUNDS:-2}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_ROUNDS must be a positive integer" >&2; exit 2; }
export BENCH_TARGETS=${BENCH_TARGETS:-nbd-mirror,nbdkit,nbd-mirror sync,nbd-mirror async,nbd-mirror sync plain}
case ",$BENCH_TARGETS," in
  *,nbdkit,* | *,nbd-server,* | *,qemu-nbd,*) ;;
  *) BENCH_TARGETS="$BENCH_TARGETS,nbdkit" ;;
esac

old_sha=$(git -C "$ROOT" rev-parse --verify "$OLD_REV^{commit}")
new_sha=$(git -C "$ROOT" rev-parse --verify "$NEW_REV^{commit}")
TMP=$(mktemp -d "${TMPDIR:-/tmp}/nbd-mirror-bench-compare.XXXXXX")
worktrees=()
child=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n $child ]]; then
    kill -TERM "$child" 2>/dev/null || true   # the bench stops its servers on SIGTERM
    wait "$child" 2>/dev/null || true
  fi
  local stale=
  for wt in "${worktrees[@]}"; do git -C "$ROOT" worktree remove --force "$wt" 2>/dev/null || stale=1; done
  rm -rf "$TMP"
  [[ -z $stale ]] || git -C "$ROOT" worktree prune 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

log() { printf '[compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# The bench script's own imports need this checkout's build (dist/admin/client.js).
if [[ ! -f $ROOT/dist/admin/client.js ]]; then
  log "building this checkout (the bench script uses its dist/)"
  (cd "$ROOT" && npm run -s build)
fi
modules=$(readlink -f "$ROOT/node_modules")
[[ -d $modules ]] || { echo "no node_modules in $ROOT (run npm ci)" >&2; exit 2; }

# checkout SHA NAME: a detached worktree with node_modules linked, built; prints its dist/cli.js.
checkout() {
  local dir=$TMP/$2
  git -C "$ROOT" worktree add --quiet --detach "$dir" "$1" >&2
  worktrees+=("$dir")
  ln -s "$modules" "$dir/node_modules"
  log "building $2 (${1:0:9}) in $dir"
  (cd "$dir" && npm run -s build) >&2
}

checkout "$old_sha" old
checkout "$new_sha" new
old_cli=$TMP/old/dist/cli.js
new_cli=$TMP/new/dist/cli.js
[[ $new_sha != "$old_sha" ]] || log "OLD and NEW are the same commit (${old_sha:0:9}): an A/A run (shows the noise)"

mkdir -p "$TMP/results"
old_files=()
new_files=()
# run SIDE ROUND CLI
run() {
  local json=$TMP/results/$1-$2.json errlog=$TMP/results/$1-$2.log started=$SECONDS rc=0
  log "round $2/$ROUNDS: $1 ($( [[ $1 == old ]] && echo "$OLD_REV" || echo "$NEW_REV" )) ..."
  BENCH_NBD_MIRROR_CLI=$3 BENCH_OUTPUT=$json node "$ROOT/scripts/bench.js" >"$TMP/results/$1-$2.md" 2>"$errlog" &
  child=$!
  wait "$child" || rc=$?
  child=
  if [[ $rc -ne 0 || ! -f $json ]]; then
    log "round $2: $1 failed (exit $rc); last lines of its log:"
    tail -n 15 "$errlog" >&2
  else
    log "round $2/$ROUNDS: $1 done in $((SECONDS - started)) s"
    if [[ $1 == old ]]; then old_files+=("$json"); else new_files+=("$json"); fi
  fi
}

# Old first in odd rounds, new first in even ones: a machine that drifts busier or quieter
# during the sitting does not always favour the same side.
log "targets: $BENCH_TARGETS; $ROUNDS round(s), order old new, then new old"
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then
    run old "$r" "$old_cli"; run new "$r" "$new_cli"
  else
    run new "$r" "$new_cli"; run old "$r" "$old_cli"
  fi
done

if [[ -n ${BENCH_COMPARE_KEEP:-} ]]; then
  mkdir -p "$BENCH_COMPARE_KEEP"
  cp "$TMP"/results/* "$BENCH_COMPARE_KEEP"/
  log "per-run results kept in $BENCH_COMPARE_KEEP"
fi
[[ ${#old_files[@]} -gt 0 && ${#new_files[@]} -gt 0 ]] || { echo "compare: no successful run on one side" >&2; exit 1; }

join() { local IFS=,; echo "$*"; }
echo "Settings: $( (env | grep -E '^BENCH_' | grep -v -E '^BENCH_(NBD_MIRROR_CLI|OUTPUT)=' | sort | tr '\n' ' ') || true)"
echo "old = $OLD_REV (${old_sha:0:9}), new = $NEW_REV (${new_sha:0:9}); bench script: $ROOT/scripts/bench.js"
node "$ROOT/scripts/bench/compare.js" --old "$(join "${old_files[@]}")" --new "$(join "${new_files[@]}")" \
  --old-label "old $OLD_REV" --new-label "new $NEW_REV" --limit "${BENCH_COMPARE_LIMIT:-0.05}"
