// The per-LUN mirror journal: on-disk layout, round trip, recovery (torn tail, corruption),
// header checks, group commit, reset, concurrency and SIGKILL.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { crc32c } from '@node-rs/crc32';
import { expect } from 'chai';
import {
  Journal, JOURNAL_KIND, JournalError, type JournalEntry, type JournalRecord,
} from '../../src/persist/journal.js';
import {
  bitmapHeader, JOURNAL_MAGIC, journalHeaderFixed, journalHeaderSize, readRecordHeader, RECORD_CRC_OFFSET,
  RECORD_HEADER_SIZE, RECORD_MAGIC, recordHeader, writeRecordHeader, type RecordHeader,
} from '../../src/persist/record.js';
import { MIRROR_FLAG } from '../../src/mirror/wire.js';
import { pathExists, tmpDir, type TmpDir } from '../helpers/tmp.js';

const LUN = 'lun-ä0';
const LUN_SIZE = 1024 * 1024 * 1024;
const HEADER_SIZE = journalHeaderSize(Buffer.byteLength(LUN));
const REPO = fileURLToPath(new URL('../../', import.meta.url));

/** Deterministic data for a seq (the SIGKILL child uses the same code). */
function pattern(seq: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (Math.imul(seq, 0x9e3779b1) >>> (i % 24)) ^ i;
  return b;
}
const PATTERN_SRC = `function pattern(seq, len) {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (Math.imul(seq, 0x9e3779b1) >>> (i % 24)) ^ i;
  return b;
}`;

function writeRec(seq: number, len: number, offset = seq * 4096, dep = seq - 1, flags = 0): JournalRecord {
  return { seq, dep, kind: JOURNAL_KIND.WRITE, flags, offset, length: len, data: pattern(seq, len) };
}

function zeroRec(seq: number, len: number, offset = 0): JournalRecord {
  return { seq, dep: 0, kind: JOURNAL_KIND.WRITE_ZEROES, flags: MIRROR_FLAG.MAY_PUNCH, offset, length: len, data: null };
}

function strip(e: JournalEntry) {
  return { seq: e.seq, dep: e.dep, kind: e.kind, flags: e.flags, offset: e.offset, length: e.length,
    dataPos: e.dataPos, timeMs: e.timeMs, recordBytes: e.recordBytes };
}

async function fileSize(p: string): Promise<number> {
  return (await fsp.stat(p)).size;
}

