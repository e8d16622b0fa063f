// One secondary LUN's side of the mirror: who feeds it and in what order, how far it has applied
// the primary's requests (surviving restarts), the undo log that lets promote roll back an
// interrupted resync, adopting the primary's generation, and its status. It knows nothing of
// the NBD side (lun/): the site hands it the stores it works on.
import type { Logger } from '../../log.js';
import type { AppliedPoint } from '../../persist/applied-point.js';
import type { LunMeta } from '../../persist/lun-meta.js';
import type { UndoLog } from '../../persist/undo-log.js';
import type { Backing } from '../../storage/backing.js';
import { hashRange } from '../../storage/hash.js';
import { decodeGeneration, MIRROR_FLAG, MIRROR_OP, type MirrorRequestHeader } from '../wire.js';
import { ApplyOrder } from './apply-order.js';

const EINVAL = 22;

export type SecondaryState = 'secondary-uptodate' | 'secondary-waiting' | 'secondary-syncing' | 'secondary-inconsistent' | 'split-brain';

export interface Pairing { sync: 'incremental' | 'full'; reason: string }

export interface SecondaryStatus {
  state: SecondaryState;
  reason?: string;
  peer: string | null;
  appliedSeq: number;
  applied: { ops: number; bytes: number; flushes: number; errors: number };
  pairing: Pairing | null;
  undoRegions: number;
}

/** What promote found when it took this copy over (see leave). */
export interface Takeover {
  neverSynced: boolean;
  /** Regions an interrupted resync had overwritten, rolled back; null: nothing to roll back. */
  rolledBack: number | null;
}

export class SecondaryLun {
  readonly order = new ApplyOrder();
  /** The site whose primary feeds it, while one of its connections has it paired. */
  feeder: string | null = null;
  connections = 0;
  readonly applied = { ops: 0, bytes: 0, flushes: 0, errors: 0 };
  /** How the last pairing catches up, and why. */
  pairing: Pairing | null = null;
  /**
   * Restored after a reboot that may have lost answered requests above this point (it was not
   * flushed beyond it): pairings answer it, not the skip-ahead, until the primary sends again.
   */
  lostAbove: number | null = null;
  /** The write that makes this copy inconsistent is persisting that fact (see beforeOverwrite). */
  private losingConsistency: Promise<void> | null = null;

  constructor(
    readonly name: string,
    private readonly backing: Backing,
    readonly meta: LunMeta,
    private readonly undo: UndoLog | null,
    private readonly point: AppliedPoint | null,
    private readonly log: Logger,
  ) {
    // A restarted secondary knows which run it followed and how far: it never applies that again.
    if (point?.instance) this.order.restore(point.instance, point.prefix);
    if (point?.instance && point.lostAbove) {
      this.lostAbove = point.prefix;
      log.warn('restarted after a reboot: requests answered after the last flush may be lost; the primary resends them', {
        lun: name, durableUpTo: point.prefix,
      });
    }
  }

  get size(): number { return this.backing.size; }
  get undoRegions(): number { return this.undo?.saved ?? 0; }

  // ---- pairing and connections ------------------------------------------------------------------

  /** Paired with `site`'s primary run `instance`, resuming at `nextSeq`: the applied point to answer. */
  paired(site: string, instance: Buffer, nextSeq: number, pairing: Pairing): number {
    this.feeder = site;
    // The run we followed before a reboot that lost answered requests: say how far we really got.
    const lost = this.lostAbove !== null && this.order.instance?.equals(instance) ? this.lostAbove : null;
    this.order.resume(instance, nextSeq);
    // (Not while the loss is untold: a restart must still see the point of the reboot.)
    if (lost === null) this.point?.record(this.order.instance!, this.order.appliedPrefix);
    this.pairing = pairing;
    return Math.max(0, lost ?? this.order.appliedPrefix);
  }

  connectionOpened(): void {
    this.connections++;
  }

  /** A connection that paired it closed: the last one takes the feeder with it. */
  connectionClosed(): void {
    this.connections--;
    if (this.connections === 0) this.feeder = null;
  }

  /** A pairing whose connection went away before it was answered feeds nothing. */
  pairingAbandoned(): void {
    if (this.connections === 0) this.feeder = null;
  }

  /** The primary sends again: it has had our answer with the lost point. */
  primarySends(): void {
    this.lostAbove = null;
  }

  // ---- applying -----------------------------------------------------------------------------------

  /**
   * Record the applied point up to a request's dep before it lands (applied-point.ts): after a
   * restart nothing at or below it is applied again.
   */
  recordBefore(dep: number): void {
    const point = this.point;
    if (point && dep > point.prefix) point.record(this.order.instance!, this.order.appliedPrefix);
  }

