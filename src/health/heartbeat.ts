// UDP heartbeats between the two sites of a mirror.
//
// Each site sends one datagram every intervalMs to the peer's mirror host, at the port number
// of the peer's mirror TCP listener (mirror.peer.port), and receives the peer's datagrams on a
// UDP socket bound to its own mirror listen host:port (TCP and UDP ports are separate
// namespaces, so the mirror listener and this socket share the number without conflict).
// The source address of a datagram is not checked (NAT, test proxies): the site name and,
// with a key, the MAC are.
//
// Datagram (cold structure, buffer-layout; all integers big-endian):
//
//   offset  size  field
//        0     8  magic        "NBDMHB01"
//        8     2  version      1
//       10     2  flags        bit 0 (0x0001) SIGNED: the authentication trailer follows the
//                              site name; the other bits are reserved (sent as 0, ignored)
//       12     8  counter      per sender boot: 1 for the first datagram, +1 per datagram
//       20     8  sentAtMs     sender's wall clock (ms since the epoch) when sending
//       28     8  echoCounter  counter of the peer's datagram echoed (below), 0 if none yet
//       36     4  echoHeldMs   ms between receiving that datagram and sending this one
//       40     2  siteLen      length of the site name in bytes, at most 128
//       42     n  site         sender's site name, UTF-8
//   Authentication trailer, only when SIGNED:
//     42+n     8  nonce        random per sender boot (chosen when the endpoint is created;
//                              never all zero)
//     50+n     8  echoNonce    nonce of the peer's datagram echoed, 0 if none yet
//     58+n    32  mac          HMAC-SHA256 over bytes [0, 58+n) under the heartbeat key
//
// The datagram is exactly 42 + siteLen bytes unsigned, 90 + siteLen signed. u64 fields must be
// below 2^53. The heartbeat key is HKDF-SHA256(ikm = the mirror's pre-shared key
// (mirror.credentials.pskFile, the same at both sites), salt = none, info =
// "nbd-mirror heartbeat v1", 32 bytes): a key of its own, not the TLS PSK itself.
//
// With a key (HeartbeatOptions.key), every datagram sent is SIGNED, and a datagram is trusted
// only once its MAC verifies (crypto.timingSafeEqual, one HMAC per datagram): before that only
// its structure is checked (the reasons length to utf8 below, which locate the MAC); nothing in
// it (site name, counter, sentAtMs, echo fields, nonce) influences any state. Without a key,
// datagrams are sent unsigned and signed ones are ignored: a mismatched configuration (a key at
// one site only, or different keys) is ignored and counted as 'auth', and logged at warn once
// per kind, not per datagram. (A version without SIGNED counts signed datagrams as 'length'.)
//
// The receiver ignores, and counts by reason (stats.ignored, event 'ignored'):
//   length   shorter than the header, or not exactly 42 + siteLen (+ 48 if SIGNED) bytes
//   magic    wrong magic
//   version  a version other than 1
//   siteLen  siteLen above 128
//   range    a u64 field at or above 2^53
//   utf8     a site name that is not valid UTF-8
//   auth     with a key: unsigned, or a MAC that does not verify (another key, forged or
//            corrupted); without a key: signed
//   site     a site name other than the expected peer (peerSite; if peerSite is '', any name
//            but our own is accepted)
//   replay   not fresh by the rules below: a duplicate, a replayed datagram, a datagram of an
//            earlier peer boot
//   unproven (with a key) a datagram of a peer boot never accepted yet, while no peer boot is
//            known (we just started) and it does not echo us (below). Normal for the first
//            datagram or two after either site starts (the peer has not heard us yet); it
//            persists when the peer does not receive our heartbeats (warned once after 5 in a
//            row), or when someone replays an earlier boot's datagrams.
//
// Freshness with a key (authenticated: the counter, sentAtMs, nonce and echo fields can only
// come from a holder of the key). We remember the current peer boot: its nonce, the last
// counter and sentAtMs accepted from it; and the nonces of up to 16 earlier peer boots.
//   - Current nonce: accepted only with a counter greater than the last one accepted. Captured
//     datagrams of the current boot replayed later are duplicates or older: 'replay'.
//   - An earlier boot's nonce (one we accepted before and then replaced): never again, 'replay'.
//   - A new nonce (the peer restarted, or the first datagram we hear): accepted, and from then on
//     the current boot, only if it is provably fresh:
//       (a) it echoes our own nonce with a counter we sent among our last 32 datagrams: it was
//           made after we sent that one (at most 32 intervals ago) — no clock involved; or
//       (b) a peer boot is known and its sentAtMs is later than the sentAtMs of the last
//           datagram accepted: a restart seen at once, even while our datagrams do not reach the
//           peer. Assumes the peer's wall clock does not step backwards across its restart; if
//           it does, (a) still accepts the new boot as soon as the peer hears us (meanwhile its
//           datagrams count as 'replay').
//     Otherwise 'replay' if a peer boot is known (older sentAtMs: a replay of an earlier boot),
//     else 'unproven': after our own restart we know no boot, so only (a) can prove one —
//     which is what keeps datagrams captured from any earlier peer boot out.
//   A forged datagram fails the MAC. So spoofed or replayed datagrams never count as a beat:
//   they cannot keep a dead link up nor start or complete a probation.
// What authentication does not bound is delay: a genuine datagram that never reached us (held
// back by someone on the path) is accepted once if delivered later while its counter is still
// ahead of the last accepted one (and its boot still current). Only what the peer really sent
// can be delivered that way, each datagram once.
//
// Freshness without a key (nothing can be authenticated: anyone who can reach the port can
// forge any datagram, including a "restart"): a counter not greater than the last accepted is
// 'replay', unless it is a counter reset: a datagram with a LOWER counter than the last accepted
// one is accepted (and the peer considered restarted) only if its sentAtMs is later than the
// sentAtMs of the last accepted datagram. An equal counter is always a duplicate. This relies on
// the peer's wall clock not stepping backwards across a restart (if it does, its datagrams are
// ignored as replays until its counter passes the old one). A higher counter is always
// accepted, whatever its sentAtMs.
//
// Echo: each datagram echoes the last datagram we accepted from the peer (counter and, signed,
// nonce) and how long it was held. With a key, while no peer boot has been accepted yet, it
// echoes the authenticated 'unproven' datagram with the latest sentAtMs instead: that is how
// the first contact proves itself by (a) in both directions (each side echoes the other before
// accepting it; a replay of an older boot cannot displace a newer datagram from the echo).
// With a key, accepting a new peer boot (first contact or restart) sends one datagram at once,
// out of schedule (with its 'tick'), so that the peer gets its proof within a round trip
// instead of an interval. Replays never trigger it (they are not accepted).
//
// Round-trip time: we remember the send time of our recent counters (a small ring), so on an
// echo of one of them (with a key: echoNonce = our nonce) rtt = now - sendTime(echoCounter) -
// echoHeldMs (monotonic clock on our side; the peer's hold time is floored to whole ms, so the
// result is never below the true value). Taken, like everything else, from accepted datagrams.
import { isUtf8 } from 'node:buffer';
import { createHmac, createSecretKey, hkdfSync, randomBytes, timingSafeEqual, type KeyObject } from 'node:crypto';
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
/** flags bit: the authentication trailer (nonce, echoNonce, mac) follows the site name. */
export const HEARTBEAT_FLAG_SIGNED = 0x0001;
export const HEARTBEAT_NONCE_SIZE = 8;
export const HEARTBEAT_MAC_SIZE = 32;
/** nonce + echoNonce + mac. */
export const HEARTBEAT_TRAILER_SIZE = 2 * HEARTBEAT_NONCE_SIZE + HEARTBEAT_MAC_SIZE;
/** HKDF info of the heartbeat key (see the file header). */
export const HEARTBEAT_KEY_INFO = 'nbd-mirror heartbeat v1';
/** The shortest pre-shared key accepted (as for the mirror's TLS PSK). */
export const HEARTBEAT_MIN_KEY_BYTES = 16;
const MAX_U32 = 0xffffffff;
const ZERO_NONCE = Buffer.alloc(HEARTBEAT_NONCE_SIZE);

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

