// The replication engine of one primary LUN's mirror, shared by the host's write path
// (lun-mirror.ts) and the catch-up workers (catch-up.ts): the state and where new writes go
// (path), the link session, requests out and their answers, and outages — everything not
// answered goes to the journal, and a full or failing journal collapses into the dirty bitmap.
import type { Logger } from '../../log.js';
import type { RegionBitmap } from '../../persist/bitmap.js';
import { JOURNAL_KIND, type Journal } from '../../persist/journal.js';
import type { LunMeta } from '../../persist/lun-meta.js';
import type { Backing } from '../../storage/backing.js';
import { ENOTCONN, type MirrorOp } from '../peer-connection.js';
import type { MirrorLink } from '../pool.js';
import { ESTALE, MAX_MIRROR_PAYLOAD, MIRROR_FLAG, MIRROR_OP } from '../wire.js';
import { DirtyRegions } from './dirty-regions.js';
import { LinkSession } from './link-session.js';
import { checkTransition, type MirrorState, type WritePath } from './mirror-state.js';
import { OverlapGate } from './overlap-gate.js';
import { protectionOf, protectionReason } from './protection.js';
import { Sequencer } from './sequencer.js';

export interface MirrorStore {
  journal: Journal;
  bitmap: RegionBitmap;
  maxJournalBytes: number;
}

/** 'live' (new write), 'replay' (from the journal), 'resync' (region copy), 'flush', 'control' (HASH, SET_GEN). */
export type OpOrigin = 'live' | 'replay' | 'resync' | 'flush' | 'control';

