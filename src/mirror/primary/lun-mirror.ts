// The sending half of one primary LUN's mirror: sequence numbers and dependencies, the path a
// write takes (live to the peer, into the journal, or only into the dirty bitmap), the async
// window, flush barriers, outage handling, and the replay and resync workers.
//
// Ordering (docs/mirror-protocol.md): each change gets the next per-LUN sequence number and a
// `dep` = the highest sequence whose local write had completed when it was issued; the overlap
// gate starts an overlapping write only after the earlier one completed locally. The secondary
// applies a request once everything up to its `dep` is applied.
//
// Sequence numbers stay dense from the acked prefix on: when the link fails, every request above
// the prefix (answered or not) is journaled, so a replay re-sends each number the secondary might
// still wait for. Writes while the journal has overflowed take no number (the bitmap covers them).
//
// Durability (docs/journal-format.md): the region bitmap is written before any mirrored change
// lands locally, and cleared once the peer has everything for the region; so a crash of this
// process at any moment leaves every possibly-unmirrored region marked.
import { setImmediate as yieldTurn } from 'node:timers/promises';
import type { Logger } from '../../log.js';
import type { RegionBitmap } from '../../persist/bitmap.js';
import { RegionSet } from '../../persist/region-set.js';
import { JOURNAL_KIND, type Journal, type JournalEntry } from '../../persist/journal.js';
import { ENOTCONN, type MirrorOp } from '../peer-connection.js';
import type { MirrorPool } from '../pool.js';
import {
  encodeGeneration, ESTALE, MIRROR_FLAG, MIRROR_OP, OFFER_FLAG, PAIR, PAIR_REASON, SYNC, type LunAnswer, type LunOffer,
} from '../wire.js';
import type { Backing } from '../../storage/backing.js';
import { hashRange } from '../../storage/hash.js';
import { CompareWalk, CompareWatch, TurnBudget, type CompareItem } from './catch-up-walk.js';
import { FlushedClears } from './flushed-clears.js';
import type { LunMeta } from '../../persist/lun-meta.js';
import { OverlapGate } from './overlap-gate.js';
import { protectionOf, protectionReason } from './protection.js';
import type { RateLimiter } from './rate-limit.js';

export type MirrorState = 'connecting' | 'uptodate' | 'journaling' | 'replaying' | 'syncing' | 'resyncing' | 'unpaired' | 'split-brain';
/** Where new writes go: to the peer, into the journal, or only into the bitmap (journal overflowed). */
export type WritePath = 'live' | 'journal' | 'bitmap';

export interface MirrorStore {
  journal: Journal;
  bitmap: RegionBitmap;
  maxJournalBytes: number;
}

const REPLAY_WINDOW_BYTES = 8 * 1024 * 1024;
const REPLAY_BATCH_BYTES = 2 * 1024 * 1024;
const CLEAR_DELAY_MS = 2000;
const RESYNC_WINDOW_BYTES = 16 * 1024 * 1024;
/** Comparisons (HASH requests) in flight during an initial sync. */
const COMPARE_PARALLEL = 16;
/**
 * Largest range compared as one: a range that is a hole here, or one still all to compare whose
 * bytes fit a sixteenth of a second of the background rate (its bytes are taken from the rate
 * at once, so progress stays smooth); where the two copies differ, its regions are compared next.
 */
const COMPARE_COARSE_BYTES = 64 * 1024 * 1024;
/** Regions marked per event-loop turn when a full sync starts (a 1 TiB LUN has 16.7 M). */
const MARK_SLICE_REGIONS = 1 << 20;

class PendingOp implements MirrorOp {
  reqId = 0;
  journaled: Promise<void> | null = null;
  /** HASH: the peer's digest. */
  reply: Buffer | null = null;
  errno = 0;
  private resolveSettled!: () => void;
  /** Resolves when the peer has it, or it is safely in the journal/bitmap instead. */
  readonly settled = new Promise<void>((r) => { this.resolveSettled = r; });
  constructor(
    readonly owner: LunMirror,
    readonly type: number, readonly flags: number, readonly lunId: number,
    readonly seq: number, readonly dep: number, readonly offset: number, readonly length: number,
    readonly payload: Buffer | null,
    /** 'live' (new write), 'replay' (from the journal), 'resync' (region copy), 'flush', 'control' (HASH, SET_GEN). */
    readonly origin: 'live' | 'replay' | 'resync' | 'flush' | 'control',
    readonly region = -1,
  ) {}

  done(errno: number, data?: Buffer): void {
    this.errno = errno;
    this.reply = data ?? null;
    this.owner.completed(this, errno);
  }

  settle(): void {
    this.resolveSettled();
  }
}

export class LunMirror {
  state: MirrorState = 'connecting';
  reason = 'waiting for the peer';
  path: WritePath = 'journal';
  readonly stats = { ops: 0, bytes: 0, failures: 0, replayed: 0, replayedBytes: 0, resynced: 0, resyncedBytes: 0 };
  readonly progress = { replayTotal: 0, replayDone: 0, resyncTotal: 0, resyncDone: 0, syncTotal: 0, syncDone: 0, startedMs: 0 };
  /** Initial sync / full compare: regions compared, found equal (not sent), and their bytes. */
  readonly sync = { compared: 0, equal: 0, equalBytes: 0 };
  /** Regions to compare with the peer's copy (by hash) before deciding to send them. */
  readonly compareNeeded: RegionSet;
  /** Ranges being compared; a write into one meanwhile voids its verdict. */
  private readonly watching = new CompareWatch();
  /** The peer's generation from its last answer. */
  private peerCurrent = '';
  private offlineRotated = false;
  private rotation: Promise<void> | null = null;
  readonly gate = new OverlapGate();
  /** Identifies this run of the primary to the secondary. */
  readonly instance = Buffer.from(Array.from({ length: 8 }, () => Math.floor(Math.random() * 256)));
  private lunId = -1;
  private nextSeq = 1;
  private doneHigh = 0;
  /** Every request up to here was answered; `answered` holds answered ones beyond it. */
  private ackedPrefix = 0;
  private readonly answered = new Set<number>();
  /** Live/resync requests above the acked prefix, kept (with payload) until the prefix passes them. */
  private readonly tracked = new Map<number, PendingOp>();
  /** Live requests in flight per region (their bits must stay set). */
  private readonly pending = new Map<number, number>();
  /** Regions that became clearable, and when (cleared after CLEAR_DELAY_MS of quiet). */
  private readonly clearCandidates = new Map<number, number>();
  /** Clean regions waiting for a peer FLUSH before their bits go: quiet ones, and ones the compare found equal. */
  private readonly clears: FlushedClears;
  private readonly compareClears: FlushedClears;
  /** Regions whose copy on the peer is stale and must be resent from local data. */
  readonly resyncNeeded: RegionSet;
  private flushWaiters: { target: number; resolve: () => void }[] = [];
  private windowWaiters: (() => void)[] = [];
  private appendsInFlight = 0;
  private appendsIdle: (() => void)[] = [];
  private linkUp = false;
  private worker: Promise<void> | null = null;
  private kickAgain = false;
  inflightBytes = 0;
  /**
   * After a restart with a recovered journal: the peer may already have applied some of those
   * records (and writes the old run sent beyond them), so replaying them is a resync, not an
   * in-order catch-up — the peer is inconsistent (undo log) until SET_GEN.
   */
  private replayAsResync = false;
  /** A RESYNC-flagged change was sent: the peer is inconsistent until it gets SET_GEN. */
  private genNeeded = false;
  /** Replay sessions in a row that sent records and saw none answered. */
  private replayStalls = 0;
  /** Times the journal was dropped (overflow), and that count when the last offer was made. */
  private drops = 0;
  private offeredDrops = 0;
  /** Start a new session without an outage (the sender sets it; tests may too). */
  renegotiate: (reason: string) => void = (reason) => this.pool.disconnect(`renegotiating: ${reason}`);

