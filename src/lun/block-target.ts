// What a LUN's layers speak: the operations NBD transmission needs, each layer calling the next
// one down (as nbdkit's filters call `next`). Positional arguments only: the host write path
// goes through every layer, so no per-request option objects or closures.
import type { Extent } from '../storage/backing.js';

export interface BlockTarget {
  readonly size: number;
  /** False where extents() can only ever report data (a block device): no sparse read is worth trying. */
  readonly sparse: boolean;
  read(buf: Buffer, pos: number): Promise<void>;
  write(buf: Buffer, pos: number, fua: boolean): Promise<void>;
  /** Make a range read as zeros (`mayPunch`: a hole is fine; `fastOnly`: fail with NotFastError rather than write zeros). */
  zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void>;
  trim(pos: number, len: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  cache(pos: number, len: number): Promise<void>;
  /** Allocation map of a prefix of [pos, pos+len) in at most `max` extents. */
  extents(pos: number, len: number, max: number): Extent[];
}
