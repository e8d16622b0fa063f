// The mirror wire format: hello encode/decode (with the v2 lineage of offers and the sync verdict
// of answers), the request header, and the SET_GEN payload (encodeGeneration/decodeGeneration).
import { expect } from 'chai';
import {
  decodeGeneration, decodeHello, encodeGeneration, encodeHello, HELLO_ANSWER, HELLO_MAGIC, HELLO_OFFER, HelloError, MAX_HISTORY,
  MAX_SET_GEN_PAYLOAD, OFFER_FLAG, PAIR, PROTOCOL_VERSION, readRequestHeader, REPLY_DATA_MAGIC, REPLY_MAGIC, REPLY_SIZE,
  REQUEST_HEADER_SIZE, REQUEST_MAGIC, SYNC, writeReply, writeRequestHeader, MIRROR_FLAG, MIRROR_OP, type Hello, type LunOffer,
  type MirrorRequestHeader,
} from '../../src/mirror/wire.js';

const SESSION = Buffer.from('0123abcd', 'latin1');
const ZERO_GEN = '0000000000000000';

/** n distinct generation ids (16 hex digits). */
function gens(n: number, tag = 0): string[] {
  return Array.from({ length: n }, (_, i) => `${tag.toString(16).padStart(4, '0')}${(i + 1).toString(16).padStart(12, '0')}`);
}

// Layout of an offer entry (v2): id u16, size u64, instance 8, nextSeq u64, current 8, peerBase 8,
// flags u16, historyLen u8, nameLen u16; then historyLen × 8 bytes of ids, then the name.
const HELLO_FIXED = 22;
const OFFER_ENTRY = 47;
const OFFER_CURRENT_AT = 26;
const OFFER_PEERBASE_AT = 34;
const OFFER_FLAGS_AT = 42;
const OFFER_HISTLEN_AT = 44;
const OFFER_NAMELEN_AT = 45;
const ANSWER_ENTRY = 29;   // id, status, size, sync, current, applied

/** Offset of the first LUN entry in a hello body. */
function firstEntry(h: Omit<Hello, 'version'>): number {
  return HELLO_FIXED + Buffer.byteLength(h.site) + 2;
}

const OFFER: Omit<Hello, 'version'> = {
  kind: HELLO_OFFER,
  site: 'site-a',
  session: SESSION,
  offers: [
    // A primary that never caught a peer up: no peerBase, no history.
    {
      id: 0, name: 'lun0', size: 64 * 1024 * 1024, instance: Buffer.from('inst0001'), nextSeq: 1,
      lineage: { current: 'a1b2c3d4e5f60718', history: [], peerBase: '' }, flags: 0,
    },
    // A long line of history (the most a hello carries) and a peer base in it; forced.
    {
      id: 1, name: 'ünïcode.name-x', size: 2 ** 53 - 1, instance: Buffer.from('inst0002'), nextSeq: 2 ** 40 + 7,
      lineage: { current: 'ffffffffffffffff', history: gens(MAX_HISTORY, 1), peerBase: gens(MAX_HISTORY, 1)[3] }, flags: OFFER_FLAG.FORCE,
    },
    // Unknown flag bits travel unchanged; an all-zero current is a generation like any other.
    {
      id: 65535, name: 'x'.repeat(128), size: 0, instance: Buffer.alloc(8), nextSeq: 123456789,
      lineage: { current: ZERO_GEN, history: gens(3, 2), peerBase: '0000000000000001' }, flags: 0xfffe,
    },
  ],
  answers: [],
};