  constructor(
    readonly lun: string,
    readonly mode: 'sync' | 'async',
    private readonly backing: Backing,
    private readonly pool: MirrorPool,
    private readonly store: MirrorStore,
    private readonly windowBytes: number,
    private readonly log: Logger,
    readonly meta: LunMeta,
    private readonly rate: RateLimiter,
  ) {
    this.compareNeeded = new RegionSet(store.bitmap.regions);
    this.resyncNeeded = new RegionSet(store.bitmap.regions);
    this.clears = new FlushedClears(store.bitmap.regions);
    this.compareClears = new FlushedClears(store.bitmap.regions);
  }

  get name(): string { return this.lun; }
  get size(): number { return this.backing.size; }

  /** After recovery: continue numbering after the journal and resync every marked region. */
  recover(): void {
    const { journal, bitmap } = this.store;
    this.nextSeq = journal.maxSeq + 1;
    this.ackedPrefix = journal.records ? journal.minSeq - 1 : journal.maxSeq;
    this.doneHigh = journal.maxSeq;
    this.replayAsResync = journal.records > 0;
    // An initial sync under way when we stopped: its regions are still to be compared, not sent blindly.
    bitmap.addSetTo(this.meta.data.syncCompare ? this.compareNeeded : this.resyncNeeded);
    if (journal.records || this.resyncNeeded.size) {
      this.transition('journaling', `recovered ${journal.records} journal records and ${this.resyncNeeded.size} dirty regions`);
    }
  }

  /** Journal size and the age of its oldest record (the recovery point while the peer is away). */
  journalStatus() {
    const j = this.store.journal;
    const oldest = j.oldestTimeMs;
    return { records: j.records, bytes: j.bytes, oldestAgeMs: oldest === null ? null : Date.now() - oldest };
  }

  get dirtyRegions(): number {
    return this.store.bitmap.count;
  }

  get active(): boolean {
    return this.path === 'live';
  }

  get inflight(): number {
    return this.nextSeq - 1 - this.ackedPrefix;
  }

  offer(id: number, size: number): LunOffer {
    this.lunId = id;
    this.offeredDrops = this.drops;
    const j = this.store.journal;
    const d = this.meta.data;
    return {
      // Resume after what the peer answered: records at or below it may be in the journal still
      // (the hand-over to live mirroring drops them only after a peer flush), but never again.
      id, name: this.lun, size, instance: this.instance, nextSeq: j.records ? Math.max(j.minSeq, this.ackedPrefix + 1) : this.nextSeq,
      lineage: { current: d.current, history: d.history, peerBase: d.peerBase }, flags: d.discardPeer ? OFFER_FLAG.FORCE : 0,
    };
  }

  // ---- link events ---------------------------------------------------------------------------

  /** The pool is up and the peer answered our offer for this LUN. */
  paired(answer: LunAnswer | undefined): void {
    if (!answer || answer.status !== PAIR.OK) {
      const why = answer ? PAIR_REASON[answer.status] ?? `refused (${answer.status})` : 'the peer did not answer for this LUN';
      this.linkUp = false;
      if (this.path !== 'bitmap') void this.overflow('not paired');
      if (answer?.status === PAIR.SPLIT_BRAIN) {
        if (!this.meta.data.splitBrain) {
          this.log.error('split brain: both sites wrote this LUN as primary while apart; it stays disconnected until resolved', {
            lun: this.lun, current: this.meta.current, peerCurrent: answer.current,
          });
          this.meta.update({ splitBrain: { detectedMs: Date.now(), peerCurrent: answer.current } }).catch((err: Error) => this.metaFailed(err));
        }
        this.transition('split-brain', why);
        return;
      }
      this.transition('unpaired', why);
      return;
    }
    if (this.offeredDrops !== this.drops) {
      // The journal was dropped after our offer was made: the peer would wait for its records.
      this.renegotiate(`LUN ${this.lun}: the journal was dropped during the pairing`);
      return;
    }
    this.peerCurrent = answer.current;
    this.linkUp = true;
    if (answer.applied < this.ackedPrefix) this.peerLostWrites(answer.applied);
    this.resumeAfter(answer.applied);
    if (this.meta.data.splitBrain) {
      this.log.warn('split brain resolved: the peer accepted this LUN again', { lun: this.lun });
      this.meta.update({ splitBrain: null }).catch((err: Error) => this.metaFailed(err));
    }
    if (answer.sync === SYNC.FULL) this.startFullSync(answer.copy).then(() => this.kick(), (err: Error) => this.metaFailed(err));
    else this.kick();
  }

