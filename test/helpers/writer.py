#!/usr/bin/python3
# A continuous NBD writer for outage and crash tests (libnbd, one connection, QD 1..N).
#
# Writes --len bytes (default 64 KiB) at random --len-aligned slots inside the first --span
# bytes of the export, at most --rate writes per second, with at most --qd writes in flight.
# Never two writes in flight on the same slot, so the last acknowledged write of a slot is
# what the slot holds unless a later write to it was still unanswered when the writer ended.
#
# Every write has a pattern id (--first-id, +1 per write); its data is the 16-byte block
# struct.pack('>QQ', id, offset) repeated (see test/helpers/writer.ts, which rebuilds it).
#
# Prints {"event": "ready"} once connected, then runs until --count writes were issued, stdin
# closes, SIGTERM/SIGINT, or the connection fails. Then it waits (up to --drain-s) for what is
# still in flight, FLUSHes if --flush and the connection is alive, and prints one JSON line:
#   {"writes", "maxLatencyMs", "acked": [[offset, len, id], ...] (in completion order),
#    "unknown": [[offset, len, id], ...] (issued, never acknowledged: may or may not have landed),
#    "slow": [[msSinceStart, latencyMs], ...] (the 20 slowest), "error": null | "text",
#    "flushed": bool, "durationMs"}
# Exit status 0 in every case the JSON was printed.
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
    block = struct.pack('>QQ', pid, offset)
    reps = (length + 15) // 16
    return bytearray((block * reps)[:length])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('uri')
    ap.add_argument('--qd', type=int, default=4)
    ap.add_argument('--len', type=int, default=64 * 1024)
    ap.add_argument('--span', type=int, default=32 * 1024 * 1024)
    ap.add_argument('--rate', type=float, default=200.0, help='writes per second (0: unlimited)')
    ap.add_argument('--count', type=int, default=0, help='stop after this many writes (0: run until told)')
    ap.add_argument('--first-id', type=int, default=1)
    ap.add_argument('--seed', type=int, default=None)
    ap.add_argument('--flush', action='store_true', help='FLUSH before exiting')
    ap.add_argument('--drain-s', type=float, default=20.0)
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    rng = random.Random(seed)

    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    span = min(args.span, size)
    slots = span // args.len
    if slots < args.qd:
        print(f'span {span} holds only {slots} slots of {args.len} bytes', file=sys.stderr)
        sys.exit(2)

    t0 = time.monotonic()
    print(json.dumps({'event': 'ready', 'seed': seed, 'size': size}), flush=True)

    stdin_fd = sys.stdin.fileno()
    stdin_open = True
    pending = {}          # cookie -> (offset, len, id, issued_at, buffer)
    busy_slots = set()
    acked = []
    latencies_slow = []   # (latency, since_start)
    max_latency = 0.0
    next_id = args.first_id
    issued = 0
    error = None
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_issue = t0

    def retire():
        nonlocal max_latency
        while pending:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                return
            offset, length, pid, issued_at, _buf = pending.pop(cookie)
            busy_slots.discard(offset)
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                raise WriteFailed(offset, length, pid, e)
            now = time.monotonic()
            lat = (now - issued_at) * 1000.0
            if lat > max_latency:
                max_latency = lat
            latencies_slow.append((lat, (issued_at - t0) * 1000.0))
            if len(latencies_slow) > 200:
                latencies_slow.sort(reverse=True)
                del latencies_slow[20:]
            acked.append([offset, length, pid])

    def wait_io(timeout):
        nonlocal stdin_open
        rlist, wlist = [], []
        fd = h.aio_get_fd()
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
        if fd in r:
            h.aio_notify_read()
        if fd in w:
            h.aio_notify_write()

    try:
        while not stop_requested and (args.count == 0 or issued < args.count):
            now = time.monotonic()
            if len(pending) < args.qd and now >= next_issue:
                slot = rng.randrange(slots)
                while slot * args.len in busy_slots:
                    slot = rng.randrange(slots)
                offset = slot * args.len
                pid = next_id
                next_id += 1
                buf = pattern(pid, offset, args.len)
                issued_at = time.monotonic()
                cookie = h.aio_pwrite(buf, offset)
                pending[cookie] = (offset, args.len, pid, issued_at, buf)
                busy_slots.add(offset)
                issued += 1
                next_issue = max(next_issue + interval, issued_at - 0.5) if interval else issued_at
                continue
            timeout = 0.05
            if len(pending) < args.qd:
                timeout = min(timeout, next_issue - now)
            wait_io(timeout)
            retire()
        deadline = time.monotonic() + args.drain_s
        while pending and time.monotonic() < deadline:
            wait_io(min(0.05, deadline - time.monotonic()))
            retire()
    except WriteFailed as e:
        error = f'write of id {e.pid} at {e.offset} failed: {e.err} (errno {e.err.errno})'
        pending[-1] = (e.offset, e.length, e.pid, 0, None)
    except nbd.Error as e:
        error = f'{e} (errno {e.errno})'

    flushed = False
    if error is None and not pending and args.flush:
        try:
            h.flush()
            flushed = True
        except nbd.Error as e:
            error = f'flush failed: {e} (errno {e.errno})'
    if error is None and pending:
        error = f'{len(pending)} writes still unanswered after {args.drain_s} s'
    try:
        if error is None:
            h.shutdown()
    except nbd.Error:
        pass

    latencies_slow.sort(reverse=True)
    out = {
        'writes': len(acked),
        'maxLatencyMs': round(max_latency, 1),
        'acked': acked,
        'unknown': [[o, l, p] for (o, l, p, _t, _b) in pending.values()],
        'slow': [[round(s, 1), round(l, 1)] for (l, s) in latencies_slow[:20]],
        'error': error,
        'flushed': flushed,
        'seed': seed,
        'durationMs': round((time.monotonic() - t0) * 1000.0, 1),
    }
    print(json.dumps(out), flush=True)


class WriteFailed(Exception):
    def __init__(self, offset, length, pid, err):
        super().__init__(str(err))
        self.offset = offset
        self.length = length
        self.pid = pid
        self.err = err


if __name__ == '__main__':
    main()
