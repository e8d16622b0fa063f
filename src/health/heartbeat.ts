// The heartbeat endpoint: one UDP socket that sends a datagram to the peer every intervalMs and
// receives the peer's, echoes them, measures the round-trip time and counts what it ignores.
// The protocol (datagram, authentication, freshness, echo): docs/heartbeat.md.
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Logger } from '../log.js';
import { judgeFreshness, REPLAY_WHY } from './heartbeat-freshness.js';
import {
  authenticateHeartbeat, encodeHeartbeat, HEARTBEAT_MAX_SITE_BYTES, HEARTBEAT_MAX_U32, HEARTBEAT_NONCE_SIZE,
  HEARTBEAT_ZERO_NONCE, HeartbeatKey, type HeartbeatDatagram,
} from './heartbeat-wire.js';

// ---- the heartbeat endpoint ----------------------------------------------------------------

export interface HeartbeatOptions {
  /** This site's name (sent in every datagram). */
  site: string;
  /** Expected peer site name; '' accepts any name but our own. */
  peerSite: string;
  /** Where to receive the peer's datagrams: our mirror listen host and port (0: any free port). */
  bindHost: string;
  port: number;
  /** Where to send: the peer's mirror host and port. */
  peerHost: string;
  peerPort: number;
  intervalMs: number;
  /**
   * The shared mirror key (mirror.credentials.pskFile, at least 16 bytes): datagrams are signed
   * with HMAC-SHA256 under a key derived from it, and unsigned or badly signed ones ignored.
   * null: unauthenticated (mirror.tls "off" without a key file).
   */
  key?: Buffer | null;
}

export interface HeartbeatStats {
  /** Datagrams handed to the socket. */
  sent: number;
  /** Datagrams accepted from the peer. */
  received: number;
  /** Datagrams ignored, by reason (docs/heartbeat.md). */
  ignored: Record<string, number>;
  /** Wall clock (ms since the epoch) of the last accepted datagram. */
  lastReceivedMs: number | null;
  /** Last round-trip time measured from an echo. */
  rttMs: number | null;
  /** Sends that failed (unreachable peer, unresolvable host, ...): counted, never thrown. */
  sendErrors: number;
  /** Peer restarts accepted (a new boot nonce, or without a key a counter reset). */
  peerRestarts: number;
}

export interface HeartbeatEvents {
  /** A valid datagram from the peer was accepted (wall clock, ms since the epoch). */
  beat: [nowMs: number];
  /** A datagram was sent (after every send, wall clock). */
  tick: [nowMs: number];
  /** A datagram was ignored. */
  ignored: [reason: string];
}

/** Send times of our recent counters, for the round-trip time and the echo proof of freshness. */
const RING_SIZE = 32;
/** Nonces of earlier peer boots remembered (never accepted again). */
const RETIRED_NONCES = 16;
/** 'unproven' datagrams in a row (no peer boot known) before a warning. */
const UNPROVEN_WARN_AFTER = 5;

const AUTH_MESSAGES: Record<string, string> = {
  unsigned: 'unsigned heartbeat ignored: this site authenticates heartbeats (mirror.credentials.pskFile) but the peer does not sign them; configure the same pskFile at both sites',
  signed: 'signed heartbeat ignored: the peer signs its heartbeats but this site has no key (mirror.credentials.pskFile); configure the same pskFile at both sites',
  mac: 'heartbeat with a bad MAC ignored: the peer uses another key (mirror.credentials.pskFile differs), or the datagram is forged or corrupted',
};

/** A datagram received from the peer (its boot nonce, counter, sentAtMs and monotonic arrival). */
interface Seen {
  /** The boot's nonce (null without a key). */
  nonce: Buffer | null;
  counter: number;
  sentAtMs: number;
  receivedAt: number;
}

export class Heartbeat extends EventEmitter<HeartbeatEvents> {
  readonly stats: HeartbeatStats = {
    sent: 0, received: 0, ignored: {}, lastReceivedMs: null, rttMs: null, sendErrors: 0, peerRestarts: 0,
  };
  private socket: dgram.Socket | null = null;
  private timer: NodeJS.Timeout | null = null;
  private counter = 0;
  private peerHost: string;
  private peerPort: number;
  private readonly key: HeartbeatKey | null;
  /** Our boot nonce (with a key). */
  private readonly nonce: Buffer | null;
  /** counter → monotonic send time, indexed by counter % RING_SIZE. */
  private readonly ring: { counter: number; at: number }[] =
    Array.from({ length: RING_SIZE }, () => ({ counter: 0, at: 0 }));
  /** The last datagram accepted from the peer (its current boot). */
  private last: Seen | null = null;
  /** The datagram our datagrams echo: `last`, or before any is accepted the newest 'unproven' one. */
  private echo: Seen | null = null;
  /** Nonces of earlier peer boots, oldest first. */
  private readonly retired: Buffer[] = [];
  private unprovenRun = 0;
  private readonly logged = new Set<string>();

