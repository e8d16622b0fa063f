// The sending half of one primary LUN's mirror: the host's write path, the pairing with the
// peer, and the public face (status, verify, shutdown) of the rooms it is made of —
//   sequencer.ts      sequence numbers, deps, the acked prefix, flush and window waiters (pure)
//   dirty-regions.ts  the activity log over the region bitmap: pending, stale, clearable regions
//   replicator.ts     where writes go, requests out and answers in, outages into journal/bitmap
//   catch-up.ts       the worker: replay.ts, then compare.ts and resync.ts; verify.ts on demand
// It talks to the pool only through MirrorLink (pool.ts), so tests drive it without sockets.
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
//
// State. Pairing states: the peer has not taken the LUN (yet) — connecting (start, never paired),
// unpaired, split-brain. Replication states: it has, or had — journaling, replaying, syncing,
// resyncing, uptodate. Every change goes through Replicator.transition(), checked against
// mirror-state.ts ALLOWED; any state may stay with a new reason. The table, from → to:
//
//   from                  to            why
//   any but split-brain → journaling    recover() found journal records or dirty regions; an
//                                       outage (linkDown(), a failed answer) while not journaling
//                                       (connecting and unpaired keep their state then)
//   split-brain         → journaling    the link went down (the next pairing decides again)
//   any                 → unpaired      paired(): the peer refused the LUN (or did not answer)
//   any                 → split-brain   paired(): both sites wrote it as primary while apart
//   connecting, unpaired,
//   journaling          → replaying     the worker (after a paired OK) has journal records to send
//   connecting, unpaired,
//   journaling, replaying,
//   resyncing, uptodate → syncing       the worker compares regions (full sync, a peer that lost writes)
//   connecting, unpaired,
//   journaling, replaying,
//   syncing, uptodate   → resyncing     the worker resends stale regions (also a verify's repair)
//   connecting, unpaired,
//   journaling, replaying,
//   syncing, resyncing  → uptodate      the worker's session is still up, live, nothing stale, and
//                                       the peer took our generation
//
// Never: → connecting; split-brain → any replication state but journaling (an outage and a new
// pairing come first); syncing, resyncing or uptodate → replaying (the path is live there: only
// an outage, → journaling, brings writes back to the journal).
//
// Where writes go (path) is not a state of its own: 'journal' from the start and after an
// outage, 'live' once a replay or resync has caught up, 'bitmap' once the journal overflowed.
import { setImmediate as yieldTurn } from 'node:timers/promises';
import type { Logger } from '../../log.js';
import type { LunMeta } from '../../persist/lun-meta.js';
import type { RegionSet } from '../../persist/region-set.js';
import type { Backing } from '../../storage/backing.js';
import type { MirrorLink } from '../pool.js';
import { MIRROR_FLAG, MIRROR_OP, OFFER_FLAG, PAIR, PAIR_REASON, SYNC, type LunAnswer, type LunOffer } from '../wire.js';
import { CatchUp } from './catch-up.js';
import { LinkSession } from './link-session.js';
import type { MirrorState, WritePath } from './mirror-state.js';
import type { OverlapGate } from './overlap-gate.js';
import type { RateLimiter } from './rate-limit.js';
import { Replicator, type MirrorStore } from './replicator.js';
import { verify } from './verify.js';

export type { MirrorState, WritePath } from './mirror-state.js';
export type { MirrorStore } from './replicator.js';

const CLEAR_DELAY_MS = 2000;
/** Regions marked per event-loop turn when a full sync starts (a 1 TiB LUN has 16.7 M). */
const MARK_SLICE_REGIONS = 1 << 20;

export class LunMirror {
  private readonly r: Replicator;
  private readonly catchUp: CatchUp;
  readonly stats: Replicator['stats'];
  readonly progress: Replicator['progress'];
  readonly sync: Replicator['sync'];
  /** Regions whose copy on the peer is stale and must be resent from local data. */
  readonly resyncNeeded: RegionSet;
  /** Regions to compare with the peer's copy (by hash) before deciding to send them. */
  readonly compareNeeded: RegionSet;
  readonly gate: OverlapGate;
  /** Identifies this run of the primary to the secondary. */
  readonly instance: Buffer;
  /** The journal-drop count when the last offer was made (a drop since voids the pairing). */
  private offeredDrops = 0;

