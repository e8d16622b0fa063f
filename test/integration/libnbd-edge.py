#!/usr/bin/python3
"""Drive NBD edge cases through libnbd with client-side strictness disabled.

Usage: libnbd-edge.py HOST PORT RW_EXPORT RO_EXPORT

The RW export must be a freshly created, fully sparse (all holes) export of at least 160 MiB;
the RO export is any read-only export. Prints one JSON object on stdout:

  {"size": ..., "checks": {NAME: {"ok": bool, "errno": "EINVAL"|null, ...}, ...}}

The mocha test (libnbd-edge.test.ts) asserts on it; this script only observes.
Layout used inside the RW export (all offsets in MiB):
  0      FUA write (unaligned, at byte 12345)
  4      trim          8   zero           10  zero NO_HOLE
  12     zero FAST_ZERO                   14  zero NO_HOLE|FAST_ZERO
  16-20  block status (data only in [17, 18))
  24     multi-conn
  20-100 trim/zero/cache/block status longer than the max payload (after the checks above)
  64-128 64 MiB (= max payload) write/read
"""
import errno
import json
import sys

import nbd

MiB = 1024 * 1024
MAX_PAYLOAD = 64 * MiB

host, port, rw_export, ro_export = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
checks = {}


def errname(e):
    if e.errnum is None:
        return None
    return errno.errorcode.get(e.errnum, str(e.errnum))


def attempt(fn):
    """Run fn(); {"ok": True, "value": ...} or {"ok": False, "errno": "E...", "msg": ...}."""
    try:
        v = fn()
        return {"ok": True, "errno": None, "value": v}
    except nbd.Error as e:
        return {"ok": False, "errno": errname(e), "msg": e.string}


def record(name, result):
    checks[name] = result
    return result


def connect(export, meta=True):
    h = nbd.NBD()
    # Let every request reach the server: the point is to test the server's checks.
    h.set_strict_mode(0)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_export_name(export)
    h.connect_tcp(host, str(port))
    return h


