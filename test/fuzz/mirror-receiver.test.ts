// Fuzz: the mirror receiver (src/mirror/receiver.ts) behind a real listener on 127.0.0.1:0, with
// a secondary LUN over a temp file. (1) Random bytes and broken hellos, followed by write
// requests: the process never crashes, the connection is closed once the client is done, and
// the backing file is unchanged unless the hello really paired the LUN. (2) A valid hello, then
// random request streams: the answer hello and every reply are well-formed (a reqId we sent, a
// known errno), nothing out of range succeeds, the file never grows, and the connection count
// of the LUN returns to zero after the close.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import fc from 'fast-check';
import { Lun } from '../../src/lun/lun.js';
import { LunRegistry } from '../../src/lun/registry.js';
import { MirrorReceiver } from '../../src/mirror/receiver.js';
import {
  decodeHello, encodeHello, HELLO_ANSWER, HELLO_OFFER, MAX_HELLO_LENGTH, MAX_MIRROR_PAYLOAD, MIRROR_OP, PAIR,
  REPLY_MAGIC, REPLY_SIZE, REQUEST_HEADER_SIZE, REQUEST_MAGIC, type Hello, type LunOffer,
} from '../../src/mirror/wire.js';
import { Backing } from '../../src/storage/backing.js';
import { silentLogger } from '../nbd/support.js';
import { bytes, fuzz, ProcessGuard, sleep, splitAt, timeoutFor, TOLERATE_KNOWN, u32, utf8String, within, type TargetBudget } from './harness.js';
import { helloBodyArb } from './mirror-arbs.js';

const LUN_NAME = 'mirr';
const LUN_SIZE = 256 * 1024;
const SETTLE_MS = 2000;
const ERRNOS = new Set([0, 1, 5, 12, 22, 28, 75, 95, 108, 116]);

// ---- generation --------------------------------------------------------------------------------

const siteArb = fc.oneof({ weight: 4, arbitrary: fc.constant('a') }, { weight: 1, arbitrary: utf8String(20).filter((s) => s !== 'b') });
const id8 = bytes(8, 8);

const offerArb: fc.Arbitrary<LunOffer> = fc.record({
  id: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 0xffff })),
  name: fc.oneof({ weight: 5, arbitrary: fc.constant(LUN_NAME) }, { weight: 1, arbitrary: fc.constantFrom('nope', '', 'MIRR') }),
  size: fc.oneof({ weight: 5, arbitrary: fc.constant(LUN_SIZE) }, { weight: 2, arbitrary: fc.integer({ min: 0, max: LUN_SIZE }) },
    { weight: 1, arbitrary: fc.constantFrom(LUN_SIZE + 1, Number.MAX_SAFE_INTEGER) }),
  instance: id8,
  nextSeq: fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 1, max: 5 }) }, { weight: 1, arbitrary: fc.constantFrom(0, 2 ** 40, Number.MAX_SAFE_INTEGER) }),
});

const u64Arb = (small: fc.Arbitrary<number>) => fc.oneof(
  { weight: 60, arbitrary: small.map(BigInt) },
  { weight: 1, arbitrary: fc.constantFrom(2n ** 53n - 1n, 2n ** 53n, 2n ** 64n - 1n) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }) },
);

const requestArb = fc.record({
  magic: fc.oneof({ weight: 40, arbitrary: fc.constant(REQUEST_MAGIC) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) }),
  type: fc.oneof({ weight: 12, arbitrary: fc.constantFrom(MIRROR_OP.WRITE, MIRROR_OP.WRITE_ZEROES, MIRROR_OP.TRIM, MIRROR_OP.FLUSH) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }) }),
  flags: fc.oneof(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 255 })),
  lunId: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
  seq: u64Arb(fc.integer({ min: 0, max: 30 })),
  dep: u64Arb(fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 30 }))),
  offset: u64Arb(fc.oneof(fc.integer({ min: 0, max: LUN_SIZE / 512 }).map((b) => b * 512), fc.integer({ min: 0, max: LUN_SIZE + 4096 }))),
  length: fc.oneof({ weight: 1, arbitrary: fc.constant(0) }, { weight: 8, arbitrary: fc.integer({ min: 1, max: 4096 }) },
    { weight: 1, arbitrary: fc.integer({ min: 1, max: LUN_SIZE + 1 }) },
    { weight: 1, arbitrary: fc.constantFrom(MAX_MIRROR_PAYLOAD, MAX_MIRROR_PAYLOAD + 1, 0xffffffff) }),
  payloadLen: fc.oneof({ weight: 10, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 100 }) }),
  fill: fc.integer({ min: 0, max: 255 }),
});

type Req = typeof requestArb extends fc.Arbitrary<infer T> ? T : never;

