// UDP heartbeats between the two sites of a mirror.
//
// Each site sends one datagram every intervalMs to the peer's mirror host, at the port number
// of the peer's mirror TCP listener (mirror.peer.port), and receives the peer's datagrams on a
// UDP socket bound to its own mirror listen host:port (TCP and UDP ports are separate
// namespaces, so the mirror listener and this socket share the number without conflict).
// The source address of a datagram is not checked (NAT, test proxies): the site name is.
//
// Datagram (cold structure, buffer-layout; all integers big-endian):
//
//   offset  size  field
//        0     8  magic        "NBDMHB01"
//        8     2  version      1
//       10     2  flags        0 (reserved: a later version signs the datagram with an HMAC and
//                              announces it here; this version sends 0 and ignores the field)
//       12     8  counter      per sender: 1 for the first datagram, +1 per datagram
//       20     8  sentAtMs     sender's wall clock (ms since the epoch) when sending
//       28     8  echoCounter  last counter accepted from the peer, 0 if none yet
//       36     4  echoHeldMs   ms between accepting that datagram and sending this one
//       40     2  siteLen      length of the site name in bytes, at most 128
//       42     n  site         sender's site name, UTF-8
//
// The datagram is exactly 42 + siteLen bytes. u64 fields must be below 2^53.
//
// The receiver ignores, and counts by reason (stats.ignored, event 'ignored'):
//   length   shorter than the header, or not exactly 42 + siteLen bytes
//   magic    wrong magic
//   version  a version other than 1
//   siteLen  siteLen above 128
//   range    a u64 field at or above 2^53
//   utf8     a site name that is not valid UTF-8
//   site     a site name other than the expected peer (peerSite; if peerSite is '', any name
//            but our own is accepted)
//   replay   a counter not greater than the last one accepted from the peer — a duplicate or
//            a replayed datagram — unless it is a counter reset (below).
//
// Counter reset: a restarted peer counts from 1 again. A datagram with a LOWER counter than
// the last accepted one is accepted (and the peer considered restarted) only if its sentAtMs
// is later than the sentAtMs of the last accepted datagram. An equal counter is always a
// duplicate. This relies on the peer's wall clock not stepping backwards across a restart
// (if it does, its datagrams are ignored as replays until its counter passes the old one).
// A higher counter is always accepted, whatever its sentAtMs: after a reset, datagrams captured
// before the restart (higher counters) would be accepted again if replayed. Without
// authentication anyone who can reach the port can forge any of this anyway, including a
// "restart"; a later version adds an HMAC over the datagram (announced in `flags`) to make
// counter and sentAtMs unforgeable (it should also cover that pre-restart replay, e.g. with a
// per-boot nonce in the signed data).
//
// Round-trip time: each datagram echoes the last counter we accepted from the peer and how long
// it was held. We remember the send time of our recent counters (a small ring), so on an echo
// rtt = now - sendTime(echoCounter) - echoHeldMs (monotonic clock on our side; the peer's
// hold time is floored to whole ms, so the result is never below the true value).
import { isUtf8 } from 'node:buffer';
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import lo from 'buffer-layout';
import type { Logger } from '../log.js';

export const HEARTBEAT_MAGIC = Buffer.from('NBDMHB01', 'latin1');
export const HEARTBEAT_VERSION = 1;
export const HEARTBEAT_HEADER_SIZE = 42;
export const HEARTBEAT_MAX_SITE_BYTES = 128;
const MAX_U32 = 0xffffffff;

interface HeartbeatHeader {
  magic: Buffer; version: number; flags: number; counter: number; sentAtMs: number;
  echoCounter: number; echoHeldMs: number; siteLen: number;
}

const header = lo.struct<HeartbeatHeader>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.u16be('flags'), lo.nu64be('counter'), lo.nu64be('sentAtMs'),
  lo.nu64be('echoCounter'), lo.u32be('echoHeldMs'), lo.u16be('siteLen'),
]);
if (header.span !== HEARTBEAT_HEADER_SIZE) throw new Error(`heartbeat header is ${header.span} bytes`);

/** Offsets of the u64 fields, checked for the 2^53 limit before decoding. */
const U64_OFFSETS = [12, 20, 28];