def extents(h, count, offset, flags=0):
    """block_status -> list of [offset, length, flags] for base:allocation."""
    out = []

    def cb(metacontext, off, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        pos = off
        for i in range(0, len(entries), 2):
            out.append([pos, entries[i], entries[i + 1]])
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return out


def flags_over(ext, start, end):
    """The flags of every extent intersecting [start, end)."""
    return [f for (o, l, f) in ext if o < end and o + l > start]


def pattern(n, seed):
    """Byte i is (i * 7 + seed) & 0xff (period 256)."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (block * (n // 256 + 1))[:n]


def is_zero(b):
    return b == bytes(len(b))


size = None
try:
    h = connect(rw_export)
    size = h.get_size()

    checks["handshake"] = {
        "ok": True,
        "size": size,
        "can_multi_conn": h.can_multi_conn(),
        "can_fast_zero": h.can_fast_zero(),
        "base_allocation": h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
        "block_size": [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)],
    }

    # --- out of range ---
    record("read_past_end", attempt(lambda: len(h.pread(4096, size - 1024))))
    record("read_at_end", attempt(lambda: len(h.pread(1, size))))
    record("write_past_end", attempt(lambda: h.pwrite(b"\x55" * 4096, size - 1024)))
    record("zero_past_end", attempt(lambda: h.zero(4096, size - 1024)))
    record("trim_past_end", attempt(lambda: h.trim(4096, size - 1024)))
    record("cache_past_end", attempt(lambda: h.cache(4096, size - 1024)))
    record("block_status_past_end", attempt(lambda: extents(h, 4096, size)))
    # The connection must still be usable after those errors.
    record("usable_after_errors", attempt(lambda: len(h.pread(4096, 0))))

    # --- bad flags ---
    # Bit 14 is not a defined command flag.
    record("read_unknown_flag", attempt(lambda: len(h.pread(512, 0, 1 << 14))))
    record("write_unknown_flag", attempt(lambda: h.pwrite(b"\x01" * 512, 0, 1 << 14)))

    # --- payload size limits ---
    big = pattern(MAX_PAYLOAD, 3)
    record("write_max_payload", attempt(lambda: h.pwrite(big, 64 * MiB)))
    record("read_max_payload", attempt(lambda: h.pread(MAX_PAYLOAD, 64 * MiB) == big))
    del big
    # Requests over 64 MiB: libnbd refuses them itself (its own limit), so the mocha test sends
    # them with a hand-rolled client.

    # --- FUA write ---
    fua_data = pattern(20000, 11)
    r = record("fua_write", attempt(lambda: h.pwrite(fua_data, 12345, nbd.CMD_FLAG_FUA)))
    r["offset"] = 12345
    r["length"] = len(fua_data)
    r["seed"] = 11
    r["readback_matches"] = h.pread(len(fua_data), 12345) == fua_data

    # --- trim ---
    off = 4 * MiB
    h.pwrite(b"\xaa" * MiB, off)
    h.flush()
    r = record("trim", attempt(lambda: h.trim(MiB, off)))
    r["reads_zero"] = is_zero(h.pread(MiB, off))
    r["flags"] = flags_over(extents(h, MiB, off), off, off + MiB)

    # --- write zeroes ---
    for name, off, flags in [
        ("zero", 8 * MiB, 0),
        ("zero_no_hole", 10 * MiB, nbd.CMD_FLAG_NO_HOLE),
        ("zero_fast", 12 * MiB, nbd.CMD_FLAG_FAST_ZERO),
        ("zero_no_hole_fast", 14 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO),
    ]:
        if flags & nbd.CMD_FLAG_FAST_ZERO and not h.can_fast_zero():
            # Sending FAST_ZERO unadvertised would be a client bug; the test fails on can_fast_zero.
            record(name, {"ok": False, "errno": "NOT_ADVERTISED"})
            continue
        h.pwrite(b"\xbb" * MiB, off)
        h.flush()
        r = record(name, attempt(lambda: h.zero(MiB, off, flags)))
        data = h.pread(MiB, off)
        r["reads_zero"] = is_zero(data)
        r["flags"] = flags_over(extents(h, MiB, off), off, off + MiB)

    # --- cache ---
    record("cache", attempt(lambda: h.cache(MiB, 0)))

    # --- block status ---
    h.pwrite(b"\xcc" * MiB, 17 * MiB)
    h.flush()
    r = record("block_status", attempt(lambda: extents(h, 4 * MiB, 16 * MiB)))
    r = record("block_status_req_one_hole", attempt(lambda: extents(h, 4 * MiB, 16 * MiB, nbd.CMD_FLAG_REQ_ONE)))
    r = record("block_status_req_one_data", attempt(lambda: extents(h, 3 * MiB, 17 * MiB, nbd.CMD_FLAG_REQ_ONE)))

    # --- multi-conn ---
    h2 = connect(rw_export)
    mc_data = pattern(65536, 99)
    r = record("multi_conn", attempt(lambda: h.pwrite(mc_data, 24 * MiB)))
    r["flush_other"] = attempt(lambda: h2.flush())
    r["other_sees_data"] = h2.pread(len(mc_data), 24 * MiB) == mc_data
    h2.shutdown()

    # --- commands without payload, longer than the maximum payload ([20 MiB, 100 MiB)) ---
    # The spec lets the server succeed or fail them (EOVERFLOW/EINVAL), but not hang up.
    span = MAX_PAYLOAD + 16 * MiB
    record("trim_over_max_payload", attempt(lambda: h.trim(span, 20 * MiB)))
    record("zero_over_max_payload", attempt(lambda: h.zero(span, 20 * MiB)))
    record("cache_over_max_payload", attempt(lambda: h.cache(span, 20 * MiB)))
    record("block_status_over_max_payload", attempt(lambda: len(extents(h, span, 20 * MiB)) > 0))
    record("usable_after_long_requests", attempt(lambda: len(h.pread(4096, 0))))

    # --- read-only export ---
    ro = connect(ro_export)
    record("ro_is_read_only", {"ok": True, "errno": None, "value": ro.is_read_only()})
    record("ro_read", attempt(lambda: len(ro.pread(4096, 0))))
    record("ro_write", attempt(lambda: ro.pwrite(b"\x01" * 4096, 0)))
    record("ro_zero", attempt(lambda: ro.zero(4096, 0)))
    record("ro_trim", attempt(lambda: ro.trim(4096, 0)))
    ro.shutdown()

    h.shutdown()
except Exception as e:  # report, never crash: the test asserts there is no "fatal"
    checks["fatal"] = {"ok": False, "errno": None, "msg": "%s: %s" % (type(e).__name__, e)}

json.dump({"size": size, "checks": checks}, sys.stdout)
sys.stdout.write("\n")
