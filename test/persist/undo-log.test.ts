// The undo log of a secondary LUN: protect-before-write, rollback to the snapshot, reopen,
// torn tail, corruption, header checks, discard, concurrency.
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import { crc32c } from '@node-rs/crc32';
import { expect } from 'chai';
import {
  UNDO_RECORD_HEADER_SIZE, UNDO_RECORD_MAGIC, UndoLog, UndoLogError, undoHeaderFixed, undoHeaderSize, undoRecordHeader,
} from '../../src/persist/undo-log.js';
import { Backing } from '../../src/storage/backing.js';
import { randomFile, sha256File, tmpDir, type TmpDir } from '../helpers/tmp.js';

const LUN = 'lun-ä1';
const GRAN = 4096;
/** 512 full regions and a short last one of 1000 bytes. */
const LUN_SIZE = 512 * GRAN + 1000;
const REGIONS = 513;
const HEADER_SIZE = undoHeaderSize(Buffer.byteLength(LUN));

function regionLen(r: number, size = LUN_SIZE, gran = GRAN): number {
  return Math.min(gran, size - r * gran);
}

/** Regions [first, end) a range touches (clipped to the LUN). */
function regionsOf(offset: number, length: number, size = LUN_SIZE, gran = GRAN): number[] {
  const end = Math.min(offset + length, size);
  const out: number[] = [];
  if (offset >= end) return out;
  for (let r = Math.floor(offset / gran); r <= Math.floor((end - 1) / gran); r++) out.push(r);
  return out;
}

/** A pseudo-random generator (deterministic per test). */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  return p.then(() => { throw new Error('expected a rejection'); }, (err: Error) => err);
}