export class PendingOp implements MirrorOp {
  reqId = 0;
  journaled: Promise<void> | null = null;
  /** HASH: the peer's digest. */
  reply: Buffer | null = null;
  errno = 0;
  /** Live/resync: the regions [first, last] it covers in the activity log (computed once, in track()). */
  first = 0;
  last = -1;
  private resolveSettled!: () => void;
  /** Resolves when the peer has it, or it is safely in the journal/bitmap instead. */
  readonly settled = new Promise<void>((r) => { this.resolveSettled = r; });
  constructor(
    readonly owner: Replicator,
    readonly type: number, readonly flags: number, readonly lunId: number,
    readonly seq: number, readonly dep: number, readonly offset: number, readonly length: number,
    readonly payload: Buffer | null,
    readonly origin: OpOrigin,
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

export class Replicator {
  state: MirrorState = 'connecting';
  reason = 'waiting for the peer';
  path: WritePath = 'journal';
  /** The pairing under way (null before the first); catch-up workers stop when theirs ends. */
  session: LinkSession | null = null;
  readonly seq: Sequencer<PendingOp>;
  readonly dirty: DirtyRegions;
  readonly gate = new OverlapGate();
  /** Identifies this run of the primary to the secondary. */
  readonly instance = Buffer.from(Array.from({ length: 8 }, () => Math.floor(Math.random() * 256)));
  readonly stats = { ops: 0, bytes: 0, failures: 0, replayed: 0, replayedBytes: 0, resynced: 0, resyncedBytes: 0 };
  readonly progress = { replayTotal: 0, replayDone: 0, resyncTotal: 0, resyncDone: 0, syncTotal: 0, syncDone: 0, startedMs: 0 };
  /** Initial sync / full compare: regions compared, found equal (not sent), and their bytes. */
  readonly sync = { compared: 0, equal: 0, equalBytes: 0 };
  /** Progress of a verify under way (bytes compared of total), or null. */
  verifying: { done: number; total: number; startedMs: number } | null = null;
  lunId = -1;
  /** The peer's generation from its last answer. */
  peerCurrent = '';
  offlineRotated = false;
  private rotation: Promise<void> | null = null;
  /**
   * After a restart with a recovered journal: the peer may already have applied some of those
   * records (and writes the old run sent beyond them), so replaying them is a resync, not an
   * in-order catch-up — the peer is inconsistent (undo log) until SET_GEN.
   */
  replayAsResync = false;
  /** A RESYNC-flagged change was sent: the peer is inconsistent until it gets SET_GEN. */
  genNeeded = false;
  /** Times the journal was dropped (overflow). */
  drops = 0;
  /** Journal appends under way (a bit may not go meanwhile; replay and overflow wait for them). */
  appendsInFlight = 0;
  private appendsIdle: (() => void)[] = [];
  /** Replayed bytes in flight (the replay's own window). */
  replayBytes = 0;
  private wake: (() => void) | null = null;
  /** Start a new session without an outage (the sender sets it; tests may too). */
  renegotiate: (reason: string) => void = (reason) => this.link.disconnect(`renegotiating: ${reason}`);

  constructor(
    readonly lun: string,
    readonly mode: 'sync' | 'async',
    readonly backing: Backing,
    readonly link: MirrorLink,
    readonly store: MirrorStore,
    windowBytes: number,
    readonly log: Logger,
    readonly meta: LunMeta,
  ) {
    this.seq = new Sequencer(windowBytes);
    this.dirty = new DirtyRegions(store.bitmap, () => store.journal.records === 0 && this.appendsInFlight === 0);
  }

  get linkUp(): boolean {
    return this.session !== null && this.session.live;
  }

  /** The worker's guard: its session `s` is still up and new writes still take `path`. */
  still(s: LinkSession, path: WritePath): boolean {
    return s.live && this.path === path;
  }

  /** The one way the state changes: checked against the table (mirror-state.ts), logged once per change. */
  transition(to: MirrorState, reason: string): void {
    if (this.state === to && this.reason === reason) return;
    const from = this.state;
    checkTransition(from, to, reason);
    this.state = to;
    this.reason = reason;
    if (from === to) return;
    const level = to === 'split-brain' ? 'error' : to === 'journaling' || to === 'unpaired' ? 'warn' : 'info';
    const protection = protectionOf(to, this.mode);
    this.log.log(level, 'LUN mirror state', {
      lun: this.lun, from, to, reason, protection, ...(protection === 'local-only' ? { protectionReason: protectionReason(to) } : {}),
    });
  }

  /**
   * The first change the peer does not have since it was last reachable starts a new generation:
   * if the peer is promoted meanwhile, the two histories then differ and the next pairing
   * reports a split brain instead of one side's writes silently winning.
   */
  offline(): Promise<void> | void {
    if (this.path === 'live' || this.offlineRotated) return;
    this.rotation ??= this.meta.rotate().then(() => {
      this.offlineRotated = true;
      this.log.info('new generation: this LUN takes writes its peer does not have', { lun: this.lun, generation: this.meta.current });
    }).finally(() => { this.rotation = null; });
    return this.rotation;
  }

  /**
   * Send the change to the peer, or record it for later. Returns what the host's reply must wait
   * for: the peer (sync), the journal append (always: a crash must not forget an answered write),
   * or nothing (async live, bitmap).
   */
  dispatch(type: number, flags: number, offset: number, length: number, payload: Buffer | null, seq: number): Promise<void> | null {
    if (this.path === 'bitmap') {
      this.dirty.needResync(offset, length);
      return null;
    }
    if (this.path === 'journal') return this.append(type, flags, seq, this.seq.doneHigh, offset, length, payload);
    const op = new PendingOp(this, type, flags, this.lunId, seq, this.seq.doneHigh, offset, length, payload, 'live');
    this.track(op);
    this.link.send(op);
    return this.mode === 'sync' ? op.settled : null;
  }

  /**
   * A host WRITE: numbered and dispatched (bitmap path: seq 0). One larger than a mirror frame
   * goes as consecutive frames, a number each and the same dep: they do not overlap, so the peer
   * may apply them in any order (the gate holds the whole range meanwhile). Each keeps the FUA:
   * a flush after one frame does not cover frames applied after it. Returns the last number.
   */
  dispatchWrite(buf: Buffer, pos: number, flags: number): [number, Promise<void> | null] {
    if (this.path === 'bitmap') return [0, this.dispatch(MIRROR_OP.WRITE, flags, pos, buf.length, buf, 0)];
    if (buf.length <= MAX_MIRROR_PAYLOAD) {
      const seq = this.seq.take();
      return [seq, this.dispatch(MIRROR_OP.WRITE, flags, pos, buf.length, buf, seq)];
    }
    const waits: Promise<void>[] = [];
    let seq = 0;
    for (let at = 0; at < buf.length; at += MAX_MIRROR_PAYLOAD) {
      const frame = buf.subarray(at, Math.min(at + MAX_MIRROR_PAYLOAD, buf.length));
      seq = this.seq.take();
      const settled = this.dispatch(MIRROR_OP.WRITE, flags, pos + at, frame.length, frame, seq);
      if (settled) waits.push(settled);
    }
    return [seq, waits.length ? Promise.all(waits).then(() => undefined) : null];
  }

  /** A live or resync request goes out: kept until answered, its regions' bits held. */
  track(op: PendingOp): void {
    this.seq.track(op, op.length);
    this.stats.ops++;
    this.stats.bytes += op.length;
    [op.first, op.last] = this.store.bitmap.regionsOf(op.offset, op.length);
    this.dirty.opStarted(op.first, op.last);
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
        this.link.disconnect(`peer failed a request of LUN ${this.lun} (errno ${errno})`);
      }
      this.enterOutage(errno === ENOTCONN ? `link failure: ${this.link.downReason || 'connection lost'}` : `peer error ${errno}`);
    } else {
      this.seq.answer(op.seq);
      if (op.origin === 'replay') {
        this.stats.replayed++;
        this.stats.replayedBytes += op.length;
        this.progress.replayDone++;
      } else if (op.origin === 'resync') {
        this.stats.resynced++;
        this.stats.resyncedBytes += op.length;
        // A resync request is a run of whole regions from op.region (resync.ts).
        const n = op.last - op.first + 1;
        this.progress.resyncDone += n;
        this.dirty.resyncNeeded.deleteRange(op.region, n);
      }
    }
    if (op.origin !== 'replay') this.dirty.opEnded(op.first, op.last);
    if (op.journaled) void op.journaled.then(() => this.release(op));
    else if (errno === 0 || op.origin === 'replay') this.release(op);
  }

