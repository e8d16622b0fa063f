// The top layer: counts what hosts ask for, and holds the latency hook the metrics module sets
// (admin/metrics.ts instrument). The layer below is swapped when the LUN changes role.
import type { Extent } from '../storage/backing.js';
import type { BlockTarget } from './block-target.js';

export interface LunCounters {
  readOps: number; readBytes: number;
  writeOps: number; writeBytes: number;
  trimOps: number; zeroOps: number; flushOps: number;
  errors: number;
}

/** Per-request latency (NBD command type, seconds). */
export type LatencyHook = (type: number, seconds: number) => void;

export class StatsLayer implements BlockTarget {
  readonly counters: LunCounters = {
    readOps: 0, readBytes: 0, writeOps: 0, writeBytes: 0, trimOps: 0, zeroOps: 0, flushOps: 0, errors: 0,
  };
  latency: LatencyHook | null = null;

  constructor(readonly name: string, private next: BlockTarget) {}

  /** Put `next` under this layer (a role change; the counters stay). */
  stack(next: BlockTarget): void {
    this.next = next;
  }

  get size(): number { return this.next.size; }
  get sparse(): boolean { return this.next.sparse; }

  read(buf: Buffer, pos: number): Promise<void> {
    this.countRead(buf.length);
    return this.next.read(buf, pos);
  }

  /** One host read of `len` bytes (a sparse read is served in pieces but counts once). */
  countRead(len: number): void {
    this.counters.readOps++;
    this.counters.readBytes += len;
  }

  /** A piece of a host read already counted by countRead. */
  readPiece(buf: Buffer, pos: number): Promise<void> {
    return this.next.read(buf, pos);
  }

  write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    this.counters.writeOps++;
    this.counters.writeBytes += buf.length;
    return this.next.write(buf, pos, fua);
  }

  zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    this.counters.zeroOps++;
    return this.next.zero(pos, len, mayPunch, fastOnly, fua);
  }

  trim(pos: number, len: number, fua: boolean): Promise<void> {
    this.counters.trimOps++;
    return this.next.trim(pos, len, fua);
  }

  flush(): Promise<void> {
    this.counters.flushOps++;
    return this.next.flush();
  }

  cache(pos: number, len: number): Promise<void> {
    return this.next.cache(pos, len);
  }

  extents(pos: number, len: number, max: number): Extent[] {
    return this.next.extents(pos, len, max);
  }
}