const ANSWER: Omit<Hello, 'version'> = {
  kind: HELLO_ANSWER,
  site: 'b',
  session: SESSION,
  offers: [],
  answers: [
    { id: 0, status: PAIR.OK, size: 64 * 1024 * 1024, sync: SYNC.INCREMENTAL, current: 'a1b2c3d4e5f60718', applied: 0 },
    { id: 1, status: PAIR.MISSING, size: 0, sync: SYNC.INCREMENTAL, current: ZERO_GEN, applied: 0 },
    { id: 2, status: PAIR.SMALLER, size: 4 * 1024 * 1024, sync: SYNC.FULL, current: 'ffffffffffffffff', applied: 17 },
    { id: 3, status: PAIR.OK, size: 2 ** 53 - 1, sync: SYNC.FULL, current: ZERO_GEN, applied: 2 ** 53 - 1 },
    { id: 4, status: PAIR.SPLIT_BRAIN, size: 1, sync: SYNC.FULL, current: '0123456789abcdef', applied: 0 },
    { id: 5, status: PAIR.PEER_NEWER, size: 2, sync: 0xff, current: '0000000000000001', applied: 5 },
    { id: 65535, status: PAIR.STALE_PRIMARY, size: 3, sync: SYNC.FULL, current: 'fedcba9876543210', applied: 9 },
  ],
};

/** The body of an encoded hello (without its u32 length prefix), checking the prefix. */
function body(h: Omit<Hello, 'version'>): Buffer {
  const wire = encodeHello(h);
  expect(wire.readUInt32BE(0)).to.equal(wire.length - 4);
  return wire.subarray(4);
}

function expectHelloError(b: Buffer, match: RegExp): void {
  let caught: unknown;
  try {
    decodeHello(b);
  } catch (err) {
    caught = err;
  }
  expect(caught, 'decodeHello should throw').to.be.instanceOf(HelloError);
  expect((caught as Error).message).to.match(match);
}

