// On-disk structures of the mirror journal and the dirty-region bitmap (docs/journal-format.md).
// All integers big-endian. (Positional I/O: file-io.ts; the header codec: header.ts.)
//
// The buffer-layout definitions below are the documented layout. The journal record header is
// on the hot path (one per journaled host write), so writeRecordHeader()/readRecordHeader()
// encode it with plain Buffer calls; test/persist/journal.test.ts checks that both agree.
import { readU64, writeU64 } from '../net/u64.js';
import lo from 'buffer-layout';
import { hex8, type HeaderKind } from './header.js';

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

export const JOURNAL_HEADER: HeaderKind<JournalHeaderFixed> = {
  noun: 'journal', fileIs: 'a mirror journal', magic: JOURNAL_MAGIC, version: JOURNAL_VERSION,
  fixed: journalHeaderFixed, size: (f) => journalHeaderSize(f.nameLen), crcHex: hex8,
};

export const JOURNAL_KIND = { WRITE: 1, WRITE_ZEROES: 2 } as const;

// RESYNC: a region copy in flight when the link failed keeps its sequence number in the journal,
// so the replay stays dense (a later record may depend on it).
/** Request flags a record keeps (the mirror wire uses the same values: mirror/wire.ts MIRROR_FLAG). */
export const RECORD_FLAG = { FUA: 1, MAY_PUNCH: 2, RESYNC: 4 } as const;
export const KNOWN_RECORD_FLAGS = RECORD_FLAG.FUA | RECORD_FLAG.MAY_PUNCH | RECORD_FLAG.RESYNC;

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

/** The bitmap header's CRC is its struct's last field. Its messages print CRCs unpadded, as always. */
export const BITMAP_HEADER: HeaderKind<BitmapHeader> = {
  noun: 'bitmap', fileIs: 'a region bitmap', magic: BITMAP_MAGIC, version: BITMAP_VERSION,
  fixed: bitmapHeader, size: () => bitmapHeader.span, crcHex: (n) => n.toString(16),
};