describe('undo log', function () {
  this.timeout(60_000);
  let dir: TmpDir;
  let image: string;
  let logFile: string;
  let backing: Backing;
  let snapshot: string;
  const logs: UndoLog[] = [];

  async function openLog(name = LUN, size = LUN_SIZE, gran = GRAN): Promise<UndoLog> {
    const log = await UndoLog.open(logFile, name, size, gran);
    logs.push(log);
    return log;
  }

  async function closeLog(log: UndoLog): Promise<void> {
    logs.splice(logs.indexOf(log), 1);
    await log.close();
  }

  /** protect() then write random data, as the secondary's apply path does. */
  async function write(log: UndoLog, offset: number, length: number): Promise<void> {
    await log.protect(backing, offset, length);
    expect(log.covers(offset, length)).to.equal(true);
    const len = Math.min(length, LUN_SIZE - offset);
    await backing.write(randomBytes(len), offset);
  }

  /** `n` random writes (some spanning several regions, some touching the short last one). */
  async function randomWrites(log: UndoLog, n: number, seed: number): Promise<Set<number>> {
    const rand = rng(seed);
    const touched = new Set<number>();
    for (let i = 0; i < n; i++) {
      let offset: number;
      let length: number;
      const kind = i % 4;
      if (kind === 0) { offset = Math.floor(rand() * LUN_SIZE); length = 1 + Math.floor(rand() * 512); }
      else if (kind === 1) { offset = Math.floor(rand() * LUN_SIZE); length = GRAN + Math.floor(rand() * 5 * GRAN); }
      else if (kind === 2) { offset = LUN_SIZE - 1 - Math.floor(rand() * 3000); length = 1 + Math.floor(rand() * 4000); }
      else { offset = Math.floor(rand() * REGIONS) * GRAN; length = GRAN; }
      length = Math.min(length, LUN_SIZE - offset);
      for (const r of regionsOf(offset, length)) touched.add(r);
      await write(log, offset, length);
    }
    return touched;
  }

  function recordBytes(regions: Iterable<number>): number {
    let n = 0;
    for (const r of regions) n += UNDO_RECORD_HEADER_SIZE + regionLen(r);
    return n;
  }

  beforeEach(async () => {
    dir = await tmpDir('nbd-undo-test-');
    image = await randomFile(dir.join('lun.img'), LUN_SIZE);
    logFile = dir.join('lun.undo');
    backing = await Backing.open(image, false);
    snapshot = await sha256File(image);
  });

  afterEach(async () => {
    for (const l of logs.splice(0)) await l.close().catch(() => undefined);
    await backing.close().catch(() => undefined);
    await dir.cleanup();
  });

  describe('layout', () => {
    it('creates the file (mode 0600) with the documented header, no temp file left', async () => {
      const log = await openLog();
      expect(log.saved).to.equal(0);
      expect(log.bytes).to.equal(HEADER_SIZE);
      await closeLog(log);
      const st = await fsp.stat(logFile);
      expect(st.mode & 0o777).to.equal(0o600);
      const buf = await fsp.readFile(logFile);
      const name = Buffer.from(LUN, 'utf8');
      expect(undoHeaderFixed.span).to.equal(24);
      expect(buf.length).to.equal(24 + name.length + 4);
      expect(buf.subarray(0, 8).toString('latin1')).to.equal('NBDMUND1');
      expect(buf.readUInt16BE(8)).to.equal(1);
      expect(Number(buf.readBigUInt64BE(10))).to.equal(LUN_SIZE);
      expect(buf.readUInt32BE(18)).to.equal(GRAN);
      expect(buf.readUInt16BE(22)).to.equal(name.length);
      expect(buf.subarray(24, 24 + name.length).equals(name)).to.equal(true);
      expect(buf.readUInt32BE(24 + name.length)).to.equal(crc32c(buf.subarray(0, 24 + name.length)) >>> 0);
      expect(await fsp.readdir(dir.path)).to.have.members(['lun.img', 'lun.undo']);
    });

    it('writes records exactly as documented', async () => {
      const old = Buffer.alloc(GRAN + 1000);
      await backing.read(old, 511 * GRAN);
      const log = await openLog();
      await log.protect(backing, 511 * GRAN + 10, GRAN);   // regions 511 and 512 (the short one)
      await closeLog(log);
      const buf = await fsp.readFile(logFile);
      expect(undoRecordHeader.span).to.equal(UNDO_RECORD_HEADER_SIZE);
      expect(buf.length).to.equal(HEADER_SIZE + 2 * UNDO_RECORD_HEADER_SIZE + GRAN + 1000);
      let at = HEADER_SIZE;
      for (const [region, len] of [[511, GRAN], [512, 1000]]) {
        expect(buf.readUInt32BE(at)).to.equal(UNDO_RECORD_MAGIC);
        expect(buf.subarray(at, at + 4).toString('latin1')).to.equal('NMU1');
        expect(Number(buf.readBigUInt64BE(at + 4))).to.equal(region);
        expect(buf.readUInt32BE(at + 12)).to.equal(len);
        const data = buf.subarray(at + 20, at + 20 + len);
        expect(buf.readUInt32BE(at + 16)).to.equal(crc32c(data, crc32c(buf.subarray(at, at + 16))) >>> 0);
        expect(crc32c(Buffer.concat([buf.subarray(at, at + 16), data])) >>> 0).to.equal(buf.readUInt32BE(at + 16));
        expect(data.equals(old.subarray((region - 511) * GRAN, (region - 511) * GRAN + len))).to.equal(true);
        at += 20 + len;
      }
    });
  });

  describe('protect and rollback', () => {
    it('random writes, then rollback restores the snapshot exactly', async () => {
      const log = await openLog();
      const touched = await randomWrites(log, 300, 1);
      expect(await sha256File(image)).to.not.equal(snapshot);
      expect(log.saved).to.equal(touched.size);
      expect(log.bytes).to.equal(HEADER_SIZE + recordBytes(touched));
      expect(touched.has(REGIONS - 1)).to.equal(true);   // the short last region was saved too
      expect(await log.rollback(backing)).to.equal(touched.size);
      expect(await sha256File(image)).to.equal(snapshot);
      expect(log.saved).to.equal(0);
      expect(log.bytes).to.equal(HEADER_SIZE);
      expect((await fsp.stat(logFile)).size).to.equal(HEADER_SIZE);
      // The log is empty now: a second rollback changes nothing.
      expect(await log.rollback(backing)).to.equal(0);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('saves a region once, however often it is written', async () => {
      const log = await openLog();
      const reads: number[] = [];
      const read = backing.read.bind(backing);
      backing.read = (buf: Buffer, pos: number) => { reads.push(pos); return read(buf, pos); };
      for (let i = 0; i < 5; i++) await write(log, 3 * GRAN + 100 * i, 2 * GRAN);   // regions 3..5
      expect(log.saved).to.equal(3);
      expect(reads.sort((a, b) => a - b)).to.deep.equal([3 * GRAN, 4 * GRAN, 5 * GRAN]);
      expect(log.bytes).to.equal(HEADER_SIZE + 3 * (UNDO_RECORD_HEADER_SIZE + GRAN));
      expect(await log.rollback(backing)).to.equal(3);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('covers(): only durable regions, clipped to the LUN', async () => {
      const log = await openLog();
      expect(log.covers(0, 0)).to.equal(true);
      expect(log.covers(GRAN, 1)).to.equal(false);
      const p = log.protect(backing, GRAN, 2 * GRAN);
      expect(log.covers(GRAN, 1)).to.equal(false);   // in flight: not yet durable
      await p;
      expect(log.covers(GRAN, 2 * GRAN)).to.equal(true);
      expect(log.covers(GRAN - 1, 2)).to.equal(false);
      expect(log.covers(LUN_SIZE, 100)).to.equal(true);   // nothing of the LUN
      expect(log.covers(-1, 10)).to.equal(false);
      // A range past the end is clipped: the short last region (1000 bytes) is saved.
      await log.protect(backing, LUN_SIZE - 10, 100_000);
      expect(log.covers(LUN_SIZE - 1000, 5000)).to.equal(true);
      expect(log.saved).to.equal(3);
      expect(log.bytes).to.equal(HEADER_SIZE + 2 * (UNDO_RECORD_HEADER_SIZE + GRAN) + UNDO_RECORD_HEADER_SIZE + 1000);
      expect((await rejection(log.protect(backing, -1, 10)))).to.be.instanceOf(UndoLogError);
    });

    it('overlapping concurrent protects: each region read and saved once, none resolves early', async () => {
      const log = await openLog();
      const reads = new Map<number, number>();
      const read = backing.read.bind(backing);
      backing.read = async (buf: Buffer, pos: number) => {
        reads.set(pos, (reads.get(pos) ?? 0) + 1);
        await new Promise((r) => setTimeout(r, Math.random() * 3));
        return read(buf, pos);
      };
      const rand = rng(7);
      const touched = new Set<number>();
      const tasks: Promise<void>[] = [];
      for (let i = 0; i < 400; i++) {
        const offset = Math.floor(rand() * 64) * 1000;   // all within the first ~16 regions: heavy overlap
        const length = 1 + Math.floor(rand() * 3 * GRAN);
        for (const r of regionsOf(offset, length)) touched.add(r);
        tasks.push((async () => {
          await log.protect(backing, offset, length);
          // Resolved: every region of the range must be durable now.
          expect(log.covers(offset, length)).to.equal(true);
          await backing.write(randomBytes(length), offset);
        })());
      }
      // And a few at the short last region, concurrently.
      for (let i = 0; i < 20; i++) {
        const offset = LUN_SIZE - 1 - Math.floor(rand() * 1500);
        for (const r of regionsOf(offset, 3000)) touched.add(r);
        tasks.push(log.protect(backing, offset, 3000).then(() => backing.write(randomBytes(LUN_SIZE - offset), offset)));
      }
      await Promise.all(tasks);
      expect(log.saved).to.equal(touched.size);
      expect([...reads.values()].every((n) => n === 1)).to.equal(true);
      expect(reads.size).to.equal(touched.size);
      expect(log.bytes).to.equal(HEADER_SIZE + recordBytes(touched));
      expect(await log.rollback(backing)).to.equal(touched.size);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('a failed read of old data rejects protect(); the region is not saved and a retry works', async () => {
      const log = await openLog();
      const read = backing.read.bind(backing);
      let fail = true;
      backing.read = (buf: Buffer, pos: number) => (fail && pos === 7 * GRAN
        ? Promise.reject(Object.assign(new Error('injected EIO'), { code: 'EIO' }))
        : read(buf, pos));
      const err = await rejection(log.protect(backing, 6 * GRAN, 2 * GRAN));
      expect(err).to.be.instanceOf(UndoLogError);
      expect(err.message).to.match(/injected EIO/);
      expect(log.covers(7 * GRAN, 1)).to.equal(false);
      fail = false;
      await write(log, 6 * GRAN, 2 * GRAN);
      expect(log.saved).to.equal(2);
      expect(await log.rollback(backing)).to.equal(2);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('refuses a backing of another size', async () => {
      const log = await openLog();
      const other = await randomFile(dir.join('other.img'), LUN_SIZE + 1);
      const b2 = await Backing.open(other, false);
      try {
        expect(await rejection(log.protect(b2, 0, 10))).to.be.instanceOf(UndoLogError);
        expect(await rejection(log.rollback(b2))).to.be.instanceOf(UndoLogError);
      } finally {
        await b2.close();
      }
    });
  });

  describe('reopen and recovery', () => {
    it('reopen after close rebuilds `saved`; rollback still restores the snapshot', async () => {
      let log = await openLog();
      const touched = await randomWrites(log, 120, 2);
      const bytes = log.bytes;
      await closeLog(log);
      log = await openLog();
      expect(log.saved).to.equal(touched.size);
      expect(log.bytes).to.equal(bytes);
      for (const r of touched) expect(log.covers(r * GRAN, 1)).to.equal(true);
      // More writes after reopening: already-saved regions are not saved again.
      const more = await randomWrites(log, 60, 3);
      for (const r of more) touched.add(r);
      expect(log.saved).to.equal(touched.size);
      expect(log.bytes).to.equal(HEADER_SIZE + recordBytes(touched));
      expect(await log.rollback(backing)).to.equal(touched.size);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('a torn tail (cut mid-record) is dropped; the earlier records still roll back', async () => {
      let log = await openLog();
      await write(log, 0, 3 * GRAN);            // regions 0..2
      await write(log, 100 * GRAN, 10);         // region 100
      await log.protect(backing, 200 * GRAN, 1);   // region 200: saved, then the "crash" before its write
      const full = log.bytes;
      await closeLog(log);
      for (const cut of [full - 1, full - GRAN, full - GRAN - 5, full - GRAN - UNDO_RECORD_HEADER_SIZE + 1]) {
        const copy = await fsp.readFile(logFile);
        await fsp.truncate(logFile, cut);
        log = await openLog();
        expect(log.saved, `cut at ${cut}`).to.equal(4);
        expect(log.bytes).to.equal(full - UNDO_RECORD_HEADER_SIZE - GRAN);
        expect((await fsp.stat(logFile)).size).to.equal(full - UNDO_RECORD_HEADER_SIZE - GRAN);
        expect(log.covers(200 * GRAN, 1)).to.equal(false);
        await closeLog(log);
        await fsp.writeFile(logFile, copy);
      }
      await fsp.truncate(logFile, full - 7);
      log = await openLog();
      expect(await log.rollback(backing)).to.equal(4);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('a zero-filled tail (file extended, never written: power loss) is dropped', async () => {
      let log = await openLog();
      await write(log, 5 * GRAN, 2 * GRAN);
      const full = log.bytes;
      await closeLog(log);
      await fsp.truncate(logFile, full + 3 * GRAN);   // zeros
      log = await openLog();
      expect(log.saved).to.equal(2);
      expect(log.bytes).to.equal(full);
      expect(await log.rollback(backing)).to.equal(2);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('a flipped byte inside a record is an error naming the offset, never a silent drop', async () => {
      let log = await openLog();
      await write(log, 0, GRAN);          // record 0 at HEADER_SIZE
      await write(log, 9 * GRAN, GRAN);   // record 1
      await write(log, 20 * GRAN, GRAN);  // record 2 (the last one)
      await closeLog(log);
      const good = await fsp.readFile(logFile);
      const rec = UNDO_RECORD_HEADER_SIZE + GRAN;
      for (const [i, where] of [[0, 'data'], [1, 'data'], [2, 'data'], [2, 'header'], [1, 'crc']] as const) {
        const bad = Buffer.from(good);
        const start = HEADER_SIZE + i * rec;
        const at = start + (where === 'data' ? UNDO_RECORD_HEADER_SIZE + 1234 : where === 'header' ? 6 : 17);
        bad[at] ^= 0x10;
        await fsp.writeFile(logFile, bad);
        const err = await rejection(UndoLog.open(logFile, LUN, LUN_SIZE, GRAN));
        expect(err, `record ${i} ${where}`).to.be.instanceOf(UndoLogError);
        expect(err.message).to.include(`offset ${start}`);
        expect((await fsp.readFile(logFile)).equals(bad), 'the file is left as it is').to.equal(true);
      }
      // Corrupted while open: rollback checks each record again and stops there.
      await fsp.writeFile(logFile, good);
      log = await openLog();
      const bad = Buffer.from([good[HEADER_SIZE + rec + 100] ^ 1]);
      const fh = await fsp.open(logFile, 'r+');
      await fh.write(bad, 0, 1, HEADER_SIZE + rec + 100);
      await fh.close();
      const err = await rejection(log.rollback(backing));
      expect(err).to.be.instanceOf(UndoLogError);
      expect(err.message).to.include(`offset ${HEADER_SIZE + rec}`);
      expect(log.saved).to.equal(3);
      expect((await fsp.stat(logFile)).size).to.equal(good.length);   // not discarded
    });

    it('refuses a log of another LUN name, size or granularity, or not a log at all', async () => {
      const log = await openLog();
      await write(log, 0, 10);
      await closeLog(log);
      const before = await fsp.readFile(logFile);
      const cases: Array<[string, number, number, RegExp]> = [
        ['lun-other', LUN_SIZE, GRAN, /belongs to LUN "lun-ä1", not "lun-other"/],
        [LUN, LUN_SIZE + GRAN, GRAN, /LUN of 2098152 bytes/],
        [LUN, LUN_SIZE, 2 * GRAN, /granularity of 4096 bytes, not 8192/],
      ];
      for (const [name, size, gran, re] of cases) {
        const err = await rejection(UndoLog.open(logFile, name, size, gran));
        expect(err).to.be.instanceOf(UndoLogError);
        expect(err.message).to.match(re);
      }
      expect((await fsp.readFile(logFile)).equals(before)).to.equal(true);
      await fsp.writeFile(dir.join('junk'), randomBytes(100));
      expect((await rejection(UndoLog.open(dir.join('junk'), LUN, LUN_SIZE, GRAN))).message).to.match(/not an undo log/);
      const hdr = Buffer.from(before.subarray(0, HEADER_SIZE));
      hdr[12] ^= 1;
      await fsp.writeFile(dir.join('badhdr'), hdr);
      expect((await rejection(UndoLog.open(dir.join('badhdr'), LUN, LUN_SIZE, GRAN))).message).to.match(/header CRC mismatch/);
      for (const gran of [1000, 256, 0]) {
        expect(await rejection(UndoLog.open(dir.join('x'), LUN, LUN_SIZE, gran))).to.be.instanceOf(UndoLogError);
      }
    });

    it('rollback is idempotent: interrupted (write error), then run again, gives the snapshot', async () => {
      const log = await openLog();
      const touched = await randomWrites(log, 100, 4);
      const write0 = backing.write.bind(backing);
      let n = 0;
      backing.write = (buf: Buffer, pos: number) => (++n === 20
        ? Promise.reject(Object.assign(new Error('injected write error'), { code: 'EIO' }))
        : write0(buf, pos));
      const err = await rejection(log.rollback(backing));
      expect(err.message).to.match(/injected write error/);
      expect(log.saved).to.equal(touched.size);   // the log is kept
      backing.write = write0;
      expect(await log.rollback(backing)).to.equal(touched.size);
      expect(await sha256File(image)).to.equal(snapshot);
    });

    it('rollback is idempotent: a crash before the log is discarded, then rollback again', async () => {
      let log = await openLog();
      await randomWrites(log, 80, 5);
      await closeLog(log);
      const copy = await fsp.readFile(logFile);
      log = await openLog();
      await log.rollback(backing);
      await closeLog(log);
      await fsp.writeFile(logFile, copy);   // as if the truncation never happened
      log = await openLog();
      await log.rollback(backing);
      expect(await sha256File(image)).to.equal(snapshot);
    });
  });

  describe('discard', () => {
    it('discard() then rollback() restores nothing', async () => {
      const log = await openLog();
      await randomWrites(log, 50, 6);
      const afterSync = await sha256File(image);
      await log.discard();
      expect(log.saved).to.equal(0);
      expect(log.bytes).to.equal(HEADER_SIZE);
      expect((await fsp.stat(logFile)).size).to.equal(HEADER_SIZE);
      expect(log.covers(0, GRAN)).to.equal(false);
      expect(await log.rollback(backing)).to.equal(0);
      expect(await sha256File(image)).to.equal(afterSync);
    });

    it('a new inconsistent period after discard() saves regions again and rolls back to the new state', async () => {
      let log = await openLog();
      await randomWrites(log, 50, 7);
      await log.discard();
      const consistent = await sha256File(image);
      const touched = await randomWrites(log, 50, 8);
      expect(log.saved).to.equal(touched.size);
      await closeLog(log);
      log = await openLog();
      expect(log.saved).to.equal(touched.size);
      expect(await log.rollback(backing)).to.equal(touched.size);
      expect(await sha256File(image)).to.equal(consistent);
    });

    it('a save still in flight when discard() is called is not recorded', async () => {
      const log = await openLog();
      const read = backing.read.bind(backing);
      let release!: () => void;
      const gate = new Promise<void>((r) => { release = r; });
      backing.read = async (buf: Buffer, pos: number) => { await gate; return read(buf, pos); };
      const p = log.protect(backing, 0, GRAN);
      await log.discard();
      release();
      await p;
      expect(log.saved).to.equal(0);
      expect(log.bytes).to.equal(HEADER_SIZE);
    });

    it('protect() is refused during a rollback and after close', async () => {
      const log = await openLog();
      await write(log, 0, GRAN);
      const rb = log.rollback(backing);
      expect((await rejection(log.protect(backing, GRAN, 1))).message).to.match(/rollback is in progress/);
      expect(await rb).to.equal(1);
      await closeLog(log);
      expect((await rejection(log.protect(backing, GRAN, 1))).message).to.match(/closed/);
    });
  });
});
