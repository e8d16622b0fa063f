// The mirror wire protocol (docs/mirror-protocol.md): hello exchange (cold, buffer-layout) and
// per-request headers (hot, plain Buffer calls). All integers big-endian.
import lo from 'buffer-layout';
import { readU64, writeU64 } from '../net/u64.js';

export const PROTOCOL_VERSION = 1;
export const HELLO_MAGIC = Buffer.from('NBDMIRR1', 'latin1');
export const REQUEST_MAGIC = 0x4d525251;   // "MRRQ"
export const REPLY_MAGIC = 0x4d525250;     // "MRRP"
export const REQUEST_HEADER_SIZE = 40;
export const REPLY_SIZE = 12;
export const MAX_MIRROR_PAYLOAD = 32 * 1024 * 1024;
export const MAX_HELLO_LENGTH = 1024 * 1024;

export const MIRROR_OP = { WRITE: 1, WRITE_ZEROES: 2, TRIM: 3, FLUSH: 4 } as const;
/** A reply with this reqId (never used for requests) is a control message from the receiver. */
export const CONTROL_REQID = 0;
/** Control codes (in the errno field): the receiver's LUNs changed, offer them again. */
export const CONTROL = { REOFFER: 1 } as const;
/** Answer to a request for a LUN the receiver no longer has (a reload removed it): not a device error. */
export const ESTALE = 116;
export const MIRROR_FLAG = { FUA: 1, MAY_PUNCH: 2 } as const;

/** Why the receiver refuses to pair a LUN (sent back in its hello). */
export const PAIR = { OK: 0, MISSING: 1, NOT_SECONDARY: 2, SMALLER: 3, DUPLICATE: 4 } as const;
export const PAIR_REASON: Record<number, string> = {
  [PAIR.OK]: 'ok',
  [PAIR.MISSING]: 'no LUN of that name on the peer',
  [PAIR.NOT_SECONDARY]: 'the peer\'s LUN of that name is not a secondary',
  [PAIR.SMALLER]: 'the peer\'s LUN is smaller than the primary',
  [PAIR.DUPLICATE]: 'another connection session already feeds this LUN',
};

// ---- hello (length-prefixed: u32 length, then body) -----------------------------------------

const helloFixed = lo.struct<{ magic: Buffer; version: number; kind: number; session: Buffer; siteLen: number }>([
  lo.blob(8, 'magic'), lo.u16be('version'), lo.u16be('kind'), lo.blob(8, 'session'), lo.u16be('siteLen'),
]);
const offerEntry = lo.struct<{ id: number; size: number; instance: Buffer; nextSeq: number; nameLen: number }>([
  lo.u16be('id'), lo.nu64be('size'), lo.blob(8, 'instance'), lo.nu64be('nextSeq'), lo.u16be('nameLen'),
]);
const answerEntry = lo.struct<{ id: number; status: number; size: number }>([
  lo.u16be('id'), lo.u16be('status'), lo.nu64be('size'),
]);
const count = lo.u16be();

export const HELLO_OFFER = 1;   // from the sender (pool side)
export const HELLO_ANSWER = 2;  // from the receiver (listener side)

/** A primary LUN the sender offers to mirror. */
export interface LunOffer { id: number; name: string; size: number; instance: Buffer; nextSeq: number }
/** The receiver's verdict on one offered LUN. */
export interface LunAnswer { id: number; status: number; size: number }

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
      const e = Buffer.alloc(offerEntry.span);
      offerEntry.encode({ id: o.id, size: o.size, instance: o.instance, nextSeq: o.nextSeq, nameLen: name.length }, e);
      parts.push(e, name);
    }
  } else {
    for (const a of h.answers) {
      const e = Buffer.alloc(answerEntry.span);
      answerEntry.encode(a, e);
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
      need(at, e.nameLen);
      offers.push({ id: e.id, size: e.size, instance: Buffer.from(e.instance), nextSeq: e.nextSeq,
        name: body.toString('utf8', at, at + e.nameLen) });
      at += e.nameLen;
    } else {
      need(at, answerEntry.span);
      answers.push(answerEntry.decode(body, at));
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

export function writeReply(out: Buffer, at: number, reqId: number, errno: number): void {
  out.writeUInt32BE(REPLY_MAGIC, at);
  out.writeUInt32BE(reqId, at + 4);
  out.writeUInt32BE(errno, at + 8);
}

