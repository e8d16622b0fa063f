// Handshake-phase wire structures (cold path), laid out with buffer-layout.
// The per-request transmission structures are encoded with plain Buffer calls in transmission.ts.
import lo, { type Layout } from 'buffer-layout';

export interface Greeting { magic: Buffer; optMagic: Buffer; flags: number }
export const greeting = lo.struct<Greeting>([lo.blob(8, 'magic'), lo.blob(8, 'optMagic'), lo.u16be('flags')]);

export const clientFlags = lo.struct<{ flags: number }>([lo.u32be('flags')]);

export interface OptionHeader { magic: Buffer; option: number; length: number }
export const optionHeader = lo.struct<OptionHeader>([lo.blob(8, 'magic'), lo.u32be('option'), lo.u32be('length')]);

export interface OptionReplyHeader { magic: Buffer; option: number; type: number; length: number }
export const optionReplyHeader = lo.struct<OptionReplyHeader>([
  lo.blob(8, 'magic'), lo.u32be('option'), lo.u32be('type'), lo.u32be('length'),
]);

/** Reply to NBD_OPT_EXPORT_NAME (followed by 124 zero bytes unless NO_ZEROES). */
export const exportNameReply = lo.struct<{ size: number; flags: number }>([lo.nu64be('size'), lo.u16be('flags')]);

export const infoExport = lo.struct<{ type: number; size: number; flags: number }>([
  lo.u16be('type'), lo.nu64be('size'), lo.u16be('flags'),
]);

export const infoBlockSize = lo.struct<{ type: number; min: number; preferred: number; max: number }>([
  lo.u16be('type'), lo.u32be('min'), lo.u32be('preferred'), lo.u32be('max'),
]);

/** Encode a structure into a fresh buffer of its exact span. */
export function encode<T>(layout: Layout<T>, value: T): Buffer {
  const buf = Buffer.alloc(layout.span);
  layout.encode(value, buf);
  return buf;
}
