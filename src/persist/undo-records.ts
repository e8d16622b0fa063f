// The undo log's on-disk structures (docs/journal-format.md, "Undo log"): the header (through the
// shared header codec) and the records, with the checked walk over them that open() and
// rollback() share, and open()'s recovery (torn tail cut off, corruption refused).
import { crc32c } from '@node-rs/crc32';
import lo from 'buffer-layout';
import { fdatasync, ftruncate, preadFull, zerosFrom } from './file-io.js';
import { encodeHeader, hex8 as hex, readHeader, type HeaderKind } from './header.js';

export const UNDO_MAGIC = Buffer.from('NBDMUND1', 'latin1');
export const UNDO_VERSION = 1;
export const DEFAULT_UNDO_GRANULARITY = 64 * 1024;
export const MIN_GRANULARITY = 512;
export const MAX_GRANULARITY = 1 << 30;
export const MAX_LUN_NAME_BYTES = 0xffff;

export interface UndoHeaderFixed { magic: Buffer; version: number; lunSize: number; granularity: number; nameLen: number }
/** Followed by `nameLen` bytes of LUN name (UTF-8), then a u32 CRC of every header byte before it. */
export const undoHeaderFixed = lo.struct<UndoHeaderFixed>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.nu64be('lunSize'), lo.u32be('granularity'), lo.u16be('nameLen'),
]);
const undoHeaderCrc = lo.u32be('headerCrc');

export function undoHeaderSize(nameBytes: number): number {
  return undoHeaderFixed.span + nameBytes + undoHeaderCrc.span;
}

export const UNDO_RECORD_MAGIC = 0x4e4d5531;   // "NMU1"
export interface UndoRecordHeader { magic: number; region: number; length: number; crc: number }
/** Followed by `length` bytes: the region's old contents. `crc`: over header bytes 0..15, then the data. */
export const undoRecordHeader = lo.struct<UndoRecordHeader>([
  lo.u32be('magic'), lo.nu64be('region'), lo.u32be('length'), lo.u32be('crc'),
]);
export const UNDO_RECORD_HEADER_SIZE = 20;
export const UNDO_RECORD_CRC_OFFSET = 16;

export const UNDO_HEADER: HeaderKind<UndoHeaderFixed> = {
  noun: 'undo log', fileIs: 'an undo log', magic: UNDO_MAGIC, version: UNDO_VERSION,
  fixed: undoHeaderFixed, size: (f) => undoHeaderSize(f.nameLen), crcHex: hex,
};

/** Records are read (open, rollback) in chunks of this size (a larger record is read whole). */
const READ_CHUNK = 4 * 1024 * 1024;

export interface Geometry { lunSize: number; granularity: number; regions: number }

export function regionCount(lunSize: number, granularity: number): number {
  return Math.ceil(lunSize / granularity);
}

/** The geometry of a log for `lunSize` and `granularity`; throws `fail(...)` for values the format cannot hold. */
export function undoGeometry(lunSize: number, granularity: number, fail: (what: string) => Error): Geometry {
  if (!Number.isSafeInteger(lunSize) || lunSize < 0) throw fail(`invalid LUN size ${lunSize}`);
  if (!Number.isInteger(granularity) || granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY
    || (granularity & (granularity - 1)) !== 0) {
    throw fail(`invalid granularity ${granularity} (a power of two from ${MIN_GRANULARITY} to ${MAX_GRANULARITY})`);
  }
  const regions = regionCount(lunSize, granularity);
  if (regions > 0xffffffff) throw fail(`${regions} regions is too many; use a larger granularity`);
  return { lunSize, granularity, regions };
}

/** [first, end) regions of a range clipped to the LUN; null for an invalid range. */
export function regionRange(lunSize: number, granularity: number, offset: number, length: number): [number, number] | null {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) return null;
  const end = Math.min(offset + length, lunSize);
  if (offset >= end) return [0, 0];
  return [Math.floor(offset / granularity), Math.floor((end - 1) / granularity) + 1];
}

export function encodeUndoHeader(name: Buffer, lunSize: number, granularity: number): Buffer {
  return encodeHeader(UNDO_HEADER, { magic: UNDO_MAGIC, version: UNDO_VERSION, lunSize, granularity, nameLen: name.length }, name);
}

/** The record of `region` holding `data`, its header encoded (CRC over the header, then the data). */
export function encodeUndoRecordHeader(region: number, data: Buffer): Buffer {
  const hdr = Buffer.alloc(UNDO_RECORD_HEADER_SIZE);
  undoRecordHeader.encode({ magic: UNDO_RECORD_MAGIC, region, length: data.length, crc: 0 }, hdr);
  const crc = crc32c(data, crc32c(hdr.subarray(0, UNDO_RECORD_CRC_OFFSET))) >>> 0;
  hdr.writeUInt32BE(crc, UNDO_RECORD_CRC_OFFSET);
  return hdr;
}

