// The mirror wire protocol (docs/mirror-protocol.md): hello exchange (cold, buffer-layout) and
// per-request headers (hot, plain Buffer calls). All integers big-endian.
import lo from 'buffer-layout';
import { readU64, writeU64 } from '../net/u64.js';
import { RECORD_FLAG } from '../persist/journal.js';

// 3: an answer carries the secondary's applied point (where the primary resumes).
// 4: and the identity of the secondary's copy (an interrupted initial sync resumes only on the same copy).
export const PROTOCOL_VERSION = 4;
export const HELLO_MAGIC = Buffer.from('NBDMIRR1', 'latin1');
export const REQUEST_MAGIC = 0x4d525251;   // "MRRQ"
export const REPLY_MAGIC = 0x4d525250;     // "MRRP"
/** A reply followed by REPLY_DATA_SIZE bytes (the digest answering a HASH). */
export const REPLY_DATA_MAGIC = 0x4d525244; // "MRRD"
export const REPLY_DATA_SIZE = 32;
/** Largest range one HASH may cover (the receiver reads it whole, in chunks). */
export const MAX_HASH_LENGTH = 1024 * 1024 * 1024;
export const REQUEST_HEADER_SIZE = 40;
export const REPLY_SIZE = 12;
export const MAX_MIRROR_PAYLOAD = 32 * 1024 * 1024;
export const MAX_HELLO_LENGTH = 1024 * 1024;

/**
 * HASH: SHA-256 of [offset, offset+length) once everything up to `dep` is applied (initial sync,
 * verify). SET_GEN: the primary caught up; payload = its generation id (8) and history (n × 8):
 * the secondary adopts them, is consistent again and drops its undo log.
 */
export const MIRROR_OP = { WRITE: 1, WRITE_ZEROES: 2, TRIM: 3, FLUSH: 4, HASH: 5, SET_GEN: 6 } as const;
export const MAX_SET_GEN_PAYLOAD = 8 * 64;
/** A reply with this reqId (never used for requests) is a control message from the receiver. */
export const CONTROL_REQID = 0;
/** Control codes (in the errno field): the receiver's LUNs changed, offer them again. */
export const CONTROL = { REOFFER: 1 } as const;
/** Answer to a request for a LUN the receiver no longer has (a reload removed it): not a device error. */
export const ESTALE = 116;
/** RESYNC: part of a resync or initial sync (the secondary is inconsistent until SET_GEN). */
// The journal stores these flags verbatim, so both name the same values.
export const MIRROR_FLAG = RECORD_FLAG;

/** Why the receiver refuses to pair a LUN (sent back in its hello). */
export const PAIR = {
  OK: 0, MISSING: 1, NOT_SECONDARY: 2, SMALLER: 3, DUPLICATE: 4, SPLIT_BRAIN: 5, PEER_NEWER: 6, STALE_PRIMARY: 7,
} as const;
export const PAIR_REASON: Record<number, string> = {
  [PAIR.OK]: 'ok',
  [PAIR.SPLIT_BRAIN]: 'split brain: both sites wrote as primary while apart; run `nbd-mirror resolve LUN --discard-local|--discard-remote`',
  [PAIR.PEER_NEWER]: 'the peer\'s copy is newer than this primary (it was promoted): demote this LUN, or resolve',
  [PAIR.STALE_PRIMARY]: 'the peer still has this LUN as a primary, with older data: demote it there',
  [PAIR.MISSING]: 'no LUN of that name on the peer',
  [PAIR.NOT_SECONDARY]: 'the peer\'s LUN of that name is not a secondary',
  [PAIR.SMALLER]: 'the peer\'s LUN is smaller than the primary',
  [PAIR.DUPLICATE]: 'another connection session already feeds this LUN',
};

// ---- hello (length-prefixed: u32 length, then body) -----------------------------------------