  constructor(
    readonly lun: string,
    readonly mode: 'sync' | 'async',
    private readonly backing: Backing,
    link: MirrorLink,
    private readonly store: MirrorStore,
    windowBytes: number,
    private readonly log: Logger,
    readonly meta: LunMeta,
    rate: RateLimiter,
  ) {
    this.r = new Replicator(lun, mode, backing, link, store, windowBytes, log, meta);
    this.catchUp = new CatchUp(this.r, rate);
    ({ stats: this.stats, progress: this.progress, sync: this.sync, gate: this.gate, instance: this.instance } = this.r);
    ({ resyncNeeded: this.resyncNeeded, compareNeeded: this.compareNeeded } = this.r.dirty);
  }

  get name(): string { return this.lun; }
  get size(): number { return this.backing.size; }
  get state(): MirrorState { return this.r.state; }
  get reason(): string { return this.r.reason; }
  get path(): WritePath { return this.r.path; }
  get inflight(): number { return this.r.seq.inflight; }
  /** Live/resync bytes sent and not yet answered (the async lag). */
  get inflightBytes(): number { return this.r.seq.inflightBytes; }
  get active(): boolean { return this.r.path === 'live'; }
  get dirtyRegions(): number { return this.store.bitmap.count; }
  /** Progress of a verify under way (bytes compared of total), or null. */
  get verifying(): Replicator['verifying'] { return this.r.verifying; }
  /** The journal and bitmap this mirror writes (the site closes them when the LUN goes). */
  get storeRef(): MirrorStore { return this.store; }
  /** Start a new session without an outage (the sender sets it; tests may too). */
  get renegotiate(): (reason: string) => void { return this.r.renegotiate; }
  set renegotiate(fn: (reason: string) => void) { this.r.renegotiate = fn; }

  /** After recovery: continue numbering after the journal and resync every marked region. */
  recover(): void {
    const { journal } = this.store;
    this.r.seq.restore(journal.maxSeq, journal.records ? journal.minSeq - 1 : journal.maxSeq);
    this.r.replayAsResync = journal.records > 0;
    // An initial sync under way when we stopped: its regions are still to be compared, not sent blindly.
    this.r.dirty.markedAreStale(this.meta.data.syncCompare);
    if (journal.records || this.resyncNeeded.size) {
      this.r.transition('journaling', `recovered ${journal.records} journal records and ${this.resyncNeeded.size} dirty regions`);
    }
  }

  /** Journal size and the age of its oldest record (the recovery point while the peer is away). */
  journalStatus() {
    const j = this.store.journal;
    const oldest = j.oldestTimeMs;
    return { records: j.records, bytes: j.bytes, oldestAgeMs: oldest === null ? null : Date.now() - oldest };
  }

  offer(id: number, size: number): LunOffer {
    this.r.lunId = id;
    this.offeredDrops = this.r.drops;
    const j = this.store.journal;
    const d = this.meta.data;
    const seq = this.r.seq;
    return {
      // Resume after what the peer answered: records at or below it may be in the journal still
      // (the hand-over to live mirroring drops them only after a peer flush), but never again.
      id, name: this.lun, size, instance: this.instance, nextSeq: j.records ? Math.max(j.minSeq, seq.ackedPrefix + 1) : seq.nextSeq,
      lineage: { current: d.current, history: d.history, peerBase: d.peerBase }, flags: d.discardPeer ? OFFER_FLAG.FORCE : 0,
    };
  }

  // ---- link events ---------------------------------------------------------------------------

