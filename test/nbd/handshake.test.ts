// Fixed-newstyle handshake: NbdServer on 127.0.0.1:0 for what the client sees on the wire,
// negotiate() on a loopback socket pair for the Session it produces, and the option parsers.
import net from 'node:net';
import { expect } from 'chai';
import {
  CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, INFO, MAX_OPTION_LENGTH, MAX_PAYLOAD, OPT, REP, REPLY_TYPE, TFLAG,
} from '../../src/nbd/constants.js';
import { negotiate, NegotiationEnded, parseInfoRequest, parseMetaContextRequest, type Session } from '../../src/nbd/handshake.js';
import {
  encodeOption, encodeRequest, Fixture, infoPayload, KiB, metaPayload, MiB, NbdTestClient, u16, u32, type OptionReply,
} from './support.js';

const ALPHA_SIZE = 1 * MiB;
const BETA_SIZE = 2 * MiB;

function infoOf(replies: OptionReply[], type: number): Buffer | undefined {
  return replies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === type)?.data;
}

function last(replies: OptionReply[]): OptionReply {
  return replies[replies.length - 1];
}

describe('NBD handshake (through NbdServer)', function () {
  let fx: Fixture;

  before(async function () {
    fx = await Fixture.start([
      { name: 'alpha', size: ALPHA_SIZE, description: 'the first LUN' },
      { name: 'beta', size: BETA_SIZE, readOnly: true, fill: [[0, 64 * KiB]] },
    ]);
  });
  afterEach(async function () { await fx.dropClients(); });
  after(async function () { await fx?.stop(); });

  it('sends the greeting NBDMAGIC IHAVEOPT with FIXED_NEWSTYLE|NO_ZEROES', async function () {
    const c = await fx.connect();
    const g = await c.greeting();
    expect(g.toString('hex')).to.equal(
      Buffer.concat([Buffer.from('NBDMAGIC', 'latin1'), Buffer.from('IHAVEOPT', 'latin1'), u16(3)]).toString('hex'));
  });

  it('closes the connection on unknown client flags', async function () {
    const c = await fx.connect();
    await c.greeting();
    await c.write(u32(FLAG_FIXED_NEWSTYLE | 0x4));
    expect(await c.waitClosed()).to.equal(true);
    expect(c.unread).to.equal(0);
  });

  it('closes the connection on a bad option magic', async function () {
    const c = await fx.connect();
    await c.start();
    const opt = encodeOption(OPT.LIST);
    opt.write('IHAVEOPX', 0, 'latin1');
    await c.write(opt);
    expect(await c.waitClosed()).to.equal(true);
    expect(c.unread).to.equal(0);
  });

  it('closes the connection on an option longer than 64 KiB (without waiting for its data)', async function () {
    const c = await fx.connect();
    await c.start();
    await c.write(encodeOption(99, Buffer.alloc(0), MAX_OPTION_LENGTH + 1));
    expect(await c.waitClosed()).to.equal(true);
  });

  it('accepts an option of exactly 64 KiB (unknown option: ERR_UNSUP)', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(99, Buffer.alloc(MAX_OPTION_LENGTH, 7));
    expect(r).to.have.length(1);
    expect(r[0].option).to.equal(99);
    expect(r[0].type).to.equal(REP.ERR_UNSUP);
  });

  it('answers unknown options with ERR_UNSUP and goes on negotiating', async function () {
    const c = await fx.connect();
    await c.start();
    for (const opt of [99, 0x7fffffff, OPT.PEEK_EXPORT, OPT.EXTENDED_HEADERS]) {
      const r = await c.option(opt, Buffer.from('junk'));
      expect(r, `option ${opt}`).to.have.length(1);
      expect(r[0].type, `option ${opt}`).to.equal(REP.ERR_UNSUP);
      expect(r[0].option).to.equal(opt);
    }
    const list = await c.option(OPT.LIST);
    expect(last(list).type).to.equal(REP.ACK);
  });

  it('LIST: one REP_SERVER per LUN (name length, name, description) then ACK', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.LIST);
    expect(r.map((x) => x.type)).to.deep.equal([REP.SERVER, REP.SERVER, REP.ACK]);
    expect(r.every((x) => x.option === OPT.LIST)).to.equal(true);
    const entries = r.slice(0, 2).map((x) => {
      const len = x.data.readUInt32BE(0);
      return { name: x.data.toString('utf8', 4, 4 + len), rest: x.data.toString('utf8', 4 + len) };
    });
    expect(entries).to.deep.equal([{ name: 'alpha', rest: 'the first LUN' }, { name: 'beta', rest: '' }]);
    expect(last(r).data.length).to.equal(0);
  });

  it('LIST with data: ERR_INVALID, and negotiation continues', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.LIST, Buffer.from('x'));
    expect(r.map((x) => x.type)).to.deep.equal([REP.ERR_INVALID]);
    expect(last(await c.option(OPT.LIST)).type).to.equal(REP.ACK);
  });

  for (const opt of [OPT.INFO, OPT.GO]) {
    const label = opt === OPT.INFO ? 'INFO' : 'GO';
    it(`${label} for an unknown export: ERR_UNKNOWN, and negotiation continues`, async function () {
      const c = await fx.connect();
      await c.start();
      const r = await c.option(opt, infoPayload('gamma'));
      expect(r.map((x) => x.type)).to.deep.equal([REP.ERR_UNKNOWN]);
      expect(r[0].option).to.equal(opt);
      expect(last(await c.option(OPT.INFO, infoPayload('alpha'))).type).to.equal(REP.ACK);
    });

    it(`${label} with a malformed payload: ERR_INVALID, and negotiation continues`, async function () {
      const c = await fx.connect();
      await c.start();
      const bad = [
        Buffer.from([0, 0, 0, 100, 0x61, 0x62, 0x63, 0, 0]),   // name length past the end
        Buffer.concat([infoPayload('alpha'), Buffer.from([0])]), // trailing byte
        infoPayload('alpha', [INFO.NAME]).subarray(0, 4 + 5 + 2 + 1), // truncated request list
        Buffer.from([0, 0]),                                  // shorter than any request
      ];
      for (const data of bad) {
        const r = await c.option(opt, data);
        expect(r.map((x) => x.type), data.toString('hex')).to.deep.equal([REP.ERR_INVALID]);
      }
      expect(last(await c.option(OPT.LIST)).type).to.equal(REP.ACK);
    });
  }

  it('INFO: INFO_EXPORT (size, flags), BLOCK_SIZE 1/4096/64 MiB, ACK; no NAME unless asked; does not end negotiation', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.INFO, infoPayload('alpha'));
    expect(last(r).type).to.equal(REP.ACK);
    expect(r.slice(0, -1).every((x) => x.type === REP.INFO && x.option === OPT.INFO)).to.equal(true);
    const exp = infoOf(r, INFO.EXPORT)!;
    expect(exp, 'INFO_EXPORT').to.not.equal(undefined);
    expect(exp.length).to.equal(12);
    expect(Number(exp.readBigUInt64BE(2))).to.equal(ALPHA_SIZE);
    const flags = exp.readUInt16BE(10);
    expect(flags & TFLAG.HAS_FLAGS).to.equal(TFLAG.HAS_FLAGS);
    expect(flags & TFLAG.READ_ONLY).to.equal(0);
    expect(flags & TFLAG.SEND_FLUSH).to.equal(TFLAG.SEND_FLUSH);
    expect(flags & TFLAG.SEND_TRIM).to.equal(TFLAG.SEND_TRIM);
    expect(flags & TFLAG.SEND_WRITE_ZEROES).to.equal(TFLAG.SEND_WRITE_ZEROES);
    expect(flags & TFLAG.SEND_DF, 'DF without structured replies').to.equal(0);
    const bs = infoOf(r, INFO.BLOCK_SIZE)!;
    expect(bs, 'INFO_BLOCK_SIZE').to.not.equal(undefined);
    expect(bs.length).to.equal(14);
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).to.deep.equal([1, 4096, 64 * MiB]);
    expect(bs.readUInt32BE(10)).to.equal(MAX_PAYLOAD);
    expect(infoOf(r, INFO.NAME), 'NAME not requested').to.equal(undefined);
    // Still negotiating: another option is answered.
    expect(last(await c.option(OPT.LIST)).type).to.equal(REP.ACK);
  });

  it('INFO with NAME and DESCRIPTION requested returns them', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.INFO, infoPayload('alpha', [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE]));
    expect(last(r).type).to.equal(REP.ACK);
    expect(infoOf(r, INFO.NAME)?.toString('utf8', 2)).to.equal('alpha');
    expect(infoOf(r, INFO.DESCRIPTION)?.toString('utf8', 2)).to.equal('the first LUN');
    expect(r.filter((x) => x.type === REP.INFO && x.data.readUInt16BE(0) === INFO.BLOCK_SIZE)).to.have.length(1);
  });

  it('INFO on a read-only LUN advertises READ_ONLY and no write commands', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.INFO, infoPayload('beta'));
    const exp = infoOf(r, INFO.EXPORT)!;
    expect(Number(exp.readBigUInt64BE(2))).to.equal(BETA_SIZE);
    const flags = exp.readUInt16BE(10);
    expect(flags & TFLAG.READ_ONLY).to.equal(TFLAG.READ_ONLY);
    expect(flags & (TFLAG.SEND_TRIM | TFLAG.SEND_WRITE_ZEROES | TFLAG.SEND_FUA)).to.equal(0);
  });

  it('GO with "" selects the first LUN', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.GO, infoPayload('', [INFO.NAME]));
    expect(last(r).type).to.equal(REP.ACK);
    expect(Number(infoOf(r, INFO.EXPORT)!.readBigUInt64BE(2))).to.equal(ALPHA_SIZE);
    expect(infoOf(r, INFO.NAME)?.toString('utf8', 2)).to.equal('alpha');
    const reply = await c.roundTrip({ type: CMD.READ, cookie: 1n, offset: 4096, length: 512 });
    expect(reply.error).to.equal(0);
    expect(reply.data!.equals(fx.contents('alpha', 4096, 512))).to.equal(true);
  });

  it('STRUCTURED_REPLY: ACK once, ERR_INVALID the second time and with data; GO then advertises DF', async function () {
    const c = await fx.connect();
    await c.start();
    const withData = await c.option(OPT.STRUCTURED_REPLY, Buffer.from([0]));
    expect(withData.map((x) => x.type)).to.deep.equal([REP.ERR_INVALID]);
    expect((await c.option(OPT.STRUCTURED_REPLY)).map((x) => x.type)).to.deep.equal([REP.ACK]);
    expect((await c.option(OPT.STRUCTURED_REPLY)).map((x) => x.type)).to.deep.equal([REP.ERR_INVALID]);
    const r = await c.option(OPT.GO, infoPayload('alpha'));
    expect(infoOf(r, INFO.EXPORT)!.readUInt16BE(10) & TFLAG.SEND_DF).to.equal(TFLAG.SEND_DF);
    // Structured replies are in force: a READ comes back as an OFFSET_DATA chunk.
    const reply = await c.roundTrip({ type: CMD.READ, cookie: 2n, offset: 0, length: 16 });
    expect(reply.structured).to.equal(true);
    expect(reply.chunks[0].type).to.equal(REPLY_TYPE.OFFSET_DATA);
  });

  it('SET_META_CONTEXT and LIST_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID', async function () {
    const c = await fx.connect();
    await c.start();
    for (const opt of [OPT.SET_META_CONTEXT, OPT.LIST_META_CONTEXT]) {
      const r = await c.option(opt, metaPayload('alpha', ['base:allocation']));
      expect(r.map((x) => x.type), `option ${opt}`).to.deep.equal([REP.ERR_INVALID]);
    }
  });

  it('LIST_META_CONTEXT with no queries lists base:allocation with id 0', async function () {
    const c = await fx.connect();
    await c.start();
    await c.option(OPT.STRUCTURED_REPLY);
    const r = await c.option(OPT.LIST_META_CONTEXT, metaPayload('alpha', []));
    expect(r.map((x) => x.type)).to.deep.equal([REP.META_CONTEXT, REP.ACK]);
    expect(r[0].data.readUInt32BE(0)).to.equal(0);
    expect(r[0].data.toString('utf8', 4)).to.equal('base:allocation');
  });

  it('LIST_META_CONTEXT with "base:" matches base:allocation; an unrelated query matches nothing', async function () {
    const c = await fx.connect();
    await c.start();
    await c.option(OPT.STRUCTURED_REPLY);
    const base = await c.option(OPT.LIST_META_CONTEXT, metaPayload('alpha', ['base:']));
    expect(base.map((x) => x.type)).to.deep.equal([REP.META_CONTEXT, REP.ACK]);
    const other = await c.option(OPT.LIST_META_CONTEXT, metaPayload('alpha', ['qemu:dirty-bitmap:x']));
    expect(other.map((x) => x.type)).to.deep.equal([REP.ACK]);
  });

  it('SET_META_CONTEXT base:allocation returns context id 1, and BLOCK_STATUS then works', async function () {
    const c = await fx.connect();
    await c.start();
    await c.option(OPT.STRUCTURED_REPLY);
    const r = await c.option(OPT.SET_META_CONTEXT, metaPayload('alpha', ['base:allocation']));
    expect(r.map((x) => x.type)).to.deep.equal([REP.META_CONTEXT, REP.ACK]);
    expect(r[0].data.readUInt32BE(0)).to.equal(1);
    expect(r[0].data.toString('utf8', 4)).to.equal('base:allocation');
    expect(last(await c.option(OPT.GO, infoPayload('alpha'))).type).to.equal(REP.ACK);
    const bs = await c.roundTrip({ type: CMD.BLOCK_STATUS, cookie: 3n, offset: 0, length: 4096 });
    expect(bs.error).to.equal(0);
    expect(bs.chunks[0].type).to.equal(REPLY_TYPE.BLOCK_STATUS);
    expect(bs.chunks[0].payload.readUInt32BE(0)).to.equal(1);
  });

  it('SET_META_CONTEXT for an unknown export: ERR_UNKNOWN; malformed: ERR_INVALID', async function () {
    const c = await fx.connect();
    await c.start();
    await c.option(OPT.STRUCTURED_REPLY);
    expect((await c.option(OPT.SET_META_CONTEXT, metaPayload('gamma', ['base:allocation']))).map((x) => x.type))
      .to.deep.equal([REP.ERR_UNKNOWN]);
    expect((await c.option(OPT.SET_META_CONTEXT, Buffer.from([0, 0, 0, 9]))).map((x) => x.type))
      .to.deep.equal([REP.ERR_INVALID]);
  });

  it('SET_META_CONTEXT for another export than GO: BLOCK_STATUS gets EINVAL', async function () {
    const c = await fx.connect();
    await c.start();
    await c.option(OPT.STRUCTURED_REPLY);
    expect(last(await c.option(OPT.SET_META_CONTEXT, metaPayload('beta', ['base:allocation']))).type).to.equal(REP.ACK);
    expect(last(await c.option(OPT.GO, infoPayload('alpha'))).type).to.equal(REP.ACK);
    const bs = await c.roundTrip({ type: CMD.BLOCK_STATUS, cookie: 4n, offset: 0, length: 4096 });
    expect(bs.structured).to.equal(true);
    expect(bs.chunks.map((x) => x.type)).to.deep.equal([REPLY_TYPE.ERROR]);
    expect(bs.error).to.equal(22);
  });

  it('EXPORT_NAME for an unknown export closes the connection', async function () {
    const c = await fx.connect();
    await c.start();
    await c.sendOption(OPT.EXPORT_NAME, Buffer.from('gamma'));
    expect(await c.waitClosed()).to.equal(true);
    expect(c.unread).to.equal(0);
  });

  it('EXPORT_NAME (no NO_ZEROES): size, flags and 124 zero bytes, then transmission', async function () {
    const c = await fx.connect();
    await c.start(FLAG_FIXED_NEWSTYLE);
    await c.sendOption(OPT.EXPORT_NAME, Buffer.from('beta'));
    const reply = await c.read(8 + 2 + 124);
    expect(Number(reply.readBigUInt64BE(0))).to.equal(BETA_SIZE);
    const flags = reply.readUInt16BE(8);
    expect(flags & TFLAG.HAS_FLAGS).to.equal(TFLAG.HAS_FLAGS);
    expect(flags & TFLAG.READ_ONLY).to.equal(TFLAG.READ_ONLY);
    expect(reply.subarray(10).equals(Buffer.alloc(124))).to.equal(true);
    const r = await c.roundTrip({ type: CMD.READ, cookie: 5n, offset: 0, length: 100 });
    expect(r.data!.equals(fx.contents('beta', 0, 100))).to.equal(true);
  });

  it('EXPORT_NAME with NO_ZEROES: size and flags only, the next bytes are a transmission reply', async function () {
    const c = await fx.connect();
    await c.start(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    await c.write(Buffer.concat([
      encodeOption(OPT.EXPORT_NAME, Buffer.from('alpha')),
      c.encode({ type: CMD.READ, cookie: 6n, offset: 10, length: 20 }),
    ]));
    const reply = await c.read(10);
    expect(Number(reply.readBigUInt64BE(0))).to.equal(ALPHA_SIZE);
    expect(reply.readUInt16BE(8) & TFLAG.READ_ONLY).to.equal(0);
    const r = await c.readReply();
    expect(r.cookie).to.equal(6n);
    expect(r.error).to.equal(0);
    expect(r.data!.equals(fx.contents('alpha', 10, 20))).to.equal(true);
  });

  it('ABORT: ACK, then the server closes', async function () {
    const c = await fx.connect();
    await c.start();
    const r = await c.option(OPT.ABORT);
    expect(r).to.have.length(1);
    expect(r[0].option).to.equal(OPT.ABORT);
    expect(r[0].type).to.equal(REP.ACK);
    expect(await c.waitClosed()).to.equal(true);
  });

  it('keeps bytes pipelined after GO: GO and a READ request in one write', async function () {
    const c = await fx.connect();
    await c.greeting();
    await c.write(Buffer.concat([
      u32(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
      encodeOption(OPT.GO, infoPayload('alpha')),
      c.encode({ type: CMD.READ, cookie: 0xfeedfacecafebeefn, offset: 65536 + 3, length: 1000 }),
    ]));
    const replies = await c.readOptionReplies();
    expect(last(replies).type).to.equal(REP.ACK);
    const r = await c.readReply();
    expect(r.cookie).to.equal(0xfeedfacecafebeefn);
    expect(r.error).to.equal(0);
    expect(r.data!.equals(fx.contents('alpha', 65536 + 3, 1000))).to.equal(true);
  });
});