describe('journal', function () {
  this.timeout(60_000);
  let dir: TmpDir;
  let file: string;
  const open: Journal[] = [];

  async function openJ(p = file, name = LUN, size = LUN_SIZE) {
    const r = await Journal.open(p, name, size);
    open.push(r.journal);
    return r;
  }

  async function closeJ(j: Journal) {
    open.splice(open.indexOf(j), 1);
    await j.close();
  }

  /** A journal with `recs` appended (in that order) and closed; returns the record start offsets. */
  async function build(recs: JournalRecord[]): Promise<number[]> {
    const { journal } = await openJ();
    const starts: number[] = [];
    for (const r of recs) {
      starts.push(HEADER_SIZE + journal.bytes);
      await journal.append(r);
    }
    await closeJ(journal);
    return starts;
  }

  beforeEach(async () => {
    dir = await tmpDir('nbd-journal-test-');
    file = dir.join('lun.journal');
  });

  afterEach(async () => {
    for (const j of open.splice(0)) await j.close().catch(() => undefined);
    await dir.cleanup();
  });

  describe('layout', () => {
    it('hot-path record header encoding agrees with the buffer-layout definition', () => {
      expect(recordHeader.span).to.equal(RECORD_HEADER_SIZE);
      expect(RECORD_CRC_OFFSET).to.equal(RECORD_HEADER_SIZE - 4);
      expect(journalHeaderFixed.span).to.equal(20);
      expect(bitmapHeader.span).to.equal(26);
      const samples: RecordHeader[] = [
        { magic: RECORD_MAGIC, kind: 1, flags: 3, reserved: 0, seq: 1, dep: 0, offset: 0, length: 4096, dataLen: 4096, timeMs: 1_700_000_000_123, crc: 0xdeadbeef },
        { magic: RECORD_MAGIC, kind: 2, flags: 2, reserved: 0, seq: 2 ** 53 - 1, dep: 2 ** 40 + 3, offset: 2 ** 52 + 5, length: 0xffffffff, dataLen: 0, timeMs: 0, crc: 0 },
        { magic: 0x01020304, kind: 255, flags: 255, reserved: 0xffff, seq: 0x1_0000_0000, dep: 0xffff_ffff, offset: 123456789012, length: 1, dataLen: 1, timeMs: 2 ** 41, crc: 0xffffffff },
      ];
      for (const h of samples) {
        const a = Buffer.alloc(RECORD_HEADER_SIZE);
        const b = Buffer.alloc(RECORD_HEADER_SIZE + 3);
        recordHeader.encode(h, a);
        writeRecordHeader(b, 3, h);
        expect(b.subarray(3).equals(a), JSON.stringify(h)).to.equal(true);
        expect(readRecordHeader(b, 3)).to.deep.equal(h);
        expect(recordHeader.decode(a)).to.deep.equal(h);
      }
    });

    it('creates the file (mode 0600) with the documented header', async () => {
      const { journal, recovery } = await openJ();
      expect(recovery).to.deep.equal({ records: 0, bytes: 0, tornTailBytes: 0, corrupt: null });
      await closeJ(journal);
      const st = await fsp.stat(file);
      expect(st.mode & 0o777).to.equal(0o600);
      const buf = await fsp.readFile(file);
      const name = Buffer.from(LUN, 'utf8');
      expect(buf.length).to.equal(8 + 2 + 8 + 2 + name.length + 4);
      expect(buf.subarray(0, 8).toString('latin1')).to.equal('NBDMJRNL');
      expect(buf.readUInt16BE(8)).to.equal(1);
      expect(Number(buf.readBigUInt64BE(10))).to.equal(LUN_SIZE);
      expect(buf.readUInt16BE(18)).to.equal(name.length);
      expect(buf.subarray(20, 20 + name.length).equals(name)).to.equal(true);
      expect(buf.readUInt32BE(20 + name.length)).to.equal(crc32c(buf.subarray(0, 20 + name.length)) >>> 0);
      expect((await fsp.readdir(dir.path))).to.deep.equal(['lun.journal']);   // no temp file left behind
    });

    it('writes records exactly as documented', async () => {
      const { journal } = await openJ();
      const before = Date.now();
      await journal.append(writeRec(7, 5, 1000, 6, MIRROR_FLAG.FUA));
      await journal.append(zeroRec(8, 65536, 8192));
      const after = Date.now();
      await closeJ(journal);
      const buf = await fsp.readFile(file);
      let at = HEADER_SIZE;
      expect(buf.readUInt32BE(at)).to.equal(0x4e4d4a31);
      expect(buf.subarray(at, at + 4).toString('latin1')).to.equal('NMJ1');
      expect(buf[at + 4]).to.equal(1);
      expect(buf[at + 5]).to.equal(MIRROR_FLAG.FUA);
      expect(buf.readUInt16BE(at + 6)).to.equal(0);
      expect(Number(buf.readBigUInt64BE(at + 8))).to.equal(7);
      expect(Number(buf.readBigUInt64BE(at + 16))).to.equal(6);
      expect(Number(buf.readBigUInt64BE(at + 24))).to.equal(1000);
      expect(buf.readUInt32BE(at + 32)).to.equal(5);
      expect(buf.readUInt32BE(at + 36)).to.equal(5);
      const t = Number(buf.readBigUInt64BE(at + 40));
      expect(t).to.be.within(before, after);
      const crc = crc32c(pattern(7, 5), crc32c(buf.subarray(at, at + 48))) >>> 0;
      expect(buf.readUInt32BE(at + 48)).to.equal(crc);
      expect(buf.subarray(at + 52, at + 57).equals(pattern(7, 5))).to.equal(true);
      at += 57;
      expect(buf[at + 4]).to.equal(2);
      expect(buf[at + 5]).to.equal(MIRROR_FLAG.MAY_PUNCH);
      expect(buf.readUInt32BE(at + 32)).to.equal(65536);
      expect(buf.readUInt32BE(at + 36)).to.equal(0);
      expect(buf.readUInt32BE(at + 48)).to.equal(crc32c(buf.subarray(at, at + 48)) >>> 0);
      expect(buf.length).to.equal(at + 52);
    });
  });

  describe('round trip', () => {
    it('reopens with the same entries in seq order and the same data', async () => {
      const { journal } = await openJ();
      const seqs = [1, 2, 4, 3, 5, 9, 6, 8, 7, 10];   // appended slightly out of order
      const t0 = Date.now();
      await Promise.all(seqs.map((s) => journal.append(s === 6 ? zeroRec(6, 1 << 20, 4096) : writeRec(s, 512 * s))));
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      expect(journal.records).to.equal(10);
      expect(journal.minSeq).to.equal(1);
      expect(journal.maxSeq).to.equal(10);
      expect(journal.oldestTimeMs).to.be.within(t0, Date.now());
      const bytes = journal.bytes;
      expect(bytes).to.equal(10 * RECORD_HEADER_SIZE + 512 * (55 - 6));
      const mine = journal.entries().map(strip);
      const oldest = journal.oldestTimeMs;
      await closeJ(journal);
      expect(await fileSize(file)).to.equal(HEADER_SIZE + bytes);

      const { journal: j2, recovery } = await openJ();
      expect(recovery).to.deep.equal({ records: 10, bytes, tornTailBytes: 0, corrupt: null });
      expect(j2.entries().map(strip)).to.deep.equal(mine);
      expect(j2.oldestTimeMs).to.equal(oldest);
      expect([j2.minSeq, j2.maxSeq, j2.records, j2.bytes]).to.deep.equal([1, 10, 10, bytes]);
      for (const e of j2.entries()) {
        const d = await j2.readData(e);
        if (e.kind === JOURNAL_KIND.WRITE) expect(d.equals(pattern(e.seq, 512 * e.seq)), `seq ${e.seq}`).to.equal(true);
        else expect(d.length).to.equal(0);
      }
      const e6 = j2.entries()[5];
      expect([e6.kind, e6.flags, e6.offset, e6.length, e6.recordBytes]).to.deep.equal([JOURNAL_KIND.WRITE_ZEROES, MIRROR_FLAG.MAY_PUNCH, 4096, 1 << 20, RECORD_HEADER_SIZE]);
    });

    it('keeps the index sorted for arbitrary arrival order, ties in append order', async () => {
      const { journal } = await openJ();
      const seqs = [50, 10, 30, 10, 70, 20, 60, 40, 5, 80];
      for (const s of seqs) await journal.append(zeroRec(s, 1));
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([...seqs].sort((a, b) => a - b));
      expect([journal.minSeq, journal.maxSeq]).to.deep.equal([5, 80]);
    });

    it('an empty journal reports no seqs and no age', async () => {
      const { journal } = await openJ();
      expect([journal.records, journal.bytes, journal.minSeq, journal.maxSeq, journal.oldestTimeMs]).to.deep.equal([0, 0, 0, 0, null]);
      expect(journal.entries()).to.deep.equal([]);
    });

    it('refuses malformed records without writing anything', async () => {
      const { journal } = await openJ();
      const bad: JournalRecord[] = [
        { ...writeRec(1, 10), data: pattern(1, 9) },
        { ...writeRec(1, 10), data: null },
        { ...zeroRec(1, 10), data: Buffer.alloc(10) },
        { ...writeRec(1, 10), kind: 3 },
        { ...writeRec(1, 10), flags: 8 },
        { ...writeRec(1, 10), seq: -1 },
        { ...writeRec(1, 10), seq: 2 ** 53 },
        { ...writeRec(1, 10), offset: LUN_SIZE - 9 },
        { ...zeroRec(1, 0x1_0000_0000) },
      ];
      for (const r of bad) {
        let err: unknown = null;
        await journal.append(r).catch((e: unknown) => { err = e; });
        expect(err, JSON.stringify({ ...r, data: r.data?.length })).to.be.instanceOf(JournalError);
      }
      expect(journal.records).to.equal(0);
      expect(await fileSize(file)).to.equal(HEADER_SIZE);
      await journal.append(writeRec(1, 10));   // still usable
      expect(journal.records).to.equal(1);
    });

    it('oldestTimeMs is the earliest append time and survives reopening', async () => {
      const { journal } = await openJ();
      const t0 = Date.now();
      await journal.append(writeRec(1, 100));
      const first = journal.oldestTimeMs!;
      expect(first).to.be.within(t0, Date.now());
      expect(journal.entries()[0].timeMs).to.equal(first);
      // Later appends (here with an earlier seq) do not make the journal look younger.
      await journal.append(zeroRec(0, 100));
      expect(journal.oldestTimeMs).to.be.at.most(journal.entries()[0].timeMs);
      expect(journal.oldestTimeMs).to.equal(Math.min(...journal.entries().map((e) => e.timeMs)));
      await closeJ(journal);
      const { journal: j2 } = await openJ();
      expect(j2.oldestTimeMs).to.equal(Math.min(...j2.entries().map((e) => e.timeMs)));
      expect(j2.oldestTimeMs).to.be.at.most(first);
    });
  });

  describe('recovery', () => {
    it('drops a torn last record wherever the file ends inside it', async () => {
      const recs = [writeRec(1, 3000), writeRec(2, 1000), writeRec(3, 5000)];
      const starts = await build(recs);
      const whole = await fsp.readFile(file);
      const last = starts[2];
      const lastBytes = RECORD_HEADER_SIZE + 5000;
      expect(whole.length).to.equal(last + lastBytes);
      // Inside the header, at its end, inside the data, one byte short.
      for (const cut of [1, 4, 30, RECORD_HEADER_SIZE - 1, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 1, RECORD_HEADER_SIZE + 2500, lastBytes - 1]) {
        await fsp.writeFile(file, whole.subarray(0, last + cut));
        const { journal, recovery } = await openJ();
        expect(recovery, `cut ${cut}`).to.deep.equal({ records: 2, bytes: last - HEADER_SIZE, tornTailBytes: cut, corrupt: null });
        expect(journal.entries().map((e) => e.seq)).to.deep.equal([1, 2]);
        expect(await fileSize(file)).to.equal(last);
        // Appends go on where the good records end.
        await journal.append(writeRec(3, 777));
        await closeJ(journal);
        const { journal: j2, recovery: r2 } = await openJ();
        expect(r2.tornTailBytes).to.equal(0);
        expect(j2.entries().map((e) => e.seq)).to.deep.equal([1, 2, 3]);
        expect((await j2.readData(j2.entries()[2])).equals(pattern(3, 777))).to.equal(true);
        expect((await j2.readData(j2.entries()[0])).equals(pattern(1, 3000))).to.equal(true);
        await closeJ(j2);
      }
      expect((await fsp.readdir(dir.path)).filter((n) => n.includes('corrupt'))).to.deep.equal([]);
    });

    it('a complete last record with a bad CRC is a torn tail', async () => {
      const starts = await build([writeRec(1, 100), writeRec(2, 100)]);
      const buf = await fsp.readFile(file);
      buf[starts[1] + RECORD_HEADER_SIZE + 50] ^= 0x10;
      await fsp.writeFile(file, buf);
      const { journal, recovery } = await openJ();
      expect(recovery.tornTailBytes).to.equal(RECORD_HEADER_SIZE + 100);
      expect(recovery.corrupt).to.equal(null);
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([1]);
    });

    it('drops a zero-filled tail (an extended but unwritten file end)', async () => {
      const starts = await build([writeRec(1, 100), writeRec(2, 100)]);
      const end = starts[1] + RECORD_HEADER_SIZE + 100;
      await fsp.appendFile(file, Buffer.alloc(200_000));
      const { journal, recovery } = await openJ();
      expect(recovery).to.deep.equal({ records: 2, bytes: end - HEADER_SIZE, tornTailBytes: 200_000, corrupt: null });
      expect(journal.records).to.equal(2);
      expect(await fileSize(file)).to.equal(end);
    });

    it('a damaged last record followed only by zeros is a torn tail', async () => {
      const starts = await build([writeRec(1, 100), writeRec(2, 5000)]);
      const buf = await fsp.readFile(file);
      buf.fill(0, starts[1] + RECORD_HEADER_SIZE + 4096);   // the end of its data never reached the disk
      await fsp.writeFile(file, Buffer.concat([buf, Buffer.alloc(8192)]));
      const { journal, recovery } = await openJ();
      expect(recovery.corrupt).to.equal(null);
      expect(recovery.tornTailBytes).to.equal(RECORD_HEADER_SIZE + 5000 + 8192);
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([1]);
    });

    it('drops trailing garbage too short to hold a record header', async () => {
      await build([writeRec(1, 100)]);
      const end = await fileSize(file);
      await fsp.appendFile(file, Buffer.alloc(RECORD_HEADER_SIZE - 1, 0xa5));
      const { recovery } = await openJ();
      expect(recovery.tornTailBytes).to.equal(RECORD_HEADER_SIZE - 1);
      expect(recovery.corrupt).to.equal(null);
      expect(await fileSize(file)).to.equal(end);
    });

    it('reports a corrupt record in the middle, saves the file and cuts the journal there', async () => {
      const recs = [1, 2, 3, 4, 5].map((s) => writeRec(s, 4096));
      const starts = await build(recs);
      const buf = await fsp.readFile(file);
      buf[starts[1] + RECORD_HEADER_SIZE + 1234] ^= 0x01;   // one data bit of record 2 of 5
      await fsp.writeFile(file, buf);
      const t0 = Date.now();
      const { journal, recovery } = await openJ();
      expect(recovery.records).to.equal(1);
      expect(recovery.bytes).to.equal(starts[1] - HEADER_SIZE);
      expect(recovery.tornTailBytes).to.equal(0);
      expect(recovery.corrupt).to.not.equal(null);
      const c = recovery.corrupt!;
      expect(c.offset).to.equal(starts[1]);
      expect(c.reason).to.match(/CRC mismatch in record seq 2/);
      expect(c.savedAs.startsWith(`${file}.corrupt-`)).to.equal(true);
      expect(Number(c.savedAs.slice(`${file}.corrupt-`.length))).to.be.within(t0, Date.now());
      expect((await fsp.readFile(c.savedAs)).equals(buf)).to.equal(true);
      expect((await fsp.stat(c.savedAs)).mode & 0o777).to.equal(0o600);
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([1]);
      expect((await journal.readData(journal.entries()[0])).equals(pattern(1, 4096))).to.equal(true);
      expect(await fileSize(file)).to.equal(starts[1]);
      // Reopening again finds a clean journal.
      await closeJ(journal);
      const { recovery: r2 } = await openJ();
      expect(r2).to.deep.equal({ records: 1, bytes: starts[1] - HEADER_SIZE, tornTailBytes: 0, corrupt: null });
    });

    it('a damaged length field in the middle is corruption, not a torn tail', async () => {
      const starts = await build([1, 2, 3].map((s) => writeRec(s, 1000)));
      const buf = await fsp.readFile(file);
      buf.writeUInt32BE(0x7fff_0000, starts[1] + 36);   // dataLen of record 2 now points far beyond EOF
      await fsp.writeFile(file, buf);
      const { journal, recovery } = await openJ();
      expect(recovery.corrupt?.offset).to.equal(starts[1]);
      expect(recovery.corrupt?.reason).to.match(/implausible record header/);
      expect(recovery.tornTailBytes).to.equal(0);
      expect(journal.records).to.equal(1);
    });

    it('a bad record magic in the middle is corruption', async () => {
      const starts = await build([1, 2, 3].map((s) => writeRec(s, 100)));
      const buf = await fsp.readFile(file);
      buf[starts[1]] ^= 0xff;
      await fsp.writeFile(file, buf);
      const { journal, recovery } = await openJ();
      expect(recovery.corrupt?.offset).to.equal(starts[1]);
      expect(recovery.corrupt?.reason).to.match(/bad record magic/);
      expect(journal.records).to.equal(1);
      expect(await pathExists(recovery.corrupt!.savedAs)).to.equal(true);
    });

    it('refuses another LUN\'s journal, another size, and files that are no journal', async () => {
      await build([writeRec(1, 100)]);
      const orig = await fsp.readFile(file);
      const expectOpenFails = async (re: RegExp, name = LUN, size = LUN_SIZE) => {
        let err: unknown = null;
        await Journal.open(file, name, size).then(({ journal }) => journal.close(), (e: unknown) => { err = e; });
        expect(err).to.be.instanceOf(JournalError);
        expect((err as Error).message).to.include(file);
        expect((err as Error).message).to.match(re);
      };
      await expectOpenFails(/belongs to LUN "lun-ä0", not "lun-1"/, 'lun-1');
      await expectOpenFails(/of 1073741824 bytes, the LUN now has 2147483648 bytes/, LUN, 2 * LUN_SIZE);
      expect((await fsp.readFile(file)).equals(orig)).to.equal(true);   // left alone

      const damaged = async (mutate: (b: Buffer) => void, re: RegExp) => {
        const b = Buffer.from(orig);
        mutate(b);
        await fsp.writeFile(file, b);
        await expectOpenFails(re);
        expect((await fsp.readFile(file)).equals(b)).to.equal(true);
      };
      await damaged((b) => { b[0] = 0x58; }, /not a mirror journal \(bad magic/);
      await damaged((b) => { b.writeUInt16BE(2, 8); }, /format version 2/);
      await damaged((b) => { b[21] ^= 1; }, /header CRC mismatch/);
      await fsp.writeFile(file, JOURNAL_MAGIC.subarray(0, 5));
      await expectOpenFails(/shorter than a journal header/);
      await fsp.writeFile(file, orig.subarray(0, HEADER_SIZE - 1));
      await expectOpenFails(/truncated header/);
    });

    it('treats an empty file as a new journal', async () => {
      await fsp.writeFile(file, '', { mode: 0o600 });
      const { journal, recovery } = await openJ();
      expect(recovery.records).to.equal(0);
      await journal.append(writeRec(1, 10));
      await closeJ(journal);
      expect((await openJ()).journal.records).to.equal(1);
    });
  });

  describe('group commit, reset, concurrency', () => {
    it('sync() shares fdatasyncs between concurrent callers, at most one in flight', async () => {
      const { journal } = await openJ();
      const real = fs.fdatasync;
      let calls = 0;
      let inFlight = 0;
      let maxInFlight = 0;
      (fs as { fdatasync: unknown }).fdatasync = (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
        calls++;
        maxInFlight = Math.max(maxInFlight, ++inFlight);
        real(fd, (err) => { inFlight--; cb(err); });
      };
      try {
        const ops: Promise<void>[] = [];
        for (let i = 1; i <= 200; i++) {
          ops.push(journal.append(writeRec(i, 4096)).then(() => journal.sync()));
          if (i % 10 === 0) ops.push(journal.sync());
        }
        await Promise.all(ops);
        expect(maxInFlight).to.equal(1);
        expect(calls).to.be.at.least(1).and.below(100);
        // Nothing appended since: no new fdatasync needed.
        const before = calls;
        await Promise.all([journal.sync(), journal.sync()]);
        expect(calls).to.equal(before);
      } finally {
        (fs as { fdatasync: unknown }).fdatasync = real;
      }
      expect(journal.records).to.equal(200);
    });

    it('sync() waits for an fdatasync that started after the appends that resolved before it', async () => {
      const { journal } = await openJ();
      const real = fs.fdatasync;
      const log: string[] = [];
      (fs as { fdatasync: unknown }).fdatasync = (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => {
        log.push(`start@${journal.records}`);
        real(fd, (err) => { log.push('end'); cb(err); });
      };
      try {
        await journal.append(writeRec(1, 10));
        const s1 = journal.sync();              // starts an fdatasync covering record 1
        await journal.append(writeRec(2, 10));  // resolves while that one may be in flight
        const s2 = journal.sync();              // must not ride on the first one
        await Promise.all([s1, s2]);
        const last = log.lastIndexOf('start@2');
        expect(last, log.join(' ')).to.be.at.least(0);
        expect(log[last + 1]).to.equal('end');
      } finally {
        (fs as { fdatasync: unknown }).fdatasync = real;
      }
    });

    it('reset() reclaims everything appended before it and keeps what comes after', async () => {
      const { journal } = await openJ();
      const before = [1, 2, 3].map((s) => journal.append(writeRec(s, 10_000)));
      const reset = journal.reset();
      const after = journal.append(writeRec(4, 100));
      await Promise.all([...before, reset, after]);
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([4]);
      expect(journal.bytes).to.equal(RECORD_HEADER_SIZE + 100);
      expect((await journal.readData(journal.entries()[0])).equals(pattern(4, 100))).to.equal(true);
      await journal.reset();
      expect([journal.records, journal.bytes, journal.minSeq, journal.maxSeq, journal.oldestTimeMs]).to.deep.equal([0, 0, 0, 0, null]);
      expect(await fileSize(file)).to.equal(HEADER_SIZE);
      await closeJ(journal);
      const { journal: j2, recovery } = await openJ();
      expect(recovery).to.deep.equal({ records: 0, bytes: 0, tornTailBytes: 0, corrupt: null });
      expect(j2.records).to.equal(0);
    });

    it('readData refuses an entry that reset() reclaimed', async () => {
      const { journal } = await openJ();
      await journal.append(writeRec(1, 100));
      const stale = journal.entries()[0];
      await journal.reset();
      await journal.append(writeRec(2, 100));
      let err: unknown = null;
      await journal.readData(stale).catch((e: unknown) => { err = e; });
      expect(err).to.be.instanceOf(JournalError);
    });

    it('1000 concurrent appends all survive reopening with the right data', async () => {
      const { journal } = await openJ();
      const sizes = new Map<number, number>();
      const ops: Promise<void>[] = [];
      for (let i = 0; i < 1000; i++) {
        const seq = i % 10 === 0 ? i + 2 : i % 10 === 1 ? i : i + 1;   // pairs swapped: out of seq order
        const len = 1 + ((i * 7919) % 70_000);
        if (i % 13 === 0) {
          sizes.set(seq, -len);
          ops.push(journal.append(zeroRec(seq, len, i * 512)));
        } else {
          sizes.set(seq, len);
          ops.push(journal.append(writeRec(seq, len, i * 512)));
        }
        if (i % 100 === 0) ops.push(journal.sync());
      }
      await Promise.all(ops);
      expect(journal.records).to.equal(1000);
      const mine = journal.entries().map(strip);
      await closeJ(journal);
      const { journal: j2, recovery } = await openJ();
      expect(recovery.records).to.equal(1000);
      expect(recovery.tornTailBytes).to.equal(0);
      expect(j2.entries().map(strip)).to.deep.equal(mine);
      const seqs = j2.entries().map((e) => e.seq);
      expect(seqs).to.deep.equal([...seqs].sort((a, b) => a - b));
      for (const e of j2.entries()) {
        const len = sizes.get(e.seq)!;
        expect(e.length).to.equal(Math.abs(len));
        const d = await j2.readData(e);
        if (len > 0) expect(d.equals(pattern(e.seq, len)), `seq ${e.seq}`).to.equal(true);
        else expect(d.length).to.equal(0);
      }
    });

    it('a failed write is cut off the file and the journal stays usable', async () => {
      const { journal } = await openJ();
      await journal.append(writeRec(1, 1000));
      const size = await fileSize(file);
      const real = fs.writev;
      (fs as { writev: unknown }).writev = (fd: number, bufs: Buffer[], pos: number, cb: (err: Error | null, n: number) => void) => {
        (fs as { writev: unknown }).writev = real;
        // Half of the batch reaches the file, then the disk fills up.
        real(fd, bufs.slice(0, 1), pos, () => cb(Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' }), 0));
      };
      let err: unknown = null;
      await journal.append(writeRec(2, 1000)).catch((e: unknown) => { err = e; });
      expect(err).to.be.instanceOf(JournalError);
      expect((err as Error).message).to.match(/ENOSPC/);
      expect(await fileSize(file)).to.equal(size);
      expect(journal.entries().map((e) => e.seq)).to.deep.equal([1]);
      await journal.append(writeRec(3, 1000));
      await closeJ(journal);
      const { journal: j2, recovery } = await openJ();
      expect(recovery.tornTailBytes).to.equal(0);
      expect(j2.entries().map((e) => e.seq)).to.deep.equal([1, 3]);
    });

    it('close() writes what is queued; later calls are refused', async () => {
      const { journal } = await openJ();
      const appends = [1, 2, 3].map((s) => journal.append(writeRec(s, 100)));
      await closeJ(journal);
      await Promise.all(appends);
      for (const p of [journal.append(writeRec(4, 1)), journal.sync(), journal.reset()]) {
        let err: unknown = null;
        await p.catch((e: unknown) => { err = e; });
        expect(err).to.be.instanceOf(JournalError);
      }
      expect((await openJ()).journal.records).to.equal(3);
    });
  });

  describe('SIGKILL', () => {
    const script = (journalUrl: string) => `
      import { Journal, JOURNAL_KIND } from ${JSON.stringify(journalUrl)};
      ${PATTERN_SRC}
      const { journal } = await Journal.open(process.argv[2], 'kill-lun', 1 << 30);
      let seq = 0;
      const inflight = new Set();
      for (;;) {
        while (inflight.size < 32) {
          const s = ++seq;
          const len = 1 + ((s * 7919) % 65536);
          const p = journal.append({ seq: s, dep: s - 1, kind: JOURNAL_KIND.WRITE, flags: 0, offset: s * 512, length: len, data: pattern(s, len) })
            .then(() => { process.stdout.write(s + '\\n'); inflight.delete(p); });
          inflight.add(p);
          if (s % 50 === 0) {
            const q = journal.sync().then(() => { inflight.delete(q); });
            inflight.add(q);
          }
        }
        await Promise.race(inflight);
      }
    `;

    for (const acks of [100, 1500]) {
      it(`every append that resolved before the kill survives (kill after ${acks})`, async () => {
        const js = dir.join('child.mjs');
        await fsp.writeFile(js, script(new URL('src/persist/journal.ts', `file://${REPO}`).href));
        const child = spawn(process.execPath, ['--import', 'tsx', js, file], { cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
        const acked = new Set<number>();
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
        const exited = new Promise<NodeJS.Signals | number | null>((resolve) => child.on('exit', (code, sig) => resolve(sig ?? code)));
        let partial = '';
        await new Promise<void>((resolve, reject) => {
          child.stdout.on('data', (d: Buffer) => {
            const lines = (partial + d.toString()).split('\n');
            partial = lines.pop()!;
            for (const l of lines) acked.add(Number(l));
            if (acked.size >= acks) {
              child.kill('SIGKILL');
              resolve();
            }
          });
          void exited.then((how) => reject(new Error(`child exited (${how}) early: ${stderr}`)));
        });
        expect(await exited).to.equal('SIGKILL');
        const { journal, recovery } = await openJ(file, 'kill-lun', 1 << 30);
        expect(recovery.corrupt).to.equal(null);
        const bySeq = new Map(journal.entries().map((e) => [e.seq, e]));
        for (const s of acked) {
          if (!Number.isInteger(s) || s <= 0) continue;
          const e = bySeq.get(s);
          expect(e, `acked seq ${s} lost (recovered ${journal.records}, torn ${recovery.tornTailBytes})`).to.not.equal(undefined);
          const len = 1 + ((s * 7919) % 65536);
          expect((await journal.readData(e!)).equals(pattern(s, len)), `seq ${s}`).to.equal(true);
        }
        // Appends were written in call order: the survivors are exactly seqs 1..n.
        expect(journal.entries().map((e) => e.seq)).to.deep.equal(Array.from({ length: journal.records }, (_, i) => i + 1));
      });
    }
  });
});