function encodeReq(r: Req, reqId: number): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(r.magic >>> 0, 0);
  b[4] = r.type;
  b[5] = r.flags;
  b.writeUInt16BE(r.lunId, 6);
  b.writeUInt32BE(reqId >>> 0, 8);
  b.writeBigUInt64BE(r.seq, 12);
  b.writeBigUInt64BE(r.dep, 20);
  b.writeBigUInt64BE(r.offset, 28);
  b.writeUInt32BE(r.length >>> 0, 36);
  if (r.type !== MIRROR_OP.WRITE) return b;
  const n = r.payloadLen ?? (r.length <= 16384 ? r.length : 50);
  return Buffer.concat([b, Buffer.alloc(n, r.fill)]);
}

interface Parsed { reqId: number; type: number; lunId: number; seq: number; offset: number; length: number }

/** The request stream as the receiver parses it: complete requests, and whether it hits a violation. */
function modelStream(s: Buffer): { requests: Parsed[]; violation: boolean } {
  const requests: Parsed[] = [];
  let at = 0;
  const u64 = (o: number) => s.readBigUInt64BE(o);
  while (at + REQUEST_HEADER_SIZE <= s.length) {
    if (s.readUInt32BE(at) !== REQUEST_MAGIC) return { requests, violation: true };
    if ([12, 20, 28].some((o) => u64(at + o) >= 2n ** 53n)) return { requests, violation: true };
    const r: Parsed = {
      type: s[at + 4], lunId: s.readUInt16BE(at + 6), reqId: s.readUInt32BE(at + 8), seq: Number(u64(at + 12)),
      offset: Number(u64(at + 28)), length: s.readUInt32BE(at + 36),
    };
    at += REQUEST_HEADER_SIZE;
    if (r.type === MIRROR_OP.WRITE) {
      if (r.length > MAX_MIRROR_PAYLOAD) return { requests, violation: true };
      if (at + r.length > s.length) break;
      at += r.length;
    }
    requests.push(r);
  }
  return { requests, violation: false };
}

// ---- fixture --------------------------------------------------------------------------------------

const RANDOM_BUDGET: TargetBudget = { runs: 500, capMs: 4000 };
const VALID_BUDGET: TargetBudget = { runs: 120, capMs: 3000 };