describe('negotiate() on a loopback socket pair', function () {
  let fx: Fixture;
  let listener: net.Server;
  let port = 0;
  const accepted: net.Socket[] = [];
  let nextSocket: ((s: net.Socket) => void) | null = null;
  let shuttingDown = false;

  before(async function () {
    fx = await Fixture.start([
      { name: 'alpha', size: ALPHA_SIZE },
      { name: 'beta', size: BETA_SIZE },
    ]);
    listener = net.createServer((s) => {
      accepted.push(s);
      s.setNoDelay(true);
      s.on('error', () => undefined);
      nextSocket?.(s);
    });
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    port = (listener.address() as net.AddressInfo).port;
  });
  afterEach(async function () {
    shuttingDown = false;
    for (const s of accepted.splice(0)) s.destroy();
    await fx.dropClients();
  });
  after(async function () {
    await new Promise<void>((resolve) => listener.close(() => resolve()));
    await fx?.stop();
  });

  /** A connected pair: the test's client, and negotiate() running on the accepted socket. */
  async function pair(): Promise<{ client: NbdTestClient; session: Promise<Session> }> {
    const serverSide = new Promise<net.Socket>((resolve) => { nextSocket = resolve; });
    const client = await NbdTestClient.connect(port);
    const socket = await serverSide;
    const session = negotiate(socket, { luns: fx.registry, isShuttingDown: () => shuttingDown });
    session.catch(() => undefined);   // inspected by the tests that expect a rejection
    return { client, session };
  }

  afterEach(function () { nextSocket = null; });

  it('GO after STRUCTURED_REPLY and SET_META_CONTEXT on the same export: structured, base:allocation, DF', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      await client.option(OPT.STRUCTURED_REPLY);
      await client.option(OPT.SET_META_CONTEXT, metaPayload('beta', ['base:allocation']));
      await client.sendOption(OPT.GO, infoPayload('beta'));
      const s = await session;
      expect(s.lun).to.equal(fx.lun('beta'));
      expect(s.structured).to.equal(true);
      expect(s.baseAllocation).to.equal(true);
      expect(s.exportFlags & TFLAG.SEND_DF).to.equal(TFLAG.SEND_DF);
      expect(last(await client.readOptionReplies()).type).to.equal(REP.ACK);
    } finally {
      client.destroy();
    }
  });

  it('SET_META_CONTEXT on "" applies to GO of the first LUN by name', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      await client.option(OPT.STRUCTURED_REPLY);
      await client.option(OPT.SET_META_CONTEXT, metaPayload('', ['base:allocation']));
      await client.sendOption(OPT.GO, infoPayload('alpha'));
      const s = await session;
      expect(s.lun).to.equal(fx.lun('alpha'));
      expect(s.baseAllocation).to.equal(true);
    } finally {
      client.destroy();
    }
  });

  it('SET_META_CONTEXT on one export does not select base:allocation for another', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      await client.option(OPT.STRUCTURED_REPLY);
      await client.option(OPT.SET_META_CONTEXT, metaPayload('alpha', ['base:allocation']));
      await client.sendOption(OPT.GO, infoPayload('beta'));
      const s = await session;
      expect(s.lun).to.equal(fx.lun('beta'));
      expect(s.baseAllocation).to.equal(false);
    } finally {
      client.destroy();
    }
  });

  it('a later SET_META_CONTEXT without base:allocation deselects it', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      await client.option(OPT.STRUCTURED_REPLY);
      await client.option(OPT.SET_META_CONTEXT, metaPayload('alpha', ['base:allocation']));
      const r = await client.option(OPT.SET_META_CONTEXT, metaPayload('alpha', []));
      expect(r.map((x) => x.type)).to.deep.equal([REP.ACK]);
      await client.sendOption(OPT.GO, infoPayload('alpha'));
      expect((await session).baseAllocation).to.equal(false);
    } finally {
      client.destroy();
    }
  });

  it('hands bytes pipelined after GO to transmission as leftover', async function () {
    const { client, session } = await pair();
    try {
      await client.greeting();
      const req = encodeRequest({ type: CMD.READ, cookie: 9n, offset: 0, length: 512 });
      await client.write(Buffer.concat([u32(FLAG_FIXED_NEWSTYLE), encodeOption(OPT.GO, infoPayload('alpha')), req]));
      const s = await session;
      // Everything the client wrote went out in one segment; whatever arrived after GO is leftover.
      expect(req.subarray(0, s.leftover.length).equals(s.leftover)).to.equal(true);
      expect(s.leftover.length).to.equal(req.length);
    } finally {
      client.destroy();
    }
  });

  it('rejects with NegotiationEnded on unknown client flags', async function () {
    const { client, session } = await pair();
    try {
      await client.greeting();
      await client.write(u32(0x80000001));
      const err = await session.then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(NegotiationEnded);
    } finally {
      client.destroy();
    }
  });

  it('rejects with NegotiationEnded on EXPORT_NAME of an unknown export', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      await client.sendOption(OPT.EXPORT_NAME, Buffer.from('nope'));
      const err = await session.then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(NegotiationEnded);
    } finally {
      client.destroy();
    }
  });

  it('while shutting down: options get ERR_SHUTDOWN and negotiation ends', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      shuttingDown = true;
      const r = await client.option(OPT.LIST);
      expect(r.map((x) => x.type)).to.deep.equal([REP.ERR_SHUTDOWN]);
      const err = await session.then(() => null, (e: unknown) => e);
      expect(err).to.be.instanceOf(NegotiationEnded);
    } finally {
      client.destroy();
    }
  });

  it('while shutting down: ABORT is still acknowledged', async function () {
    const { client, session } = await pair();
    try {
      await client.start();
      shuttingDown = true;
      const r = await client.option(OPT.ABORT);
      expect(r.map((x) => x.type)).to.deep.equal([REP.ACK]);
      expect(await session.then(() => null, (e: unknown) => e)).to.be.instanceOf(NegotiationEnded);
    } finally {
      client.destroy();
    }
  });

  it('rejects (not NegotiationEnded) when the client hangs up mid-option', async function () {
    const { client, session } = await pair();
    await client.start();
    await client.write(encodeOption(OPT.LIST, Buffer.alloc(0), 100).subarray(0, 16));
    client.socket.end();
    const err = await session.then(() => null, (e: unknown) => e);
    expect(err).to.be.instanceOf(Error);
    expect(err).to.not.be.instanceOf(NegotiationEnded);
    client.destroy();
  });
});

