// u64 fields of the wire and file formats, as Numbers (every offset, size and sequence number
// here is far below 2^53; larger values are invalid input, not silently rounded).

export function writeU64(out: Buffer, at: number, v: number): void {
  out.writeUInt32BE(Math.floor(v / 0x100000000), at);
  out.writeUInt32BE(v >>> 0, at + 4);
}

/** -1 for values at or above 2^53 (never valid here). */
export function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  if (hi >= 0x200000) return -1;
  return hi * 0x100000000 + buf.readUInt32BE(at + 4);
}