describe('fuzz: mirror receiver', function () {
  this.timeout(timeoutFor(RANDOM_BUDGET) + timeoutFor(VALID_BUDGET));
  let dir: string;
  let file: string;
  let lun: Lun;
  let receiver: MirrorReceiver;
  let port: number;
  const guard = new ProcessGuard();

  before(async function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fuzz-rx-'));
    file = path.join(dir, 'mirr.img');
    const init = Buffer.alloc(LUN_SIZE);
    for (let i = 0; i < LUN_SIZE; i++) init[i] = (i * 7) & 0xff;
    fs.writeFileSync(file, init);
    const registry = new LunRegistry();
    lun = new Lun({ name: LUN_NAME, path: file, role: 'secondary', mirror: 'none', readOnly: false, description: '' },
      await Backing.open(file, false));
    registry.add(lun);
    receiver = new MirrorReceiver(registry, { site: 'b', peerSite: '', idleCheckMs: 1000, peerAlive: () => true }, silentLogger());
    port = (await receiver.listen('127.0.0.1', 0)).port;
  });

  after(async function () {
    guard.disarm();
    await receiver?.close();
    await lun?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const digest = () => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

  /** Send `data` (split at `cuts`), optionally wait for `done`, half-close, and wait for the close; returns what came back. */
  async function exchange(data: Buffer, cuts: number[], done?: (out: Buffer) => boolean): Promise<Buffer> {
    const socket = net.connect({ host: '127.0.0.1', port, noDelay: true });
    socket.on('error', () => undefined);
    const received: Buffer[] = [];
    let wake = () => undefined as void;
    socket.on('data', (d: Buffer) => { received.push(d); wake(); });
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    try {
      await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
      for (const c of splitAt(data, cuts)) socket.write(c);
      if (done) {
        // Replies due: wait for them, or until the stream has been quiet for a while (a request
        // may legitimately wait for a dep that never comes).
        for (;;) {
          if (done(Buffer.concat(received))) break;
          const n = received.length;
          await new Promise<void>((resolve) => {
            const t = setTimeout(resolve, 25);
            wake = () => { clearTimeout(t); resolve(); };
          });
          wake = () => undefined;
          if (received.length === n) break;
        }
      }
      socket.end();
      await within(closed, SETTLE_MS, 'the receiver closing the connection after the client finished');
    } finally {
      socket.destroy();
    }
    return Buffer.concat(received);
  }

  async function connectionsDrained(): Promise<void> {
    const state = receiver.secondaries.get(LUN_NAME);
    const deadline = Date.now() + SETTLE_MS;
    while (state && state.connections !== 0) {
      if (Date.now() > deadline) throw new Error(`LEAK: ${state.connections} connection(s) still counted on the LUN after the close`);
      await sleep(2);
    }
    if (state) expect(state.feeder, 'feeder after every connection closed').to.equal(null);
  }

  /** Would this hello (length prefix + body) pair our LUN? */
  function pairs(prefixed: Buffer): boolean {
    if (prefixed.length < 4) return false;
    const len = prefixed.readUInt32BE(0);
    if (len > MAX_HELLO_LENGTH || prefixed.length < 4 + len) return false;
    let h: Hello;
    try {
      h = decodeHello(prefixed.subarray(4, 4 + len));
    } catch {
      return false;
    }
    return h.kind === HELLO_OFFER && h.site !== 'b' && h.offers.some((o) => o.name === LUN_NAME && o.size <= LUN_SIZE);
  }

  it('survives random bytes and broken hellos without touching the LUN', async function () {
    const writes = fc.array(requestArb.map((r) => ({ ...r, magic: REQUEST_MAGIC, type: MIRROR_OP.WRITE, payloadLen: null })), { maxLength: 3 });
    const inputArb = fc.record({
      hello: fc.oneof(
        { weight: 2, arbitrary: bytes(64) },
        { weight: 3, arbitrary: helloBodyArb.map((b) => Buffer.concat([u32(b.length), b])) },
        { weight: 1, arbitrary: fc.tuple(fc.integer({ min: 0, max: 0xffffffff }), helloBodyArb).map(([n, b]) => Buffer.concat([u32(n), b])) },
        { weight: 1, arbitrary: fc.constant(u32(MAX_HELLO_LENGTH + 1)) },
        // A hello for our LUN with a few bytes overwritten (it may or may not still pair).
        { weight: 3, arbitrary: fc.tuple(siteArb, id8, offerArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 }))
          .map(([site, session, o, edits]) => {
            const b = encodeHello({ kind: HELLO_OFFER, site, session, offers: [{ ...o, name: LUN_NAME }], answers: [] });
            for (const [at, v] of edits) b[at % b.length] = v;
            return b;
          }) },
        // Well-formed but refused: an answer instead of an offer, our own site name, other LUNs only.
        { weight: 2, arbitrary: fc.tuple(fc.constantFrom('answer', 'own-site', 'other-lun'), id8, fc.array(offerArb, { maxLength: 3 })).map(([why, session, offers]) => {
          if (why === 'answer') return encodeHello({ kind: HELLO_ANSWER, site: 'a', session, offers: [], answers: [{ id: 0, status: 0, size: LUN_SIZE }] });
          if (why === 'own-site') return encodeHello({ kind: HELLO_OFFER, site: 'b', session, offers, answers: [] });
          return encodeHello({ kind: HELLO_OFFER, site: 'a', session, offers: offers.map((o) => ({ ...o, name: 'other' })), answers: [] });
        }) },
      ),
      writes,
      cuts: fc.array(fc.nat(), { maxLength: 6 }),
    });
    let before = digest();
    let paired = 0;
    guard.arm();
    try {
      await fuzz('mirror receiver (random bytes / bad hello)', fc.asyncProperty(inputArb, async ({ hello, writes: ws, cuts }) => {
        const stream = Buffer.concat([hello, ...ws.map((w, i) => encodeReq(w, i))]);
        const willPair = pairs(hello);
        const out = await exchange(stream, cuts);
        await sleep(0);
        guard.check();
        if (willPair) {
          // A real pairing may write: let what it applied land, and take that as the new baseline.
          paired++;
          await sleep(20);
          before = digest();
          await connectionsDrained();
          return;
        }
        expect(digest(), 'the LUN changed although the hello did not pair it').to.equal(before);
        // Refused or unpaired: at most an answer hello (valid offer, no usable LUN) and EINVAL replies.
        if (out.length) {
          const len = out.readUInt32BE(0);
          const answer = decodeHello(out.subarray(4, 4 + len));
          expect(answer.kind).to.equal(HELLO_ANSWER);
          expect(answer.site).to.equal('b');
          for (let at = 4 + len; at < out.length; at += REPLY_SIZE) {
            expect(out.readUInt32BE(at)).to.equal(REPLY_MAGIC);
            expect(out.readUInt32BE(at + 8)).to.equal(22);
          }
        }
        await connectionsDrained();
      }), RANDOM_BUDGET);
    } finally {
      guard.disarm();
    }
    console.log(`      (${paired} of the inputs happened to pair the LUN)`);
  });

  it('answers a valid hello and then only well-formed replies; never writes out of range', async function () {
    const inputArb = fc.record({
      site: siteArb,
      session: id8,
      offers: fc.tuple(offerArb.map((o) => ({ ...o, name: LUN_NAME })), fc.array(offerArb, { maxLength: 2 })).map(([o, rest]) => [o, ...rest]),
      items: fc.array(fc.oneof({ weight: 15, arbitrary: requestArb.map((r) => ({ kind: 'req' as const, r })) },
        { weight: 1, arbitrary: bytes(50, 1).map((b) => ({ kind: 'garbage' as const, b })) }), { maxLength: 12 }),
      cuts: fc.array(fc.nat(), { maxLength: 8 }),
    });
    const stats = { ok: 0, errors: 0, violations: 0 };
    guard.arm();
    try {
      await fuzz('mirror receiver (valid hello + requests)', fc.asyncProperty(inputArb, async (input) => {
        const hello = encodeHello({ kind: HELLO_OFFER, site: input.site, session: input.session, offers: input.offers, answers: [] });
        const stream = Buffer.concat(input.items.map((it, i) => (it.kind === 'req' ? encodeReq(it.r, i + 1) : it.b)));
        const model = modelStream(stream);
        const byId = new Map(model.requests.map((r) => [r.reqId, r]));
        const complete = (out: Buffer) => {
          if (out.length < 4) return false;
          return out.length >= 4 + out.readUInt32BE(0) + REPLY_SIZE * model.requests.length;
        };
        const waitingBefore = receiver.secondaries.get(LUN_NAME)?.order.waiting ?? 0;
        const out = await exchange(Buffer.concat([hello, stream]), input.cuts, complete);
        await sleep(0);
        guard.check();

        expect(out.length, 'no answer hello').to.be.at.least(4);
        const len = out.readUInt32BE(0);
        const answer = decodeHello(out.subarray(4, 4 + len));
        expect(answer.kind).to.equal(HELLO_ANSWER);
        expect(answer.site).to.equal('b');
        expect(answer.session.equals(input.session)).to.equal(true);
        expect(answer.answers.map((a) => a.id)).to.deep.equal(input.offers.map((o) => o.id));
        const targets = new Map<number, number>();
        answer.answers.forEach((a, i) => {
          const o = input.offers[i];
          if (o.name !== LUN_NAME) expect(a.status).to.equal(PAIR.MISSING);
          else if (o.size > LUN_SIZE) expect(a.status).to.equal(PAIR.SMALLER);
          else expect(a.status, 'a fresh session must pair the LUN').to.equal(PAIR.OK);
          if (a.status === PAIR.OK) targets.set(a.id, o.size);
        });
        const seen = new Set<number>();
        const rest = out.subarray(4 + len);
        expect(rest.length % REPLY_SIZE, 'partial reply').to.equal(0);
        for (let at = 0; at < rest.length; at += REPLY_SIZE) {
          expect(rest.readUInt32BE(at), 'reply magic').to.equal(REPLY_MAGIC);
          const reqId = rest.readUInt32BE(at + 4);
          const errno = rest.readUInt32BE(at + 8);
          const r = byId.get(reqId);
          expect(r, `reply for reqId ${reqId}, which no complete request carried`).to.not.equal(undefined);
          expect(seen.has(reqId), `second reply for reqId ${reqId}`).to.equal(false);
          seen.add(reqId);
          expect(ERRNOS.has(errno), `unknown errno ${errno}`).to.equal(true);
          if (errno === 0) {
            stats.ok++;
            const size = targets.get(r!.lunId);
            expect(size, 'success for a LUN id that was not paired').to.not.equal(undefined);
            if (r!.type !== MIRROR_OP.FLUSH) {
              expect([MIRROR_OP.WRITE, MIRROR_OP.WRITE_ZEROES, MIRROR_OP.TRIM]).to.include(r!.type);
              expect(r!.length > 0 && r!.seq > 0 && r!.offset + r!.length <= size!, `out-of-range request succeeded: ${JSON.stringify(r)}`).to.equal(true);
            }
          } else {
            stats.errors++;
          }
        }
        if (model.violation) stats.violations++;
        expect(fs.statSync(file).size, 'the LUN file changed size').to.equal(LUN_SIZE);
        await connectionsDrained();
        // Requests that waited for a dep must not outlive their connection (they hold their payload).
        // (Compared with the count before this input: a shrink that reuses the instance of an
        // earlier input would otherwise also see that input's leftovers.)
        const state = receiver.secondaries.get(LUN_NAME);
        if (state && !TOLERATE_KNOWN) {   // (known bug, regressions.test.ts)
          const deadline = Date.now() + 200;
          while (state.order.waiting > waitingBefore && Date.now() < deadline) await sleep(5);
          expect(state.order.waiting, 'requests still waiting for a dep after their connection closed').to.be.at.most(waitingBefore);
        }
      }), VALID_BUDGET);
    } finally {
      guard.disarm();
      console.log(`      replies: ${stats.ok} ok, ${stats.errors} errors; ${stats.violations} streams with a protocol violation`);
    }
  });
});