  /**
   * The peer says it has applied every request of this run up to `applied` (it records that
   * point durably): requests it answered before a cut whose replies we lost count as answered.
   */
  private resumeAfter(applied: number): void {
    if (!(applied > this.ackedPrefix && applied < this.nextSeq)) return;
    for (let s = this.ackedPrefix + 1; s <= applied; s++) {
      this.tracked.delete(s);
      this.answered.delete(s);
    }
    this.ackedPrefix = applied;
    while (this.answered.delete(this.ackedPrefix + 1)) this.tracked.delete(++this.ackedPrefix);
  }

  /**
   * The peer answered less than it had acknowledged: it rebooted and lost what it had not flushed
   * (requests after `applied`). Those are behind bits still set (a bit goes only after a peer
   * FLUSH, flushed-clears.ts): every marked region is resent as a resync, the peer inconsistent until done.
   */
  private peerLostWrites(applied: number): void {
    this.log.warn('the peer lost writes it had acknowledged (a reboot before its flush): every marked region is resynced', {
      lun: this.lun, peerApplied: applied, acknowledged: this.ackedPrefix, regions: this.store.bitmap.count,
    });
    this.clears.forget();
    this.compareClears.forget();
    this.store.bitmap.addSetTo(this.meta.data.syncCompare ? this.compareNeeded : this.resyncNeeded);
    this.replayAsResync = true;
    this.genNeeded = true;
  }

  /** Start the catch-up worker, or have the running one start over when it ends. */
  private kick(): void {
    if (this.worker) {
      this.kickAgain = true;
      return;
    }
    this.worker = this.catchUp().finally(() => {
      this.worker = null;
      if (this.kickAgain && this.linkUp) {
        this.kickAgain = false;
        this.kick();
      }
    });
  }

  /** The pool went down: everything not yet answered goes to the journal. */
  linkDown(reason: string): void {
    this.linkUp = false;
    this.enterOutage(`link down: ${reason}`);
  }

  private metaFailed(err: Error): void {
    this.log.error('saving LUN metadata failed; pairing stops until it can be saved', { lun: this.lun, error: err.message });
    this.pool.disconnect(`LUN ${this.lun}: metadata not saved`);
  }

  /**
   * Every region is to be compared with the peer's copy `peerCopy` (persisted, so a restart
   * resumes it). The progress of an interrupted compare holds only for that same copy: another
   * one (a replaced secondary, a fresh dataDir) is compared whole again.
   */
  private async startFullSync(peerCopy: string): Promise<void> {
    const d = this.meta.data;
    if (!d.syncCompare || d.syncPeerCopy !== peerCopy) {
      if (d.syncCompare) {
        this.log.warn('full sync: the peer\'s copy is not the one the interrupted compare ran against: it starts over', { lun: this.lun });
      }
      this.log.info('full sync: every region is compared with the peer\'s copy and sent only where it differs', { lun: this.lun });
      // Regions waiting to be marked clean were clean on another copy (or before this sync): not on this one.
      this.clears.forget();
      this.compareClears.forget();
      const bitmap = this.store.bitmap;
      for (let r = 0; r < bitmap.regions; r += MARK_SLICE_REGIONS) {
        await bitmap.markRegions(r, Math.min(MARK_SLICE_REGIONS, bitmap.regions - r));
        await yieldTurn();
      }
      await bitmap.sync();
      await this.meta.update({ syncCompare: true, syncPeerCopy: peerCopy });
    }
    this.store.bitmap.addSetTo(this.compareNeeded, this.resyncNeeded);
    // Resuming on the same copy: regions this compare found equal whose bits wait for a peer FLUSH
    // are done (unless the peer lost them: peerLostWrites forgets them).
    this.compareClears.subtractFrom(this.compareNeeded);
  }

  /**
   * The first change the peer does not have since it was last reachable starts a new generation:
   * if the peer is promoted meanwhile, the two histories then differ and the next pairing
   * reports a split brain instead of one side's writes silently winning.
   */
  private offline(): Promise<void> | void {
    if (this.path === 'live' || this.offlineRotated) return;
    this.rotation ??= this.meta.rotate().then(() => {
      this.offlineRotated = true;
      this.log.info('new generation: this LUN takes writes its peer does not have', { lun: this.lun, generation: this.meta.current });
    }).finally(() => { this.rotation = null; });
    return this.rotation;
  }

  private noteTouched(pos: number, len: number): void {
    const [first, last] = this.store.bitmap.regionsOf(pos, len);
    this.watching.touch(first, last);
  }

  // ---- the host's write path ----------------------------------------------------------------