/** The authentication trailer of a signed datagram. */
export interface HeartbeatAuth {
  /** The sender's boot nonce. */
  nonce: Buffer;
  /** The nonce of the datagram echoed by echoCounter (zero if none). */
  echoNonce: Buffer;
  /** HMAC-SHA256 over everything before it (verified by authenticateHeartbeat, not by parseHeartbeat). */
  mac: Buffer;
}

/** One decoded heartbeat datagram. */
export interface HeartbeatDatagram {
  version: number;
  flags: number;
  counter: number;
  sentAtMs: number;
  echoCounter: number;
  echoHeldMs: number;
  site: string;
  /** The trailer if the datagram is SIGNED, else null. */
  auth: HeartbeatAuth | null;
}

export type HeartbeatInput = Omit<HeartbeatDatagram, 'version' | 'flags' | 'auth'> & {
  /** Reserved bits; SIGNED is set by signing (encodeHeartbeat with a key), never here. */
  flags?: number;
  /** Signed datagrams only: the sender's boot nonce (required with a key). */
  nonce?: Buffer;
  /** Signed datagrams only: the echoed datagram's nonce (default: zero). */
  echoNonce?: Buffer;
};

/**
 * The heartbeat key, derived once from the mirror's pre-shared key (HKDF, see the file header):
 * signs and verifies datagrams. One HMAC per datagram; nothing else is computed per datagram.
 */