  /** The pool is up and the peer answered our offer for this LUN. */
  paired(answer: LunAnswer | undefined): void {
    const r = this.r;
    if (!answer || answer.status !== PAIR.OK) {
      const why = answer ? PAIR_REASON[answer.status] ?? `refused (${answer.status})` : 'the peer did not answer for this LUN';
      r.session?.end();
      if (r.path !== 'bitmap') void r.overflow('not paired');
      if (answer?.status === PAIR.SPLIT_BRAIN) {
        if (!this.meta.data.splitBrain) {
          this.log.error('split brain: both sites wrote this LUN as primary while apart; it stays disconnected until resolved', {
            lun: this.lun, current: this.meta.current, peerCurrent: answer.current,
          });
          this.meta.update({ splitBrain: { detectedMs: Date.now(), peerCurrent: answer.current } }).catch((err: Error) => this.metaFailed(err));
        }
        r.transition('split-brain', why);
        return;
      }
      r.transition('unpaired', why);
      return;
    }
    if (this.offeredDrops !== r.drops) {
      // The journal was dropped after our offer was made: the peer would wait for its records.
      r.renegotiate(`LUN ${this.lun}: the journal was dropped during the pairing`);
      return;
    }
    r.peerCurrent = answer.current;
    r.session?.end();
    r.session = new LinkSession();
    if (answer.applied < r.seq.ackedPrefix) this.peerLostWrites(answer.applied);
    r.seq.resumeAfter(answer.applied);
    if (this.meta.data.splitBrain) {
      this.log.warn('split brain resolved: the peer accepted this LUN again', { lun: this.lun });
      this.meta.update({ splitBrain: null }).catch((err: Error) => this.metaFailed(err));
    }
    if (answer.sync === SYNC.FULL) this.startFullSync(answer.copy).then(() => this.catchUp.kick(), (err: Error) => this.metaFailed(err));
    else this.catchUp.kick();
  }

  /**
   * The peer answered less than it had acknowledged: it rebooted and lost what it had not flushed
   * (requests after `applied`). Those are behind bits still set (a bit goes only after a peer
   * FLUSH, flushed-clears.ts): every marked region is resent as a resync, the peer inconsistent until done.
   */
  private peerLostWrites(applied: number): void {
    this.log.warn('the peer lost writes it had acknowledged (a reboot before its flush): every marked region is resynced', {
      lun: this.lun, peerApplied: applied, acknowledged: this.r.seq.ackedPrefix, regions: this.store.bitmap.count,
    });
    this.r.dirty.forgetClears();
    this.r.dirty.markedAreStale(this.meta.data.syncCompare);
    this.r.replayAsResync = true;
    this.r.genNeeded = true;
  }

  /** The pool went down: everything not yet answered goes to the journal. */
  linkDown(reason: string): void {
    this.r.session?.end();
    this.r.enterOutage(`link down: ${reason}`);
  }

  private metaFailed(err: Error): void {
    this.log.error('saving LUN metadata failed; pairing stops until it can be saved', { lun: this.lun, error: err.message });
    this.r.link.disconnect(`LUN ${this.lun}: metadata not saved`);
  }

  /**
   * Every region is to be compared with the peer's copy `peerCopy` (persisted, so a restart
   * resumes it). The progress of an interrupted compare holds only for that same copy: another
   * one (a replaced secondary, a fresh dataDir) is compared whole again.
   */
  private async startFullSync(peerCopy: string): Promise<void> {
    const d = this.meta.data;
    const dirty = this.r.dirty;
    if (!d.syncCompare || d.syncPeerCopy !== peerCopy) {
      if (d.syncCompare) {
        this.log.warn('full sync: the peer\'s copy is not the one the interrupted compare ran against: it starts over', { lun: this.lun });
      }
      this.log.info('full sync: every region is compared with the peer\'s copy and sent only where it differs', { lun: this.lun });
      // Regions waiting to be marked clean were clean on another copy (or before this sync): not on this one.
      dirty.forgetClears();
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
    dirty.compareClears.subtractFrom(this.compareNeeded);
  }

  // ---- the host's write path ----------------------------------------------------------------

  async write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    const r = this.r;
    if (r.path === 'live') await (this.mode === 'async' ? r.seq.admit(buf.length) : undefined);
    else await r.offline();
    const token = await r.gate.enter(pos, buf.length);
    if (r.dirty.watching.size) r.dirty.noteTouched(pos, buf.length);
    let seq = 0;
    let settled: Promise<void> | null = null;
    try {
      const marked = this.store.bitmap.mark(pos, buf.length);
      if (marked) await marked;
      [seq, settled] = r.dispatchWrite(buf, pos, fua ? MIRROR_FLAG.FUA : 0);
      await this.backing.write(buf, pos);
      if (fua) await this.backing.flush();
    } catch (err) {
      if (seq) this.log.error('local write failed after it was mirrored; the copies may differ in that range', {
        lun: this.lun, seq, offset: pos, length: buf.length, error: (err as Error).message,
      });
      if (seq) r.dirty.needResync(pos, buf.length);
      throw err;
    } finally {
      r.seq.localDone(seq);
      r.gate.leave(token);
    }
    if (settled) await settled;
  }

