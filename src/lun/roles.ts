// A LUN's role as one object, swapped whole on promote/demote (Lun.become): what it exports
// (read-write or read-only), which layer it puts over the backing, and what it owns.
import type { LunMirror } from '../mirror/primary/lun-mirror.js';
import type { SecondaryLun } from '../mirror/secondary/secondary-lun.js';
import type { BlockTarget } from './block-target.js';
import { MirrorLayer } from './mirror-layer.js';

export type Role = 'primary' | 'secondary';
export type MirrorMode = 'sync' | 'async' | 'none';

/** Takes host writes; with a mirror (mode sync/async, once attached) they go through it. */
export class PrimaryRole {
  readonly name = 'primary' as const;
  readonly readOnly = false;

  constructor(readonly mode: MirrorMode, readonly mirror: LunMirror | null = null) {}

  layer(base: BlockTarget): BlockTarget {
    return this.mirror ? new MirrorLayer(this.mirror, base) : base;
  }
}

/** Fed by the peer's primary (its SecondaryLun; null on a site without a mirror); hosts only read. */
export class SecondaryRole {
  readonly name = 'secondary' as const;
  readonly mode = 'none' as const;
  readonly readOnly = true;
  readonly mirror = null;

  constructor(readonly secondary: SecondaryLun | null = null) {}

  layer(base: BlockTarget): BlockTarget {
    return base;
  }
}

export type LunRole = PrimaryRole | SecondaryRole;
