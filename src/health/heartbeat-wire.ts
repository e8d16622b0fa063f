// The heartbeat datagram: layout, encoding, decoding and authentication (protocol: docs/heartbeat.md).
import { isUtf8 } from 'node:buffer';
import { createHmac, createSecretKey, hkdfSync, timingSafeEqual, type KeyObject } from 'node:crypto';
import lo from 'buffer-layout';

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
/** HKDF info of the heartbeat key (docs/heartbeat.md). */
export const HEARTBEAT_KEY_INFO = 'nbd-mirror heartbeat v1';
/** The shortest pre-shared key accepted (as for the mirror's TLS PSK). */
export const HEARTBEAT_MIN_KEY_BYTES = 16;
export const HEARTBEAT_MAX_U32 = 0xffffffff;
/** echoNonce of a datagram that echoes nothing yet (and never a boot nonce). */
export const HEARTBEAT_ZERO_NONCE = Buffer.alloc(HEARTBEAT_NONCE_SIZE);

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
 * The heartbeat key, derived once from the mirror's pre-shared key (HKDF, docs/heartbeat.md):
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
  if (!Number.isInteger(d.echoHeldMs) || d.echoHeldMs < 0 || d.echoHeldMs > HEARTBEAT_MAX_U32) {
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
    (d.echoNonce ?? HEARTBEAT_ZERO_NONCE).copy(out, siteEnd + HEARTBEAT_NONCE_SIZE);
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
 * Decode a datagram's structure, or say why it is not one (reasons: docs/heartbeat.md). The
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
