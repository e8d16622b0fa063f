#!/usr/bin/python3
# Many random, heavily overlapping, unaligned writes over several NBD connections at once.
#
# N libnbd handles connect to the same export; each keeps up to --inflight asynchronous
# aio_pwrite commands in flight (random length 1..--max-len bytes at a random offset inside
# the first --region bytes, random content). One single-threaded select() loop drives all
# handles, so the server really sees interleaved writes from every connection. When all
# --writes writes have completed, every handle issues a FLUSH.
#
# Prints one JSON object: {"writes", "bytes", "flushes", "seed", "size"}. Any failed command
# makes the script exit 1 with the error on stderr.
import argparse
import json
import os
import random
import select
import sys

import nbd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('uri')
    ap.add_argument('--handles', type=int, default=4)
    ap.add_argument('--inflight', type=int, default=32, help='per handle')
    ap.add_argument('--writes', type=int, default=4000, help='in total')
    ap.add_argument('--region', type=int, default=1024 * 1024)
    ap.add_argument('--max-len', type=int, default=64 * 1024)
    ap.add_argument('--seed', type=int, default=None)
    args = ap.parse_args()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    rng = random.Random(seed)

    handles = []
    for _ in range(args.handles):
        h = nbd.NBD()
        h.connect_uri(args.uri)
        handles.append(h)
    size = handles[0].get_size()
    region = min(args.region, size)
    max_len = min(args.max_len, region)

    # cookie -> buffer, per handle (the buffer must stay alive until the command completes)
    pending = [dict() for _ in handles]
    issued = 0
    completed = 0
    total_bytes = 0

    def issue(i):
        nonlocal issued, total_bytes
        length = rng.randint(1, max_len)
        offset = rng.randint(0, region - length)
        buf = bytearray(os.urandom(length))
        cookie = handles[i].aio_pwrite(buf, offset)
        pending[i][cookie] = buf
        issued += 1
        total_bytes += length

    def retire(i):
        nonlocal completed
        h = handles[i]
        while pending[i]:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            try:
                h.aio_command_completed(cookie)   # raises nbd.Error if the write failed
            except nbd.Error as e:
                print(f'write failed on handle {i}: {e} (errno {e.errno})', file=sys.stderr)
                sys.exit(1)
            del pending[i][cookie]
            completed += 1

    def top_up():
        for i in range(len(handles)):
            while issued < args.writes and len(pending[i]) < args.inflight:
                issue(i)

    top_up()
    while completed < args.writes:
        rlist, wlist = [], []
        fds = {}
        for i, h in enumerate(handles):
            if not pending[i]:
                continue
            fd = h.aio_get_fd()
            fds[fd] = i
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rlist.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wlist.append(fd)
        if not rlist and not wlist:
            print('no handle has anything to wait for, but writes are pending', file=sys.stderr)
            sys.exit(1)
        r, w, _ = select.select(rlist, wlist, [], 30)
        if not r and not w:
            print(f'no progress for 30 s ({completed}/{args.writes} writes completed)', file=sys.stderr)
            sys.exit(1)
        for fd in r:
            handles[fds[fd]].aio_notify_read()
        for fd in w:
            handles[fds[fd]].aio_notify_write()
        for i in range(len(handles)):
            retire(i)
        top_up()

    for h in handles:
        h.flush()
    for h in handles:
        h.shutdown()
    print(json.dumps({'writes': completed, 'bytes': total_bytes, 'flushes': len(handles), 'seed': seed, 'size': size}))


if __name__ == '__main__':
    main()
