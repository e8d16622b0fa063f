// The bottom layer: the backing store, with FUA as a flush after the operation (the store itself
// has no FUA) and TRIM as its advisory discard.
import type { Backing, Extent } from '../storage/backing.js';
import type { BlockTarget } from './block-target.js';

export class BackingLayer implements BlockTarget {
  readonly sparse: boolean;

  constructor(private readonly backing: Backing) {
    this.sparse = !backing.isBlockDevice;
  }

  get size(): number { return this.backing.size; }

  read(buf: Buffer, pos: number): Promise<void> {
    return this.backing.read(buf, pos);
  }

  async write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    await this.backing.write(buf, pos);
    if (fua) await this.backing.flush();
  }

  async zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    await this.backing.zero(pos, len, mayPunch, fastOnly);
    if (fua) await this.backing.flush();
  }

  async trim(pos: number, len: number, fua: boolean): Promise<void> {
    await this.backing.trim(pos, len);
    if (fua) await this.backing.flush();
  }

  flush(): Promise<void> {
    return this.backing.flush();
  }

  cache(pos: number, len: number): Promise<void> {
    return this.backing.cache(pos, len);
  }

  extents(pos: number, len: number, max: number): Extent[] {
    return this.backing.extents(pos, len, max);
  }
}