  async write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    if (this.path === 'live') await this.admit(buf.length);
    else await this.offline();
    const token = await this.gate.enter(pos, buf.length);
    if (this.watching.size) this.noteTouched(pos, buf.length);
    let seq = 0;
    let settled: Promise<void> | null = null;
    try {
      const marked = this.store.bitmap.mark(pos, buf.length);
      if (marked) await marked;
      const flags = fua ? MIRROR_FLAG.FUA : 0;
      seq = this.path === 'bitmap' ? 0 : this.nextSeq++;
      settled = this.dispatch(MIRROR_OP.WRITE, flags, pos, buf.length, buf, seq);
      await this.backing.write(buf, pos);
      if (fua) await this.backing.flush();
    } catch (err) {
      if (seq) this.log.error('local write failed after it was mirrored; the copies may differ in that range', {
        lun: this.lun, seq, offset: pos, length: buf.length, error: (err as Error).message,
      });
      if (seq) this.needResync(pos, buf.length);
      throw err;
    } finally {
      if (seq > this.doneHigh) this.doneHigh = seq;
      this.gate.leave(token);
    }
    if (settled) await settled;
  }

  /** Zero or punch a range. Local first (FAST_ZERO may fail): only what happened is mirrored. */
  async zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    await this.offline();
    const token = await this.gate.enter(pos, len);
    if (this.watching.size) this.noteTouched(pos, len);
    let settled: Promise<void> | null = null;
    let seq = 0;
    try {
      const marked = this.store.bitmap.mark(pos, len);
      if (marked) await marked;
      await this.backing.zero(pos, len, mayPunch, fastOnly);
      if (fua) await this.backing.flush();
      seq = this.path === 'bitmap' ? 0 : this.nextSeq++;
      const flags = (mayPunch ? MIRROR_FLAG.MAY_PUNCH : 0) | (fua ? MIRROR_FLAG.FUA : 0);
      settled = this.dispatch(MIRROR_OP.WRITE_ZEROES, flags, pos, len, null, seq);
    } finally {
      if (seq > this.doneHigh) this.doneHigh = seq;
      this.gate.leave(token);
    }
    if (settled) await settled;
  }

  /** FLUSH: local data, journal and bitmap durable; with the peer reachable, the peer's too. */
  async flush(): Promise<void> {
    const local = Promise.all([this.backing.flush(), this.store.journal.sync(), this.store.bitmap.sync()]);
    if (this.path !== 'live') return void (await local);
    const [, errno] = await Promise.all([local, this.peerFlush()]);
    if (errno !== 0) {
      // The link failed under the flush: the writes it covers went to the journal meanwhile.
      await this.appendsSettled();
      await Promise.all([this.store.journal.sync(), this.store.bitmap.sync()]);
    }
  }

  private async appendsSettled(): Promise<void> {
    while (this.appendsInFlight > 0) await new Promise<void>((r) => this.appendsIdle.push(r));
  }

  /**
   * Send the change to the peer, or record it for later. Returns what the host's reply must wait
   * for: the peer (sync), the journal append (always: a crash must not forget an answered write),
   * or nothing (async live, bitmap).
   */
  private dispatch(type: number, flags: number, offset: number, length: number, payload: Buffer | null, seq: number): Promise<void> | null {
    if (this.path === 'bitmap') {
      this.needResync(offset, length);
      return null;
    }
    if (this.path === 'journal') return this.append(type, flags, seq, this.doneHigh, offset, length, payload);
    const op = new PendingOp(this, type, flags, this.lunId, seq, this.doneHigh, offset, length, payload, 'live');
    this.track(op);
    this.pool.send(op);
    return this.mode === 'sync' ? op.settled : null;
  }

  private track(op: PendingOp): void {
    this.tracked.set(op.seq, op);
    this.inflightBytes += op.length;
    this.stats.ops++;
    this.stats.bytes += op.length;
    const [first, last] = this.store.bitmap.regionsOf(op.offset, op.length);
    for (let r = first; r <= last; r++) {
      this.pending.set(r, (this.pending.get(r) ?? 0) + 1);
      this.clearCandidates.delete(r);
    }
  }

  /** Async back-pressure: wait until the window has room for `bytes` more. */
  private admit(bytes: number): Promise<void> | void {
    if (this.mode !== 'async' || this.inflightBytes === 0 || this.inflightBytes + bytes <= this.windowBytes) return;
    return new Promise((resolve) => this.windowWaiters.push(resolve));
  }

  // ---- answers ------------------------------------------------------------------------------

  completed(op: PendingOp, errno: number): void {
    if (op.origin === 'flush' || op.origin === 'control') return op.settle();
    if (errno !== 0) {
      this.stats.failures++;
      // ESTALE: the peer removed the LUN and asked us to offer again: journal it, nothing failed.
      if (errno !== ENOTCONN && errno !== ESTALE) {
        // A peer that fails a request: end the session, so nothing waits behind it on the peer.
        this.log.warn('the peer failed a mirror request', { lun: this.lun, seq: op.seq, errno });
        this.pool.disconnect(`peer failed a request of LUN ${this.lun} (errno ${errno})`);
      }
      this.enterOutage(errno === ENOTCONN ? `link failure: ${this.pool.downReason || 'connection lost'}` : `peer error ${errno}`);
    } else {
      this.answered.add(op.seq);
      while (this.answered.delete(this.ackedPrefix + 1)) {
        this.ackedPrefix++;
        this.tracked.delete(this.ackedPrefix);
      }
      if (op.origin === 'replay') {
        this.stats.replayed++;
        this.stats.replayedBytes += op.length;
        this.progress.replayDone++;
      } else if (op.origin === 'resync') {
        this.stats.resynced++;
        this.stats.resyncedBytes += op.length;
        this.progress.resyncDone++;
        this.resyncNeeded.delete(op.region);
      }
      this.releaseFlushWaiters();
    }
    if (op.origin !== 'replay') {
      const [first, last] = this.store.bitmap.regionsOf(op.offset, op.length);
      for (let r = first; r <= last; r++) {
        const n = (this.pending.get(r) ?? 1) - 1;
        if (n > 0) this.pending.set(r, n);
        else {
          this.pending.delete(r);
          this.maybeClear(r);
        }
      }
    }
    if (op.journaled) void op.journaled.then(() => this.release(op));
    else if (errno === 0 || op.origin === 'replay') this.release(op);
  }

  private release(op: PendingOp): void {
    if (op.origin !== 'replay') this.inflightBytes -= op.length;
    else this.replayBytes -= op.length;
    op.settle();
    while (this.windowWaiters.length && this.inflightBytes < this.windowBytes) this.windowWaiters.shift()!();
    this.wakeWorker();
  }

  private releaseFlushWaiters(): void {
    if (this.flushWaiters.length === 0) return;
    const ready = this.flushWaiters.filter((w) => w.target <= this.ackedPrefix);
    this.flushWaiters = this.flushWaiters.filter((w) => w.target > this.ackedPrefix);
    for (const w of ready) w.resolve();
  }

  /**
   * A bit may go once nothing is in flight there, nothing is stale there, and the journal is empty;
   * it goes only after the region stayed quiet for CLEAR_DELAY_MS (see persistClears).
   */
  private maybeClear(r: number): void {
    if (this.clearable(r)) this.clearCandidates.set(r, Date.now());
  }

  private clearable(r: number): boolean {
    return !this.pending.has(r) && !this.resyncNeeded.has(r) && !this.compareNeeded.has(r) && this.store.journal.records === 0
      && this.appendsInFlight === 0;
  }

  /**
   * maybeClear() every set region not still to compare or resend, walking the bits: a full sync
   * of a large LUN has millions set, all of them in compareNeeded.
   */
  private clearQuiet(): void {
    const bitmap = this.store.bitmap;
    const skip = (r: number, set: RegionSet) => (set.has(r) ? set.nextAbsent(r) : r);
    for (let r = bitmap.nextSet(0); r >= 0;) {
      const next = skip(skip(r, this.compareNeeded), this.resyncNeeded);
      if (next < 0) return;
      if (next !== r) {
        r = bitmap.nextSet(next);
        continue;
      }
      this.maybeClear(r);
      r = bitmap.nextSet(r + 1);
    }
  }

  /** clearable() for every region of [first, first+n), without a lookup per region where it can. */
  private clearableRange(first: number, n: number): boolean {
    if (this.store.journal.records !== 0 || this.appendsInFlight !== 0) return false;
    if (this.resyncNeeded.countRange(first, n) !== 0 || this.compareNeeded.countRange(first, n) !== 0) return false;
    if (this.pending.size < n) {
      for (const r of this.pending.keys()) if (r >= first && r < first + n) return false;
      return true;
    }
    for (let r = first; r < first + n; r++) if (this.pending.has(r)) return false;
    return true;
  }

  private needResync(offset: number, length: number): void {
    const [first, last] = this.store.bitmap.regionsOf(offset, length);
    for (let r = first; r <= last; r++) this.resyncNeeded.add(r);
  }

  // ---- outages: journal and bitmap -------------------------------------------------------------

  /** The link failed: journal every tracked request in sequence order; new writes follow them. */
  private enterOutage(reason: string): void {
    if (this.path !== 'live') {
      // Before the first pairing the LUN stays 'connecting' (its writes are journaled all the same).
      if (this.state !== 'journaling' && this.state !== 'unpaired' && this.state !== 'connecting') this.transition('journaling', reason);
      return;
    }
    this.path = 'journal';
    this.transition('journaling', reason);
    const ops = [...this.tracked.values()].sort((a, b) => a.seq - b.seq);
    this.tracked.clear();
    // Writes the peer never answered are changes it may lack: a new generation, as for new ones.
    const rotated = ops.length ? this.offline() : undefined;
    for (const op of ops) {
      const appended = this.append(op.type, op.flags, op.seq, op.dep, op.offset, op.length, op.payload);
      op.journaled = rotated ? Promise.all([appended, rotated]).then(() => undefined) : appended;
    }
    this.answered.clear();
    // Flushes waiting for answers that will not come now: they fall back to the journal.
    for (const w of this.flushWaiters.splice(0)) w.resolve();
  }

  /** Append a change to the journal (durable first in sync mode); overflow turns to the bitmap. */
  private async append(type: number, flags: number, seq: number, dep: number, offset: number, length: number, data: Buffer | null): Promise<void> {
    const journal = this.store.journal;
    if (this.path === 'bitmap' || journal.bytes + length + 64 > this.store.maxJournalBytes) {
      if (this.path !== 'bitmap') await this.overflow(`journal would exceed ${this.store.maxJournalBytes} bytes`);
      this.needResync(offset, length);
      return;
    }
    this.appendsInFlight++;
    let failed: Error | null = null;
    try {
      await journal.append({
        seq, dep, offset, length, flags,
        kind: type === MIRROR_OP.WRITE ? JOURNAL_KIND.WRITE : JOURNAL_KIND.WRITE_ZEROES,
        data: type === MIRROR_OP.WRITE ? data : null,
      });
      if (this.mode === 'sync' || (flags & MIRROR_FLAG.FUA)) await journal.sync();
    } catch (err) {
      failed = err as Error;
    } finally {
      if (--this.appendsInFlight === 0) for (const w of this.appendsIdle.splice(0)) w();
    }
    if (failed) {
      // A full disk under dataDir (or any journal failure) must not fail host writes: fall back to
      // the bitmap. (After this append stopped counting: overflow waits for appends in flight.)
      this.log.error('journal append failed', { lun: this.lun, error: failed.message });
      await this.overflow(`journal append failed: ${failed.message}`);
      this.needResync(offset, length);
    }
  }

  /** The journal is full or failing: every marked region becomes a resync, the journal is dropped. */
  private async overflow(reason: string): Promise<void> {
    if (this.path === 'bitmap') return;
    this.path = 'bitmap';
    this.store.bitmap.addSetTo(this.resyncNeeded);
    this.log.warn('LUN journal collapsed into the dirty bitmap', { lun: this.lun, reason, regions: this.resyncNeeded.size });
    if (this.state === 'journaling') {
      this.transition('journaling', `${reason}: changes are tracked in the dirty bitmap and resynced after reconnect (the secondary is inconsistent during that resync)`);
    }
    await this.appendsSettled();
    // Appends that were in flight marked their regions meanwhile.
    this.store.bitmap.addSetTo(this.resyncNeeded);
    await this.store.journal.reset();
    await this.store.bitmap.sync();
    // The dropped records' sequence numbers will never be answered: the resync stands for them
    // (the next offer skips the peer past them), so nothing issued so far is outstanding.
    this.answered.clear();
    this.ackedPrefix = this.nextSeq - 1;
    this.drops++;
    this.releaseFlushWaiters();
    // Paired meanwhile (or replaying): the peer waits for records that will never come. A new
    // session's offer skips it past them.
    if (this.linkUp) {
      this.linkUp = false;
      this.renegotiate(`LUN ${this.lun}: the journal was dropped while paired`);
    }
  }

  // ---- catching up: replay, then resync, then live ------------------------------------------

  private replayBytes = 0;
  private wake: (() => void) | null = null;

  private wakeWorker(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private sleep(): Promise<void> {
    return new Promise((r) => { this.wake = r; });
  }

  private async catchUp(): Promise<void> {
    try {
      if (this.path === 'journal') {
        const before = this.ackedPrefix;
        const sentTo = await this.replay();
        if (this.path === 'journal' && sentTo > before) await this.noteReplayProgress(before);
      }
      if (!this.linkUp) return;
      if (this.path === 'bitmap' || this.resyncNeeded.size > 0 || this.compareNeeded.size > 0) await this.resync();
      if (!this.linkUp) return;
      if (this.path === 'live' && this.resyncNeeded.size === 0 && this.compareNeeded.size === 0 && (await this.settleGeneration())) {
        this.transition('uptodate', 'the peer has every change');
      }
    } catch (err) {
      this.log.error('catching up with the peer failed', { lun: this.lun, error: (err as Error).message });
    }
  }

  /**
   * A replay that ended with the link down: if it sent records and the peer answered none, three
   * times in a row, it cannot make progress — resync the dirty regions instead of looping.
   */
  private async noteReplayProgress(before: number): Promise<void> {
    if (this.ackedPrefix > before) {
      this.replayStalls = 0;
      return;
    }
    if (++this.replayStalls < 3) return;
    this.replayStalls = 0;
    this.log.error('journal replay made no progress in 3 sessions; the dirty regions are resynced instead', { lun: this.lun, ackedPrefix: this.ackedPrefix });
    await this.overflow('journal replay made no progress in 3 sessions');
  }

  /**
   * Send the journal in sequence order, from after what the peer has, while new writes queue
   * behind it; then go live. Returns the last sequence number sent.
   */
  private async replay(): Promise<number> {
    const journal = this.store.journal;
    let lastSent = this.ackedPrefix;   // the peer has everything up to here (see resumeAfter)
    const left = journal.records - firstIndexAfter(journal.entries(), lastSent);
    if (left > 0) this.transition('replaying', `${left} journal records to send`);
    this.progress.replayTotal = left;
    this.progress.replayDone = 0;
    this.progress.startedMs = Date.now();
    for (;;) {
      if (!this.linkUp || this.path !== 'journal') return lastSent;
      const entries = journal.entries();
      const from = firstIndexAfter(entries, lastSent);
      if (from >= entries.length || entries[from].seq !== lastSent + 1) {
        if (this.appendsInFlight > 0) {
          await this.appendsSettled();
          continue;
        }
        if (from >= entries.length) break;
        // A record the peer needs is not there: sending what follows would only wait for it.
        this.log.error('journal replay cannot continue in order: a sequence number is missing; the dirty regions are resynced instead', {
          lun: this.lun, missing: lastSent + 1, next: entries[from].seq,
        });
        await this.overflow(`journal has no record ${lastSent + 1}`);
        this.pool.disconnect(`LUN ${this.lun}: journal gap, renegotiating`);
        return lastSent;
      }
      if (this.replayBytes >= REPLAY_WINDOW_BYTES) {
        await this.sleep();
        continue;
      }
      // A batch of records (up to REPLAY_BATCH_BYTES), their data read together.
      const batch: JournalEntry[] = [];
      let bytes = 0;
      // (Consecutive records only: a gap is found, above, before anything after it is sent.)
      for (let k = from; k < entries.length && bytes < REPLAY_BATCH_BYTES && entries[k].seq === entries[from].seq + (k - from); k++) {
        batch.push(entries[k]);
        bytes += entries[k].length;
      }
      const writes = batch.filter((e) => e.kind === JOURNAL_KIND.WRITE);
      const datas = await journal.readDataMany(writes);
      if (!this.linkUp || this.path !== 'journal') return lastSent;
      const extra = this.replayAsResync ? MIRROR_FLAG.RESYNC : 0;
      let w = 0;
      for (const e of batch) {
        const isWrite = e.kind === JOURNAL_KIND.WRITE;
        const data = isWrite ? datas[w++] : null;
        const flags = e.flags | extra;
        if (flags & MIRROR_FLAG.RESYNC) this.genNeeded = true;
        const op = new PendingOp(this, isWrite ? MIRROR_OP.WRITE : MIRROR_OP.WRITE_ZEROES, flags, this.lunId, e.seq, e.dep,
          e.offset, e.length, data, 'replay');
        this.replayBytes += e.length;
        lastSent = e.seq;
        this.pool.send(op);
      }
      this.progress.replayTotal = journal.records;   // records stay until the reset after the replay
      this.logProgress('replay', this.progress.replayDone, this.progress.replayTotal);
    }
    // Caught up (nothing left, no append in flight): from here new writes go to the peer directly.
    this.path = 'live';
    this.offlineRotated = false;
    if (this.progress.replayTotal > 0) {
      this.log.info('journal replayed; mirroring live again', { lun: this.lun, records: this.progress.replayTotal });
    }
    const target = this.nextSeq - 1;
    if ((await this.peerFlush()) === 0 && this.path === 'live' && journal.maxSeq <= target && this.appendsInFlight === 0) {
      await journal.reset();
      this.clearQuiet();
    }
    return lastSent;
  }

  /** Copy every stale region from local data; new writes are mirrored live meanwhile. */
  private async resync(): Promise<void> {
    if (this.path === 'bitmap') {
      await this.store.journal.reset();
      this.path = 'live';
      this.offlineRotated = false;
    }
    if (this.compareNeeded.size > 0) await this.compare();
    if (!this.linkUp || this.path !== 'live') return;
    const todo = this.resyncNeeded;
    this.transition('resyncing', `${todo.size} regions to copy from local data (the secondary is inconsistent until done)`);
    this.progress.resyncTotal = todo.size;
    this.progress.resyncDone = 0;
    this.progress.startedMs = Date.now();
    const size = this.store.bitmap.regionSize;
    const turn = new TurnBudget();
    let sent = 0;
    // In region order, straight from the set's bits: regions added ahead of the walk go in this pass.
    for (let r = todo.next(0); r >= 0; r = todo.next(r + 1)) {
      if (!this.linkUp || this.path !== 'live') return;
      while (this.inflightBytes >= RESYNC_WINDOW_BYTES) {
        await this.sleep();
        if (!this.linkUp || this.path !== 'live') return;
      }
      if (!todo.has(r)) continue;
      const start = r * size;
      const len = Math.min(size, this.backing.size - start);
      await this.rate.take(len);
      const token = await this.gate.enter(start, len);
      try {
        if (!this.linkUp || this.path !== 'live') return;
        const hole = !this.backing.isBlockDevice && this.backing.extents(start, len, 2).every((e) => e.hole);
        let data: Buffer | null = null;
        if (!hole) {
          data = Buffer.allocUnsafe(len);
          await this.backing.read(data, start);
        }
        if (!this.linkUp || this.path !== 'live') return;
        const seq = this.nextSeq++;
        this.genNeeded = true;
        const op = new PendingOp(this, hole ? MIRROR_OP.WRITE_ZEROES : MIRROR_OP.WRITE,
          (hole ? MIRROR_FLAG.MAY_PUNCH : 0) | MIRROR_FLAG.RESYNC, this.lunId, seq, this.doneHigh, start, len, data, 'resync', r);
        this.track(op);
        this.pool.send(op);
        this.doneHigh = seq;
        if (++sent > this.progress.resyncTotal) this.progress.resyncTotal = sent;
        this.logProgress('resync', this.progress.resyncDone, this.progress.resyncTotal);
      } finally {
        this.gate.leave(token);
      }
      await turn.yield();
    }
    while (this.linkUp && this.path === 'live' && this.inflight > 0 && this.resyncNeeded.size > 0) await this.sleep();
  }

  /**
   * Initial sync / full compare: hash ranges here and on the peer (pipelined, rate-limited),
   * large ranges first (holes here in 64 MiB ranges, at no rate cost), then the regions of those
   * that differ; regions that differ, or that a write touched while they were compared, are
   * resent by resync(). The work list is the compareNeeded bits, walked in order.
   */
  private async compare(): Promise<void> {
    const todo = this.compareNeeded;
    this.transition('syncing', `comparing ${todo.size} regions with the peer's copy (the secondary is inconsistent until done)`);
    this.progress.syncTotal = todo.size;
    this.progress.syncDone = 0;
    this.progress.startedMs = Date.now();
    const rs = this.store.bitmap.regionSize;
    const holeRegions = Math.max(1, Math.floor(COMPARE_COARSE_BYTES / rs));
    const fit = Math.max(1, Math.floor(Math.min(COMPARE_COARSE_BYTES, this.rate.bytesPerSec / 16) / rs));
    const dataRegions = 2 ** Math.floor(Math.log2(fit));
    const walk = new CompareWalk(todo, { regions: todo.regions, holeRegions, dataRegions, isHole: (f, n) => this.allHole(f, n) });
    const turn = new TurnBudget();
    const inflight = new Set<Promise<void>>();
    for (;;) {
      if (!this.linkUp || this.path !== 'live') break;
      const item = walk.next();
      if (!item) {
        if (inflight.size === 0) break;
        await Promise.race(inflight);   // one may descend: its regions come next
        continue;
      }
      // Holes here cost no disk or link bandwidth: only ranges with data are rate-limited.
      if (!this.allHole(item.first, item.n)) await this.rate.take(this.rangeBytes(item));
      while (inflight.size >= COMPARE_PARALLEL) await Promise.race(inflight);
      const p: Promise<void> = this.compareRegion(item, walk).finally(() => inflight.delete(p));
      inflight.add(p);
      this.logProgress('sync', this.progress.syncDone, this.progress.syncTotal);
      await turn.yield();
    }
    await Promise.all(inflight);
    if (this.compareNeeded.size === 0 && this.meta.data.syncCompare) {
      this.log.info('full sync compared every region', { lun: this.lun, ...this.sync, toSend: this.resyncNeeded.size });
    }
  }

  /** Compare one item; equal: its regions are done; else descend into it, or (one region) resend it. */
  private async compareRegion(item: CompareItem, walk: CompareWalk): Promise<void> {
    const { first, n } = item;
    const start = first * this.store.bitmap.regionSize;
    const len = this.rangeBytes(item);
    const watch = this.watching.watch(first, n);
    try {
      let local: Buffer;
      let dep: number;
      const token = await this.gate.enter(start, len);
      try {
        local = await hashRange(this.backing, start, len);
        dep = this.doneHigh;   // every write this range has seen completed locally, so is <= dep
      } finally {
        this.gate.leave(token);
      }
      const remote = await this.hashPeer(start, len, dep);
      if (!remote) return;   // the link failed: the range stays to compare
      const equal = remote.equals(local) && !watch.touched;
      if (!equal && n > 1) return walk.descend(item);
      this.compareNeeded.deleteRange(first, n);
      this.sync.compared += n;
      this.progress.syncDone += n;
      if (equal) {
        this.sync.equal += n;
        this.sync.equalBytes += len;
        // No write behind it: cleared after the next peer FLUSH (see persistClears), so a restart resumes here.
        this.compareClears.addRange(first, n);
      } else {
        this.resyncNeeded.add(first);
      }
    } finally {
      this.watching.unwatch(watch);
    }
  }

  /** Bytes of regions [first, first+n) (the last region may be short). */
  private rangeBytes(item: CompareItem): number {
    const rs = this.store.bitmap.regionSize;
    return Math.min(item.n * rs, this.backing.size - item.first * rs);
  }

  /** True if regions [first, first+n) are all hole here (a block device cannot tell: never). */
  private allHole(first: number, n: number): boolean {
    if (this.backing.isBlockDevice) return false;
    const start = first * this.store.bitmap.regionSize;
    const len = this.rangeBytes({ first, n });
    const [e] = this.backing.extents(start, len, 1);
    return e !== undefined && e.hole && e.length >= len;
  }

  /** Clear the bits of clean regions: in one bulk step when none of them has anything behind it. */
  private clearClean(first: number, n: number): void {
    const bitmap = this.store.bitmap;
    if (n > 1 && this.clearableRange(first, n)) return bitmap.clearRegions(first, n);
    for (let r = first; r < first + n; r++) if (this.clearable(r)) bitmap.clear(r);
  }

  /** SHA-256 of the peer's copy of a range once everything up to `dep` is applied there; null if the link failed. */
  async hashPeer(offset: number, length: number, dep: number): Promise<Buffer | null> {
    if (this.path !== 'live' || !this.linkUp) return null;
    const op = new PendingOp(this, MIRROR_OP.HASH, 0, this.lunId, 0, dep, offset, length, null, 'control');
    this.pool.send(op);
    await op.settled;
    if (op.errno !== 0) {
      if (op.errno !== ENOTCONN) this.pool.disconnect(`peer failed a HASH of LUN ${this.lun} (errno ${op.errno})`);
      return null;
    }
    return op.reply;
  }

  /**
   * The peer has every change: it takes our generation (and drops its undo log), and our journal
   * and bitmap are from now on relative to it. True when that is done (or was not needed).
   */
  private async settleGeneration(): Promise<boolean> {
    const d = this.meta.data;
    if (!this.genNeeded && this.peerCurrent === d.current && d.peerBase === d.current && !d.syncCompare && !d.discardPeer) return true;
    if ((await this.peerFlush()) !== 0 || this.path !== 'live') return false;
    const current = d.current;
    const payload = encodeGeneration(current, d.history);
    const op = new PendingOp(this, MIRROR_OP.SET_GEN, 0, this.lunId, 0, this.nextSeq - 1, 0, payload.length, payload, 'control');
    this.pool.send(op);
    await op.settled;
    if (op.errno !== 0) {
      if (op.errno !== ENOTCONN) this.pool.disconnect(`peer failed SET_GEN of LUN ${this.lun} (errno ${op.errno})`);
      return false;
    }
    this.peerCurrent = current;
    this.genNeeded = false;
    this.replayAsResync = false;
    await this.meta.update({ peerBase: current, syncCompare: false, discardPeer: false });
    return true;
  }

  /** Progress of a verify under way (bytes compared of total), or null. */
  verifying: { done: number; total: number; startedMs: number } | null = null;

  /**
   * Online verify: compare both copies by range hashes (coarse ranges, then the regions of those
   * that differ) while hosts keep writing; each range's writes wait while it is hashed on both
   * sides, so a difference is never an artefact of a write in flight. With repair, differing
   * regions are resent from here. Returns the differing regions.
   */
  async verify(repair: boolean, coarseBytes = 64 * 1024 * 1024): Promise<number[]> {
    if (this.verifying) throw new Error('a verify of this LUN is already running');
    if (this.state !== 'uptodate' || this.path !== 'live') throw new Error(`the mirror is ${this.state} (${this.reason}); verify needs it up to date`);
    const size = this.backing.size;
    const rs = this.store.bitmap.regionSize;
    const coarse = Math.max(rs, Math.floor(coarseBytes / rs) * rs);
    this.verifying = { done: 0, total: size, startedMs: Date.now() };
    const differing: number[] = [];
    try {
      for (let off = 0; off < size; off += coarse) {
        const len = Math.min(coarse, size - off);
        await this.rate.take(len);
        if (!(await this.rangeEqual(off, len))) {
          for (let r = off / rs; r * rs < off + len; r++) {
            if (!(await this.rangeEqual(r * rs, Math.min(rs, size - r * rs)))) differing.push(r);
          }
        }
        this.verifying.done = off + len;
        this.logProgress('verify', this.verifying.done, size);
      }
    } finally {
      this.verifying = null;
    }
    if (repair && differing.length) {
      for (const r of differing) {
        const m = this.store.bitmap.mark(r * rs, 1);
        if (m) await m;
        this.resyncNeeded.add(r);
      }
      await this.store.bitmap.sync();
      while (this.linkUp && differing.some((r) => this.resyncNeeded.has(r))) {
        this.kick();
        await this.worker;
      }
      if (differing.some((r) => this.resyncNeeded.has(r))) throw new Error('the link went down during the repair; it completes after reconnect');
    }
    return differing;
  }

  private async rangeEqual(offset: number, length: number): Promise<boolean> {
    const token = await this.gate.enter(offset, length);
    try {
      const local = await hashRange(this.backing, offset, length);
      const remote = await this.hashPeer(offset, length, this.doneHigh);
      if (!remote) throw new Error('the link went down during the verify');
      return remote.equals(local);
    } finally {
      this.gate.leave(token);
    }
  }

  /** Every request issued so far answered, then the peer's FLUSH. 0, or an errno. */
  private async peerFlush(): Promise<number> {
    const target = this.nextSeq - 1;
    if (this.ackedPrefix < target) await new Promise<void>((resolve) => this.flushWaiters.push({ target, resolve }));
    if (this.path !== 'live') return ENOTCONN;
    let errno = 0;
    const op = new PendingOp(this, MIRROR_OP.FLUSH, 0, this.lunId, 0, 0, 0, 0, null, 'flush');
    const orig = op.done.bind(op);
    op.done = (e: number) => { errno = e; orig(e); };
    this.pool.send(op);
    await op.settled;
    if (errno !== 0 && errno !== ENOTCONN) {
      this.pool.disconnect(`peer failed a flush of LUN ${this.lun} (errno ${errno})`);
    }
    return errno;
  }

  /** The journal and bitmap this mirror writes (the site closes them when the LUN goes). */
  get storeRef(): MirrorStore {
    return this.store;
  }

  /**
   * Clear the bits of regions quiet for CLEAR_DELAY_MS and persist them. Hot regions stay marked
   * (as DRBD's activity log keeps hot extents): marking a clean region costs a bitmap write before
   * the data write, and random writes over a large LUN would otherwise pay it nearly every time.
   */
  persistClears(): Promise<void> {
    const before = Date.now() - CLEAR_DELAY_MS;
    for (const [r, at] of this.clearCandidates) {
      if (at > before) continue;
      this.clearCandidates.delete(r);
      this.clears.add(r);
    }
    // The bits go only after a peer FLUSH that covers their writes (flushed-clears.ts).
    for (const set of [this.clears, this.compareClears]) {
      if (set.waiting === 0 || this.path !== 'live' || !this.linkUp) continue;
      set.round(async () => this.path === 'live' && this.linkUp && (await this.peerFlush()) === 0, (first, n) => this.clearClean(first, n))
        .catch((err: Error) => this.log.error('bitmap clear failed', { lun: this.lun, error: err.message }));
    }
    return this.store.bitmap.flushDirty();
  }

  /** Let requests already issued reach the peer (shutdown), for at most timeoutMs. */
  async drain(timeoutMs: number): Promise<void> {
    if (this.path !== 'live') return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.peerFlush(),
      new Promise<void>((resolve) => { timer = setTimeout(resolve, timeoutMs); }),
    ]);
    clearTimeout(timer);
  }

  private lastProgressLog = 0;

  /** Long work reports progress (with an ETA) at most every 5 s. */
  private logProgress(what: 'replay' | 'resync' | 'sync' | 'verify', done: number, total: number): void {
    const now = Date.now();
    if (now - this.lastProgressLog < 5000 || done === 0) return;
    this.lastProgressLog = now;
    const elapsed = (now - (what === 'verify' ? this.verifying!.startedMs : this.progress.startedMs)) / 1000;
    const etaSeconds = Math.round((elapsed / done) * (total - done));
    this.log.info(`${what} progress`, {
      lun: this.lun, done, total, percent: Math.floor((100 * done) / total), etaSeconds, protection: protectionOf(this.state, this.mode),
    });
  }

  private transition(to: MirrorState, reason: string): void {
    if (this.state === to && this.reason === reason) return;
    const from = this.state;
    this.state = to;
    this.reason = reason;
    if (from === to) return;
    const level = to === 'split-brain' ? 'error' : to === 'journaling' || to === 'unpaired' ? 'warn' : 'info';
    const protection = protectionOf(to, this.mode);
    this.log.log(level, 'LUN mirror state', {
      lun: this.lun, from, to, reason, protection, ...(protection === 'local-only' ? { protectionReason: protectionReason(to) } : {}),
    });
  }
}

/** Index of the first journal entry with a sequence number above `seq` (entries are sorted by seq). */
function firstIndexAfter(entries: readonly JournalEntry[], seq: number): number {
  let lo = 0;
  let hi = entries.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (entries[mid].seq <= seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