  constructor(private readonly opts: HeartbeatOptions, private readonly log: Logger) {
    super();
    if (!Number.isFinite(opts.intervalMs) || opts.intervalMs < 1) throw new RangeError(`heartbeat intervalMs ${opts.intervalMs}: must be at least 1`);
    if (Buffer.byteLength(opts.site, 'utf8') > HEARTBEAT_MAX_SITE_BYTES) throw new RangeError('site name longer than 128 bytes');
    this.peerHost = opts.peerHost;
    this.peerPort = opts.peerPort;
    this.key = opts.key ? new HeartbeatKey(opts.key) : null;
    let nonce: Buffer | null = null;
    if (this.key) do nonce = randomBytes(HEARTBEAT_NONCE_SIZE); while (nonce.equals(HEARTBEAT_ZERO_NONCE));
    this.nonce = nonce;
  }

  /** Are datagrams signed and verified? */
  get authenticated(): boolean {
    return this.key !== null;
  }

  /** A copy of this endpoint's boot nonce (null without a key). */
  get bootNonce(): Buffer | null {
    return this.nonce && Buffer.from(this.nonce);
  }

  /** Bind, send one datagram at once, then one every intervalMs. */
  async start(): Promise<void> {
    if (this.socket) throw new Error('heartbeat already started');
    const { bindHost, port } = this.opts;
    const socket = dgram.createSocket({ type: net.isIPv6(bindHost) ? 'udp6' : 'udp4' });
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('error', reject);
        socket.bind({ address: bindHost, port, exclusive: true }, () => {
          socket.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      try { socket.close(); } catch { /* never bound */ }
      const e = err as NodeJS.ErrnoException;
      const why = e.code === 'EADDRINUSE' ? 'the port is already in use' : e.message;
      throw new Error(`heartbeat: cannot bind UDP ${bindHost}:${port}: ${why}`, { cause: err });
    }
    socket.on('message', (msg, rinfo) => this.receive(msg, rinfo));
    socket.on('error', (err) => {
      // Asynchronous socket errors (e.g. ICMP port unreachable reported on some platforms).
      this.stats.sendErrors++;
      this.log.debug('heartbeat socket error', { error: err.message });
    });
    this.socket = socket;
    const addr = socket.address();
    this.log.info('heartbeat started', {
      bind: `${addr.address}:${addr.port}`, peer: `${this.peerHost}:${this.peerPort}`, intervalMs: this.opts.intervalMs,
      authenticated: this.key !== null, ...(this.nonce ? { nonce: this.nonce.toString('hex') } : {}),
    });
    this.send();
    this.timer = setInterval(() => this.send(), this.opts.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    const socket = this.socket;
    this.socket = null;
    if (!socket) return;
    await new Promise<void>((resolve) => socket.close(() => resolve()));
  }

  /** The bound UDP address (after start). */
  address(): { address: string; port: number } {
    if (!this.socket) throw new Error('heartbeat not started');
    const { address, port } = this.socket.address();
    return { address, port };
  }

  /** Change where datagrams go (e.g. when both ends bind port 0 and learn each other's port later). */
  setPeer(host: string, port: number): void {
    this.peerHost = host;
    this.peerPort = port;
  }

  private send(): void {
    const socket = this.socket;
    if (!socket) return;
    const mono = performance.now();
    const counter = ++this.counter;
    const slot = this.ring[counter % RING_SIZE];
    slot.counter = counter;
    slot.at = mono;
    const echo = this.echo;
    const held = echo ? Math.min(HEARTBEAT_MAX_U32, Math.max(0, Math.floor(mono - echo.receivedAt))) : 0;
    const dgramBuf = encodeHeartbeat({
      counter, sentAtMs: Date.now(), echoCounter: echo?.counter ?? 0, echoHeldMs: held, site: this.opts.site,
      ...(this.nonce ? { nonce: this.nonce, echoNonce: echo?.nonce ?? HEARTBEAT_ZERO_NONCE } : {}),
    }, this.key);
    try {
      socket.send(dgramBuf, this.peerPort, this.peerHost, (err) => {
        if (err) this.sendFailed(err);
      });
      this.stats.sent++;
    } catch (err) {
      // Synchronous failures (bad port, socket closing): never thrown out of the timer.
      this.sendFailed(err as Error);
    }
    this.emit('tick', Date.now());
  }

  private sendFailed(err: Error): void {
    this.stats.sendErrors++;
    this.logOnce(`send:${(err as NodeJS.ErrnoException).code ?? 'error'}`, 'heartbeat send failed',
      { peer: `${this.peerHost}:${this.peerPort}`, error: err.message });
  }

  /**
   * Handle one datagram from the network (the socket's 'message' handler; callable directly, e.g.
   * by tests). Emits 'beat' if it is accepted, 'ignored' otherwise.
   */
  receive(msg: Buffer, from?: { address: string; port: number }): void {
    const src = from ? { from: `${from.address}:${from.port}` } : {};
    // Authenticate first: nothing in the datagram is looked at before its MAC verified.
    const parsed = authenticateHeartbeat(msg, this.key);
    if (!parsed.ok) {
      if (parsed.detail) return this.ignore(parsed.reason, src, `${parsed.reason}:${parsed.detail}`, AUTH_MESSAGES[parsed.detail]);
      return this.ignore(parsed.reason, src);
    }
    const d = parsed.datagram;
    const { site, peerSite } = this.opts;
    if (peerSite ? d.site !== peerSite : d.site === site) {
      return this.ignore('site', { ...src, site: d.site, expected: peerSite || `any but "${site}"` });
    }
    const mono = performance.now();
    const last = this.last;
    const verdict = judgeFreshness(
      { counter: d.counter, sentAtMs: d.sentAtMs, nonce: d.auth?.nonce ?? null, echoesUs: this.echoesUs(d) },
      { last, retired: this.retired, unprovenSentAtMs: this.echo?.sentAtMs ?? null },
    );
    if (!verdict.accept && verdict.reason === 'replay') {
      return this.ignore('replay', verdict.why === 'not-ahead'
        ? { ...src, counter: d.counter, lastCounter: last!.counter }
        : { ...src, counter: d.counter, nonce: d.auth!.nonce.toString('hex'), why: REPLAY_WHY[verdict.why] });
    }
    if (!verdict.accept) return this.unproven(d, mono, src, verdict.echo);
    const now = Date.now();
    this.unprovenRun = 0;
    this.last = { nonce: d.auth?.nonce ?? null, counter: d.counter, sentAtMs: d.sentAtMs, receivedAt: mono };
    this.echo = this.last;
    this.stats.received++;
    this.stats.lastReceivedMs = now;
    if (verdict.boot === 'restart') {
      if (last!.nonce) {
        this.retired.push(last!.nonce);
        if (this.retired.length > RETIRED_NONCES) this.retired.shift();
      }
      this.stats.peerRestarts++;
      this.log.info(d.auth ? 'peer heartbeat boot nonce changed: the peer restarted' : 'peer heartbeat counter reset: the peer restarted', {
        site: d.site, counter: d.counter, previous: last!.counter,
        ...(d.auth ? { nonce: d.auth.nonce.toString('hex'), previousNonce: last!.nonce?.toString('hex') } : {}),
      });
    } else if (verdict.boot === 'first' && d.auth) {
      this.log.info('authenticated heartbeats from the peer', { site: d.site, nonce: d.auth.nonce.toString('hex') });
    }
    if (d.echoCounter > 0 && (!d.auth || d.auth.echoNonce.equals(this.nonce!))) {
      const slot = this.ring[d.echoCounter % RING_SIZE];
      if (slot.counter === d.echoCounter) {
        const rtt = mono - slot.at - d.echoHeldMs;
        if (rtt >= 0) this.stats.rttMs = Math.round(rtt * 1000) / 1000;
      }
    }
    this.emit('beat', now);
    // A new peer boot may be waiting for our echo to prove itself (first contact): answer at
    // once rather than at the next interval. Only genuine new boots get here (not replays).
    if (verdict.boot !== 'same' && this.key) this.send();
  }

  /**
   * No peer boot known (we just started): echo the newest such datagram, so that the peer can
   * prove itself by (a) in its next datagram and our own datagrams can do the same.
   */
  private unproven(d: HeartbeatDatagram, mono: number, src: Record<string, unknown>, echo: boolean): void {
    if (echo) this.echo = { nonce: Buffer.from(d.auth!.nonce), counter: d.counter, sentAtMs: d.sentAtMs, receivedAt: mono };
    this.unprovenRun++;
    this.log.debug('heartbeat datagram ignored', { reason: 'unproven', ...src, counter: d.counter });
    if (this.unprovenRun >= UNPROVEN_WARN_AFTER) {
      this.logOnce('unproven', 'the peer\'s heartbeats arrive but none echoes ours: does the peer receive our heartbeats (firewall, mirror.peer.host/port at this site)? Replayed datagrams of an earlier boot of the peer look the same',
        { ...src, inARow: this.unprovenRun });
    }
    this.ignore('unproven', {}, null);
  }

  /** Does a (verified) datagram echo one of our last RING_SIZE datagrams of this boot? */
  private echoesUs(d: HeartbeatDatagram): boolean {
    if (!d.auth || !this.nonce || d.echoCounter === 0 || !d.auth.echoNonce.equals(this.nonce)) return false;
    return this.ring[d.echoCounter % RING_SIZE].counter === d.echoCounter;
  }

  /**
   * Count an ignored datagram. The first of each kind (logKey, default the reason) is logged at
   * warn, the rest at debug; logKey null: not logged here.
   */
  private ignore(reason: string, meta: Record<string, unknown>, logKey: string | null = reason, message = 'heartbeat datagram ignored'): void {
    this.stats.ignored[reason] = (this.stats.ignored[reason] ?? 0) + 1;
    if (logKey !== null) this.logOnce(`ignored:${logKey}`, message, { reason, ...meta });
    this.emit('ignored', reason);
  }

  /** The first occurrence of each kind at warn, the rest at debug (no log floods). */
  private logOnce(key: string, message: string, meta: Record<string, unknown>): void {
    const first = !this.logged.has(key);
    this.logged.add(key);
    if (first) this.log.warn(message, meta);
    else this.log.debug(message, meta);
  }
}
