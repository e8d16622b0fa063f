#!/usr/bin/env bash
# Two sites, each in its own network namespace, joined by a veth pair; every LUN on a loop device.
#
#   site a (netns nbdm-a-PID)                        site b (netns nbdm-b-PID)
#     lun0 primary, sync   ───────── mirror ───────►   lun0 secondary
#     lun1 secondary       ◄──────── mirror ─────────  lun1 primary, async
#
# Real NBD clients (libnbd, from inside each namespace) write random data and zeroes; each write
# is timed and also applied to a "shadow" file, so at the end primary, secondary and shadow must
# hash the same. Phases: live writes; link cut with iptables DROP (writes go on, the LUNs
# journal), heal (probation, replay); SIGKILL + restart of b, then of a (writes on the survivor);
# final writes; convergence; sha256 comparison; graceful stop.
#
# Run as root from anywhere: bash scripts/loopback-test.sh (needs `npm run build` first).
# Writer knobs (environment): FLUSH_EVERY=N (an NBD FLUSH after every N writes, default 25; 0 =
# only the final flush), GIVE_UP_S=S (a request without reply after S s is reported as hung and
# its writer stops, default 8).
# Prints "ok ..." per step, "PASS lunN ..." per compared LUN, "total N s"; exits 0 only if every
# check passed. A trap removes everything it made (processes, namespaces, veth, loop devices,
# temp files), also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
START_MS=$(date +%s%3N)

ID=$$
NS_A=nbdm-a-$ID
NS_B=nbdm-b-$ID
VETH_A=nbdma$ID            # interface names: at most 15 characters
VETH_B=nbdmb$ID
NET=10.201.$((RANDOM % 250))
IP_A=$NET.1                # addresses exist only inside the two namespaces
IP_B=$NET.2
NBD_PORT=10809
MIRROR_PORT=10810
ADMIN_PORT=10811
HB_INTERVAL=200
HB_TIMEOUT=600
HB_PROBATION=1000
MAX_WRITE_MS=$((HB_TIMEOUT + 1000))   # no client request may take longer (timeout + 1 s)
LUN_SIZE=64M
PY=/usr/bin/python3        # Debian's python3-libnbd lives there

WORK=""
NS_MADE=()
LOOPS=()
declare -A SITE_PID=()
WRITER_PIDS=()
FAILURES=0
IPT=iptables