describe('mirror wire: hello', function () {
  it('an offer round-trips (names, 64-bit sizes and sequence numbers, instance ids)', function () {
    const b = body(OFFER);
    expect(b.subarray(0, 8).equals(HELLO_MAGIC)).to.equal(true);
    const h = decodeHello(b);
    expect(h.version).to.equal(PROTOCOL_VERSION);
    expect(h.kind).to.equal(HELLO_OFFER);
    expect(h.site).to.equal('site-a');
    expect(h.session.equals(SESSION)).to.equal(true);
    expect(h.answers).to.deep.equal([]);
    expect(h.offers).to.have.length(3);
    h.offers.forEach((o, i) => {
      const want = OFFER.offers[i];
      expect(o.id).to.equal(want.id);
      expect(o.name).to.equal(want.name);
      expect(o.size).to.equal(want.size);
      expect(o.nextSeq).to.equal(want.nextSeq);
      expect(o.instance.equals(want.instance), `instance of offer ${i}`).to.equal(true);
      expect(o.lineage, `lineage of offer ${i}`).to.deep.equal(want.lineage);
      expect(o.flags, `flags of offer ${i}`).to.equal(want.flags);
    });
    expect(h.offers[1].lineage.history).to.have.length(MAX_HISTORY);
    expect(h.offers[1].flags & OFFER_FLAG.FORCE).to.equal(OFFER_FLAG.FORCE);
  });

  it('the lineage is on the wire where the layout says (ids as 8 raw bytes, no peerBase as zeros)', function () {
    const one: Omit<Hello, 'version'> = { ...OFFER, offers: [OFFER.offers[1]] };
    const b = body(one);
    const e = firstEntry(one);
    const o = OFFER.offers[1];
    expect(b.length).to.equal(e + OFFER_ENTRY + MAX_HISTORY * 8 + Buffer.byteLength(o.name));
    expect(b.toString('hex', e + OFFER_CURRENT_AT, e + OFFER_CURRENT_AT + 8)).to.equal(o.lineage.current);
    expect(b.toString('hex', e + OFFER_PEERBASE_AT, e + OFFER_PEERBASE_AT + 8)).to.equal(o.lineage.peerBase);
    expect(b.readUInt16BE(e + OFFER_FLAGS_AT)).to.equal(OFFER_FLAG.FORCE);
    expect(b[e + OFFER_HISTLEN_AT]).to.equal(MAX_HISTORY);
    expect(b.readUInt16BE(e + OFFER_NAMELEN_AT)).to.equal(Buffer.byteLength(o.name));
    o.lineage.history.forEach((g, k) => {
      const at = e + OFFER_ENTRY + 8 * k;
      expect(b.toString('hex', at, at + 8), `history[${k}]`).to.equal(g);
    });
    const none = body({ ...OFFER, offers: [OFFER.offers[0]] });
    const at = firstEntry(OFFER) + OFFER_PEERBASE_AT;
    expect(none.toString('hex', at, at + 8), 'no peerBase').to.equal(ZERO_GEN);
  });

  it('an empty current or history entry is sent as zeros; an all-zero peerBase decodes as none', function () {
    const o: LunOffer = { ...OFFER.offers[0], lineage: { current: '', history: ['', gens(1)[0]], peerBase: ZERO_GEN } };
    const h = decodeHello(body({ ...OFFER, offers: [o] }));
    expect(h.offers[0].lineage).to.deep.equal({ current: ZERO_GEN, history: [ZERO_GEN, gens(1)[0]], peerBase: '' });
    const a = decodeHello(body({ ...ANSWER, answers: [{ ...ANSWER.answers[0], current: '' }] }));
    expect(a.answers[0].current).to.equal(ZERO_GEN);
  });

  it('a history longer than MAX_HISTORY is cut to its first MAX_HISTORY ids when encoded', function () {
    const long = gens(MAX_HISTORY + 5, 7);
    const o: LunOffer = { ...OFFER.offers[0], lineage: { current: gens(1, 9)[0], history: long, peerBase: '' } };
    const h = decodeHello(body({ ...OFFER, offers: [o] }));
    expect(h.offers[0].lineage.history).to.deep.equal(long.slice(0, MAX_HISTORY));
    expect(h.offers[0].name).to.equal(o.name);
  });

  it('an answer round-trips (status, sync verdict and the receiver\'s generation)', function () {
    const b = body(ANSWER);
    expect(b.length).to.equal(firstEntry(ANSWER) + ANSWER.answers.length * ANSWER_ENTRY);
    const h = decodeHello(b);
    expect(h.kind).to.equal(HELLO_ANSWER);
    expect(h.site).to.equal('b');
    expect(h.session.equals(SESSION)).to.equal(true);
    expect(h.offers).to.deep.equal([]);
    expect(h.answers).to.deep.equal(ANSWER.answers);
  });

  it('an empty offer (no LUNs) round-trips', function () {
    const h = decodeHello(body({ ...OFFER, offers: [] }));
    expect(h.offers).to.deep.equal([]);
    expect(h.site).to.equal('site-a');
  });

  it('every truncation of a valid hello is a HelloError', function () {
    for (const h of [OFFER, ANSWER]) {
      const b = body(h);
      for (let n = 0; n < b.length; n++) expectHelloError(b.subarray(0, n), /truncated/);
    }
  });

  it('bad magic is a HelloError', function () {
    const b = Buffer.from(body(OFFER));
    b[0] ^= 0x01;
    expectHelloError(b, /magic/);
  });

  it('another protocol version is a HelloError naming both versions', function () {
    const b = Buffer.from(body(OFFER));
    b.writeUInt16BE(PROTOCOL_VERSION + 1, 8);
    expectHelloError(b, new RegExp(`version ${PROTOCOL_VERSION + 1}.*${PROTOCOL_VERSION}`));
  });

  it('an unknown kind is a HelloError', function () {
    const b = Buffer.from(body(OFFER));
    b.writeUInt16BE(3, 10);
    expectHelloError(b, /kind/);
  });

  it('trailing bytes are a HelloError', function () {
    for (const h of [OFFER, ANSWER]) expectHelloError(Buffer.concat([body(h), Buffer.from([0])]), /trailing/);
  });

  it('a name length past the end is a HelloError (not a short name)', function () {
    for (const o of [OFFER.offers[0], OFFER.offers[2]]) {   // without and with history before the name
      const one = { ...OFFER, offers: [o] };
      const b = Buffer.from(body(one));
      b.writeUInt16BE(Buffer.byteLength(o.name) + 1, firstEntry(one) + OFFER_NAMELEN_AT);
      expectHelloError(b, /truncated/);
    }
  });

  it('a history length past the end is a HelloError (not a short history)', function () {
    const one = { ...OFFER, offers: [OFFER.offers[2]] };
    const b = Buffer.from(body(one));
    // 3 ids and a 128-byte name follow: 16 ids (128 bytes) + 128 name bytes is more than is there.
    b[firstEntry(one) + OFFER_HISTLEN_AT] = MAX_HISTORY;
    expectHelloError(b, /truncated/);
  });

  it(`a history of more than MAX_HISTORY (${MAX_HISTORY}) ids is a HelloError, even when the bytes are there`, function () {
    for (const n of [MAX_HISTORY + 1, 0xff]) {
      // Build the body by hand: the encoder never sends more than MAX_HISTORY ids.
      const one = { ...OFFER, offers: [OFFER.offers[0]] };
      const b = Buffer.from(body(one));
      const e = firstEntry(one);
      b[e + OFFER_HISTLEN_AT] = n;
      const forged = Buffer.concat([b.subarray(0, e + OFFER_ENTRY), Buffer.alloc(8 * n, 0x11), b.subarray(e + OFFER_ENTRY)]);
      expectHelloError(forged, new RegExp(`history of ${n} entries`));
    }
    // Exactly MAX_HISTORY is fine.
    const ok = decodeHello(body({ ...OFFER, offers: [OFFER.offers[1]] }));
    expect(ok.offers[0].lineage.history).to.have.length(MAX_HISTORY);
  });

  it('an offer\'s trailing bytes after a history-bearing entry are a HelloError', function () {
    expectHelloError(Buffer.concat([body({ ...OFFER, offers: [OFFER.offers[1]] }), Buffer.alloc(8)]), /trailing/);
  });
});

