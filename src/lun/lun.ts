// One LUN: its backing store under a stack of layers (stats → mirror, on a mirrored primary →
// backing) and a role object swapped whole on promote/demote. The NBD layer sees only this.
import { allowList } from '../net/cidr.js';
import type { Backing, Extent } from '../storage/backing.js';
import type { LunMeta } from '../persist/lun-meta.js';
import type { LunMirror } from '../mirror/primary/lun-mirror.js';
import type { SecondaryLun } from '../mirror/secondary/secondary-lun.js';
import { BackingLayer } from './backing-layer.js';
import { PrimaryRole, SecondaryRole, type LunRole, type MirrorMode, type Role } from './roles.js';
import { StatsLayer, type LunCounters } from './stats-layer.js';

export type { MirrorMode, Role } from './roles.js';
export type { LunCounters } from './stats-layer.js';

export interface LunSpec {
  name: string;
  path: string;
  /** The role it opens with; `Lun.role` is the role now. */
  role: Role;
  /** Likewise the mode it opens with; `Lun.mode` is the mode now. */
  mirror: MirrorMode;
  readOnly: boolean;
  description: string;
  /** Client networks (CIDRs) that may see and attach it; absent or empty: every client. */
  allowedNetworks?: readonly string[];
}

export class Lun {
  /** The top of the stack: hosts' requests enter here. */
  readonly stats: StatsLayer;
  private readonly base: BackingLayer;
  private current: LunRole;
  /** allowedNetworks as a predicate, built once here rather than per handshake (null: everyone). */
  private readonly allowed: ((address: string | undefined) => boolean) | null;

  /** `meta`: generation ids and role (lun-meta.ts), for every LUN of a mirrored site. */
  constructor(readonly spec: LunSpec, readonly backing: Backing, readonly meta: LunMeta | null = null) {
    this.allowed = allowList(spec.allowedNetworks ?? []);
    this.base = new BackingLayer(backing);
    this.current = spec.role === 'secondary' ? new SecondaryRole() : new PrimaryRole(spec.mirror);
    this.stats = new StatsLayer(spec.name, this.current.layer(this.base));
  }

  get name(): string { return this.spec.name; }
  get size(): number { return this.backing.size; }
  get role(): Role { return this.current.name; }
  get mode(): MirrorMode { return this.current.mode; }
  /** The sending half of the mirror (a primary with mode sync/async, once attached). */
  get mirror(): LunMirror | null { return this.current.mirror; }
  /** The receiving half (a secondary of a mirrored site). */
  get secondary(): SecondaryLun | null { return this.current.name === 'secondary' ? this.current.secondary : null; }
  /** What hosts may do: a secondary is exported read-only, as is an explicitly read-only LUN. */
  get readOnly(): boolean { return this.spec.readOnly || this.current.readOnly; }
  get description(): string { return this.spec.description; }
  get counters(): LunCounters { return this.stats.counters; }
  /** Whether extents() can report holes (not on a block device). */
  get sparse(): boolean { return this.stats.sparse; }

  /** Whether a host at `address` may see and attach this LUN. */
  allows(address: string | undefined): boolean { return this.allowed === null || this.allowed(address); }

  /** Take on `role` (its layer goes under the stats); returns the role it had. */
  become(role: LunRole): LunRole {
    const old = this.current;
    this.current = role;
    this.stats.stack(role.layer(this.base));
    return old;
  }

  read(buf: Buffer, pos: number): Promise<void> { return this.stats.read(buf, pos); }
  /** One host read served in pieces (readPiece) counts once, here. */
  countRead(len: number): void { this.stats.countRead(len); }
  readPiece(buf: Buffer, pos: number): Promise<void> { return this.stats.readPiece(buf, pos); }
  write(buf: Buffer, pos: number, fua: boolean): Promise<void> { return this.stats.write(buf, pos, fua); }
  flush(): Promise<void> { return this.stats.flush(); }
  /** TRIM. On a mirrored LUN it becomes a punch-hole zero, so both copies read the same (mirror-layer.ts). */
  trim(pos: number, len: number, fua: boolean): Promise<void> { return this.stats.trim(pos, len, fua); }
  zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    return this.stats.zero(pos, len, mayPunch, fastOnly, fua);
  }
  cache(pos: number, len: number): Promise<void> { return this.stats.cache(pos, len); }
  extents(pos: number, len: number, max: number): Extent[] { return this.stats.extents(pos, len, max); }

  async close(): Promise<void> {
    await this.backing.flush().catch(() => undefined);
    await this.backing.close();
    await this.secondary?.close().catch(() => undefined);
  }
}
