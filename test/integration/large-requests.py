#!/usr/bin/python3
"""Requests far above 32 MiB, as the NBD project's integrityhuge test sends them.

Usage: large-requests.py URI SEED COUNT

Writes COUNT requests of 33-48 MiB at seeded random offsets (any byte alignment) into a fresh,
all-zero export, keeping a shadow copy; after each write it reads a random range of 33-48 MiB
back and compares it with the shadow. Ends with a FLUSH and prints one JSON object:
  {"max_block": ..., "writes": n, "reads": n, "mismatches": [...], "sha256": hex of the shadow}
The mocha test (large-requests.test.ts) asserts on it; this script only observes.
"""
import hashlib
import json
import random
import sys

import nbd

MiB = 1024 * 1024
uri, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)

h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
shadow = bytearray(size)
out = {"max_block": h.get_block_size(nbd.SIZE_MAXIMUM), "writes": 0, "reads": 0, "mismatches": []}


def span():
    length = rng.randrange(33 * MiB, 48 * MiB + 1)
    return rng.randrange(0, size - length + 1), length


for i in range(count):
    off, length = span()
    data = rng.randbytes(length)
    h.pwrite(data, off)
    shadow[off:off + length] = data
    out["writes"] += 1
    off, length = span()
    if h.pread(length, off) != shadow[off:off + length]:
        out["mismatches"].append([i, off, length])
    out["reads"] += 1
h.flush()
h.shutdown()
out["sha256"] = hashlib.sha256(shadow).hexdigest()
print(json.dumps(out))