  private release(op: PendingOp): void {
    if (op.origin !== 'replay') this.seq.release(op.length);
    else this.replayBytes -= op.length;
    op.settle();
    this.seq.admitWaiting();
    this.wakeWorker();
  }

  /** A catch-up worker waits for something in flight to be released. */
  sleep(): Promise<void> {
    return new Promise((r) => { this.wake = r; });
  }

  private wakeWorker(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  // ---- outages: journal and bitmap -------------------------------------------------------------

  /** The link failed: journal every tracked request in sequence order; new writes follow them. */
  enterOutage(reason: string): void {
    if (this.path !== 'live') {
      // Before the first pairing the LUN stays 'connecting' (its writes are journaled all the same).
      if (this.state !== 'journaling' && this.state !== 'unpaired' && this.state !== 'connecting') this.transition('journaling', reason);
      return;
    }
    this.path = 'journal';
    this.transition('journaling', reason);
    const ops = this.seq.takeTracked();
    // Writes the peer never answered are changes it may lack: a new generation, as for new ones.
    const rotated = ops.length ? this.offline() : undefined;
    for (const op of ops) {
      const appended = this.append(op.type, op.flags, op.seq, op.dep, op.offset, op.length, op.payload);
      op.journaled = rotated ? Promise.all([appended, rotated]).then(() => undefined) : appended;
    }
    // Flushes waiting for answers that will not come now: they fall back to the journal.
    this.seq.abandon();
  }

  /** Append a change to the journal (durable first in sync mode); overflow turns to the bitmap. */
  async append(type: number, flags: number, seq: number, dep: number, offset: number, length: number, data: Buffer | null): Promise<void> {
    const journal = this.store.journal;
    if (this.path === 'bitmap' || journal.bytes + length + 64 > this.store.maxJournalBytes) {
      if (this.path !== 'bitmap') await this.overflow(`journal would exceed ${this.store.maxJournalBytes} bytes`);
      this.dirty.needResync(offset, length);
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
      this.dirty.needResync(offset, length);
    }
  }

  async appendsSettled(): Promise<void> {
    while (this.appendsInFlight > 0) await new Promise<void>((r) => this.appendsIdle.push(r));
  }

  /** The journal is full or failing: every marked region becomes a resync, the journal is dropped. */
  async overflow(reason: string): Promise<void> {
    if (this.path === 'bitmap') return;
    this.path = 'bitmap';
    this.store.bitmap.addSetTo(this.dirty.resyncNeeded);
    this.log.warn('LUN journal collapsed into the dirty bitmap', { lun: this.lun, reason, regions: this.dirty.resyncNeeded.size });
    if (this.state === 'journaling') {
      this.transition('journaling', `${reason}: changes are tracked in the dirty bitmap and resynced after reconnect (the secondary is inconsistent during that resync)`);
    }
    await this.appendsSettled();
    // Appends that were in flight marked their regions meanwhile.
    this.store.bitmap.addSetTo(this.dirty.resyncNeeded);
    await this.store.journal.reset();
    await this.store.bitmap.sync();
    // The dropped records' sequence numbers will never be answered: the resync stands for them
    // (the next offer skips the peer past them), so nothing issued so far is outstanding.
    this.drops++;
    this.seq.skipAll();
    // Paired meanwhile (or replaying): the peer waits for records that will never come. A new
    // session's offer skips it past them.
    if (this.linkUp) {
      this.session!.end();
      this.renegotiate(`LUN ${this.lun}: the journal was dropped while paired`);
    }
  }

  // ---- control requests -----------------------------------------------------------------------

  /** Every request issued so far answered, then the peer's FLUSH. 0, or an errno. */
  async peerFlush(): Promise<number> {
    const acked = this.seq.ackedTo(this.seq.issued);
    if (acked) await acked;
    if (this.path !== 'live') return ENOTCONN;
    const op = new PendingOp(this, MIRROR_OP.FLUSH, 0, this.lunId, 0, 0, 0, 0, null, 'flush');
    this.link.send(op);
    await op.settled;
    const errno = op.errno;
    if (errno !== 0 && errno !== ENOTCONN) {
      this.link.disconnect(`peer failed a flush of LUN ${this.lun} (errno ${errno})`);
    }
    return errno;
  }

  /** SHA-256 of the peer's copy of a range once everything up to `dep` is applied there; null if the link failed. */
  async hashPeer(offset: number, length: number, dep: number): Promise<Buffer | null> {
    if (this.path !== 'live' || !this.linkUp) return null;
    const op = new PendingOp(this, MIRROR_OP.HASH, 0, this.lunId, 0, dep, offset, length, null, 'control');
    this.link.send(op);
    await op.settled;
    if (op.errno !== 0) {
      if (op.errno !== ENOTCONN) this.link.disconnect(`peer failed a HASH of LUN ${this.lun} (errno ${op.errno})`);
      return null;
    }
    return op.reply;
  }
}
