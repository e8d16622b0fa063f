// The mirror pool: n PeerConnections to the peer's listener, established together as one
// session. Requests spread over the connections that are up; if any connection fails the
// whole session goes down (every unanswered request fails with ENOTCONN) and the owner decides
// when to reconnect, so a LUN never sees a partial session.
import crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Logger } from '../log.js';
import type { MirrorTransport } from '../security/mirror-tls.js';
import { ENOTCONN, PeerConnection, type MirrorOp } from './peer-connection.js';
import { CONTROL, encodeHello, HELLO_ANSWER, HELLO_OFFER, type LunAnswer, type LunOffer } from './wire.js';

export interface PoolOptions {
  site: string;
  peerHost: string;
  peerPort: number;
  /** Expected peer site name; '' accepts any name but our own. */
  peerSite: string;
  connections: number;
  connectTimeoutMs: number;
}

/**
 * What a LUN's mirror uses of the pool (primary/lun-mirror.ts), so tests can drive answers and
 * outages without sockets. The owner reports the session's ups and downs to the LUN (paired(),
 * linkDown()); send() on a session that is down fails the op with ENOTCONN, asynchronously.
 */
export interface MirrorLink {
  send(op: MirrorOp): void;
  /** Bring the whole session down: every unanswered request fails with ENOTCONN. */
  disconnect(reason: string): void;
  /** Why the session last went down. */
  readonly downReason: string;
}

export type PoolState = 'down' | 'connecting' | 'up';

export interface PoolEvents {
  up: [answers: LunAnswer[], peerSite: string];
  down: [reason: string];
  /** The receiver asked for the LUNs to be offered again (its LUNs changed). */
  reoffer: [];
}

export class MirrorPool extends EventEmitter<PoolEvents> implements MirrorLink {
  readonly elements: PeerConnection[];
  state: PoolState = 'down';
  peerSite = '';
  private next = 0;
  private generation = 0;
  /** Why the session last went down (for the LUNs' state reasons). */
  downReason = '';
  private lastFailure = '';

  constructor(private readonly opts: PoolOptions, private readonly transport: MirrorTransport, private readonly log: Logger) {
    super();
    this.elements = Array.from({ length: opts.connections }, (_, i) => new PeerConnection(i));
    for (const e of this.elements) {
      e.onControl = (code) => {
        if (code === CONTROL.REOFFER && this.state === 'up') this.emit('reoffer');
      };
    }
  }

  /** Open all n connections with a fresh session id; resolves true when the session is up. */
  async connect(offers: LunOffer[]): Promise<boolean> {
    if (this.state !== 'down') return this.state === 'up';
    this.state = 'connecting';
    const generation = ++this.generation;
    const session = crypto.randomBytes(8);
    const hello = encodeHello({ kind: HELLO_OFFER, site: this.opts.site, session, offers, answers: [] });
    const onDown = (reason: string) => this.teardown(generation, reason);
    try {
      const hellos = await Promise.all(this.elements.map((e) =>
        e.open(this.transport, this.opts.peerHost, this.opts.peerPort, hello, this.opts.connectTimeoutMs, onDown)));
      const answer = hellos[0];
      if (answer.kind !== HELLO_ANSWER) throw new Error('peer did not answer with a mirror hello');
      if (answer.site === this.opts.site) throw new Error(`peer calls itself "${answer.site}", as this site does: refusing to mirror to ourselves`);
      if (this.opts.peerSite && answer.site !== this.opts.peerSite) {
        throw new Error(`peer is site "${answer.site}", expected "${this.opts.peerSite}"`);
      }
      if (generation !== this.generation) return false;
      this.state = 'up';
      this.peerSite = answer.site;
      this.emit('up', answer.answers, answer.site);
      return true;
    } catch (err) {
      this.teardown(generation, (err as Error).message);
      return false;
    }
  }

  /** Send on the least busy connection that is up; fails at once with ENOTCONN if none is. */
  send(op: MirrorOp): void {
    if (this.state !== 'up') {
      queueMicrotask(() => op.done(ENOTCONN));
      return;
    }
    const n = this.elements.length;
    let best: PeerConnection | null = null;
    for (let i = 0; i < n; i++) {
      const e = this.elements[(this.next + i) % n];
      if (e.status === 'up' && (best === null || e.inflight < best.inflight)) best = e;
    }
    this.next = (this.next + 1) % n;
    if (!best) {
      queueMicrotask(() => op.done(ENOTCONN));
      return;
    }
    best.send(op);
  }

  /** Bring the whole session down (link declared dead, or shutting down). */
  disconnect(reason: string): void {
    this.teardown(this.generation, reason);
  }

  private teardown(generation: number, reason: string): void {
    if (generation !== this.generation || this.state === 'down') return;
    const wasUp = this.state === 'up';
    this.state = 'down';
    this.downReason = reason;
    this.generation++;
    for (const e of this.elements) e.close(reason);
    const peer = `${this.opts.peerHost}:${this.opts.peerPort}`;
    if (wasUp) this.log.warn('mirror link down', { peer, reason });
    else if (reason !== this.lastFailure) this.log.warn('mirror connect failed', { peer, reason });   // once per new reason
    else this.log.debug('mirror connect failed', { peer, reason });
    this.lastFailure = wasUp ? '' : reason;
    this.emit('down', reason);
  }
}