const helloFixed = lo.struct<{ magic: Buffer; version: number; kind: number; session: Buffer; siteLen: number }>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.u16be('kind'), lo.blob(8, 'session'), lo.u16be('siteLen'),
]);
const offerEntry = lo.struct<{
  id: number; size: number; instance: Buffer; nextSeq: number; current: Buffer; peerBase: Buffer; flags: number; historyLen: number; nameLen: number;
}>([
  lo.u16be('id'), lo.nu64be('size'), lo.blob(8, 'instance'), lo.nu64be('nextSeq'), lo.blob(8, 'current'), lo.blob(8, 'peerBase'),
  lo.u16be('flags'), lo.u8('historyLen'), lo.u16be('nameLen'),
]);
const answerEntry = lo.struct<{ id: number; status: number; size: number; sync: number; current: Buffer; applied: number; copy: Buffer }>([
  lo.u16be('id'), lo.u16be('status'), lo.nu64be('size'), lo.u8('sync'), lo.blob(8, 'current'), lo.nu64be('applied'), lo.blob(8, 'copy'),
]);
export const MAX_HISTORY = 16;
/** Offer flags. FORCE: `resolve --discard-remote` was run here: the peer must take our data. */
export const OFFER_FLAG = { FORCE: 1 } as const;
/** How an accepted pairing catches up: from the primary's journal/bitmap, or comparing every region. */
export const SYNC = { INCREMENTAL: 0, FULL: 1 } as const;
const count = lo.u16be();

export const HELLO_OFFER = 1;   // from the sender (pool side)
export const HELLO_ANSWER = 2;  // from the receiver (listener side)

/** Generation ids travel as 16 hex digits (8 bytes). */
export interface Lineage {
  current: string;
  history: string[];
  /** The generation the primary's journal and bitmap are relative to ('' if none yet). */
  peerBase: string;
}

/** A primary LUN the sender offers to mirror. */
export interface LunOffer { id: number; name: string; size: number; instance: Buffer; nextSeq: number; lineage: Lineage; flags: number }
/**
 * The receiver's verdict on one offered LUN; `sync` says how to catch up, `current` is its
 * generation, `applied` the offered run's sequence number up to which it has applied everything,
 * `copy` the identity of its copy (new when the copy is created, promoted or demoted).
 */
export interface LunAnswer { id: number; status: number; size: number; sync: number; current: string; applied: number; copy: string }

const ZERO_GEN = '0000000000000000';
const gen = (hex: string): Buffer => Buffer.from(hex || ZERO_GEN, 'hex');

export interface Hello {
  version: number;
  kind: number;
  site: string;
  /** Identifies one pool session: all n connections of a session carry the same value. */
  session: Buffer;
  offers: LunOffer[];
  answers: LunAnswer[];
}

export function encodeHello(h: Omit<Hello, 'version'>): Buffer {
  const site = Buffer.from(h.site, 'utf8');
  const parts: Buffer[] = [];
  const fixed = Buffer.alloc(helloFixed.span);
  helloFixed.encode({ magic: HELLO_MAGIC, version: PROTOCOL_VERSION, kind: h.kind, session: h.session, siteLen: site.length }, fixed);
  parts.push(fixed, site);
  const list = h.kind === HELLO_OFFER ? h.offers : h.answers;
  const n = Buffer.alloc(2);
  count.encode(list.length, n);
  parts.push(n);
  if (h.kind === HELLO_OFFER) {
    for (const o of h.offers) {
      const name = Buffer.from(o.name, 'utf8');
      const history = o.lineage.history.slice(0, MAX_HISTORY);
      const e = Buffer.alloc(offerEntry.span);
      offerEntry.encode({
        id: o.id, size: o.size, instance: o.instance, nextSeq: o.nextSeq, current: gen(o.lineage.current), peerBase: gen(o.lineage.peerBase),
        flags: o.flags, historyLen: history.length, nameLen: name.length,
      }, e);
      parts.push(e, ...history.map(gen), name);
    }
  } else {
    for (const a of h.answers) {
      const e = Buffer.alloc(answerEntry.span);
      answerEntry.encode({ id: a.id, status: a.status, size: a.size, sync: a.sync, current: gen(a.current), applied: a.applied, copy: gen(a.copy) }, e);
      parts.push(e);
    }
  }
  const body = Buffer.concat(parts);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length, 0);
  return Buffer.concat([len, body]);
}

export class HelloError extends Error {}