  /** Zero or punch a range. Local first (FAST_ZERO may fail): only what happened is mirrored. */
  async zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    const r = this.r;
    await r.offline();
    const token = await r.gate.enter(pos, len);
    if (r.dirty.watching.size) r.dirty.noteTouched(pos, len);
    let settled: Promise<void> | null = null;
    let seq = 0;
    try {
      const marked = this.store.bitmap.mark(pos, len);
      if (marked) await marked;
      await this.backing.zero(pos, len, mayPunch, fastOnly);
      if (fua) await this.backing.flush();
      seq = r.path === 'bitmap' ? 0 : r.seq.take();
      const flags = (mayPunch ? MIRROR_FLAG.MAY_PUNCH : 0) | (fua ? MIRROR_FLAG.FUA : 0);
      settled = r.dispatch(MIRROR_OP.WRITE_ZEROES, flags, pos, len, null, seq);
    } finally {
      r.seq.localDone(seq);
      r.gate.leave(token);
    }
    if (settled) await settled;
  }

  /** FLUSH: local data, journal and bitmap durable; with the peer reachable, the peer's too. */
  async flush(): Promise<void> {
    const local = Promise.all([this.backing.flush(), this.store.journal.sync(), this.store.bitmap.sync()]);
    if (this.r.path !== 'live') return void (await local);
    const [, errno] = await Promise.all([local, this.r.peerFlush()]);
    if (errno !== 0) {
      // The link failed under the flush: the writes it covers went to the journal meanwhile.
      await this.r.appendsSettled();
      await Promise.all([this.store.journal.sync(), this.store.bitmap.sync()]);
    }
  }

  // ---- background and on demand ---------------------------------------------------------------

  /** SHA-256 of the peer's copy of a range once everything up to `dep` is applied there; null if the link failed. */
  hashPeer(offset: number, length: number, dep: number): Promise<Buffer | null> {
    return this.r.hashPeer(offset, length, dep);
  }

  /** Online verify of both copies (verify.ts); with repair, differing regions are resent. Returns them. */
  verify(repair: boolean, coarseBytes = 64 * 1024 * 1024): Promise<number[]> {
    return verify(this.catchUp, repair, coarseBytes);
  }

  /**
   * Clear the bits of regions quiet for CLEAR_DELAY_MS and persist them. Hot regions stay marked
   * (as DRBD's activity log keeps hot extents): marking a clean region costs a bitmap write before
   * the data write, and random writes over a large LUN would otherwise pay it nearly every time.
   */
  persistClears(): Promise<void> {
    const r = this.r;
    r.dirty.gatherQuiet(Date.now() - CLEAR_DELAY_MS);
    // The bits go only after a peer FLUSH that covers their writes (flushed-clears.ts).
    if (r.path === 'live' && r.linkUp) {
      void r.dirty.clearRounds(async () => r.path === 'live' && r.linkUp && (await r.peerFlush()) === 0,
        (err: Error) => this.log.error('bitmap clear failed', { lun: this.lun, error: err.message }));
    }
    return this.store.bitmap.flushDirty();
  }

  /** Let requests already issued reach the peer (shutdown), for at most timeoutMs. */
  async drain(timeoutMs: number): Promise<void> {
    if (this.r.path !== 'live') return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.r.peerFlush(),
      new Promise<void>((resolve) => { timer = setTimeout(resolve, timeoutMs); }),
    ]);
    clearTimeout(timer);
  }
}