describe('parseInfoRequest', function () {
  it('parses a name and its information requests', function () {
    expect(parseInfoRequest(infoPayload('alpha', [INFO.NAME, INFO.BLOCK_SIZE]))).to.deep.equal({
      name: 'alpha', requests: [INFO.NAME, INFO.BLOCK_SIZE],
    });
    expect(parseInfoRequest(infoPayload(''))).to.deep.equal({ name: '', requests: [] });
  });

  it('accepts a 4096-byte name and refuses 4097', function () {
    expect(parseInfoRequest(infoPayload('n'.repeat(4096)))?.name.length).to.equal(4096);
    expect(parseInfoRequest(infoPayload('n'.repeat(4097)))).to.equal(null);
  });

  it('refuses truncated and over-long payloads', function () {
    const good = infoPayload('alpha', [INFO.NAME, INFO.DESCRIPTION]);
    for (let n = 0; n < good.length; n++) expect(parseInfoRequest(good.subarray(0, n)), `first ${n} bytes`).to.equal(null);
    expect(parseInfoRequest(Buffer.concat([good, Buffer.from([0])]))).to.equal(null);
    expect(parseInfoRequest(Buffer.concat([good, Buffer.from([0, 1])]))).to.equal(null);
  });

  it('refuses a name length past the end (including huge lengths)', function () {
    expect(parseInfoRequest(Buffer.from([0, 0, 0, 10, 0x61, 0, 0]))).to.equal(null);
    expect(parseInfoRequest(Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0]))).to.equal(null);
  });

  it('refuses a request count that does not match the data', function () {
    const p = infoPayload('a', [1]);
    p.writeUInt16BE(3, 4 + 1);
    expect(parseInfoRequest(p)).to.equal(null);
    p.writeUInt16BE(0, 4 + 1);
    expect(parseInfoRequest(p)).to.equal(null);
  });
});

