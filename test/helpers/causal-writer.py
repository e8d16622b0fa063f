#!/usr/bin/python3
# A writer for causality checks (test/helpers/causality.ts): libnbd, --conns connections, at most
# --qd writes in flight in all, --len-byte writes (a multiple of 4096) at random --len-aligned slots
# of the first --span bytes; never two writes in flight on the same slot.
#
# Every write has an id (--first-id, +1 per write, in issue order). Every 4 KiB block of it holds
# the 16-byte unit struct.pack('>QQ', id, blockOffset) 256 times, so any block of a copy names the
# write it came from (all zeros: never written).
#
# Every issue and every completion takes the next number of one event counter, so "write x was
# acknowledged before write w was issued" is ackEv(x) < issueEv(w).
#
# A FLUSH is issued every --flush-every writes (on the connections in turn; one at a time), and
# whenever a line "flush" arrives on stdin (that one even if another is outstanding). Each
# completed FLUSH prints {"event": "flush", "n", "ms", "forced"} at once; "flush-issued" likewise.
#
# Prints {"event": "ready"} once connected. Runs until --count writes were issued, stdin closes,
# SIGTERM/SIGINT, or a connection fails; then waits up to --drain-s for what is in flight and
# prints one JSON line:
#   {"writes": [[id, offset, len, issueEv, ackEv], ...]   (ackEv -1: never acknowledged),
#    "flushes": [[n, issueEv, ackEv, issuedMs, latencyMs, forced], ...]  (ackEv -1: no reply),
#    "events", "acked", "unknown", "maxLatencyMs", "maxFlushMs", "error", "durationMs", "seed"}
import argparse
import json
import os
import random
import select
import signal
import struct
import sys
import time

import nbd

stop_requested = False


def request_stop(*_):
    global stop_requested
    stop_requested = True


