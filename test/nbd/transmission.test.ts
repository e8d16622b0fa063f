// Transmission phase through real connections to an NbdServer on 127.0.0.1:0: request
// validation, framing (oversized payloads, bad magic), cookies, structured replies, DISC and
// graceful shutdown.
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import { expect } from 'chai';
import {
  CMD, CMD_FLAG, MAX_PAYLOAD, NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN,
  REPLY_FLAG_DONE, REPLY_TYPE, STATE_HOLE, STATE_ZERO,
} from '../../src/nbd/constants.js';
import {
  assembleRead, encodeRequest, Fixture, GatedLun, KiB, MiB, NbdTestClient, type Reply, type RequestSpec,
} from './support.js';

const SIZE = 1 * MiB;
const TWO_53 = 2n ** 53n;
const U64_MAX = 2n ** 64n - 1n;
const SPARSE_DATA: Array<[number, number]> = [[0, 64 * KiB], [512 * KiB, 64 * KiB]];

function gated(spec: ConstructorParameters<typeof GatedLun>[0], backing: ConstructorParameters<typeof GatedLun>[1]): GatedLun {
  return new GatedLun(spec, backing);
}

/** Extents of a BLOCK_STATUS chunk: context id, then (length, flags) pairs. */
function extentsOf(reply: Reply): { id: number; extents: Array<{ length: number; flags: number }> } {
  expect(reply.chunks).to.have.length(1);
  const c = reply.chunks[0];
  expect(c.type).to.equal(REPLY_TYPE.BLOCK_STATUS);
  expect(c.flags & REPLY_FLAG_DONE).to.equal(REPLY_FLAG_DONE);
  expect((c.payload.length - 4) % 8).to.equal(0);
  const extents: Array<{ length: number; flags: number }> = [];
  for (let at = 4; at < c.payload.length; at += 8) {
    extents.push({ length: c.payload.readUInt32BE(at), flags: c.payload.readUInt32BE(at + 4) });
  }
  return { id: c.payload.readUInt32BE(0), extents };
}

