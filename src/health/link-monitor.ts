// Link state of the mirror toward the peer, from heartbeats and the pool's fate, and the
// probation that must pass after an outage before the pool may connect again.
//
// The monitor has no timers of its own: its owner calls beat() for every heartbeat accepted
// from the peer, tick() after every heartbeat sent (every intervalMs), connected() when the pool
// came up and connectionLost() whenever the pool went down. Time comes from `now`
// (monotonic by default; tests inject a clock).
//
// States and rules:
//   connecting  Start-up: never had an outage. The pool may connect at once (mayConnect()).
//               Otherwise like 'ready': silence longer than timeoutMs → 'down', where silence
//               is measured from the last beat, or from construction if none arrived since.
//   up          The pool is up (connected()). Silence longer than timeoutMs, measured from the
//               last beat or from entering 'up' if none arrived since → 'down' + 'down' event:
//               the owner closes the pool.
//   down        Outage (silence, or connectionLost()). No connecting. The first beat starts
//               probation → 'probation'.
//   probation   Beats must keep coming without a gap for probationMs. A gap between two
//               consecutive beats longer than 1.5 × intervalMs (tolerance for timer jitter; the
//               requirement reads "any gap longer than the interval") restarts the probation
//               timer: a 'state' event probation → probation with reason
//               "gap of N ms restarts probation". On a tick, when probationMs have passed since
//               the last (re)start and the last beat is fresh (at most 1.5 × intervalMs old),
//               → 'ready' + 'ready' event. Silence during probation does not go back to 'down'
//               (nothing is connected to close); the next beat is a gap and restarts the timer.
//   ready       Probation passed: the pool may connect (mayConnect()). A failed connect attempt
//               does not reset probation: the owner simply retries while mayConnect() holds.
//               Silence longer than timeoutMs → 'down' + 'down' event.
//
//   connected()          from any state → 'up' (silence then counts from now, if no beat comes).
//   connectionLost(why)  the pool went down: from 'up' or 'probation' → 'down' + 'down' event.
//                        In 'connecting' and 'ready' the pool cannot have been up (it would
//                        have been reported with connected(), which leads to 'up'), so the pool
//                        going down there is a failed connect attempt: no transition, no event
//                        (lastConnectFailure records it). The owner can therefore report every
//                        'down' of the pool, attempts included. In 'down': nothing.
//
// Every transition emits exactly one 'state' event (from, to, reason); a probation restart emits
// one with from = to = 'probation'. 'down' and 'ready' events follow their 'state' event.
import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';

export type LinkState = 'connecting' | 'up' | 'down' | 'probation' | 'ready';

export interface LinkMonitorOptions {
  /** Heartbeat period. */
  intervalMs: number;
  /** Silence after which the link is declared down. */
  timeoutMs: number;
  /** Uninterrupted heartbeats required after an outage before connecting again. */
  probationMs: number;
  /** Clock in ms (only differences matter). Default: performance.now(). */
  now?: () => number;
}

export interface LinkMonitorEvents {
  state: [from: LinkState, to: LinkState, reason: string];
  down: [reason: string];
  ready: [];
}

/** Gaps up to this multiple of the interval are timer jitter, not an interruption. */
export const GAP_TOLERANCE = 1.5;

export class LinkMonitor extends EventEmitter<LinkMonitorEvents> {
  state: LinkState = 'connecting';
  private readonly now: () => number;
  private readonly gapLimitMs: number;
  /** Time of the last beat, null if none yet. */
  private lastBeat: number | null = null;
  /** Silence is measured from the later of the last beat and this (construction, then 'up'). */
  private silenceFrom: number;
  /** When probation (re)started. */
  private probationStart = 0;
  /** The reason of the last failed connect attempt (connectionLost() in 'connecting'/'ready'). */
  lastConnectFailure: string | null = null;