export class HeartbeatKey {
  private readonly key: KeyObject;

  constructor(psk: Buffer) {
    if (!Buffer.isBuffer(psk) || psk.length < HEARTBEAT_MIN_KEY_BYTES) {
      throw new RangeError(`heartbeat key of ${Buffer.isBuffer(psk) ? psk.length : 0} bytes: at least ${HEARTBEAT_MIN_KEY_BYTES} needed`);
    }
    this.key = createSecretKey(Buffer.from(hkdfSync('sha256', psk, Buffer.alloc(0), HEARTBEAT_KEY_INFO, 32)));
  }

  /** HMAC-SHA256 of `data`. */
  mac(data: Buffer): Buffer {
    return createHmac('sha256', this.key).update(data).digest();
  }

  /** Does the last HEARTBEAT_MAC_SIZE bytes of `datagram` authenticate the rest? (constant time) */
  verify(datagram: Buffer): boolean {
    if (datagram.length < HEARTBEAT_MAC_SIZE) return false;
    const at = datagram.length - HEARTBEAT_MAC_SIZE;
    return timingSafeEqual(this.mac(datagram.subarray(0, at)), datagram.subarray(at));
  }
}

function checkNonce(name: string, n: Buffer | undefined): void {
  if (!Buffer.isBuffer(n) || n.length !== HEARTBEAT_NONCE_SIZE) throw new RangeError(`heartbeat ${name} must be ${HEARTBEAT_NONCE_SIZE} bytes`);
}

/**
 * Encode a datagram; with a key, SIGNED (d.nonce required). Throws RangeError on values the
 * format cannot carry.
 */
export function encodeHeartbeat(d: HeartbeatInput, key?: HeartbeatKey | null): Buffer {
  const site = Buffer.from(d.site, 'utf8');
  if (site.length > HEARTBEAT_MAX_SITE_BYTES) throw new RangeError(`site name of ${site.length} bytes (at most ${HEARTBEAT_MAX_SITE_BYTES})`);
  for (const k of ['counter', 'sentAtMs', 'echoCounter'] as const) {
    if (!Number.isSafeInteger(d[k]) || d[k] < 0) throw new RangeError(`heartbeat ${k} ${d[k]} is not an integer in [0, 2^53)`);
  }
  if (!Number.isInteger(d.echoHeldMs) || d.echoHeldMs < 0 || d.echoHeldMs > MAX_U32) {
    throw new RangeError(`heartbeat echoHeldMs ${d.echoHeldMs} is not a u32`);
  }
  let flags = d.flags ?? 0;
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) throw new RangeError(`heartbeat flags ${flags} is not a u16`);
  if (flags & HEARTBEAT_FLAG_SIGNED) throw new RangeError('heartbeat flag SIGNED is set by signing (pass a key), not by flags');
  const siteEnd = HEARTBEAT_HEADER_SIZE + site.length;
  let out: Buffer;
  if (key) {
    checkNonce('nonce', d.nonce);
    if (d.echoNonce !== undefined) checkNonce('echoNonce', d.echoNonce);
    flags |= HEARTBEAT_FLAG_SIGNED;
    out = Buffer.alloc(siteEnd + HEARTBEAT_TRAILER_SIZE);
    d.nonce!.copy(out, siteEnd);
    (d.echoNonce ?? ZERO_NONCE).copy(out, siteEnd + HEARTBEAT_NONCE_SIZE);
  } else {
    if (d.nonce !== undefined || d.echoNonce !== undefined) throw new RangeError('heartbeat nonces are only carried by signed datagrams');
    out = Buffer.alloc(siteEnd);
  }
  header.encode({
    magic: HEARTBEAT_MAGIC, version: HEARTBEAT_VERSION, flags, counter: d.counter, sentAtMs: d.sentAtMs,
    echoCounter: d.echoCounter, echoHeldMs: d.echoHeldMs, siteLen: site.length,
  }, out);
  site.copy(out, HEARTBEAT_HEADER_SIZE);
  if (key) {
    const macAt = out.length - HEARTBEAT_MAC_SIZE;
    key.mac(out.subarray(0, macAt)).copy(out, macAt);
  }
  return out;
}

