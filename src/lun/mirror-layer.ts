// A mirrored primary's layer: what changes data goes through its LunMirror (which writes the
// backing and the peer in the order its mode asks); reads and the allocation map go below.
import type { Extent } from '../storage/backing.js';
import type { LunMirror } from '../mirror/primary/lun-mirror.js';
import type { BlockTarget } from './block-target.js';

/** The part of a LunMirror the host path uses. */
export type MirrorWrites = Pick<LunMirror, 'write' | 'zero' | 'flush'>;

export class MirrorLayer implements BlockTarget {
  constructor(private readonly mirror: MirrorWrites, private readonly next: BlockTarget) {}

  get size(): number { return this.next.size; }
  get sparse(): boolean { return this.next.sparse; }

  read(buf: Buffer, pos: number): Promise<void> {
    return this.next.read(buf, pos);
  }

  write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    return this.mirror.write(buf, pos, fua);
  }

  zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    return this.mirror.zero(pos, len, mayPunch, fastOnly, fua);
  }

  /** TRIM becomes a punch-hole zero, so both copies read the same (a plain TRIM may leave data). */
  trim(pos: number, len: number, fua: boolean): Promise<void> {
    return this.mirror.zero(pos, len, true, false, fua);
  }

  flush(): Promise<void> {
    return this.mirror.flush();
  }

  cache(pos: number, len: number): Promise<void> {
    return this.next.cache(pos, len);
  }

  extents(pos: number, len: number, max: number): Extent[] {
    return this.next.extents(pos, len, max);
  }
}
