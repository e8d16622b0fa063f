// On-disk structures of the mirror journal and the dirty-region bitmap (docs/journal-format.md),
// plus the small positional-I/O helpers both files use. All integers big-endian.
//
// The buffer-layout definitions below are the documented layout. The journal record header is
// on the hot path (one per journaled host write), so writeRecordHeader()/readRecordHeader()
// encode it with plain Buffer calls; test/persist/journal.test.ts checks that both agree.
import { readU64, writeU64 } from '../net/u64.js';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import lo from 'buffer-layout';

// ---- journal file header -------------------------------------------------------------------

export const JOURNAL_MAGIC = Buffer.from('NBDMJRNL', 'latin1');
export const JOURNAL_VERSION = 1;

export interface JournalHeaderFixed { magic: Buffer; version: number; lunSize: number; nameLen: number }
/** Followed by `nameLen` bytes of LUN name (UTF-8), then the u32 headerCrc. */
export const journalHeaderFixed = lo.struct<JournalHeaderFixed>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.nu64be('lunSize'), lo.u16be('nameLen'),
]);
/** crc32c of every header byte before it (fixed part and name). */
export const headerCrc = lo.u32be('headerCrc');
export const MAX_LUN_NAME_BYTES = 0xffff;

/** Size in bytes of a journal file header for a LUN name of `nameBytes` bytes. */
export function journalHeaderSize(nameBytes: number): number {
  return journalHeaderFixed.span + nameBytes + headerCrc.span;
}

// ---- journal record header -----------------------------------------------------------------

export const RECORD_MAGIC = 0x4e4d4a31;   // "NMJ1"
export const RECORD_HEADER_SIZE = 52;
/** The crc field's offset: the CRC covers the header bytes before it, then the data. */
export const RECORD_CRC_OFFSET = 48;

export interface RecordHeader {
  magic: number;
  kind: number;
  flags: number;
  reserved: number;
  seq: number;
  dep: number;
  offset: number;
  length: number;
  dataLen: number;
  timeMs: number;
  crc: number;
}

export const recordHeader = lo.struct<RecordHeader>([
  lo.u32be('magic'), lo.u8('kind'), lo.u8('flags'), lo.u16be('reserved'),
  lo.nu64be('seq'), lo.nu64be('dep'), lo.nu64be('offset'),
  lo.u32be('length'), lo.u32be('dataLen'), lo.nu64be('timeMs'), lo.u32be('crc'),
]);

/** Hot-path encoder of `recordHeader` (same bytes). u64 fields must be safe non-negative integers. */
export function writeRecordHeader(out: Buffer, at: number, h: RecordHeader): void {
  out.writeUInt32BE(h.magic, at);
  out[at + 4] = h.kind;
  out[at + 5] = h.flags;
  out.writeUInt16BE(h.reserved, at + 6);
  writeU64(out, at + 8, h.seq);
  writeU64(out, at + 16, h.dep);
  writeU64(out, at + 24, h.offset);
  out.writeUInt32BE(h.length, at + 32);
  out.writeUInt32BE(h.dataLen, at + 36);
  writeU64(out, at + 40, h.timeMs);
  out.writeUInt32BE(h.crc >>> 0, at + 48);
}

/**
 * Hot-path decoder of `recordHeader`. A u64 field at or above 2^53 (never written by this code)
 * decodes as -1, which the journal's sanity checks reject.
 */
export function readRecordHeader(buf: Buffer, at: number): RecordHeader {
  return {
    magic: buf.readUInt32BE(at),
    kind: buf[at + 4],
    flags: buf[at + 5],
    reserved: buf.readUInt16BE(at + 6),
    seq: readU64(buf, at + 8),
    dep: readU64(buf, at + 16),
    offset: readU64(buf, at + 24),
    length: buf.readUInt32BE(at + 32),
    dataLen: buf.readUInt32BE(at + 36),
    timeMs: readU64(buf, at + 40),
    crc: buf.readUInt32BE(at + 48),
  };
}


// ---- bitmap file header --------------------------------------------------------------------

export const BITMAP_MAGIC = Buffer.from('NBDMBMAP', 'latin1');
export const BITMAP_VERSION = 1;

export interface BitmapHeader { magic: Buffer; version: number; lunSize: number; regionSize: number; headerCrc: number }
export const bitmapHeader = lo.struct<BitmapHeader>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.nu64be('lunSize'), lo.u32be('regionSize'), lo.u32be('headerCrc'),
]);
/** Bytes of the bitmap header the headerCrc covers. */
export const BITMAP_CRC_COVERS = bitmapHeader.span - 4;

// ---- positional I/O (Number positions: Node 20 ignores bigint ones) --------------------------