export async function checkUndoHeader(fd: number, size: number, name: Buffer, lunName: string, lunSize: number, granularity: number,
  fail: (what: string) => Error): Promise<void> {
  const { fields: f, bytes: full } = await readHeader(UNDO_HEADER, fd, size, fail);
  const fixedSpan = undoHeaderFixed.span;
  const storedName = full.subarray(fixedSpan, fixedSpan + f.nameLen);
  if (!storedName.equals(name)) {
    throw fail(`belongs to LUN ${JSON.stringify(storedName.toString('utf8'))}, not ${JSON.stringify(lunName)}`);
  }
  if (f.lunSize !== lunSize) throw fail(`was written for a LUN of ${f.lunSize} bytes, LUN ${JSON.stringify(lunName)} has ${lunSize}`);
  if (f.granularity !== granularity) throw fail(`was written with a granularity of ${f.granularity} bytes, not ${granularity}`);
}

export interface WalkedRecord { region: number; data: Buffer }
/** Where walkRecords() stopped. `incomplete`: the file ends inside the record (by its header, if plausible). */
export interface BadSpot { offset: number; reason: string; incomplete: boolean }

/**
 * Read the records in [from, end), in file order, checking each (magic, plausible header, CRC),
 * in chunks: `visit` gets the valid records of each chunk (their data are fresh views, valid
 * after it returns). Stops at the first record that is not valid and returns where; null if
 * every record to `end` is valid.
 */
export async function walkRecords(fd: number, from: number, end: number, geo: Geometry,
  visit: (recs: WalkedRecord[]) => void | Promise<void>): Promise<BadSpot | null> {
  let pos = from;
  let want = READ_CHUNK;
  while (pos < end) {
    const n = Math.min(want, end - pos);
    const buf = Buffer.allocUnsafe(n);
    const got = await preadFull(fd, buf, 0, n, pos);
    if (got < n) return { offset: pos, reason: `short read at ${pos} (the file shrank?)`, incomplete: false };
    const recs: WalkedRecord[] = [];
    let at = 0;
    let bad: BadSpot | null = null;
    want = READ_CHUNK;
    while (at < n) {
      const offset = pos + at;
      if (n - at < UNDO_RECORD_HEADER_SIZE) {
        if (offset + UNDO_RECORD_HEADER_SIZE > end) bad = { offset, reason: 'the file ends inside a record header', incomplete: true };
        break;   // else: read on from here
      }
      const h = undoRecordHeader.decode(buf, at);
      if (h.magic !== UNDO_RECORD_MAGIC) {
        bad = { offset, reason: `bad record magic 0x${hex(h.magic)}`, incomplete: false };
        break;
      }
      if (!(h.region < geo.regions)) {
        bad = { offset, reason: `region ${h.region} beyond the LUN's ${geo.regions} regions`, incomplete: false };
        break;
      }
      const expect = Math.min(geo.granularity, geo.lunSize - h.region * geo.granularity);
      if (h.length !== expect) {
        bad = { offset, reason: `length ${h.length} for region ${h.region}, which has ${expect} bytes`, incomplete: false };
        break;
      }
      const size = UNDO_RECORD_HEADER_SIZE + h.length;
      if (offset + size > end) {
        bad = { offset, reason: `the file ends inside the record of region ${h.region}`, incomplete: true };
        break;
      }
      if (at + size > n) {
        want = Math.max(READ_CHUNK, size);
        break;   // read on from here
      }
      const data = buf.subarray(at + UNDO_RECORD_HEADER_SIZE, at + size);
      const crc = crc32c(data, crc32c(buf.subarray(at, at + UNDO_RECORD_CRC_OFFSET))) >>> 0;
      if (crc !== h.crc) {
        bad = { offset, reason: `CRC mismatch in the record of region ${h.region} (stored 0x${hex(h.crc)}, computed 0x${hex(crc)})`, incomplete: false };
        break;
      }
      recs.push({ region: h.region, data });
      at += size;
    }
    if (recs.length > 0) await visit(recs);
    if (bad) return bad;
    pos += at;
  }
  return null;
}

/**
 * Rebuild the set of saved regions from the records of `fd` in [from, size) and cut off a torn
 * tail (an append cut short by a crash: its protect() never resolved, nothing relies on it). A
 * corrupt record throws `fail(...)` and leaves the file as it is.
 */
export async function recoverUndoLog(fd: number, from: number, size: number, geo: Geometry, fail: (what: string) => Error):
  Promise<{ bits: Uint8Array; count: number; size: number }> {
  const bits = new Uint8Array(Math.ceil(geo.regions / 8));
  let count = 0;
  const bad = await walkRecords(fd, from, size, geo, (recs) => {
    for (const r of recs) {
      const k = r.region >>> 3;
      const m = 1 << (r.region & 7);
      if ((bits[k] & m) !== 0) continue;   // never written twice by this code; the first one counts
      bits[k] |= m;
      count++;
    }
  });
  if (bad) {
    if (!bad.incomplete && !(await zerosFrom(fd, bad.offset, size))) {
      throw fail(`corrupt record at offset ${bad.offset}: ${bad.reason}; the log cannot be used (the file was left as it is; `
      + `only if the host lost power while this record was being appended is it safe to cut the file to ${bad.offset} bytes)`);
    }
    await ftruncate(fd, bad.offset);
    await fdatasync(fd);
    size = bad.offset;
  }
  return { bits, count, size };
}