def pattern(pid, offset, length):
    out = bytearray(length)
    for b in range(0, length, 4096):
        out[b:b + 4096] = struct.pack('>QQ', pid, offset + b) * 256
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('uri')
    ap.add_argument('--qd', type=int, default=8)
    ap.add_argument('--conns', type=int, default=2)
    ap.add_argument('--len', type=int, default=4096)
    ap.add_argument('--span', type=int, default=16 * 1024 * 1024)
    ap.add_argument('--rate', type=float, default=0.0, help='writes per second (0: unlimited)')
    ap.add_argument('--count', type=int, default=0)
    ap.add_argument('--first-id', type=int, default=1)
    ap.add_argument('--seed', type=int, default=None)
    ap.add_argument('--flush-every', type=int, default=250)
    ap.add_argument('--drain-s', type=float, default=10.0)
    args = ap.parse_args()
    if args.len % 4096:
        print('--len must be a multiple of 4096', file=sys.stderr)
        sys.exit(2)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    rng = random.Random(seed)

    handles = []
    for _ in range(args.conns):
        h = nbd.NBD()
        h.connect_uri(args.uri)
        handles.append(h)
    size = handles[0].get_size()
    span = min(args.span, size)
    slots = span // args.len
    if slots < args.qd * 2:
        print(f'span {span} holds only {slots} slots of {args.len} bytes', file=sys.stderr)
        sys.exit(2)

    t0 = time.monotonic()
    print(json.dumps({'event': 'ready', 'seed': seed, 'size': size}), flush=True)

    ev = 0
    writes = []            # [id, offset, len, issueEv, ackEv]
    flushes = []           # [n, issueEv, ackEv, issuedMs, latencyMs, forced]
    pending = {}           # (conn, cookie) -> ('w', index, issued_at) | ('f', index, issued_at)
    pending_writes = 0
    pending_flushes = 0
    busy = set()
    next_id = args.first_id
    issued = 0
    since_flush = 0
    max_latency = 0.0
    max_flush = 0.0
    error = None
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_issue = t0
    conn_rr = 0
    flush_rr = 0
    stdin_fd = sys.stdin.fileno()
    stdin_open = True
    stdin_buf = b''
    forced_flushes = 0

    def issue_flush(forced):
        nonlocal ev, pending_flushes, flush_rr
        c = flush_rr % len(handles)
        flush_rr += 1
        n = len(flushes)
        now = time.monotonic()
        flushes.append([n, ev, -1, round((now - t0) * 1000.0, 1), -1, forced])
        ev += 1
        cookie = handles[c].aio_flush()
        pending[(c, cookie)] = ('f', n, now)
        pending_flushes += 1
        print(json.dumps({'event': 'flush-issued', 'n': n, 'forced': forced}), flush=True)

    def retire():
        nonlocal ev, pending_writes, pending_flushes, max_latency, max_flush
        for c, h in enumerate(handles):
            while h.aio_in_flight() > 0 or any(k[0] == c for k in pending):
                try:
                    cookie = h.aio_peek_command_completed()
                except nbd.Error:
                    break   # nothing completed (libnbd raises when none is in flight)
                if cookie <= 0:
                    break
                kind, idx, issued_at = pending.pop((c, cookie))
                try:
                    h.aio_command_completed(cookie)
                    ok = None
                except nbd.Error as e:
                    ok = e
                now = time.monotonic()
                lat = (now - issued_at) * 1000.0
                if kind == 'w':
                    pending_writes -= 1
                    busy.discard(writes[idx][1])
                    if ok is not None:
                        raise RuntimeError(f'write of id {writes[idx][0]} failed: {ok} (errno {ok.errno})')
                    writes[idx][4] = ev
                    ev += 1
                    max_latency = max(max_latency, lat)
                else:
                    pending_flushes -= 1
                    if ok is not None:
                        raise RuntimeError(f'flush {idx} failed: {ok} (errno {ok.errno})')
                    flushes[idx][2] = ev
                    flushes[idx][4] = round(lat, 1)
                    ev += 1
                    max_flush = max(max_flush, lat)
                    print(json.dumps({'event': 'flush', 'n': idx, 'ms': round(lat, 1), 'forced': flushes[idx][5]}), flush=True)

    def wait_io(timeout):
        nonlocal stdin_open, stdin_buf, forced_flushes
        rlist, wlist = [], []
        fds = {}
        for c, h in enumerate(handles):
            fd = h.aio_get_fd()
            fds[fd] = h
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rlist.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wlist.append(fd)
        if stdin_open:
            rlist.append(stdin_fd)
        try:
            r, w, _ = select.select(rlist, wlist, [], max(0.0, timeout))
        except InterruptedError:
            return
        if stdin_fd in r:
            data = os.read(stdin_fd, 4096)
            if not data:
                stdin_open = False
                request_stop()
            stdin_buf += data
            while b'\n' in stdin_buf:
                line, stdin_buf = stdin_buf.split(b'\n', 1)
                if line.strip() == b'flush':
                    forced_flushes += 1
        for fd, h in fds.items():
            if fd in r:
                h.aio_notify_read()
            if fd in w:
                h.aio_notify_write()

    try:
        while not stop_requested and (args.count == 0 or issued < args.count):
            while forced_flushes > 0:
                forced_flushes -= 1
                issue_flush(True)
            now = time.monotonic()
            if args.flush_every and since_flush >= args.flush_every and pending_flushes == 0:
                since_flush = 0
                issue_flush(False)
                continue
            if pending_writes < args.qd and now >= next_issue:
                slot = rng.randrange(slots)
                while slot * args.len in busy:
                    slot = rng.randrange(slots)
                offset = slot * args.len
                pid = next_id
                next_id += 1
                buf = pattern(pid, offset, args.len)
                idx = len(writes)
                writes.append([pid, offset, args.len, ev, -1])
                ev += 1
                c = conn_rr % len(handles)
                conn_rr += 1
                cookie = handles[c].aio_pwrite(buf, offset)
                pending[(c, cookie)] = ('w', idx, time.monotonic())
                pending_writes += 1
                busy.add(offset)
                issued += 1
                since_flush += 1
                next_issue = max(next_issue + interval, now - 0.5) if interval else now
                continue
            timeout = 0.05
            if pending_writes < args.qd and interval:
                timeout = min(timeout, next_issue - now)
            wait_io(timeout)
            retire()
        deadline = time.monotonic() + args.drain_s
        while pending and time.monotonic() < deadline:
            wait_io(min(0.05, deadline - time.monotonic()))
            retire()
        if pending:
            error = f'{pending_writes} writes and {pending_flushes} flushes still unanswered after {args.drain_s} s'
    except (RuntimeError, nbd.Error) as e:
        error = str(e)

    if error is None:
        for h in handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    print(json.dumps({
        'writes': writes,
        'flushes': flushes,
        'events': ev,
        'acked': sum(1 for w in writes if w[4] >= 0),
        'unknown': sum(1 for w in writes if w[4] < 0),
        'maxLatencyMs': round(max_latency, 1),
        'maxFlushMs': round(max_flush, 1),
        'error': error,
        'durationMs': round((time.monotonic() - t0) * 1000.0),
        'seed': seed,
    }), flush=True)


if __name__ == '__main__':
    main()
