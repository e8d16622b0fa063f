// The catch-up worker of one primary LUN's mirror: after a pairing it replays the journal
// (replay.ts), then compares (compare.ts) and resends (resync.ts) stale regions, then hands the
// peer our generation; new writes are mirrored live as soon as the journal is replayed. One
// worker runs at a time, within one link session: it stops when that session ends.
import { encodeGeneration, MIRROR_OP } from '../wire.js';
import { ENOTCONN } from '../peer-connection.js';
import { LinkSession } from './link-session.js';
import { protectionOf } from './protection.js';
import type { RateLimiter } from './rate-limit.js';
import { replay } from './replay.js';
import { PendingOp, type Replicator } from './replicator.js';
import { resync } from './resync.js';
import type { WorkerContext } from './worker-context.js';

export class CatchUp implements WorkerContext {
  private running: Promise<void> | null = null;
  private kickAgain = false;
  /** Replay sessions in a row that sent records and saw none answered. */
  private replayStalls = 0;
  private lastProgressLog = 0;

  constructor(readonly r: Replicator, readonly rate: RateLimiter) {}

  /** The worker under way, if any. */
  get worker(): Promise<void> | null {
    return this.running;
  }

  /** Start the catch-up worker, or have the running one start over when it ends. */
  kick(): void {
    if (this.running) {
      this.kickAgain = true;
      return;
    }
    this.running = this.run().finally(() => {
      this.running = null;
      if (this.kickAgain && this.r.linkUp) {
        this.kickAgain = false;
        this.kick();
      }
    });
  }

  private async run(): Promise<void> {
    const r = this.r;
    const { dirty } = r;
    const s = r.session ?? LinkSession.NONE;
    try {
      if (r.path === 'journal') {
        const before = r.seq.ackedPrefix;
        const sentTo = await replay(this, s);
        if (r.path === 'journal' && sentTo > before) await this.noteReplayProgress(before);
      }
      if (!s.live) return;
      if (r.path === 'bitmap' || dirty.resyncNeeded.size > 0 || dirty.compareNeeded.size > 0) await resync(this, s);
      if (!s.live) return;
      if (r.path === 'live' && dirty.resyncNeeded.size === 0 && dirty.compareNeeded.size === 0 && (await this.settleGeneration())
        && r.still(s, 'live')) {
        r.transition('uptodate', 'the peer has every change');
      }
    } catch (err) {
      r.log.error('catching up with the peer failed', { lun: r.lun, error: (err as Error).message });
    }
  }

  /**
   * A replay that ended with the link down: if it sent records and the peer answered none, three
   * times in a row, it cannot make progress — resync the dirty regions instead of looping.
   */
  private async noteReplayProgress(before: number): Promise<void> {
    const r = this.r;
    if (r.seq.ackedPrefix > before) {
      this.replayStalls = 0;
      return;
    }
    if (++this.replayStalls < 3) return;
    this.replayStalls = 0;
    r.log.error('journal replay made no progress in 3 sessions; the dirty regions are resynced instead', { lun: r.lun, ackedPrefix: r.seq.ackedPrefix });
    await r.overflow('journal replay made no progress in 3 sessions');
  }

  /**
   * The peer has every change: it takes our generation (and drops its undo log), and our journal
   * and bitmap are from now on relative to it. True when that is done (or was not needed).
   */
  private async settleGeneration(): Promise<boolean> {
    const r = this.r;
    const d = r.meta.data;
    if (!r.genNeeded && r.peerCurrent === d.current && d.peerBase === d.current && !d.syncCompare && !d.discardPeer) return true;
    if ((await r.peerFlush()) !== 0 || r.path !== 'live') return false;
    const current = d.current;
    const payload = encodeGeneration(current, d.history);
    const op = new PendingOp(r, MIRROR_OP.SET_GEN, 0, r.lunId, 0, r.seq.issued, 0, payload.length, payload, 'control');
    r.link.send(op);
    await op.settled;
    if (op.errno !== 0) {
      if (op.errno !== ENOTCONN) r.link.disconnect(`peer failed SET_GEN of LUN ${r.lun} (errno ${op.errno})`);
      return false;
    }
    r.peerCurrent = current;
    r.genNeeded = false;
    r.replayAsResync = false;
    await r.meta.update({ peerBase: current, syncCompare: false, discardPeer: false });
    return true;
  }

  /** Long work reports progress (with an ETA) at most every 5 s. */
  logProgress(what: 'replay' | 'resync' | 'sync' | 'verify', done: number, total: number): void {
    const now = Date.now();
    if (now - this.lastProgressLog < 5000 || done === 0) return;
    this.lastProgressLog = now;
    const r = this.r;
    const elapsed = (now - (what === 'verify' ? r.verifying!.startedMs : r.progress.startedMs)) / 1000;
    const etaSeconds = Math.round((elapsed / done) * (total - done));
    r.log.info(`${what} progress`, {
      lun: r.lun, done, total, percent: Math.floor((100 * done) / total), etaSeconds, protection: protectionOf(r.state, r.mode),
    });
  }
}