export type HeartbeatParse =
  | { ok: true; datagram: HeartbeatDatagram }
  | { ok: false; reason: string; detail?: 'unsigned' | 'signed' | 'mac' };

/**
 * Decode a datagram's structure, or say why it is not one (reasons as in the file header). The
 * MAC of a signed datagram is NOT verified here: use authenticateHeartbeat before trusting it.
 */
export function parseHeartbeat(buf: Buffer): HeartbeatParse {
  if (buf.length < HEARTBEAT_HEADER_SIZE) return { ok: false, reason: 'length' };
  const h = header.decode(buf);
  if (!h.magic.equals(HEARTBEAT_MAGIC)) return { ok: false, reason: 'magic' };
  if (h.version !== HEARTBEAT_VERSION) return { ok: false, reason: 'version' };
  if (h.siteLen > HEARTBEAT_MAX_SITE_BYTES) return { ok: false, reason: 'siteLen' };
  const signed = (h.flags & HEARTBEAT_FLAG_SIGNED) !== 0;
  const siteEnd = HEARTBEAT_HEADER_SIZE + h.siteLen;
  if (buf.length !== siteEnd + (signed ? HEARTBEAT_TRAILER_SIZE : 0)) return { ok: false, reason: 'length' };
  if (U64_OFFSETS.some((at) => buf.readUInt32BE(at) >= 0x200000)) return { ok: false, reason: 'range' };
  if (!isUtf8(buf.subarray(HEARTBEAT_HEADER_SIZE, siteEnd))) return { ok: false, reason: 'utf8' };
  const echoNonceAt = siteEnd + HEARTBEAT_NONCE_SIZE;
  const macAt = echoNonceAt + HEARTBEAT_NONCE_SIZE;
  return {
    ok: true,
    datagram: {
      version: h.version, flags: h.flags, counter: h.counter, sentAtMs: h.sentAtMs, echoCounter: h.echoCounter,
      echoHeldMs: h.echoHeldMs, site: buf.toString('utf8', HEARTBEAT_HEADER_SIZE, siteEnd),
      auth: signed
        ? {
          nonce: Buffer.from(buf.subarray(siteEnd, echoNonceAt)),
          echoNonce: Buffer.from(buf.subarray(echoNonceAt, macAt)),
          mac: Buffer.from(buf.subarray(macAt)),
        }
        : null,
    },
  };
}

/**
 * Decode a datagram and authenticate it for a receiver with `key` (null: unauthenticated).
 * With a key, only a signed datagram whose MAC verifies is ok; without one, only an unsigned
 * datagram. Failures are reason 'auth' with a detail: 'unsigned' (we have a key, the datagram
 * is not signed), 'signed' (we have no key, the datagram is signed), 'mac' (bad MAC).
 */
export function authenticateHeartbeat(buf: Buffer, key: HeartbeatKey | null): HeartbeatParse {
  const r = parseHeartbeat(buf);
  if (!r.ok) return r;
  const signed = r.datagram.auth !== null;
  if (!key) return signed ? { ok: false, reason: 'auth', detail: 'signed' } : r;
  if (!signed) return { ok: false, reason: 'auth', detail: 'unsigned' };
  if (!key.verify(buf)) return { ok: false, reason: 'auth', detail: 'mac' };
  return r;
}

