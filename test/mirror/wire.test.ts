// The mirror wire format: hello encode/decode and the request header.
import { expect } from 'chai';
import {
  decodeHello, encodeHello, HELLO_ANSWER, HELLO_MAGIC, HELLO_OFFER, HelloError, PAIR, PROTOCOL_VERSION, readRequestHeader,
  REQUEST_HEADER_SIZE, REQUEST_MAGIC, writeRequestHeader, MIRROR_FLAG, MIRROR_OP, type Hello, type MirrorRequestHeader,
} from '../../src/mirror/wire.js';

const SESSION = Buffer.from('0123abcd', 'latin1');

const OFFER: Omit<Hello, 'version'> = {
  kind: HELLO_OFFER,
  site: 'site-a',
  session: SESSION,
  offers: [
    { id: 0, name: 'lun0', size: 64 * 1024 * 1024, instance: Buffer.from('inst0001'), nextSeq: 1 },
    { id: 1, name: 'ünïcode.name-x', size: 2 ** 53 - 1, instance: Buffer.from('inst0002'), nextSeq: 2 ** 40 + 7 },
    { id: 65535, name: 'x'.repeat(128), size: 0, instance: Buffer.alloc(8), nextSeq: 123456789 },
  ],
  answers: [],
};

const ANSWER: Omit<Hello, 'version'> = {
  kind: HELLO_ANSWER,
  site: 'b',
  session: SESSION,
  offers: [],
  answers: [
    { id: 0, status: PAIR.OK, size: 64 * 1024 * 1024 },
    { id: 1, status: PAIR.MISSING, size: 0 },
    { id: 2, status: PAIR.SMALLER, size: 4 * 1024 * 1024 },
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
    });
  });

  it('an answer round-trips', function () {
    const h = decodeHello(body(ANSWER));
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
    const b = Buffer.from(body({ ...OFFER, offers: [OFFER.offers[0]] }));
    // The name length is the last u16 before the name "lun0" at the end of the body.
    b.writeUInt16BE(200, b.length - 4 - 2);
    expectHelloError(b, /truncated/);
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