describe('NBD transmission (through NbdServer)', function () {
  let fx: Fixture;

  before(async function () {
    fx = await Fixture.start([
      { name: 'rw', size: SIZE },
      { name: 'ro', size: SIZE, readOnly: true },
      { name: 'sparse', size: SIZE, fill: SPARSE_DATA },
      { name: 'shrink', size: SIZE },
      { name: 'gated', size: SIZE, make: gated },
      { name: 'scratch', size: SIZE, fill: 'sparse' },
    ]);
  });
  after(async function () { await fx?.stop(); });

  describe('request validation', function () {
    type ConnName = 'rw' | 'ro' | 'st';
    const conns = new Map<ConnName, NbdTestClient>();

    before(async function () {
      const rw = await fx.connect();
      await rw.connectExport('rw');
      const ro = await fx.connect();
      await ro.connectExport('ro');
      const st = await fx.connect();
      await st.connectExport('rw', { structured: true, meta: 'rw' });
      conns.set('rw', rw).set('ro', ro).set('st', st);
    });
    after(async function () { await fx.dropClients(); });

    interface Case { name: string; on: ConnName; req: Omit<RequestSpec, 'cookie'>; payload?: number; expect: number }
    const F = CMD_FLAG;
    const cases: Case[] = [
      // READ
      { name: 'READ with NO_HOLE', on: 'rw', req: { type: CMD.READ, flags: F.NO_HOLE, offset: 0, length: 512 }, expect: NBD_EINVAL },
      { name: 'READ with an undefined flag bit', on: 'rw', req: { type: CMD.READ, flags: 1 << 15, offset: 0, length: 512 }, expect: NBD_EINVAL },
      { name: 'READ with DF without structured replies', on: 'rw', req: { type: CMD.READ, flags: F.DF, offset: 0, length: 512 }, expect: NBD_EINVAL },
      { name: 'READ crossing the end', on: 'rw', req: { type: CMD.READ, offset: SIZE - 512, length: 1024 }, expect: NBD_EINVAL },
      { name: 'READ at the end', on: 'rw', req: { type: CMD.READ, offset: SIZE, length: 1 }, expect: NBD_EINVAL },
      { name: 'READ of length 0', on: 'rw', req: { type: CMD.READ, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'READ of 64 MiB + 1', on: 'rw', req: { type: CMD.READ, offset: 0, length: MAX_PAYLOAD + 1 }, expect: NBD_EINVAL },
      { name: 'READ at offset 2^53', on: 'rw', req: { type: CMD.READ, offset: TWO_53, length: 1 }, expect: NBD_EINVAL },
      { name: 'READ at offset 2^64-1', on: 'rw', req: { type: CMD.READ, offset: U64_MAX, length: 1 }, expect: NBD_EINVAL },
      { name: 'READ of the last 512 bytes (control)', on: 'rw', req: { type: CMD.READ, offset: SIZE - 512, length: 512 }, expect: 0 },
      { name: 'READ on a read-only export (control)', on: 'ro', req: { type: CMD.READ, offset: 0, length: 512 }, expect: 0 },
      // WRITE
      { name: 'WRITE with NO_HOLE', on: 'rw', req: { type: CMD.WRITE, flags: F.NO_HOLE, offset: 0, length: 512 }, payload: 512, expect: NBD_EINVAL },
      { name: 'WRITE with DF', on: 'st', req: { type: CMD.WRITE, flags: F.DF, offset: 0, length: 512 }, payload: 512, expect: NBD_EINVAL },
      { name: 'WRITE on a read-only export', on: 'ro', req: { type: CMD.WRITE, offset: 0, length: 512 }, payload: 512, expect: NBD_EPERM },
      { name: 'WRITE crossing the end', on: 'rw', req: { type: CMD.WRITE, offset: SIZE - 256, length: 512 }, payload: 512, expect: NBD_ENOSPC },
      { name: 'WRITE at offset 2^53', on: 'rw', req: { type: CMD.WRITE, offset: TWO_53, length: 512 }, payload: 512, expect: NBD_ENOSPC },
      { name: 'WRITE of length 0', on: 'rw', req: { type: CMD.WRITE, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'WRITE of the last 512 bytes (control)', on: 'rw', req: { type: CMD.WRITE, flags: F.FUA, offset: SIZE - 512, length: 512 }, payload: 512, expect: 0 },
      // TRIM
      { name: 'TRIM with NO_HOLE', on: 'rw', req: { type: CMD.TRIM, flags: F.NO_HOLE, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'TRIM on a read-only export', on: 'ro', req: { type: CMD.TRIM, offset: 0, length: 4096 }, expect: NBD_EPERM },
      { name: 'TRIM crossing the end', on: 'rw', req: { type: CMD.TRIM, offset: SIZE - 4096, length: 8192 }, expect: NBD_EINVAL },
      { name: 'TRIM of length 0', on: 'rw', req: { type: CMD.TRIM, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'TRIM at offset 2^53', on: 'rw', req: { type: CMD.TRIM, offset: TWO_53, length: 4096 }, expect: NBD_EINVAL },
      // WRITE_ZEROES
      { name: 'WRITE_ZEROES with DF', on: 'st', req: { type: CMD.WRITE_ZEROES, flags: F.DF, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'WRITE_ZEROES with REQ_ONE', on: 'rw', req: { type: CMD.WRITE_ZEROES, flags: F.REQ_ONE, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'WRITE_ZEROES on a read-only export', on: 'ro', req: { type: CMD.WRITE_ZEROES, offset: 0, length: 4096 }, expect: NBD_EPERM },
      { name: 'WRITE_ZEROES crossing the end', on: 'rw', req: { type: CMD.WRITE_ZEROES, offset: SIZE - 4096, length: 8192 }, expect: NBD_ENOSPC },
      { name: 'WRITE_ZEROES of length 0', on: 'rw', req: { type: CMD.WRITE_ZEROES, offset: 0, length: 0 }, expect: NBD_EINVAL },
      // CACHE
      { name: 'CACHE with NO_HOLE', on: 'rw', req: { type: CMD.CACHE, flags: F.NO_HOLE, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'CACHE crossing the end', on: 'rw', req: { type: CMD.CACHE, offset: SIZE - 4096, length: 8192 }, expect: NBD_EINVAL },
      { name: 'CACHE of length 0', on: 'rw', req: { type: CMD.CACHE, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'CACHE at offset 2^64-1', on: 'rw', req: { type: CMD.CACHE, offset: U64_MAX, length: 1 }, expect: NBD_EINVAL },
      { name: 'CACHE on a read-only export (control)', on: 'ro', req: { type: CMD.CACHE, offset: 0, length: SIZE }, expect: 0 },
      // FLUSH
      { name: 'FLUSH with NO_HOLE', on: 'rw', req: { type: CMD.FLUSH, flags: F.NO_HOLE, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'FLUSH with a nonzero offset and length', on: 'rw', req: { type: CMD.FLUSH, offset: 4096, length: 77 }, expect: 0 },
      { name: 'FLUSH with offset 2^64-1', on: 'rw', req: { type: CMD.FLUSH, offset: U64_MAX, length: 0 }, expect: 0 },
      { name: 'FLUSH on a read-only export', on: 'ro', req: { type: CMD.FLUSH, offset: 0, length: 0 }, expect: 0 },
      // BLOCK_STATUS
      { name: 'BLOCK_STATUS without a meta context', on: 'rw', req: { type: CMD.BLOCK_STATUS, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'BLOCK_STATUS with NO_HOLE', on: 'st', req: { type: CMD.BLOCK_STATUS, flags: F.NO_HOLE, offset: 0, length: 4096 }, expect: NBD_EINVAL },
      { name: 'BLOCK_STATUS crossing the end', on: 'st', req: { type: CMD.BLOCK_STATUS, offset: SIZE - 4096, length: 8192 }, expect: NBD_EINVAL },
      { name: 'BLOCK_STATUS of length 0', on: 'st', req: { type: CMD.BLOCK_STATUS, offset: 0, length: 0 }, expect: NBD_EINVAL },
      // Unknown commands
      { name: 'command type 8', on: 'rw', req: { type: 8, offset: 0, length: 512 }, expect: NBD_EINVAL },
      { name: 'command type 0xffff', on: 'rw', req: { type: 0xffff, offset: 0, length: 0 }, expect: NBD_EINVAL },
      { name: 'command type 9 (structured connection)', on: 'st', req: { type: 9, offset: 0, length: 512 }, expect: NBD_EINVAL },
      // Structured: over-long reads
      { name: 'READ of 64 MiB + 1 with DF (structured)', on: 'st', req: { type: CMD.READ, flags: F.DF, offset: 0, length: MAX_PAYLOAD + 1 }, expect: NBD_EOVERFLOW },
      { name: 'READ of 64 MiB + 1 without DF (structured)', on: 'st', req: { type: CMD.READ, offset: 0, length: MAX_PAYLOAD + 1 }, expect: NBD_EINVAL },
      { name: 'READ crossing the end (structured)', on: 'st', req: { type: CMD.READ, offset: SIZE - 512, length: 1024 }, expect: NBD_EINVAL },
    ];

    let cookie = 0x1000n;
    for (const c of cases) {
      it(`${c.name} → ${c.expect === 0 ? 'success' : `errno ${c.expect}`}`, async function () {
        const client = conns.get(c.on)!;
        const req: RequestSpec = { ...c.req, cookie: cookie++ };
        const reply = await client.roundTrip(req, c.payload ? randomBytes(c.payload) : undefined);
        expect(reply.error).to.equal(c.expect);
        if (reply.structured && c.expect !== 0) {
          // READ / BLOCK_STATUS errors under structured replies: one ERROR chunk with DONE.
          expect(reply.chunks.map((x) => [x.type, x.flags])).to.deep.equal([[REPLY_TYPE.ERROR, REPLY_FLAG_DONE]]);
        }
        if (c.expect === 0 && req.type === CMD.READ && !reply.structured) expect(reply.data!.length).to.equal(req.length);
      });
    }

    it('every connection is still usable after the errors', async function () {
      for (const [name, client] of conns) {
        const r = await client.roundTrip({ type: CMD.READ, cookie: cookie++, offset: 100, length: 100 });
        expect(r.error, name).to.equal(0);
      }
    });
  });

  describe('framing', function () {
    afterEach(async function () { await fx.dropClients(); });

    it('WRITE with a 64 MiB + 1 payload: payload discarded, EINVAL, next request works', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      const before = fx.contents('rw');
      await c.request({ type: CMD.WRITE, cookie: 1n, offset: 0, length: MAX_PAYLOAD + 1 }, Buffer.alloc(MAX_PAYLOAD + 1, 0xab));
      const r1 = await c.readReply();
      expect(r1.cookie).to.equal(1n);
      expect(r1.error).to.equal(NBD_EINVAL);
      const r2 = await c.roundTrip({ type: CMD.READ, cookie: 2n, offset: 0, length: 4096 });
      expect(r2.error).to.equal(0);
      expect(r2.data!.equals(before.subarray(0, 4096))).to.equal(true);
      expect(fx.contents('rw').equals(before), 'nothing written').to.equal(true);
    });

    it('WRITE of twice the maximum payload: still discarded with EINVAL, connection kept', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      const r = await c.roundTrip({ type: CMD.WRITE, cookie: 3n, offset: 0, length: 2 * MAX_PAYLOAD }, Buffer.alloc(2 * MAX_PAYLOAD));
      expect(r.error).to.equal(NBD_EINVAL);
      expect((await c.roundTrip({ type: CMD.FLUSH, cookie: 4n, length: 0 })).error).to.equal(0);
    });

    it('WRITE header claiming more than twice the maximum payload: the connection is closed', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      await c.request({ type: CMD.WRITE, cookie: 5n, offset: 0, length: 2 * MAX_PAYLOAD + 1 });
      expect(await c.waitClosed()).to.equal(true);
      expect(c.unread).to.equal(0);
    });

    it('a request with a bad magic closes the connection', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      await c.request({ type: CMD.READ, cookie: 6n, offset: 0, length: 512, magic: 0x25609514 });
      expect(await c.waitClosed()).to.equal(true);
      expect(c.unread).to.equal(0);
    });

    it('a request header split across writes, byte by byte, is framed correctly', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      const payload = randomBytes(300);
      const bytes = c.encode({ type: CMD.WRITE, cookie: 7n, offset: 12345, length: 300 }, payload);
      for (let i = 0; i < 40; i++) await c.write(bytes.subarray(i, i + 1));
      await c.write(bytes.subarray(40));
      expect((await c.readReply()).error).to.equal(0);
      const r = await c.roundTrip({ type: CMD.READ, cookie: 8n, offset: 12345, length: 300 });
      expect(r.data!.equals(payload)).to.equal(true);
    });
  });

  describe('cookies and ordering', function () {
    afterEach(async function () { await fx.dropClients(); });

    it('echoes every 64-bit cookie (high bits set) of a pipelined batch exactly once', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      const content = fx.contents('rw');
      const reqs: RequestSpec[] = [];
      const cookies = [0n, U64_MAX, 0x8000000000000000n, 0xffffffff00000000n, 0x00000000ffffffffn, 0xdeadbeef12345678n];
      for (let i = 0; i < 40; i++) cookies.push(0xfedcba9800000000n + BigInt(i) * 0x100000001n);
      cookies.forEach((cookie, i) => {
        const kind = i % 4;
        if (kind === 3) reqs.push({ type: CMD.READ, cookie, offset: SIZE, length: 1 });      // invalid: answered at once
        else if (kind === 2) reqs.push({ type: CMD.FLUSH, cookie, length: 0 });
        else reqs.push({ type: CMD.READ, cookie, offset: i * 4099, length: 1000 + i * 3000 });
      });
      await c.write(Buffer.concat(reqs.map((r) => c.encode(r))));
      const byCookie = new Map<bigint, Reply>();
      for (let i = 0; i < reqs.length; i++) {
        const r = await c.readReply();
        expect(byCookie.has(r.cookie), `cookie ${r.cookie.toString(16)} answered twice`).to.equal(false);
        byCookie.set(r.cookie, r);
      }
      expect([...byCookie.keys()].sort()).to.deep.equal([...cookies].sort());
      for (const req of reqs) {
        const r = byCookie.get(req.cookie)!;
        if (req.type === CMD.READ && req.offset === SIZE) {
          expect(r.error).to.equal(NBD_EINVAL);
        } else {
          expect(r.error).to.equal(0);
          if (req.type === CMD.READ) {
            const off = Number(req.offset);
            expect(r.data!.equals(content.subarray(off, off + req.length)), `data for ${req.cookie.toString(16)}`).to.equal(true);
          }
        }
      }
    });

    it('answers out of order: a READ behind a stalled FLUSH is answered first', async function () {
      const lun = fx.lun('gated') as GatedLun;
      const c = await fx.connect();
      await c.connectExport('gated');
      const gate = lun.arm();
      const flushCookie = 0xffffffff00000001n;
      const readCookie = 0x8000000000000002n;
      await c.request({ type: CMD.FLUSH, cookie: flushCookie, length: 0 });
      await gate.entered;
      await c.request({ type: CMD.READ, cookie: readCookie, offset: 0, length: 512 });
      const first = await c.readReply();
      gate.release();
      const second = await c.readReply();
      expect([first.cookie, first.error]).to.deep.equal([readCookie, 0]);
      expect(first.data!.equals(fx.contents('gated', 0, 512))).to.equal(true);
      expect([second.cookie, second.error]).to.deep.equal([flushCookie, 0]);
    });
  });

  describe('data commands', function () {
    afterEach(async function () { await fx.dropClients(); });

    it('WRITE then READ at unaligned offsets', async function () {
      const c = await fx.connect();
      await c.connectExport('scratch');
      const data = randomBytes(10_000);
      expect((await c.roundTrip({ type: CMD.WRITE, flags: CMD_FLAG.FUA, cookie: 1n, offset: 4097, length: data.length }, data)).error).to.equal(0);
      const r = await c.roundTrip({ type: CMD.READ, cookie: 2n, offset: 4000, length: 10_200 });
      expect(r.data!.equals(Buffer.concat([Buffer.alloc(97), data, Buffer.alloc(103)]))).to.equal(true);
      expect(fx.contents('scratch', 4097, data.length).equals(data)).to.equal(true);
    });

    for (const [label, flags] of [['', 0], [' NO_HOLE', CMD_FLAG.NO_HOLE], [' FAST_ZERO', CMD_FLAG.FAST_ZERO]] as const) {
      it(`WRITE_ZEROES${label} reads back zeros`, async function () {
        const c = await fx.connect();
        await c.connectExport('scratch');
        const data = randomBytes(64 * KiB);
        await c.roundTrip({ type: CMD.WRITE, cookie: 1n, offset: 128 * KiB, length: data.length }, data);
        const z = await c.roundTrip({ type: CMD.WRITE_ZEROES, flags, cookie: 2n, offset: 128 * KiB + 4096, length: 8192 });
        expect(z.error).to.equal(0);
        const r = await c.roundTrip({ type: CMD.READ, cookie: 3n, offset: 128 * KiB, length: data.length });
        const expected = Buffer.from(data);
        expected.fill(0, 4096, 4096 + 8192);
        expect(r.data!.equals(expected)).to.equal(true);
      });
    }

    it('TRIM succeeds and the range reads back as zeros', async function () {
      const c = await fx.connect();
      await c.connectExport('scratch');
      const data = randomBytes(64 * KiB);
      await c.roundTrip({ type: CMD.WRITE, cookie: 1n, offset: 256 * KiB, length: data.length }, data);
      expect((await c.roundTrip({ type: CMD.TRIM, cookie: 2n, offset: 256 * KiB, length: 64 * KiB })).error).to.equal(0);
      const r = await c.roundTrip({ type: CMD.READ, cookie: 3n, offset: 256 * KiB, length: 64 * KiB });
      expect(r.data!.equals(Buffer.alloc(64 * KiB))).to.equal(true);
    });
  });

  describe('structured replies', function () {
    afterEach(async function () { await fx.dropClients(); });

    it('READ: one OFFSET_DATA chunk with DONE (flags, type, cookie, length, offset, data)', async function () {
      const c = await fx.connect();
      await c.connectExport('rw', { structured: true });
      const cookie = 0xa1b2c3d4e5f60718n;
      const r = await c.roundTrip({ type: CMD.READ, cookie, offset: 4103, length: 3000 });
      expect(r.chunks).to.have.length(1);
      const ch = r.chunks[0];
      expect(ch.flags).to.equal(REPLY_FLAG_DONE);
      expect(ch.type).to.equal(REPLY_TYPE.OFFSET_DATA);
      expect(ch.cookie).to.equal(cookie);
      expect(ch.payload.length).to.equal(8 + 3000);
      expect(Number(ch.payload.readBigUInt64BE(0))).to.equal(4103);
      expect(ch.payload.subarray(8).equals(fx.contents('rw', 4103, 3000))).to.equal(true);
    });

    for (const [from, len] of [[0, SIZE], [1000, 700 * KiB], [64 * KiB, 448 * KiB]] as const) {
      it(`READ over a sparse range [${from}, +${len}): OFFSET_HOLE and OFFSET_DATA chunks tile it exactly`, async function () {
        const c = await fx.connect();
        await c.connectExport('sparse', { structured: true });
        const r = await c.roundTrip({ type: CMD.READ, cookie: 77n, offset: from, length: len });
        expect(r.error).to.equal(0);
        expect(r.chunks.length).to.be.greaterThan(0);
        let pos = from;
        r.chunks.forEach((ch, i) => {
          expect(ch.cookie).to.equal(77n);
          expect(ch.flags, `chunk ${i} flags`).to.equal(i === r.chunks.length - 1 ? REPLY_FLAG_DONE : 0);
          expect([REPLY_TYPE.OFFSET_DATA, REPLY_TYPE.OFFSET_HOLE]).to.include(ch.type);
          expect(Number(ch.payload.readBigUInt64BE(0)), `chunk ${i} offset`).to.equal(pos);
          const n = ch.type === REPLY_TYPE.OFFSET_HOLE ? ch.payload.readUInt32BE(8) : ch.payload.length - 8;
          if (ch.type === REPLY_TYPE.OFFSET_HOLE) expect(ch.payload.length).to.equal(12);
          expect(n, `chunk ${i} length`).to.be.greaterThan(0);
          pos += n;
        });
        expect(pos, 'chunks cover the range exactly').to.equal(from + len);
        expect(r.chunks.some((ch) => ch.type === REPLY_TYPE.OFFSET_HOLE), 'at least one hole').to.equal(true);
        expect(assembleRead(r, from, len).equals(fx.contents('sparse', from, len))).to.equal(true);
      });
    }

    it('READ with DF over a sparse range: one OFFSET_DATA chunk', async function () {
      const c = await fx.connect();
      await c.connectExport('sparse', { structured: true });
      const r = await c.roundTrip({ type: CMD.READ, flags: CMD_FLAG.DF, cookie: 78n, offset: 0, length: SIZE });
      expect(r.chunks.map((x) => [x.type, x.flags])).to.deep.equal([[REPLY_TYPE.OFFSET_DATA, REPLY_FLAG_DONE]]);
      expect(r.chunks[0].payload.subarray(8).equals(fx.contents('sparse'))).to.equal(true);
    });

    it('a sparse READ counts one read op of the requested length in the LUN counters', async function () {
      const lun = fx.lun('sparse');
      const c = await fx.connect();
      await c.connectExport('sparse', { structured: true });
      const before = { ...lun.counters };
      const r = await c.roundTrip({ type: CMD.READ, cookie: 79n, offset: 0, length: SIZE });
      expect(r.chunks.length).to.be.greaterThan(1);
      expect(lun.counters.readOps - before.readOps, 'readOps').to.equal(1);
      expect(lun.counters.readBytes - before.readBytes, 'readBytes').to.equal(SIZE);
    });

    it('a failing READ: one ERROR chunk (DONE, errno, empty message) under structured, EIO simple otherwise', async function () {
      const st = await fx.connect();
      await st.connectExport('shrink', { structured: true });
      const simple = await fx.connect();
      await simple.connectExport('shrink');
      // The image shrinks under the export: reads past the new end come back short (EIO).
      fs.truncateSync(fx.file('shrink'), 64 * KiB);
      const r = await st.roundTrip({ type: CMD.READ, cookie: 0xeeeeeeeeeeeeeeeen, offset: 512 * KiB, length: 4096 });
      expect(r.chunks).to.have.length(1);
      const ch = r.chunks[0];
      expect(ch.type).to.equal(REPLY_TYPE.ERROR);
      expect(ch.flags).to.equal(REPLY_FLAG_DONE);
      expect(ch.cookie).to.equal(0xeeeeeeeeeeeeeeeen);
      expect(ch.payload.length).to.equal(6);
      expect(ch.payload.readUInt32BE(0)).to.equal(NBD_EIO);
      expect(ch.payload.readUInt16BE(4)).to.equal(0);
      const s = await simple.roundTrip({ type: CMD.READ, cookie: 2n, offset: 512 * KiB, length: 4096 });
      expect(s.structured).to.equal(false);
      expect(s.error).to.equal(NBD_EIO);
      expect(s.data).to.equal(undefined);
      // The connection survives the error.
      expect((await st.roundTrip({ type: CMD.READ, cookie: 3n, offset: 0, length: 4096 })).error).to.equal(0);
    });

    it('BLOCK_STATUS: context id 1, extents tile the range, holes flagged HOLE|ZERO', async function () {
      const c = await fx.connect();
      await c.connectExport('sparse', { structured: true, meta: 'sparse' });
      const r = await c.roundTrip({ type: CMD.BLOCK_STATUS, cookie: 90n, offset: 0, length: SIZE });
      const { id, extents } = extentsOf(r);
      expect(id).to.equal(1);
      expect(extents.reduce((n, e) => n + e.length, 0)).to.equal(SIZE);
      // Expected map from the file's data ranges.
      let pos = 0;
      for (const e of extents) {
        const inData = SPARSE_DATA.some(([o, l]) => pos >= o && pos < o + l);
        expect(e.flags, `extent at ${pos}`).to.equal(inData ? 0 : STATE_HOLE | STATE_ZERO);
        pos += e.length;
      }
      expect(extents.length).to.be.greaterThanOrEqual(4);
    });

    it('BLOCK_STATUS with REQ_ONE: exactly one extent, no longer than requested', async function () {
      const c = await fx.connect();
      await c.connectExport('sparse', { structured: true, meta: 'sparse' });
      const a = extentsOf(await c.roundTrip({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.REQ_ONE, cookie: 91n, offset: 0, length: SIZE }));
      expect(a.extents).to.have.length(1);
      expect(a.extents[0].flags).to.equal(0);
      expect(a.extents[0].length).to.be.within(1, SIZE);
      const b = extentsOf(await c.roundTrip({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.REQ_ONE, cookie: 92n, offset: 100 * KiB, length: 100 * KiB }));
      expect(b.extents).to.have.length(1);
      expect(b.extents[0].flags).to.equal(STATE_HOLE | STATE_ZERO);
      expect(b.extents[0].length).to.be.within(1, 100 * KiB);
    });
  });

  describe('NBD_CMD_DISC', function () {
    afterEach(async function () { await fx.dropClients(); });

    it('answers the requests before DISC, ignores those after, then closes', async function () {
      const c = await fx.connect();
      await c.connectExport('rw');
      await c.write(Buffer.concat([
        c.encode({ type: CMD.READ, cookie: 1n, offset: 0, length: 64 * KiB }),
        encodeRequest({ type: CMD.DISC, cookie: 2n, length: 0 }),
        encodeRequest({ type: CMD.READ, cookie: 3n, offset: 0, length: 512 }),
      ]));
      const r = await c.readReply();
      expect([r.cookie, r.error]).to.deep.equal([1n, 0]);
      expect(r.data!.equals(fx.contents('rw', 0, 64 * KiB))).to.equal(true);
      expect(await c.waitClosed()).to.equal(true);
      expect(c.unread, 'nothing after DISC').to.equal(0);
    });

    it('waits for an in-flight request before closing', async function () {
      const lun = fx.lun('gated') as GatedLun;
      const c = await fx.connect();
      await c.connectExport('gated');
      const gate = lun.arm();
      await c.write(Buffer.concat([
        c.encode({ type: CMD.FLUSH, cookie: 10n, length: 0 }),
        encodeRequest({ type: CMD.DISC, cookie: 11n, length: 0 }),
      ]));
      await gate.entered;
      expect(c.isClosed, 'closed while a request was in flight').to.equal(false);
      gate.release();
      const r = await c.readReply();
      expect([r.cookie, r.error]).to.deep.equal([10n, 0]);
      expect(await c.waitClosed()).to.equal(true);
    });
  });
});

describe('NbdServer.shutdown() with a connection open', function () {
  let fx: Fixture;

  before(async function () {
    fx = await Fixture.start([{ name: 'g', size: SIZE, make: gated }]);
  });
  after(async function () { await fx?.stop(); });

  it('answers new requests with ESHUTDOWN, finishes the in-flight one, then closes and refuses connections', async function () {
    const lun = fx.lun('g') as GatedLun;
    const c = await fx.connect();
    await c.connectExport('g');
    const gate = lun.arm();
    await c.request({ type: CMD.FLUSH, cookie: 1n, length: 0 });
    await gate.entered;

    let shutdownDone = false;
    const shutdown = fx.server.shutdown(5000).then(() => { shutdownDone = true; });

    const read = await c.roundTrip({ type: CMD.READ, cookie: 2n, offset: 0, length: 512 });
    expect(read.error).to.equal(NBD_ESHUTDOWN);
    expect(read.data).to.equal(undefined);
    const write = await c.roundTrip({ type: CMD.WRITE, cookie: 3n, offset: 0, length: 512 }, Buffer.alloc(512, 1));
    expect(write.error).to.equal(NBD_ESHUTDOWN);
    expect(fx.contents('g', 0, 512).equals(Buffer.alloc(512, 1)), 'refused write not applied').to.equal(false);

    const refused = await NbdTestClient.connect(fx.port).then((x) => { x.destroy(); return false; }, () => true);
    expect(refused, 'new connections refused').to.equal(true);
    expect(shutdownDone, 'shutdown waits for the in-flight request').to.equal(false);

    gate.release();
    const flush = await c.readReply();
    expect([flush.cookie, flush.error]).to.deep.equal([1n, 0]);
    expect(await c.waitClosed()).to.equal(true);
    await shutdown;
    expect(shutdownDone).to.equal(true);
  });
});