describe('mirror wire: SET_GEN payload (encodeGeneration / decodeGeneration)', function () {
  it('round-trips a current id with 0..MAX_HISTORY ids of history', function () {
    for (let n = 0; n <= MAX_HISTORY; n++) {
      const current = gens(1, 0xabc)[0];
      const history = gens(n, n);
      const payload = encodeGeneration(current, history);
      expect(payload.length).to.equal(8 * (n + 1));
      expect(payload.length).to.be.at.most(MAX_SET_GEN_PAYLOAD);
      expect(payload.toString('hex', 0, 8)).to.equal(current);
      expect(decodeGeneration(payload)).to.deep.equal({ current, history });
    }
    expect(decodeGeneration(encodeGeneration(ZERO_GEN, []))).to.deep.equal({ current: ZERO_GEN, history: [] });
    expect(decodeGeneration(encodeGeneration('ffffffffffffffff', [ZERO_GEN]))).to.deep.equal({ current: 'ffffffffffffffff', history: [ZERO_GEN] });
  });

  it('an empty id is sent as zeros; a history beyond MAX_HISTORY is cut', function () {
    expect(encodeGeneration('', []).equals(Buffer.alloc(8))).to.equal(true);
    const long = gens(MAX_HISTORY + 3, 5);
    const g = decodeGeneration(encodeGeneration(gens(1)[0], long));
    expect(g).to.deep.equal({ current: gens(1)[0], history: long.slice(0, MAX_HISTORY) });
  });

  it('rejects (null) a payload that is empty, not a multiple of 8 bytes, or longer than 1 + MAX_HISTORY ids', function () {
    const max = 8 * (MAX_HISTORY + 1);
    for (const n of [0, 1, 7, 9, 15, 17, 63, max - 1, max + 1, max + 8, MAX_SET_GEN_PAYLOAD]) {
      expect(decodeGeneration(Buffer.alloc(n, 0x42)), `${n} bytes`).to.equal(null);
    }
    for (const n of [8, 16, max]) expect(decodeGeneration(Buffer.alloc(n, 0x42)), `${n} bytes`).to.not.equal(null);
  });
});