/** Decode a datagram (structure only, as parseHeartbeat); null for anything that does not parse exactly. */
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
  /** Datagrams ignored, by reason (see the file header). */
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
    if (this.key) do nonce = randomBytes(HEARTBEAT_NONCE_SIZE); while (nonce.equals(ZERO_NONCE));
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
    const held = echo ? Math.min(MAX_U32, Math.max(0, Math.floor(mono - echo.receivedAt))) : 0;
    const dgramBuf = encodeHeartbeat({
      counter, sentAtMs: Date.now(), echoCounter: echo?.counter ?? 0, echoHeldMs: held, site: this.opts.site,
      ...(this.nonce ? { nonce: this.nonce, echoNonce: echo?.nonce ?? ZERO_NONCE } : {}),
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
    let newBoot = false;
    if (d.auth) {
      // Authenticated: freshness by boot nonce and counter (file header).
      const { nonce } = d.auth;
      if (last?.nonce?.equals(nonce)) {
        if (d.counter <= last.counter) return this.ignore('replay', { ...src, counter: d.counter, lastCounter: last.counter });
      } else if (this.retired.some((n) => n.equals(nonce))) {
        return this.ignore('replay', { ...src, counter: d.counter, nonce: nonce.toString('hex'), why: 'an earlier boot of the peer' });
      } else if (this.echoesUs(d) || (last !== null && d.sentAtMs > last.sentAtMs)) {
        newBoot = true;
      } else if (last) {
        return this.ignore('replay', { ...src, counter: d.counter, nonce: nonce.toString('hex'), why: 'a new boot nonce, sent earlier than the last datagram accepted' });
      } else {
        // No peer boot known (we just started): echo the newest such datagram, so that the peer
        // can prove itself by (a) in its next datagram and our own datagrams can do the same.
        if (this.echo === null || d.sentAtMs >= this.echo.sentAtMs) {
          this.echo = { nonce: Buffer.from(nonce), counter: d.counter, sentAtMs: d.sentAtMs, receivedAt: mono };
        }
        this.unprovenRun++;
        this.log.debug('heartbeat datagram ignored', { reason: 'unproven', ...src, counter: d.counter });
        if (this.unprovenRun >= UNPROVEN_WARN_AFTER) {
          this.logOnce('unproven', 'the peer\'s heartbeats arrive but none echoes ours: does the peer receive our heartbeats (firewall, mirror.peer.host/port at this site)? Replayed datagrams of an earlier boot of the peer look the same',
            { ...src, inARow: this.unprovenRun });
        }
        return this.ignore('unproven', {}, null);
      }
    } else if (last && d.counter <= last.counter) {
      // Unauthenticated: a lower counter sent later is a counter reset.
      if (d.counter === last.counter || d.sentAtMs <= last.sentAtMs) {
        return this.ignore('replay', { ...src, counter: d.counter, lastCounter: last.counter });
      }
      newBoot = true;
    }
    const now = Date.now();
    this.unprovenRun = 0;
    this.last = { nonce: d.auth?.nonce ?? null, counter: d.counter, sentAtMs: d.sentAtMs, receivedAt: mono };
    this.echo = this.last;
    this.stats.received++;
    this.stats.lastReceivedMs = now;
    if (newBoot && last) {
      if (last.nonce) {
        this.retired.push(last.nonce);
        if (this.retired.length > RETIRED_NONCES) this.retired.shift();
      }
      this.stats.peerRestarts++;
      this.log.info(d.auth ? 'peer heartbeat boot nonce changed: the peer restarted' : 'peer heartbeat counter reset: the peer restarted', {
        site: d.site, counter: d.counter, previous: last.counter,
        ...(d.auth ? { nonce: d.auth.nonce.toString('hex'), previousNonce: last.nonce?.toString('hex') } : {}),
      });
    } else if (newBoot) {
      this.log.info('authenticated heartbeats from the peer', { site: d.site, nonce: d.auth!.nonce.toString('hex') });
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
    if (newBoot && this.key) this.send();
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
