// Protocol edge cases: libnbd (python, strict mode off) via libnbd-edge.py, plus a hand-rolled
// client for what libnbd can't send (an unknown command).
import { expect } from 'chai';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NBD_ERR, rawConnect, type RawNbdClient } from '../helpers/nbd-raw.js';
import { Cleanup, exec, randomFile, readAt, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;
const SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'libnbd-edge.py');
// python3-libnbd is a Debian package: use the system interpreter, not whatever is first on PATH.
const PYTHON = '/usr/bin/python3';

const STATE_HOLE = 1;
const STATE_ZERO = 2;

interface Check {
  ok: boolean;
  errno: string | null;
  msg?: string;
  value?: unknown;
  [key: string]: unknown;
}

interface EdgeResult {
  size: number;
  checks: Record<string, Check>;
}

/** Extents clipped to [start, end): [offset, length, flags][] */
function clip(extents: [number, number, number][], start: number, end: number): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (const [o, l, f] of extents) {
    const s = Math.max(o, start);
    const e = Math.min(o + l, end);
    if (e > s) out.push([s, e - s, f]);
  }
  return out;
}

/** Merge adjacent extents with equal flags. */
function merge(extents: [number, number, number][]): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (const x of extents) {
    const last = out[out.length - 1];
    if (last && last[2] === x[2] && last[0] + last[1] === x[0]) last[1] += x[1];
    else out.push([...x]);
  }
  return out;
}

/** Allocated byte ranges [start, end) of a file, from FIEMAP (`filefrag -v -b1`, which syncs first). */
async function allocatedRanges(file: string): Promise<[number, number][]> {
  const r = await exec('filefrag', ['-v', '-b1', file], { timeoutMs: 30_000 });
  const out: [number, number][] = [];
  for (const m of r.stdout.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*(\d+):/gm)) out.push([Number(m[1]), Number(m[2]) + 1]);
  return out;
}

function overlaps(ranges: [number, number][], start: number, end: number): boolean {
  return ranges.some(([s, e]) => s < end && e > start);
}

function covers(ranges: [number, number][], start: number, end: number): boolean {
  let pos = start;
  for (const [s, e] of [...ranges].sort((a, b) => a[0] - b[0])) {
    if (s > pos) break;
    if (e > pos) pos = e;
    if (pos >= end) return true;
  }
  return pos >= end;
}