/** One decoded heartbeat datagram. */
export interface HeartbeatDatagram {
  version: number;
  flags: number;
  counter: number;
  sentAtMs: number;
  echoCounter: number;
  echoHeldMs: number;
  site: string;
}

export type HeartbeatInput = Omit<HeartbeatDatagram, 'version' | 'flags'> & { flags?: number };

/** Encode a datagram; throws RangeError on values the format cannot carry. */
export function encodeHeartbeat(d: HeartbeatInput): Buffer {
  const site = Buffer.from(d.site, 'utf8');
  if (site.length > HEARTBEAT_MAX_SITE_BYTES) throw new RangeError(`site name of ${site.length} bytes (at most ${HEARTBEAT_MAX_SITE_BYTES})`);
  for (const k of ['counter', 'sentAtMs', 'echoCounter'] as const) {
    if (!Number.isSafeInteger(d[k]) || d[k] < 0) throw new RangeError(`heartbeat ${k} ${d[k]} is not an integer in [0, 2^53)`);
  }
  if (!Number.isInteger(d.echoHeldMs) || d.echoHeldMs < 0 || d.echoHeldMs > MAX_U32) {
    throw new RangeError(`heartbeat echoHeldMs ${d.echoHeldMs} is not a u32`);
  }
  const flags = d.flags ?? 0;
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw new RangeError(`heartbeat flags ${flags} is not a u16`);
  const out = Buffer.alloc(HEARTBEAT_HEADER_SIZE + site.length);
  header.encode({
    magic: HEARTBEAT_MAGIC, version: HEARTBEAT_VERSION, flags, counter: d.counter, sentAtMs: d.sentAtMs,
    echoCounter: d.echoCounter, echoHeldMs: d.echoHeldMs, siteLen: site.length,
  }, out);
  site.copy(out, HEARTBEAT_HEADER_SIZE);
  return out;
}

export type HeartbeatParse = { ok: true; datagram: HeartbeatDatagram } | { ok: false; reason: string };

/** Decode a datagram, or say why it is not one (reasons as in the file header). */
export function parseHeartbeat(buf: Buffer): HeartbeatParse {
  if (buf.length < HEARTBEAT_HEADER_SIZE) return { ok: false, reason: 'length' };
  const h = header.decode(buf);
  if (!h.magic.equals(HEARTBEAT_MAGIC)) return { ok: false, reason: 'magic' };
  if (h.version !== HEARTBEAT_VERSION) return { ok: false, reason: 'version' };
  if (h.siteLen > HEARTBEAT_MAX_SITE_BYTES) return { ok: false, reason: 'siteLen' };
  if (buf.length !== HEARTBEAT_HEADER_SIZE + h.siteLen) return { ok: false, reason: 'length' };
  if (U64_OFFSETS.some((at) => buf.readUInt32BE(at) >= 0x200000)) return { ok: false, reason: 'range' };
  if (!isUtf8(buf.subarray(HEARTBEAT_HEADER_SIZE))) return { ok: false, reason: 'utf8' };
  return {
    ok: true,
    datagram: {
      version: h.version, flags: h.flags, counter: h.counter, sentAtMs: h.sentAtMs, echoCounter: h.echoCounter,
      echoHeldMs: h.echoHeldMs, site: buf.toString('utf8', HEARTBEAT_HEADER_SIZE),
    },
  };
}

/** Decode a datagram; null for anything that does not parse exactly. */
export function decodeHeartbeat(buf: Buffer): HeartbeatDatagram | null {
  const r = parseHeartbeat(buf);
  return r.ok ? r.datagram : null;
}

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
   * The shared mirror key (mirror.credentials.pskFile): datagrams are signed with HMAC-SHA256
   * under it and unsigned or badly signed ones ignored. null: unauthenticated (mirror.tls "off"
   * without a key file).
   */
  key?: Buffer | null;
}