/** Decode a hello body (without its length prefix); throws HelloError on anything malformed. */
export function decodeHello(body: Buffer): Hello {
  const need = (at: number, n: number) => {
    if (at + n > body.length) throw new HelloError('truncated hello');
  };
  need(0, helloFixed.span);
  const f = helloFixed.decode(body);
  if (!f.magic.equals(HELLO_MAGIC)) throw new HelloError('not a mirror hello (bad magic)');
  if (f.version !== PROTOCOL_VERSION) throw new HelloError(`mirror protocol version ${f.version}, this site speaks ${PROTOCOL_VERSION}`);
  if (f.kind !== HELLO_OFFER && f.kind !== HELLO_ANSWER) throw new HelloError(`unknown hello kind ${f.kind}`);
  let at = helloFixed.span;
  need(at, f.siteLen + 2);
  const site = body.toString('utf8', at, at + f.siteLen);
  at += f.siteLen;
  const n = count.decode(body, at);
  at += 2;
  const offers: LunOffer[] = [];
  const answers: LunAnswer[] = [];
  for (let i = 0; i < n; i++) {
    if (f.kind === HELLO_OFFER) {
      need(at, offerEntry.span);
      const e = offerEntry.decode(body, at);
      at += offerEntry.span;
      if (e.historyLen > MAX_HISTORY) throw new HelloError(`generation history of ${e.historyLen} entries`);
      need(at, e.historyLen * 8 + e.nameLen);
      const history: string[] = [];
      for (let k = 0; k < e.historyLen; k++, at += 8) history.push(body.toString('hex', at, at + 8));
      const peerBase = e.peerBase.toString('hex');
      offers.push({
        id: e.id, size: e.size, instance: Buffer.from(e.instance), nextSeq: e.nextSeq, flags: e.flags,
        lineage: { current: e.current.toString('hex'), history, peerBase: peerBase === ZERO_GEN ? '' : peerBase },
        name: body.toString('utf8', at, at + e.nameLen),
      });
      at += e.nameLen;
    } else {
      need(at, answerEntry.span);
      const a = answerEntry.decode(body, at);
      if (!Number.isSafeInteger(a.applied)) throw new HelloError('applied point beyond 2^53');
      answers.push({ id: a.id, status: a.status, size: a.size, sync: a.sync, current: a.current.toString('hex'), applied: a.applied, copy: a.copy.toString('hex') });
      at += answerEntry.span;
    }
  }
  if (at !== body.length) throw new HelloError('trailing bytes in hello');
  return { version: f.version, kind: f.kind, site, session: Buffer.from(f.session), offers, answers };
}

// ---- requests and replies (hot path) ---------------------------------------------------------

/** A mirror request as both ends see it. seq/dep order writes (see docs/mirror-protocol.md). */
export interface MirrorRequestHeader {
  type: number;
  flags: number;
  lunId: number;
  reqId: number;
  seq: number;
  dep: number;
  offset: number;
  length: number;
}

export function writeRequestHeader(out: Buffer, r: MirrorRequestHeader): void {
  out.writeUInt32BE(REQUEST_MAGIC, 0);
  out.writeUInt8(r.type, 4);
  out.writeUInt8(r.flags, 5);
  out.writeUInt16BE(r.lunId, 6);
  out.writeUInt32BE(r.reqId, 8);
  writeU64(out, 12, r.seq);
  writeU64(out, 20, r.dep);
  writeU64(out, 28, r.offset);
  out.writeUInt32BE(r.length, 36);
}

/** Decode a request header; null if the magic is wrong or a u64 is beyond 2^53. */
export function readRequestHeader(buf: Buffer, at: number): MirrorRequestHeader | null {
  if (buf.readUInt32BE(at) !== REQUEST_MAGIC) return null;
  const seq = readU64(buf, at + 12);
  const dep = readU64(buf, at + 20);
  const offset = readU64(buf, at + 28);
  if (seq < 0 || dep < 0 || offset < 0) return null;
  return {
    type: buf.readUInt8(at + 4), flags: buf.readUInt8(at + 5), lunId: buf.readUInt16BE(at + 6),
    reqId: buf.readUInt32BE(at + 8), seq, dep, offset, length: buf.readUInt32BE(at + 36),
  };
}

export function writeReply(out: Buffer, at: number, reqId: number, errno: number, magic = REPLY_MAGIC): void {
  out.writeUInt32BE(magic, at);
  out.writeUInt32BE(reqId, at + 4);
  out.writeUInt32BE(errno, at + 8);
}


/** SET_GEN payload: current (8 bytes) then the history (8 bytes each). */
export function encodeGeneration(current: string, history: string[]): Buffer {
  return Buffer.concat([gen(current), ...history.slice(0, MAX_HISTORY).map(gen)]);
}

export function decodeGeneration(payload: Buffer): { current: string; history: string[] } | null {
  if (payload.length < 8 || payload.length % 8 !== 0 || payload.length > 8 * (MAX_HISTORY + 1)) return null;
  const ids: string[] = [];
  for (let at = 0; at < payload.length; at += 8) ids.push(payload.toString('hex', at, at + 8));
  return { current: ids[0], history: ids.slice(1) };
}