describe('protocol edge cases (libnbd, strict mode off)', function () {
  const cleanup = new Cleanup();
  let site: Site;
  let lun0: string;
  let result: EdgeResult;
  const SIZE = 160 * MiB;

  const check = (name: string): Check => {
    const c = result.checks[name];
    expect(c, `check "${name}" ran (script output: ${JSON.stringify(result.checks.fatal ?? null)})`).to.not.equal(undefined);
    return c!;
  };
  const expectErrno = (name: string, errno: string | string[]) => {
    const c = check(name);
    const allowed = Array.isArray(errno) ? errno : [errno];
    expect(c.ok, `${name} should fail with ${allowed.join('/')}: ${JSON.stringify(c)}`).to.equal(false);
    expect(allowed, `${name}: ${JSON.stringify(c)}`).to.include(c.errno);
  };
  const expectOk = (name: string) => {
    const c = check(name);
    expect(c.ok, `${name} should succeed: ${JSON.stringify(c)}`).to.equal(true);
    return c;
  };

  before(async function () {
    const dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    lun0 = await sparseFile(dir.join('lun0.img'), SIZE);
    const ro = await randomFile(dir.join('ro.img'), 4 * MiB);
    site = await startSite({
      luns: [
        { name: 'lun0', path: lun0, role: 'primary', mirror: 'none' },
        { name: 'ro', path: ro, role: 'primary', mirror: 'none', readOnly: true },
      ],
    });
    cleanup.add('stop site', () => site.stop());
    const r = await exec(PYTHON, [SCRIPT, site.host, String(site.port), 'lun0', 'ro'], { timeoutMs: 45_000 });
    result = JSON.parse(r.stdout) as EdgeResult;
  });

  after(() => cleanup.run());

  it('the script ran to completion', function () {
    expect(result.checks.fatal, JSON.stringify(result.checks.fatal)).to.equal(undefined);
    expect(result.size).to.equal(SIZE);
    const hs = check('handshake');
    expect(hs.can_multi_conn).to.equal(true);
    expect(hs.base_allocation).to.equal(true);
    expect(hs.block_size).to.deep.equal([1, 4096, 64 * MiB]);
  });

  describe('out-of-range requests', function () {
    it('read past the end → EINVAL', function () {
      expectErrno('read_past_end', 'EINVAL');
      expectErrno('read_at_end', 'EINVAL');
    });
    it('write past the end → ENOSPC', function () {
      expectErrno('write_past_end', 'ENOSPC');
    });
    it('write-zeroes past the end → ENOSPC', function () {
      expectErrno('zero_past_end', 'ENOSPC');
    });
    it('trim / cache / block-status past the end → EINVAL', function () {
      expectErrno('trim_past_end', 'EINVAL');
      expectErrno('cache_past_end', 'EINVAL');
      expectErrno('block_status_past_end', 'EINVAL');
    });
    it('the connection stays usable after those errors', function () {
      expect(expectOk('usable_after_errors').value).to.equal(4096);
    });
  });

  describe('flags and payload size', function () {
    it('an undefined command flag → EINVAL', function () {
      expectErrno('read_unknown_flag', 'EINVAL');
      expectErrno('write_unknown_flag', 'EINVAL');
    });

    it('a request of exactly the maximum payload (64 MiB, as nbdkit) works both ways', function () {
      expectOk('write_max_payload');
      expect(expectOk('read_max_payload').value, 'read back what was written').to.equal(true);
    });

    // Spec, "block size constraints" / NBD_EOVERFLOW: a READ or WRITE longer than the maximum
    // payload gets NBD_EINVAL; the server "SHOULD NOT return NBD_EOVERFLOW except" for DF reads
    // and for commands *without* payload that exceed the maximum. A structured-reply server MAY
    // instead serve an oversized READ in several chunks.
    it('trim / zero / cache / block-status longer than the maximum payload: success or EOVERFLOW/EINVAL, no disconnect', function () {
      for (const name of ['trim_over_max_payload', 'zero_over_max_payload', 'cache_over_max_payload', 'block_status_over_max_payload']) {
        const c = check(name);
        if (c.ok) {
          if (name.startsWith('block_status')) expect(c.value, `${name} returned extents`).to.equal(true);
        } else {
          expect(['EOVERFLOW', 'EINVAL'], `${name}: ${JSON.stringify(c)}`).to.include(c.errno);
        }
      }
      expectOk('usable_after_long_requests');
    });
  });

  describe('data commands', function () {
    it('a FUA write reads back and is in the backing file', async function () {
      const c = expectOk('fua_write');
      expect(c.readback_matches).to.equal(true);
      const offset = c.offset as number;
      const length = c.length as number;
      const seed = c.seed as number;
      const expected = Buffer.alloc(length);
      for (let i = 0; i < length; i++) expected[i] = (i * 7 + seed) & 0xff;
      expect((await readAt(lun0, offset, length)).equals(expected), 'backing file holds the FUA data').to.equal(true);
    });

    it('trim on a sparse file reads back zeros and becomes a hole', async function () {
      const c = expectOk('trim');
      expect(c.reads_zero).to.equal(true);
      const flags = c.flags as number[];
      expect(flags.length).to.be.greaterThan(0);
      for (const f of flags) expect(f & STATE_HOLE, `extent flags ${f}`).to.equal(STATE_HOLE);
      // ...and the backing file really has no blocks there any more.
      const allocated = await allocatedRanges(lun0);
      expect(overlaps(allocated, 4 * MiB, 5 * MiB), JSON.stringify(allocated)).to.equal(false);
    });

    it('write-zeroes (no flags) reads back zeros', function () {
      const c = expectOk('zero');
      expect(c.reads_zero).to.equal(true);
    });

    it('write-zeroes with NO_HOLE reads back zeros and leaves the range provisioned', async function () {
      const c = expectOk('zero_no_hole');
      expect(c.reads_zero).to.equal(true);
      // NBD_CMD_FLAG_NO_HOLE: the area must stay fully provisioned. Checked on the backing file
      // with FIEMAP rather than via base:allocation: ext4 reports zeroed-but-allocated
      // ("unwritten") extents as holes to SEEK_HOLE, so NBD_STATE_HOLE may legitimately be set.
      const allocated = await allocatedRanges(lun0);
      expect(covers(allocated, 10 * MiB, 11 * MiB), JSON.stringify(allocated)).to.equal(true);
    });

    for (const name of ['zero_fast', 'zero_no_hole_fast']) {
      it(`write-zeroes with FAST_ZERO${name.includes('no_hole') ? ' + NO_HOLE' : ''} either zeroes or fails fast with ENOTSUP`, function () {
        const c = check(name);
        expect(c.errno, 'FAST_ZERO must be advertised').to.not.equal('NOT_ADVERTISED');
        if (c.ok) {
          expect(c.reads_zero, JSON.stringify(c)).to.equal(true);
        } else {
          // NBD_CMD_FLAG_FAST_ZERO: a server that can't zero fast fails with NBD_ENOTSUP.
          expect(c.errno, JSON.stringify(c)).to.equal('ENOTSUP');
        }
      });
    }

    it('cache succeeds', function () {
      expectOk('cache');
    });
  });

  describe('block status (base:allocation)', function () {
    it('without REQ_ONE: hole / data / hole over [16 MiB, 20 MiB)', function () {
      const c = expectOk('block_status');
      const ext = c.value as [number, number, number][];
      // Contiguous from the requested offset.
      let pos = 16 * MiB;
      for (const [o, l] of ext) {
        expect(o).to.equal(pos);
        expect(l).to.be.greaterThan(0);
        pos += l;
      }
      const got = merge(clip(ext, 16 * MiB, 20 * MiB));
      expect(got.map(([o, l, f]) => [o, l, f & STATE_HOLE])).to.deep.equal([
        [16 * MiB, MiB, STATE_HOLE],
        [17 * MiB, MiB, 0],
        [18 * MiB, 2 * MiB, STATE_HOLE],
      ]);
      expect(got[0]![2] & STATE_ZERO, 'the hole reads as zero').to.equal(STATE_ZERO);
      expect(got[2]![2] & STATE_ZERO, 'the hole reads as zero').to.equal(STATE_ZERO);
    });

    it('with REQ_ONE: exactly one extent, no longer than requested', function () {
      const hole = expectOk('block_status_req_one_hole').value as [number, number, number][];
      expect(hole, JSON.stringify(hole)).to.have.length(1);
      expect(hole[0]![0]).to.equal(16 * MiB);
      expect(hole[0]![1]).to.be.within(1, MiB); // the hole ends at 17 MiB
      expect(hole[0]![2] & STATE_HOLE).to.equal(STATE_HOLE);

      const data = expectOk('block_status_req_one_data').value as [number, number, number][];
      expect(data, JSON.stringify(data)).to.have.length(1);
      expect(data[0]![0]).to.equal(17 * MiB);
      expect(data[0]![1]).to.be.within(1, MiB); // the data ends at 18 MiB
      expect(data[0]![2] & STATE_HOLE).to.equal(0);
    });
  });

  describe('read-only export', function () {
    it('is advertised read-only and readable', function () {
      expect(expectOk('ro_is_read_only').value).to.equal(true);
      expect(expectOk('ro_read').value).to.equal(4096);
    });
    it('write / zero / trim → EPERM', function () {
      expectErrno('ro_write', 'EPERM');
      expectErrno('ro_zero', 'EPERM');
      expectErrno('ro_trim', 'EPERM');
    });
  });

  it('multi-conn: a write on one connection, flushed on another, is visible there', function () {
    const c = expectOk('multi_conn');
    expect((c.flush_other as Check).ok, JSON.stringify(c.flush_other)).to.equal(true);
    expect(c.other_sees_data).to.equal(true);
  });

  describe('hand-rolled client: what libnbd will not send', function () {
    let client: RawNbdClient | undefined;
    afterEach(() => client?.destroy());
    const MAX_PAYLOAD = 64 * MiB;

    /** A 512-byte read works: the connection is still in sync. */
    async function stillUsable(c: RawNbdClient): Promise<void> {
      await c.sendRequest({ type: 0, cookie: 0xfeedn, offset: 0n, length: 512 });
      const r = await c.readSimpleReply((k) => (k === 0xfeedn ? 512 : 0));
      expect([r.cookie, r.error, r.data?.length]).to.deep.equal([0xfeedn, 0, 512]);
    }

    // Spec, "block size constraints" / NBD_EOVERFLOW: a READ or WRITE longer than the maximum
    // payload gets NBD_EINVAL; the server "SHOULD NOT return NBD_EOVERFLOW except" for DF reads.
    it('a read longer than the maximum payload (64 MiB) → EINVAL, connection still usable', async function () {
      client = (await rawConnect(site.host, site.port, 'lun0')).client;
      await client.sendRequest({ type: 0, cookie: 7n, offset: 0n, length: MAX_PAYLOAD + 4096 });
      const r = await client.readSimpleReply(() => 0);
      expect([r.cookie, r.error]).to.deep.equal([7n, NBD_ERR.EINVAL]);
      await stillUsable(client);
    });

    it('a write longer than the maximum payload → EINVAL, its payload consumed, connection still usable', async function () {
      client = (await rawConnect(site.host, site.port, 'lun0')).client;
      await client.sendRequest({ type: 1, cookie: 8n, offset: 0n, length: MAX_PAYLOAD + 4096 }, Buffer.alloc(MAX_PAYLOAD + 4096, 0x77));
      const r = await client.readSimpleReply(() => 0);
      expect([r.cookie, r.error]).to.deep.equal([8n, NBD_ERR.EINVAL]);
      await stillUsable(client);
      expect((await readAt(lun0, 0, 4096)).includes(0x77), 'nothing of it was written').to.equal(false);
    });

    it('type 99 → EINVAL with the same cookie, connection still usable', async function () {
      const conn = await rawConnect(site.host, site.port, 'lun0');
      client = conn.client;
      expect(conn.info.size).to.equal(BigInt(SIZE));
      const cookie = 0x0123456789abcdefn;
      await client.sendRequest({ type: 99, cookie, offset: 0n, length: 0 });
      const reply = await client.readSimpleReply();
      expect(reply.cookie).to.equal(cookie);
      expect(reply.error).to.equal(NBD_ERR.EINVAL);

      // Still in sync: a read right after works.
      const readCookie = 0xfeedn;
      await client.sendRequest({ type: 0, cookie: readCookie, offset: 0n, length: 512 });
      const r = await client.readSimpleReply((c) => (c === readCookie ? 512 : 0));
      expect(r.cookie).to.equal(readCookie);
      expect(r.error).to.equal(0);
      expect(r.data?.length).to.equal(512);
    });
  });
});