export interface HeartbeatStats {
  /** Datagrams handed to the socket. */
  sent: number;
  /** Datagrams accepted from the peer. */
  received: number;
  /** Datagrams ignored, by reason (see the file header). */
  ignored: Record<string, number>;
  /** Wall clock (ms since the epoch) of the last accepted datagram. */
  lastReceivedMs: number | null;
  /** Last round-trip time measured from an echo. */
  rttMs: number | null;
  /** Sends that failed (unreachable peer, unresolvable host, ...): counted, never thrown. */
  sendErrors: number;
  /** Counter resets accepted (the peer restarted). */
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

/** Send times of our recent counters, for the round-trip time. */
const RING_SIZE = 32;

export class Heartbeat extends EventEmitter<HeartbeatEvents> {
  readonly stats: HeartbeatStats = {
    sent: 0, received: 0, ignored: {}, lastReceivedMs: null, rttMs: null, sendErrors: 0, peerRestarts: 0,
  };
  private socket: dgram.Socket | null = null;
  private timer: NodeJS.Timeout | null = null;
  private counter = 0;
  private peerHost: string;
  private peerPort: number;
  /** counter → monotonic send time, indexed by counter % RING_SIZE. */
  private readonly ring: { counter: number; at: number }[] =
    Array.from({ length: RING_SIZE }, () => ({ counter: 0, at: 0 }));
  /** The last datagram accepted from the peer. */
  private last: { counter: number; sentAtMs: number; receivedAt: number } | null = null;
  private readonly logged = new Set<string>();

  constructor(private readonly opts: HeartbeatOptions, private readonly log: Logger) {
    super();
    if (!Number.isFinite(opts.intervalMs) || opts.intervalMs < 1) throw new RangeError(`heartbeat intervalMs ${opts.intervalMs}: must be at least 1`);
    if (Buffer.byteLength(opts.site, 'utf8') > HEARTBEAT_MAX_SITE_BYTES) throw new RangeError('site name longer than 128 bytes');
    this.peerHost = opts.peerHost;
    this.peerPort = opts.peerPort;
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
    socket.on('message', (msg) => this.receive(msg));
    socket.on('error', (err) => {
      // Asynchronous socket errors (e.g. ICMP port unreachable reported on some platforms).
      this.stats.sendErrors++;
      this.log.debug('heartbeat socket error', { error: err.message });
    });
    this.socket = socket;
    const addr = socket.address();
    this.log.info('heartbeat started', {
      bind: `${addr.address}:${addr.port}`, peer: `${this.peerHost}:${this.peerPort}`, intervalMs: this.opts.intervalMs,
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
    const held = this.last ? Math.min(MAX_U32, Math.max(0, Math.floor(mono - this.last.receivedAt))) : 0;
    const dgramBuf = encodeHeartbeat({
      counter, sentAtMs: Date.now(), echoCounter: this.last?.counter ?? 0, echoHeldMs: held, site: this.opts.site,
    });
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

  private receive(msg: Buffer): void {
    const parsed = parseHeartbeat(msg);
    if (!parsed.ok) return this.ignore(parsed.reason, {});
    const d = parsed.datagram;
    const { site, peerSite } = this.opts;
    if (peerSite ? d.site !== peerSite : d.site === site) {
      return this.ignore('site', { site: d.site, expected: peerSite || `any but "${site}"` });
    }
    const last = this.last;
    let restarted = false;
    if (last && d.counter <= last.counter) {
      if (d.counter === last.counter || d.sentAtMs <= last.sentAtMs) {
        return this.ignore('replay', { counter: d.counter, lastCounter: last.counter });
      }
      restarted = true;
    }
    const mono = performance.now();
    const now = Date.now();
    this.last = { counter: d.counter, sentAtMs: d.sentAtMs, receivedAt: mono };
    this.stats.received++;
    this.stats.lastReceivedMs = now;
    if (restarted) {
      this.stats.peerRestarts++;
      this.log.info('peer heartbeat counter reset: the peer restarted', { site: d.site, counter: d.counter, previous: last!.counter });
    }
    if (d.echoCounter > 0) {
      const slot = this.ring[d.echoCounter % RING_SIZE];
      if (slot.counter === d.echoCounter) {
        const rtt = mono - slot.at - d.echoHeldMs;
        if (rtt >= 0) this.stats.rttMs = Math.round(rtt * 1000) / 1000;
      }
    }
    this.emit('beat', now);
  }

  private ignore(reason: string, meta: Record<string, unknown>): void {
    this.stats.ignored[reason] = (this.stats.ignored[reason] ?? 0) + 1;
    this.logOnce(`ignored:${reason}`, 'heartbeat datagram ignored', { reason, ...meta });
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
