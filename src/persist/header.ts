// The header codec shared by the journal, undo log and bitmap files: a fixed part (buffer-layout,
// starting with an 8-byte magic and a u16 version), optionally a variable part (the LUN name),
// and a u32 crc32c of every header byte before it as the header's last 4 bytes. The check gives
// each kind's long-standing error messages (tests and operators rely on them).
import { crc32c } from '@node-rs/crc32';
import type { Structure } from 'buffer-layout';
import { preadFull } from './file-io.js';

export interface HeaderKind<F extends { magic: Buffer; version: number }> {
  /** "journal": "shorter than a journal header", "journal format version 2". */
  noun: string;
  /** "a mirror journal": "not a mirror journal (bad magic ...)". */
  fileIs: string;
  magic: Buffer;
  version: number;
  /** The fixed part, read first. */
  fixed: Structure<F>;
  /** Total header bytes, CRC included, for a fixed part `f` (the fixed part may hold the CRC). */
  size: (f: F) => number;
  /** A CRC as messages print it (kinds differ: kept as they always were). */
  crcHex: (n: number) => string;
}

export function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

/** The header bytes for `fields`, `tail` (the variable part) after the fixed part, the CRC last. */
export function encodeHeader<F extends { magic: Buffer; version: number }>(kind: HeaderKind<F>, fields: F, tail?: Buffer): Buffer {
  const buf = Buffer.alloc(kind.size(fields));
  kind.fixed.encode(fields, buf);
  if (tail) tail.copy(buf, kind.fixed.span);
  buf.writeUInt32BE(crc32c(buf.subarray(0, buf.length - 4)) >>> 0, buf.length - 4);
  return buf;
}

/**
 * Read and check the header of the file `fd` (`size` bytes): length, magic, version, CRC. Returns
 * its fixed part and all its bytes; the caller checks the fields. `fail` makes the error.
 */
export async function readHeader<F extends { magic: Buffer; version: number }>(
  kind: HeaderKind<F>, fd: number, size: number, fail: (what: string) => Error,
): Promise<{ fields: F; bytes: Buffer }> {
  const span = kind.fixed.span;
  const fixed = Buffer.alloc(span);
  if (await preadFull(fd, fixed, 0, span, 0) < span) {
    const an = /^[aeiou]/.test(kind.noun) ? 'an' : 'a';
    throw fail(`file of ${size} bytes is shorter than ${an} ${kind.noun} header (not ${kind.fileIs}, or truncated)`);
  }
  const f = kind.fixed.decode(fixed);
  if (!f.magic.equals(kind.magic)) throw fail(`not ${kind.fileIs} (bad magic ${JSON.stringify(f.magic.toString('latin1'))})`);
  if (f.version !== kind.version) throw fail(`${kind.noun} format version ${f.version}, this build reads version ${kind.version}`);
  const total = kind.size(f);
  let bytes = fixed;
  if (total !== span) {
    bytes = Buffer.alloc(total);
    if (await preadFull(fd, bytes, 0, total, 0) < total) throw fail(`truncated header (${size} bytes, header needs ${total})`);
  }
  const stored = bytes.readUInt32BE(total - 4);
  const actual = crc32c(bytes.subarray(0, total - 4)) >>> 0;
  if (stored !== actual) {
    throw fail(`header CRC mismatch (stored 0x${kind.crcHex(stored)}, computed 0x${kind.crcHex(actual)}): corrupt header`);
  }
  return { fields: f, bytes };
}