describe('mirror wire: replies', function () {
  it('writeReply writes magic, reqId and errno; a HASH answer uses the data magic', function () {
    const out = Buffer.alloc(REPLY_SIZE + 3);
    writeReply(out, 3, 0xdeadbeef, 22);
    expect(out.readUInt32BE(3)).to.equal(REPLY_MAGIC);
    expect(out.readUInt32BE(7)).to.equal(0xdeadbeef);
    expect(out.readUInt32BE(11)).to.equal(22);
    writeReply(out, 0, 1, 0, REPLY_DATA_MAGIC);
    expect(out.readUInt32BE(0)).to.equal(REPLY_DATA_MAGIC);
    expect(REPLY_DATA_MAGIC).to.not.equal(REPLY_MAGIC);
  });
});

describe('mirror wire: request header', function () {
  const base: MirrorRequestHeader = {
    type: MIRROR_OP.WRITE, flags: MIRROR_FLAG.FUA, lunId: 513, reqId: 0xfedcba98,
    seq: 2 ** 53 - 1, dep: 2 ** 32 + 5, offset: 2 ** 40 + 12345, length: 0xffffffff,
  };

  it('round-trips, also at a non-zero offset in a buffer', function () {
    const buf = Buffer.alloc(REQUEST_HEADER_SIZE + 7);
    writeRequestHeader(buf.subarray(7), base);
    expect(buf.readUInt32BE(7)).to.equal(REQUEST_MAGIC);
    expect(readRequestHeader(buf, 7)).to.deep.equal(base);
    const zeroes = { ...base, type: MIRROR_OP.WRITE_ZEROES, flags: MIRROR_FLAG.MAY_PUNCH, seq: 1, dep: 0, offset: 0, length: 1, reqId: 1, lunId: 0 };
    const b2 = Buffer.alloc(REQUEST_HEADER_SIZE);
    writeRequestHeader(b2, zeroes);
    expect(readRequestHeader(b2, 0)).to.deep.equal(zeroes);
  });

  it('round-trips the v2 ops and flags (HASH, SET_GEN, RESYNC)', function () {
    for (const r of [
      { ...base, type: MIRROR_OP.HASH, flags: 0, seq: 0, dep: 77, offset: 4096, length: 1 << 30 },
      { ...base, type: MIRROR_OP.SET_GEN, flags: 0, seq: 0, dep: 78, offset: 0, length: 8 * (MAX_HISTORY + 1) },
      { ...base, type: MIRROR_OP.WRITE, flags: MIRROR_FLAG.RESYNC | MIRROR_FLAG.FUA, seq: 9, dep: 8, offset: 512, length: 512 },
    ]) {
      const buf = Buffer.alloc(REQUEST_HEADER_SIZE);
      writeRequestHeader(buf, r);
      expect(readRequestHeader(buf, 0)).to.deep.equal(r);
    }
  });

  for (const field of ['seq', 'dep', 'offset'] as const) {
    it(`${field} >= 2^53 decodes to null`, function () {
      const buf = Buffer.alloc(REQUEST_HEADER_SIZE);
      writeRequestHeader(buf, { ...base, [field]: 2 ** 53 });
      expect(readRequestHeader(buf, 0)).to.equal(null);
      const at = { seq: 12, dep: 20, offset: 28 }[field];
      buf.writeUInt32BE(0xffffffff, at);
      buf.writeUInt32BE(0xffffffff, at + 4);
      expect(readRequestHeader(buf, 0), `${field} = 2^64-1`).to.equal(null);
      buf.writeUInt32BE(0x1fffff, at);   // 2^53 - 1: still valid
      expect(readRequestHeader(buf, 0)![field]).to.equal(2 ** 53 - 1);
    });
  }

  it('a wrong magic decodes to null', function () {
    const buf = Buffer.alloc(REQUEST_HEADER_SIZE);
    writeRequestHeader(buf, base);
    buf.writeUInt32BE(REQUEST_MAGIC ^ 1, 0);
    expect(readRequestHeader(buf, 0)).to.equal(null);
  });
});