  /** Apply one ordered WRITE / WRITE_ZEROES / TRIM (TRIM as a zero: both copies read the same). */
  async write(h: MirrorRequestHeader, payload: Buffer | null): Promise<void> {
    // The common case (consistent, live write) costs no await.
    if ((h.flags & MIRROR_FLAG.RESYNC) || !this.meta.data.consistent || this.losingConsistency) await this.beforeOverwrite(h);
    if (h.type === MIRROR_OP.WRITE) await this.backing.write(payload!, h.offset);
    else await this.backing.zero(h.offset, h.length, (h.flags & MIRROR_FLAG.MAY_PUNCH) !== 0, false);
    if (h.flags & MIRROR_FLAG.FUA) await this.backing.flush();
  }

  /** FLUSH: everything applied so far is in the page cache; the flush makes it (and the point) stable. */
  async flush(): Promise<void> {
    const instance = this.order.instance;
    const prefix = this.order.appliedPrefix;
    await this.backing.flush();
    if (instance) await this.point?.flushed(instance, prefix);
    this.applied.flushes++;
  }

  hash(offset: number, length: number): Promise<Buffer> {
    return hashRange(this.backing, offset, length);
  }

  /**
   * A resync write makes this copy inconsistent (persisted before it lands); while inconsistent,
   * each region is saved in the undo log before its first overwrite, so promote can roll back.
   */
  async beforeOverwrite(h: { flags: number; offset: number; length: number }): Promise<void> {
    const meta = this.meta;
    if ((h.flags & MIRROR_FLAG.RESYNC) && meta.data.consistent) {
      this.losingConsistency ??= meta.update({ consistent: false }).then(() => {
        this.log.info('secondary is inconsistent until the resync completes; its last consistent state is kept in the undo log', { lun: this.name });
      }).finally(() => { this.losingConsistency = null; });
    }
    if (this.losingConsistency) await this.losingConsistency;
    // A never-synced copy has no consistent state to keep: no undo log there (nothing to roll back to).
    const undo = this.undo;
    if (!meta.data.consistent && undo && !meta.neverSynced && !undo.covers(h.offset, h.length)) await undo.protect(this.backing, h.offset, h.length);
  }

  /** SET_GEN: the primary caught up; this copy is consistent again and takes its generation. An errno. */
  async adopt(payload: Buffer | null): Promise<number> {
    const g = payload && decodeGeneration(payload);
    if (!g) return EINVAL;
    await this.backing.flush();
    await this.meta.adopt(g.current, g.history);
    await this.undo?.discard();
    this.log.info('secondary caught up with the primary', { lun: this.name, generation: g.current });
    return 0;
  }

  // ---- promote, status, close -------------------------------------------------------------------

  /**
   * Promote takes this copy over: an interrupted resync is rolled back to the last consistent
   * state (a never-synced copy has none: it is marked as promoted so), and what only a secondary
   * needs (saved regions, the applied point) is dropped.
   */
  async leave(): Promise<Takeover> {
    const meta = this.meta;
    const out: Takeover = { neverSynced: meta.neverSynced, rolledBack: null };
    if (meta.neverSynced) {
      // Nothing to roll back to: an undo log of a never-synced copy holds no state of the primary either.
      await meta.update({ consistent: true, promotedNeverSynced: Date.now() });
    } else if (!meta.data.consistent) {
      out.rolledBack = this.undo ? await this.undo.rollback(this.backing) : 0;
      await meta.update({ consistent: true });
    }
    await this.undo?.discard();
    this.point?.clear();
    return out;
  }

  status(): SecondaryStatus {
    const lm = this.meta;
    const state: SecondaryState = lm.data.splitBrain ? 'split-brain'
      : !lm.consistent ? (this.feeder ? 'secondary-syncing' : 'secondary-inconsistent')
      : this.feeder ? 'secondary-uptodate' : 'secondary-waiting';
    const reason = lm.neverSynced ? 'never synced: no initial sync has completed, so this copy is no state of the primary'
      : !lm.consistent ? 'an interrupted resync: promote rolls back to the last consistent state' : undefined;
    return {
      state, ...(reason ? { reason } : {}), peer: this.feeder, appliedSeq: this.order.appliedPrefix, applied: this.applied,
      pairing: this.pairing, undoRegions: this.undoRegions,
    };
  }

  async close(): Promise<void> {
    await this.undo?.close().catch(() => undefined);
    await this.point?.close().catch(() => undefined);
  }
}