describe('parseMetaContextRequest', function () {
  it('parses an export name and queries', function () {
    expect(parseMetaContextRequest(metaPayload('alpha', ['base:allocation', 'x:y']))).to.deep.equal({
      exportName: 'alpha', queries: ['base:allocation', 'x:y'],
    });
    expect(parseMetaContextRequest(metaPayload('', []))).to.deep.equal({ exportName: '', queries: [] });
  });

  it('refuses every truncation and trailing bytes', function () {
    const good = metaPayload('alpha', ['base:allocation', 'q']);
    for (let n = 0; n < good.length; n++) {
      expect(parseMetaContextRequest(good.subarray(0, n)), `first ${n} bytes`).to.equal(null);
    }
    expect(parseMetaContextRequest(Buffer.concat([good, Buffer.from([0])]))).to.equal(null);
  });

  it('refuses a query count larger than the queries present', function () {
    const p = metaPayload('a', ['base:allocation']);
    p.writeUInt32BE(2, 4 + 1);
    expect(parseMetaContextRequest(p)).to.equal(null);
    p.writeUInt32BE(0xffffffff, 4 + 1);
    expect(parseMetaContextRequest(p)).to.equal(null);
  });

  it('refuses lengths past the end', function () {
    const p = metaPayload('a', ['base:allocation']);
    p.writeUInt32BE(1000, 0);   // export name length
    expect(parseMetaContextRequest(p)).to.equal(null);
    const q = metaPayload('a', ['base:allocation']);
    q.writeUInt32BE(16, 4 + 1 + 4);   // query length one past the end
    expect(parseMetaContextRequest(q)).to.equal(null);
  });

  it('accepts 4096-byte names and queries, refuses 4097', function () {
    const s4096 = 'q'.repeat(4096);
    const s4097 = 'q'.repeat(4097);
    expect(parseMetaContextRequest(metaPayload(s4096, [s4096]))?.queries[0].length).to.equal(4096);
    expect(parseMetaContextRequest(metaPayload(s4097, []))).to.equal(null);
    expect(parseMetaContextRequest(metaPayload('a', [s4097]))).to.equal(null);
  });
});