export const FILE_MODE = 0o600;

export function openFile(file: string, flags: number, mode = FILE_MODE): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, (err, fd) => (err ? reject(err) : resolve(fd))));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

export function ftruncate(fd: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, len, (err) => (err ? reject(err) : resolve())));
}

export function fstatSize(fd: number): Promise<number> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st.size))));
}

/** Read up to `len` bytes at `pos` into `buf` at `at`; returns the bytes read (short only at EOF). */
export function preadFull(fd: number, buf: Buffer, at: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === len) return resolve(done);
      fs.read(fd, buf, at + done, len - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return resolve(done);
        step(done + n);
      });
    };
    step(0);
  });
}

/** Write all of `buf` at `pos`. */
export function pwriteFull(fd: number, buf: Buffer, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === buf.length) return resolve();
      fs.write(fd, buf, done, buf.length - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return reject(Object.assign(new Error(`short write at ${pos + done}`), { code: 'EIO' }));
        step(done + n);
      });
    };
    step(0);
  });
}

/** Write every buffer of `bufs`, back to back, at `pos` (one writev; continues after a short write). */
export function pwritevFull(fd: number, bufs: Buffer[], pos: number): Promise<void> {
  let total = 0;
  for (const b of bufs) total += b.length;
  return new Promise((resolve, reject) => {
    const step = (list: Buffer[], at: number, left: number): void => {
      fs.writev(fd, list, at, (err, n) => {
        if (err) return reject(err);
        if (n === left) return resolve();
        if (n === 0) return reject(Object.assign(new Error(`short write at ${at}`), { code: 'EIO' }));
        // Drop the bytes written and go on with the rest.
        let skip = n;
        let i = 0;
        while (skip >= list[i].length) skip -= list[i++].length;
        const rest = list.slice(i);
        rest[0] = rest[0].subarray(skip);
        step(rest, at + n, left - n);
      });
    };
    if (total === 0) resolve();
    else step(bufs, pos, total);
  });
}

/**
 * Create `file` holding exactly `content`, atomically: write a temporary file next to it,
 * fdatasync, rename over, fsync the directory. Either the old state (no file) or the complete
 * file survives a crash. Fails with EEXIST if `file` exists.
 */
export async function createFileAtomic(file: string, content: Buffer): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const fd = await openFile(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC);
  try {
    await pwriteFull(fd, content, 0);
    await fdatasync(fd);
  } catch (err) {
    await closeFd(fd).catch(() => undefined);
    await fs.promises.rm(tmp, { force: true });
    throw err;
  }
  await closeFd(fd);
  try {
    // link() fails if `file` appeared meanwhile instead of replacing it (rename would).
    await fs.promises.link(tmp, file);
  } finally {
    await fs.promises.rm(tmp, { force: true });
  }
  await fsyncDir(path.dirname(file));
}

export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFile(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await new Promise<void>((resolve, reject) => fs.fsync(fd, (err) => (err ? reject(err) : resolve())));
  } finally {
    await closeFd(fd);
  }
}

/**
 * Group commit for one file descriptor. `level()` is a monotonic count of completed writes;
 * sync() resolves once an fdatasync that started at or after the level seen at call time has
 * completed. At most one fdatasync is in flight and one queued; every caller in between shares them.
 */
export class GroupSync {
  private synced = 0;
  private inflight: { covers: number; promise: Promise<void> } | null = null;
  private queued: { promise: Promise<void>; resolve: () => void; reject: (err: Error) => void } | null = null;

  constructor(private readonly doSync: () => Promise<void>, private readonly level: () => number) {}

  sync(): Promise<void> {
    const target = this.level();
    if (this.inflight) {
      if (this.inflight.covers >= target) return this.inflight.promise;
    } else if (this.synced >= target) {
      return Promise.resolve();
    }
    if (!this.queued) {
      let resolve!: () => void;
      let reject!: (err: Error) => void;
      const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
      this.queued = { promise, resolve, reject };
    }
    const p = this.queued.promise;
    if (!this.inflight) this.start();
    return p;
  }

  /** Resolves once nothing is in flight or queued (errors are the callers' business). */
  async idle(): Promise<void> {
    while (this.inflight) await this.inflight.promise.catch(() => undefined);
  }

  private start(): void {
    const q = this.queued!;
    this.queued = null;
    const covers = this.level();
    this.inflight = { covers, promise: q.promise };
    this.doSync().then(() => {
      if (covers > this.synced) this.synced = covers;
      this.inflight = null;
      q.resolve();
      if (this.queued) this.start();
    }, (err: Error) => {
      this.inflight = null;
      q.reject(err);
      if (this.queued) this.start();
    });
  }
}