  constructor(private readonly opts: LinkMonitorOptions) {
    super();
    if (!(opts.intervalMs > 0)) throw new RangeError(`intervalMs ${opts.intervalMs}: must be positive`);
    if (!(opts.timeoutMs > 0)) throw new RangeError(`timeoutMs ${opts.timeoutMs}: must be positive`);
    if (!(opts.probationMs >= 0)) throw new RangeError(`probationMs ${opts.probationMs}: must not be negative`);
    this.now = opts.now ?? (() => performance.now());
    this.gapLimitMs = GAP_TOLERANCE * opts.intervalMs;
    this.silenceFrom = this.now();
  }

  /** A valid heartbeat from the peer arrived. */
  beat(): void {
    const t = this.now();
    const previous = this.lastBeat;
    this.lastBeat = t;
    if (this.state === 'down') {
      this.probationStart = t;
      this.go('probation', previous === null
        ? 'heartbeat from the peer: probation starts'
        : `heartbeat resumed after ${Math.round(t - previous)} ms: probation starts`);
    } else if (this.state === 'probation' && previous !== null && t - previous > this.gapLimitMs) {
      this.probationStart = t;
      this.go('probation', `gap of ${Math.round(t - previous)} ms restarts probation`);
    }
  }

  /** Called after each heartbeat send: timeouts and the end of probation. */
  tick(): void {
    const t = this.now();
    switch (this.state) {
      case 'connecting':
      case 'up':
      case 'ready': {
        const from = Math.max(this.lastBeat ?? -Infinity, this.silenceFrom);
        const silence = t - from;
        if (silence > this.opts.timeoutMs) {
          const what = this.lastBeat !== null && this.lastBeat >= this.silenceFrom ? 'no heartbeat for' : 'no heartbeat at all in';
          this.goDown(`${what} ${Math.round(silence)} ms (timeout ${this.opts.timeoutMs} ms)`);
        }
        break;
      }
      case 'probation':
        if (t - this.probationStart >= this.opts.probationMs && this.fresh(t)) {
          this.go('ready', `${this.opts.probationMs} ms of uninterrupted heartbeats`);
          this.emit('ready');
        }
        break;
      case 'down':
        break;
    }
  }

  /** The pool came up. */
  connected(): void {
    if (this.state === 'up') return;
    this.lastConnectFailure = null;
    this.silenceFrom = this.now();
    this.go('up', 'mirror connections up');
  }

  /** The pool went down: a failed session → 'down' (and a new probation); see the header. */
  /**
   * A deliberate reconnect (e.g. a reload changed the LUNs on offer): from 'up', go straight to
   * 'ready' — no outage happened, so no probation — and the pool's coming 'down' is ignored.
   */
  restart(reason: string): void {
    if (this.state === 'up') this.go('ready', reason);
  }

  connectionLost(reason: string): void {
    switch (this.state) {
      case 'down':
        return;
      case 'connecting':
      case 'ready':
        this.lastConnectFailure = reason;
        return;
      case 'up':
      case 'probation':
        this.goDown(reason);
    }
  }

  /** May the owner try to bring the pool up now? */
  mayConnect(): boolean {
    return this.state === 'connecting' || this.state === 'ready';
  }

  /** ms since the last beat (Infinity if none). */
  silentForMs(): number {
    return this.lastBeat === null ? Infinity : this.now() - this.lastBeat;
  }

  /**
   * In probation: ms until it can complete (at the next tick after that), assuming beats keep
   * coming; the full probationMs while a gap is in progress (the next beat restarts it).
   * null in any other state.
   */
  probationRemainingMs(): number | null {
    if (this.state !== 'probation') return null;
    const t = this.now();
    if (!this.fresh(t)) return this.opts.probationMs;
    return Math.max(0, this.probationStart + this.opts.probationMs - t);
  }

  private fresh(t: number): boolean {
    return this.lastBeat !== null && t - this.lastBeat <= this.gapLimitMs;
  }

  private goDown(reason: string): void {
    this.go('down', reason);
    this.emit('down', reason);
  }

  private go(to: LinkState, reason: string): void {
    const from = this.state;
    this.state = to;
    this.emit('state', from, to, reason);
  }
}