log() { printf '%s\n' "$*"; }
elapsed() { echo "$(( $(date +%s%3N) - START_MS ))"; }
fmt_s() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
fail() {
  log "FAIL $*"
  exit 1
}
check_fail() {          # a failed check that does not stop the run
  log "FAIL $*"
  FAILURES=$((FAILURES + 1))
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  local pid ns dev i
  for pid in "${WRITER_PIDS[@]}" "${SITE_PID[@]}"; do
    kill -9 "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for ns in "${NS_MADE[@]}"; do
    # Anything still running inside our namespaces was started by this script.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  done
  wait 2>/dev/null
  if [ "$rc" -ne 0 ] && [ -n "$WORK" ]; then
    for f in "$WORK"/site-*.log; do
      [ -f "$f" ] || continue
      echo "---- last lines of $(basename "$f") ----" >&2
      tail -n 60 "$f" >&2
    done
  fi
  for ns in "${NS_MADE[@]}"; do ip netns del "$ns" 2>/dev/null; done   # takes the veth pair along
  ip link del "$VETH_A" 2>/dev/null
  for dev in "${LOOPS[@]}"; do
    for i in $(seq 1 50); do
      losetup -d "$dev" 2>/dev/null && break
      losetup "$dev" >/dev/null 2>&1 || break       # already gone
      sleep 0.1
    done
  done
  [ -n "$WORK" ] && rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- prerequisites ------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || fail "must run as root (network namespaces, loop devices, iptables)"
for cmd in ip losetup iptables node truncate sha256sum; do
  command -v "$cmd" >/dev/null || fail "missing command: $cmd"
done
"$PY" -c 'import nbd' 2>/dev/null || fail "$PY cannot import nbd (apt-get install python3-libnbd)"
[ -f "$ROOT/dist/cli.js" ] || fail "dist/cli.js missing: run npm run build first"

WORK=$(mktemp -d /tmp/nbdm-loopback.XXXXXX)
log "ok   work dir $WORK (script pid $ID)"

# Helper: status queries and the timed libnbd writer.
cat >"$WORK/nbdm.py" <<'PY'
import json, os, random, sys, time, urllib.request

def status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
        return json.load(r)

def lun(st, name):
    return next(l for l in st["luns"] if l["name"] == name)

def cmd_state(port, name):
    try:
        print(lun(status(port), name)["state"])
    except Exception:
        print("unreachable")

def cmd_detail(port, name):
    try:
        l = lun(status(port), name)
    except Exception as e:
        print(f"unreachable ({e})")
        return
    j = l.get("journal") or {}
    print(" ".join(f"{k}={v}" for k, v in [
        ("state", l["state"]), ("reason", json.dumps(l.get("reason"))), ("journalRecords", j.get("records")),
        ("inflight", l.get("inflight")), ("dirtyRegions", l.get("dirtyRegions")),
        ("resyncPending", l.get("resyncPending")), ("mirrored", json.dumps(l.get("mirrored"), separators=(",", ":"))),
    ] if v is not None))

def cmd_settled(port, name):
    """Primary caught up completely: uptodate, nothing in flight, empty journal, no resync."""
    try:
        l = lun(status(port), name)
    except Exception:
        print("no")
        return
    j = l.get("journal") or {}
    ok = l["state"] == "uptodate" and l.get("inflight") == 0 and j.get("records") == 0 and l.get("resyncPending") == 0
    print("yes" if ok else "no")

def cmd_write(uri, shadow, seconds, max_ms, seed, label):
    """Write random data and zeroes for `seconds`, every request timed (asynchronous API, so a
    request that never completes is reported instead of hanging: given up after GIVE_UP_S)."""
    import nbd
    seconds, max_ms = float(seconds), float(max_ms)
    give_up_s = float(os.environ.get("GIVE_UP_S", "8"))
    flush_every = int(os.environ.get("FLUSH_EVERY", "25"))
    rnd = random.Random(int(seed))
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    fd = os.open(shadow, os.O_RDWR)
    n = zeros = flushes = nbytes = 0
    worst = 0.0
    slow = []
    lat = []

    def timed(what, start):
        nonlocal worst
        t = time.monotonic()
        cookie = start()
        while not h.aio_command_completed(cookie):
            if time.monotonic() - t > give_up_s:
                slow.append(f"{what}: HUNG, no reply after {give_up_s:.0f} s; giving up")
                report()
                os._exit(1)
            h.poll(50)
        ms = (time.monotonic() - t) * 1000
        lat.append(ms)
        worst = max(worst, ms)
        if ms > max_ms:
            slow.append(f"{what} took {ms:.0f} ms")

    def report():
        lat.sort()
        p50 = lat[len(lat) // 2] if lat else 0
        print(f"writer {label}: {n} writes ({zeros} zero), {nbytes / 1048576:.1f} MiB, {flushes} flushes, "
              f"p50 {p50:.1f} ms, max {worst:.0f} ms (limit {max_ms:.0f} ms)", flush=True)
        for s in slow[:10]:
            print(f"writer {label}: SLOW {s}", flush=True)

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r = rnd.random()
        if r < 0.7:      # aligned write, 4 KiB .. 128 KiB
            length = 4096 * rnd.randint(1, 32)
            off = 4096 * rnd.randrange(0, (size - length) // 4096 + 1)
        else:            # unaligned write
            length = rnd.randint(1, 70000)
            off = rnd.randrange(0, size - length + 1)
        if rnd.random() < 0.07:
            timed(f"zero {off}+{length}", lambda: h.aio_zero(length, off))
            os.pwrite(fd, bytes(length), off)
            zeros += 1
        else:
            data = rnd.randbytes(length)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            timed(f"write {off}+{length}", lambda: h.aio_pwrite(buf, off))
            os.pwrite(fd, data, off)
        n += 1
        nbytes += length
        if flush_every and n % flush_every == 0:
            timed(f"flush after write #{n}", h.aio_flush)
            flushes += 1
        time.sleep(0.004)
    timed("final flush", h.aio_flush)
    flushes += 1
    h.shutdown()
    os.fsync(fd)
    os.close(fd)
    report()
    sys.exit(1 if slow else 0)

if __name__ == "__main__":
    {"state": cmd_state, "detail": cmd_detail, "settled": cmd_settled, "write": cmd_write}[sys.argv[1]](*sys.argv[2:])
PY

ns_of() { if [ "$1" = a ]; then echo "$NS_A"; else echo "$NS_B"; fi; }
ip_of() { if [ "$1" = a ]; then echo "$IP_A"; else echo "$IP_B"; fi; }
# primary site of a LUN
prim_of() { if [ "$1" = lun0 ]; then echo a; else echo b; fi; }
q() { ip netns exec "$(ns_of "$1")" "$PY" "$WORK/nbdm.py" "$2" "$ADMIN_PORT" "$3"; }   # q SITE state|detail|settled LUN

# ---- network namespaces and veth -------------------------------------------------------------------
ip netns add "$NS_A"; NS_MADE+=("$NS_A")
ip netns add "$NS_B"; NS_MADE+=("$NS_B")
ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
ip -n "$NS_A" addr add "$IP_A/30" dev "$VETH_A"
ip -n "$NS_B" addr add "$IP_B/30" dev "$VETH_B"
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up
for i in $(seq 1 50); do   # wait for carrier on both ends (no ping here: the sites' pairing proves the path)
  ip -n "$NS_A" link show "$VETH_A" | grep -q 'state UP' && ip -n "$NS_B" link show "$VETH_B" | grep -q 'state UP' && break
  [ "$i" -lt 50 ] || fail "veth $VETH_A/$VETH_B did not come up"
  sleep 0.1
done

# iptables: the default one (nft backend here) if it can add a rule inside a fresh netns, else legacy.
ipt_works() {
  ip netns exec "$NS_A" "$1" -A OUTPUT -o lo -p udp --dport 9 -j ACCEPT 2>/dev/null \
    && ip netns exec "$NS_A" "$1" -D OUTPUT -o lo -p udp --dport 9 -j ACCEPT 2>/dev/null
}
if ipt_works iptables; then IPT=iptables
elif command -v iptables-legacy >/dev/null && ipt_works iptables-legacy; then IPT=iptables-legacy
else fail "neither iptables nor iptables-legacy can add a rule inside a network namespace"; fi
log "ok   namespaces $NS_A ($IP_A) and $NS_B ($IP_B) joined by veth $VETH_A/$VETH_B; using $IPT ($($IPT --version 2>/dev/null | head -n1))"

# ---- loop devices -------------------------------------------------------------------------------
declare -A DEV=()
for s in a b; do
  for l in lun0 lun1; do
    truncate -s "$LUN_SIZE" "$WORK/$s-$l.img"
    d=$(losetup -f --show "$WORK/$s-$l.img")
    LOOPS+=("$d")
    [[ "$d" =~ ^/dev/loop[0-9]+$ ]] || fail "losetup printed '$d'"
    DEV[$s-$l]=$d
  done
done
for l in lun0 lun1; do truncate -s "$LUN_SIZE" "$WORK/$l.shadow"; done
log "ok   loop devices: a/lun0=${DEV[a-lun0]} a/lun1=${DEV[a-lun1]} b/lun0=${DEV[b-lun0]} b/lun1=${DEV[b-lun1]}"

# ---- site configurations ----------------------------------------------------------------------------
# Both sites share one mirror key (TLS-PSK and heartbeat HMAC), as two real sites would.
( umask 077; printf 'loopback:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"$WORK/mirror.psk" )
write_config() {  # SITE PEER  LUN0ROLE LUN0MODE LUN1ROLE LUN1MODE
  local s=$1 p=$2
  mkdir -p -m 700 "$WORK/$s/data"
  cat >"$WORK/$s/config.json" <<JSON
{
  "site": "$s",
  "listen": { "host": "$(ip_of "$s")", "port": $NBD_PORT },
  "dataDir": "$WORK/$s/data",
  "admin": { "host": "127.0.0.1", "port": $ADMIN_PORT },
  "luns": [
    { "name": "lun0", "path": "${DEV[$s-lun0]}", "role": "$3", "mirror": "$4" },
    { "name": "lun1", "path": "${DEV[$s-lun1]}", "role": "$5", "mirror": "$6" }
  ],
  "mirror": {
    "listen": { "host": "$(ip_of "$s")", "port": $MIRROR_PORT },
    "peer": { "host": "$(ip_of "$p")", "port": $MIRROR_PORT, "site": "$p" },
    "tls": "psk", "credentials": { "pskFile": "$WORK/mirror.psk" },
    "connections": 4,
    "reconnectMs": 100,
    "heartbeat": { "intervalMs": $HB_INTERVAL, "timeoutMs": $HB_TIMEOUT, "probationMs": $HB_PROBATION }
  },
  "shutdownTimeoutMs": 5000,
  "log": { "level": "info", "format": "json" }
}
JSON
}
write_config a b primary sync secondary none
write_config b a secondary none primary async

start_site() {  # SITE
  local s=$1 ns deadline
  ns=$(ns_of "$s")
  ip netns exec "$ns" node "$ROOT/dist/cli.js" serve --config "$WORK/$s/config.json" >>"$WORK/site-$s.log" 2>&1 &
  SITE_PID[$s]=$!
  deadline=$(( $(date +%s%3N) + 20000 ))
  until [ "$(q "$s" state lun0)" != unreachable ]; do
    kill -0 "${SITE_PID[$s]}" 2>/dev/null || fail "site $s exited during start-up (see its log below)"
    [ "$(date +%s%3N)" -lt "$deadline" ] || fail "site $s: admin endpoint not answering after 20 s"
    sleep 0.1
  done
}

kill_site() {  # SITE: SIGKILL, wait until it is gone
  local s=$1
  kill -9 "${SITE_PID[$s]}"
  wait "${SITE_PID[$s]}" 2>/dev/null || true
  unset "SITE_PID[$s]"
}

# Wait until every primary is uptodate (settled=1: also nothing in flight, empty journal, no resync).
# Prints the states seen on the way. wait_converged LABEL DEADLINE_S [settled]
wait_converged() {
  local label=$1 limit=$2 settled=${3:-0} t0 deadline l s st seen_lun0="" seen_lun1="" done_all last0="" last1=""
  t0=$(date +%s%3N)
  deadline=$(( t0 + limit * 1000 ))
  while :; do
    done_all=1
    for l in lun0 lun1; do
      s=$(prim_of "$l")
      st=$(q "$s" state "$l")
      if [ "$l" = lun0 ]; then [ "$st" = "$last0" ] || { seen_lun0+="${seen_lun0:+→}$st"; last0=$st; }
      else [ "$st" = "$last1" ] || { seen_lun1+="${seen_lun1:+→}$st"; last1=$st; }; fi
      if [ "$st" != uptodate ]; then done_all=0
      elif [ "$settled" = 1 ] && [ "$(q "$s" settled "$l")" != yes ]; then done_all=0; fi
    done
    [ "$done_all" = 1 ] && break
    if [ "$(date +%s%3N)" -ge "$deadline" ]; then
      log "     lun0@a: $(q a detail lun0)"
      log "     lun1@b: $(q b detail lun1)"
      fail "$label: primaries not uptodate after $limit s (lun0@a $seen_lun0; lun1@b $seen_lun1)"
    fi
    sleep 0.1
  done
  log "ok   $label: converged in $(fmt_s $(( $(date +%s%3N) - t0 ))) s (lun0@a $seen_lun0; lun1@b $seen_lun1)"
}

# Wait until a primary shows STATE. wait_state SITE LUN STATE DEADLINE_MS
wait_state() {
  local s=$1 l=$2 want=$3 limit=$4 t0 st
  t0=$(date +%s%3N)
  while :; do
    st=$(q "$s" state "$l")
    [ "$st" = "$want" ] && break
    if [ $(( $(date +%s%3N) - t0 )) -ge "$limit" ]; then
      check_fail "$l@$s: expected state $want within $limit ms, still '$st' ($(q "$s" detail "$l"))"
      return 1
    fi
    sleep 0.05
  done
  log "ok   $l@$s is $want after $(( $(date +%s%3N) - t0 )) ms: $(q "$s" detail "$l")"
}

SEED=1
# start_writer LUN SECONDS: background libnbd writer through the LUN's primary site.
start_writer() {
  local l=$1 secs=$2 s
  s=$(prim_of "$l")
  SEED=$((SEED + 1))
  ip netns exec "$(ns_of "$s")" "$PY" "$WORK/nbdm.py" write "nbd://$(ip_of "$s"):$NBD_PORT/$l" "$WORK/$l.shadow" \
    "$secs" "$MAX_WRITE_MS" "$((ID * 100 + SEED))" "$l@$s" >"$WORK/writer-$l.out" 2>&1 &
  WRITER_PIDS+=($!)
  eval "WRITER_$l=$!"
}
wait_writer() {  # LUN PHASE
  local l=$1 phase=$2 pid rc=0
  eval "pid=\$WRITER_$l"
  wait "$pid" || rc=$?
  local keep=() w
  for w in "${WRITER_PIDS[@]}"; do [ "$w" = "$pid" ] || keep+=("$w"); done
  WRITER_PIDS=("${keep[@]}")
  sed 's/^/     /' "$WORK/writer-$l.out"
  if [ "$rc" -eq 0 ]; then log "ok   $phase: every $l request answered within $MAX_WRITE_MS ms"
  else check_fail "$phase: writer of $l exited $rc (slow request or I/O error, see above)"; fi
}

cut_link() {
  # First a black hole (nothing arrives: requests and answers in flight are lost, TCP does not
  # notice; only the heartbeat timeout can tell), then 1 s later outgoing packets too (sends fail
  # with EPERM inside the namespace).
  local ns v
  for ns in "$NS_A" "$NS_B"; do
    if [ "$ns" = "$NS_A" ]; then v=$VETH_A; else v=$VETH_B; fi
    ip netns exec "$ns" "$IPT" -A INPUT -i "$v" -j DROP
  done
  sleep 1
  for ns in "$NS_A" "$NS_B"; do
    if [ "$ns" = "$NS_A" ]; then v=$VETH_A; else v=$VETH_B; fi
    ip netns exec "$ns" "$IPT" -A OUTPUT -o "$v" -j DROP
  done
}
heal_link() {
  local ns v
  for ns in "$NS_A" "$NS_B"; do
    if [ "$ns" = "$NS_A" ]; then v=$VETH_A; else v=$VETH_B; fi
    ip netns exec "$ns" "$IPT" -D INPUT -i "$v" -j DROP
    ip netns exec "$ns" "$IPT" -D OUTPUT -o "$v" -j DROP
  done
}

# ---- 1. start both sites --------------------------------------------------------------------------
start_site a
start_site b
log "ok   sites started: a pid ${SITE_PID[a]} (nbd $IP_A:$NBD_PORT), b pid ${SITE_PID[b]} (nbd $IP_B:$NBD_PORT)"
wait_converged "start-up" 30

# ---- 2. live writes on both sides -------------------------------------------------------------------
start_writer lun0 2
start_writer lun1 2
wait_writer lun0 "live"
wait_writer lun1 "live"
wait_converged "after live writes" 20

# ---- 3. link cut (iptables DROP both ways, TCP and UDP), writes on, heal --------------------------
start_writer lun0 4
start_writer lun1 4
sleep 1
CUT_MS=$(date +%s%3N)
cut_link
log "ok   link cut: DROP on $VETH_A and $VETH_B (INPUT, then OUTPUT 1 s later)"
wait_state a lun0 journaling $((HB_TIMEOUT + 3000)) || true
wait_state b lun1 journaling $((HB_TIMEOUT + 3000)) || true
wait_writer lun0 "link cut"
wait_writer lun1 "link cut"
log "     during the cut: lun0@a $(q a detail lun0)"
log "     during the cut: lun1@b $(q b detail lun1)"
heal_link
log "ok   link healed after $(fmt_s $(( $(date +%s%3N) - CUT_MS ))) s of outage"
wait_converged "after heal" 30

# ---- 4. SIGKILL b while a writes lun0; restart b -------------------------------------------------------
start_writer lun0 3
sleep 0.7
kill_site b
log "ok   site b killed (SIGKILL)"
wait_state a lun0 journaling 3000 || true
sleep 0.5
start_site b
log "ok   site b restarted (pid ${SITE_PID[b]})"
wait_writer lun0 "b killed"
wait_converged "after b restart" 30
start_writer lun0 1.5
start_writer lun1 1.5
wait_writer lun0 "between restarts"
wait_writer lun1 "between restarts"
wait_converged "after writes between restarts" 20

# ---- 5. SIGKILL a while b writes lun1; restart a -------------------------------------------------------
start_writer lun1 3
sleep 0.7
kill_site a
log "ok   site a killed (SIGKILL)"
wait_state b lun1 journaling 3000 || true
sleep 0.5
start_site a
log "ok   site a restarted (pid ${SITE_PID[a]})"
wait_writer lun1 "a killed"
wait_converged "after a restart" 30

# ---- 6. final writes, convergence, comparison ----------------------------------------------------------
start_writer lun0 1.5
start_writer lun1 1.5
wait_writer lun0 "final"
wait_writer lun1 "final"
# Writers are stopped and each ended with an NBD FLUSH; wait until nothing is left to send.
wait_converged "final" 30 1
sync

declare -A SUM=()
for k in a-lun0 a-lun1 b-lun0 b-lun1; do SUM[$k]=$(sha256sum "${DEV[$k]}" | cut -d' ' -f1); done
for l in lun0 lun1; do SUM[shadow-$l]=$(sha256sum "$WORK/$l.shadow" | cut -d' ' -f1); done

compare() {  # LUN PRIMARY SECONDARY
  local l=$1 p=$2 s=$3
  if [ "${SUM[$p-$l]}" = "${SUM[$s-$l]}" ]; then
    log "PASS $l $p==$s sha256 ${SUM[$p-$l]} (primary ${DEV[$p-$l]} on $p, secondary ${DEV[$s-$l]} on $s)"
  else
    check_fail "$l $p!=$s sha256: primary ${DEV[$p-$l]} ${SUM[$p-$l]}, secondary ${DEV[$s-$l]} ${SUM[$s-$l]}"
    cmp -l "${DEV[$p-$l]}" "${DEV[$s-$l]}" 2>/dev/null | awk 'NR == 1 { first = $1 } { n++ } END { if (n) printf "     %d bytes differ, first at offset %d\n", n, first - 1 }'
  fi
  if [ "${SUM[shadow-$l]}" = "${SUM[$p-$l]}" ]; then
    log "PASS $l client-data==$p sha256 ${SUM[shadow-$l]} (every acknowledged write is on the primary)"
  else
    check_fail "$l: primary on $p (${SUM[$p-$l]}) differs from what the clients wrote (${SUM[shadow-$l]})"
    cmp -l "$WORK/$l.shadow" "${DEV[$p-$l]}" 2>/dev/null | awk 'NR == 1 { first = $1 } { n++ } END { if (n) printf "     %d bytes differ, first at offset %d\n", n, first - 1 }'
  fi
}
compare lun0 a b
compare lun1 b a

# ---- 7. graceful stop ---------------------------------------------------------------------------------
for s in a b; do kill -TERM "${SITE_PID[$s]}"; done
for s in a b; do
  rc=0
  deadline=$(( $(date +%s%3N) + 15000 ))
  while kill -0 "${SITE_PID[$s]}" 2>/dev/null && [ "$(date +%s%3N)" -lt "$deadline" ]; do sleep 0.1; done
  kill -0 "${SITE_PID[$s]}" 2>/dev/null && { check_fail "site $s still running 15 s after SIGTERM; killing it"; kill -9 "${SITE_PID[$s]}"; }
  wait "${SITE_PID[$s]}" || rc=$?
  unset "SITE_PID[$s]"
  if [ "$rc" -eq 0 ]; then log "ok   site $s stopped on SIGTERM with exit 0"
  else check_fail "site $s exited $rc on SIGTERM"; fi
done

log "total $(fmt_s "$(elapsed)") s"
if [ "$FAILURES" -ne 0 ]; then
  log "FAILED: $FAILURES check(s) failed"
  exit 1
fi
log "ALL CHECKS PASSED"
