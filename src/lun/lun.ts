// One LUN: its backing store and the write path hosts see through NBD. Mirroring policy
// (sync / async / journal) wraps these operations without the NBD layer knowing.
import { allowList } from '../net/cidr.js';
import type { Backing, Extent } from '../storage/backing.js';
import type { AppliedPoint } from '../persist/applied-point.js';
import type { UndoLog } from '../persist/undo-log.js';
import type { LunMeta } from '../persist/lun-meta.js';
import type { LunMirror } from '../mirror/primary/lun-mirror.js';

export type Role = 'primary' | 'secondary';
export type MirrorMode = 'sync' | 'async' | 'none';

export interface LunSpec {
  name: string;
  path: string;
  role: Role;
  mirror: MirrorMode;
  readOnly: boolean;
  description: string;
  /** Client networks (CIDRs) that may see and attach it; absent or empty: every client. */
  allowedNetworks?: readonly string[];
}

export interface LunCounters {
  readOps: number; readBytes: number;
  writeOps: number; writeBytes: number;
  trimOps: number; zeroOps: number; flushOps: number;
  errors: number;
}

export interface ZeroOptions { mayPunch: boolean; fastOnly: boolean; fua: boolean }

export class Lun {
  readonly counters: LunCounters = {
    readOps: 0, readBytes: 0, writeOps: 0, writeBytes: 0, trimOps: 0, zeroOps: 0, flushOps: 0, errors: 0,
  };
  /** The sending half of the mirror (primary LUNs with mode sync/async). */
  mirror: LunMirror | null = null;
  /** Generation ids and role (lun-meta.ts); set by the site for every LUN of a mirrored site. */
  meta: LunMeta | null = null;
  /** Secondary: saves what resyncs overwrite so an interrupted one can be rolled back. */
  undo: UndoLog | null = null;
  /** Secondary: how far it has applied the primary's requests (survives restarts). */
  applied: AppliedPoint | null = null;
  /** Per-request latency hook (NBD command type, seconds), set by the metrics module. */
  latency: ((type: number, seconds: number) => void) | null = null;

  /** allowedNetworks as a predicate, built once here rather than per handshake (null: everyone). */
  private readonly allowed: ((address: string | undefined) => boolean) | null;

  constructor(readonly spec: LunSpec, readonly backing: Backing) {
    this.allowed = allowList(spec.allowedNetworks ?? []);
  }

  get name(): string { return this.spec.name; }
  get size(): number { return this.backing.size; }
  /** What hosts may do: a secondary is exported read-only, as is an explicitly read-only LUN. */
  get readOnly(): boolean { return this.spec.readOnly || this.spec.role === 'secondary'; }
  get description(): string { return this.spec.description; }
  /** Whether a host at `address` may see and attach this LUN. */
  allows(address: string | undefined): boolean { return this.allowed === null || this.allowed(address); }

  read(buf: Buffer, pos: number): Promise<void> {
    this.countRead(buf.length);
    return this.backing.read(buf, pos);
  }

  /** One host read of `len` bytes (a sparse read is served in pieces but counts once). */
  countRead(len: number): void {
    this.counters.readOps++;
    this.counters.readBytes += len;
  }

  async write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    this.counters.writeOps++;
    this.counters.writeBytes += buf.length;
    if (this.mirror) return this.mirror.write(buf, pos, fua);
    await this.backing.write(buf, pos);
    if (fua) await this.backing.flush();
  }

  async flush(): Promise<void> {
    this.counters.flushOps++;
    if (this.mirror) return this.mirror.flush();
    await this.backing.flush();
  }

  /** TRIM. On a mirrored LUN it becomes a punch-hole zero, so both copies read the same. */
  async trim(pos: number, len: number, fua: boolean): Promise<void> {
    this.counters.trimOps++;
    if (this.mirror) return this.mirror.zero(pos, len, true, false, fua);
    await this.backing.trim(pos, len);
    if (fua) await this.backing.flush();
  }

  async zero(pos: number, len: number, opts: ZeroOptions): Promise<void> {
    this.counters.zeroOps++;
    if (this.mirror) return this.mirror.zero(pos, len, opts.mayPunch, opts.fastOnly, opts.fua);
    await this.backing.zero(pos, len, opts.mayPunch, opts.fastOnly);
    if (opts.fua) await this.backing.flush();
  }

  cache(pos: number, len: number): Promise<void> {
    return this.backing.cache(pos, len);
  }

  extents(pos: number, len: number, max: number): Extent[] {
    return this.backing.extents(pos, len, max);
  }

  async close(): Promise<void> {
    await this.backing.flush().catch(() => undefined);
    await this.backing.close();
    await this.applied?.close().catch(() => undefined);
  }
}
