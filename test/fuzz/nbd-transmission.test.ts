// Fuzz: the NBD transmission phase (src/nbd/transmission.ts) behind a real NbdServer on
// 127.0.0.1:0. A raw client negotiates (simple or structured replies, with or without
// base:allocation, sometimes pipelining its requests right behind NBD_OPT_GO) and sends a random
// request stream: valid and invalid headers, random types/flags/offsets/lengths, write payloads
// that are short or long, garbage, split at random points. A strict reply parser checks that
// every reply is well-formed (simple or structured magic, a cookie we sent and not yet answered,
// chunks that fit the request), that no out-of-range or malformed request ever succeeds, and
// that the server answers every complete request or closes the connection (when the stream asks
// for it: bad magic, oversized write, NBD_CMD_DISC) within a time bound. The server runs in this
// process: an uncaught exception or unhandled rejection fails the input.
import net from 'node:net';
import fc from 'fast-check';
import {
  CMD, CMD_FLAG, IHAVEOPT, INFO, MAX_PAYLOAD, META_BASE_ALLOCATION, NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC,
  NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN, OPT, REP, REPLY_FLAG_DONE, REPLY_MAGIC_OPT, REPLY_TYPE,
  REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/constants.js';
import { Fixture } from '../nbd/support.js';
import { bytes, fuzz, ProcessGuard, sleep, splitAt, timeoutFor, u16, u32, type TargetBudget } from './harness.js';

const EXPORT = 'fz';
const SIZE = 1024 * 1024;
const SETTLE_MS = 3000;
const ERRNOS = new Set([0, NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN]);

/** The flags each command may carry (NBD spec; FUA is valid on every command). */
const ALLOWED: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

// ---- generation ----------------------------------------------------------------------------------

const offsetArb = fc.oneof(
  { weight: 6, arbitrary: fc.integer({ min: 0, max: SIZE / 512 - 1 }).map((b) => BigInt(b * 512)) },
  { weight: 3, arbitrary: fc.integer({ min: 0, max: SIZE }).map(BigInt) },
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 8192 }).map((k) => BigInt(SIZE - k)) },
  { weight: 1, arbitrary: fc.constantFrom(BigInt(SIZE), BigInt(SIZE + 1), 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }) },
);

const lengthArb = fc.oneof(
  { weight: 2, arbitrary: fc.constant(0) },
  { weight: 8, arbitrary: fc.integer({ min: 1, max: 8192 }) },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: SIZE }) },
  { weight: 1, arbitrary: fc.constantFrom(SIZE, SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2 * MAX_PAYLOAD, 2 * MAX_PAYLOAD + 1, 0xffffffff) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) },
);

const requestArb = fc.record({
  magic: fc.oneof({ weight: 40, arbitrary: fc.constant(REQUEST_MAGIC) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) }),
  type: fc.oneof(
    { weight: 12, arbitrary: fc.constantFrom(CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS) },
    { weight: 1, arbitrary: fc.constant(CMD.DISC) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) },
  ),
  flags: fc.oneof({ weight: 4, arbitrary: fc.constant(0) }, { weight: 4, arbitrary: fc.integer({ min: 0, max: 63 }) },
    { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
  offset: offsetArb,
  length: lengthArb,
  /** Bytes of payload actually sent after a WRITE header: null for exactly `length` (when small). */
  payloadLen: fc.oneof({ weight: 10, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 200 }) }),
  fill: fc.integer({ min: 0, max: 255 }),
});

type Req = typeof requestArb extends fc.Arbitrary<infer T> ? T : never;

const itemArb = fc.oneof(
  { weight: 12, arbitrary: requestArb.map((r) => ({ kind: 'req' as const, r })) },
  { weight: 1, arbitrary: bytes(60, 1).map((b) => ({ kind: 'garbage' as const, b })) },
);

const inputArb = fc.record({
  structured: fc.boolean(),
  meta: fc.boolean(),
  pipelined: fc.boolean(),
  items: fc.array(itemArb, { minLength: 1, maxLength: 12 }),
  cuts: fc.array(fc.nat(), { maxLength: 10 }),
  pauses: fc.boolean(),
  cookieBase: fc.bigInt({ min: 0n, max: 2n ** 32n - 1n }),
});

type Input = typeof inputArb extends fc.Arbitrary<infer T> ? T : never;

function encodeReq(r: Req, cookie: bigint): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(r.magic >>> 0, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  if (r.type !== CMD.WRITE) return b;
  const n = r.payloadLen ?? (r.length <= 16384 ? r.length : 64);
  return Buffer.concat([b, Buffer.alloc(n, r.fill)]);
}

function handshakeBytes(input: Input): { bytes: Buffer; options: number[] } {
  const parts: Buffer[] = [u32(3)];   // FIXED_NEWSTYLE | NO_ZEROES
  const options: number[] = [];
  const opt = (option: number, data: Buffer) => {
    options.push(option);
    parts.push(IHAVEOPT, u32(option), u32(data.length), data);
  };
  const name = Buffer.from(EXPORT);
  if (input.structured) opt(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
  if (input.meta) {
    const q = Buffer.from(META_BASE_ALLOCATION);
    opt(OPT.SET_META_CONTEXT, Buffer.concat([u32(name.length), name, u32(1), u32(q.length), q]));
  }
  opt(OPT.GO, Buffer.concat([u32(name.length), name, u16(1), u16(INFO.BLOCK_SIZE)]));
  return { bytes: Buffer.concat(parts), options };
}

// ---- what the server sees: the request stream parsed by the protocol's rules ----------------------

interface Expected { cookie: bigint; type: number; flags: number; offset: bigint; length: number }

interface StreamModel {
  /** Complete requests the server must answer (unless it closes the connection for a violation). */
  requests: Expected[];
  /** The stream ends the connection: bad magic or a write too large to skip (violation), or DISC. */
  ending: null | 'violation' | 'disc';
}

function modelStream(s: Buffer): StreamModel {
  const requests: Expected[] = [];
  let at = 0;
  while (at + 28 <= s.length) {
    if (s.readUInt32BE(at) !== REQUEST_MAGIC) return { requests, ending: 'violation' };
    const r: Expected = {
      flags: s.readUInt16BE(at + 4), type: s.readUInt16BE(at + 6), cookie: s.readBigUInt64BE(at + 8),
      offset: s.readBigUInt64BE(at + 16), length: s.readUInt32BE(at + 24),
    };
    at += 28;
    if (r.type === CMD.DISC) return { requests, ending: 'disc' };
    if (r.type === CMD.WRITE) {
      if (r.length > 2 * MAX_PAYLOAD) return { requests, ending: 'violation' };
      if (at + r.length > s.length) break;   // incomplete: no reply due
      at += r.length;
    }
    requests.push(r);
  }
  return { requests, ending: null };
}

/** May this request succeed at all? (An independent statement of the spec's rules.) */
function mayRequestSucceed(r: Expected, structured: boolean, baseAllocation: boolean): boolean {
  const allowed = ALLOWED[r.type];
  if (allowed === undefined || (r.flags & ~allowed) !== 0) return false;
  if (r.type === CMD.FLUSH) return true;
  if ((r.flags & CMD_FLAG.DF) && !structured) return false;
  if (r.type === CMD.BLOCK_STATUS && !baseAllocation) return false;
  if ((r.type === CMD.READ || r.type === CMD.WRITE) && r.length > MAX_PAYLOAD) return false;
  return r.length > 0 && r.offset + BigInt(r.length) <= BigInt(SIZE);
}

// ---- strict reply parser -----------------------------------------------------------------------------

class ReplyChecker {
  private buf: Buffer = Buffer.alloc(0);
  private phase: 'greeting' | 'options' | 'transmission' = 'greeting';
  error: Error | null = null;
  /** Cookies answered (fully: simple reply or structured DONE). */
  readonly done = new Set<bigint>();
  private readonly open = new Map<bigint, { covered: number; error: boolean }>();
  private readonly byCookie = new Map<bigint, Expected>();
  private optionIndex = 0;
  structuredOk = false;
  baseAllocation = false;
  onProgress: () => void = () => undefined;

  constructor(private readonly options: number[]) {}

  expect(requests: Expected[]): void {
    for (const r of requests) {
      if (this.byCookie.has(r.cookie)) throw new Error('test bug: duplicate cookie');
      this.byCookie.set(r.cookie, r);
    }
  }

  get pendingBytes(): number {
    return this.buf.length;
  }

  get transmitting(): boolean {
    return this.phase === 'transmission';
  }

  push(chunk: Buffer): void {
    if (this.error) return;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    try {
      while (this.step()) { /* parse what is complete */ }
    } catch (err) {
      this.error = err as Error;
    }
    this.onProgress();
  }

  private fail(msg: string): never {
    throw new Error(`server output: ${msg}`);
  }

  private take(n: number): Buffer {
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Parse one unit; false if more bytes are needed. */
  private step(): boolean {
    if (this.phase === 'greeting') {
      if (this.buf.length < 18) return false;
      this.take(18);
      this.phase = 'options';
      return true;
    }
    if (this.phase === 'options') {
      if (this.buf.length < 20) return false;
      const len = this.buf.readUInt32BE(16);
      if (this.buf.length < 20 + len) return false;
      const h = this.take(20 + len);
      if (!h.subarray(0, 8).equals(REPLY_MAGIC_OPT)) this.fail('bad option reply magic');
      const option = h.readUInt32BE(8);
      const type = h.readUInt32BE(12);
      if (option !== this.options[this.optionIndex]) this.fail(`option reply for ${option}, expected ${this.options[this.optionIndex]}`);
      if (type & 0x80000000) {
        if (option === OPT.GO) this.fail(`GO failed: 0x${type.toString(16)}`);
        this.optionIndex++;   // an error reply ends that option
      } else if (type === REP.META_CONTEXT) {
        this.baseAllocation = true;
      } else if (type === REP.ACK) {
        if (option === OPT.STRUCTURED_REPLY) this.structuredOk = true;
        this.optionIndex++;
        if (option === OPT.GO) this.phase = 'transmission';
      }
      return true;
    }
    if (this.buf.length < 4) return false;
    const magic = this.buf.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      if (this.buf.length < 16) return false;
      const errno = this.buf.readUInt32BE(4);
      const cookie = this.buf.readBigUInt64BE(8);
      const r = this.request(cookie);
      if (this.open.has(cookie)) this.fail(`simple reply for cookie ${cookie} in the middle of its structured reply`);
      if (!ERRNOS.has(errno)) this.fail(`simple reply with unknown error ${errno}`);
      const dataLen = errno === 0 && r.type === CMD.READ ? r.length : 0;
      if (dataLen && this.structuredOk) this.fail('simple reply with read data although structured replies were negotiated');
      if (this.buf.length < 16 + dataLen) return false;
      this.take(16 + dataLen);
      this.answered(r, errno);
      return true;
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      if (this.buf.length < 20) return false;
      const len = this.buf.readUInt32BE(16);
      if (len > MAX_PAYLOAD + 64) this.fail(`structured chunk of ${len} bytes`);
      if (this.buf.length < 20 + len) return false;
      const c = this.take(20 + len);
      this.chunk(c.readUInt16BE(4), c.readUInt16BE(6), c.readBigUInt64BE(8), c.subarray(20));
      return true;
    }
    this.fail(`bad reply magic 0x${magic.toString(16)} (${this.buf.subarray(0, 16).toString('hex')})`);
  }

  private request(cookie: bigint): Expected {
    const r = this.byCookie.get(cookie);
    if (!r) this.fail(`reply for cookie ${cookie}, which no complete request carried`);
    if (this.done.has(cookie)) this.fail(`second reply for cookie ${cookie}`);
    return r;
  }

  private answered(r: Expected, errno: number): void {
    if (errno === 0 && !mayRequestSucceed(r, this.structuredOk, this.baseAllocation)) {
      this.fail(`request succeeded that must fail: ${JSON.stringify(r, (_, v) => (typeof v === 'bigint' ? v.toString() : v))}`);
    }
    this.done.add(r.cookie);
  }

  private chunk(flags: number, type: number, cookie: bigint, p: Buffer): void {
    if (!this.structuredOk) this.fail('structured reply without STRUCTURED_REPLY negotiated');
    const r = this.request(cookie);
    if (r.type !== CMD.READ && r.type !== CMD.BLOCK_STATUS) this.fail(`structured reply to command ${r.type}`);
    if (flags & ~REPLY_FLAG_DONE) this.fail(`unknown reply flags 0x${flags.toString(16)}`);
    const st = this.open.get(cookie) ?? { covered: 0, error: false };
    this.open.set(cookie, st);
    const inRange = (off: bigint, len: number) => off >= r.offset && off + BigInt(len) <= r.offset + BigInt(r.length);
    switch (type) {
      case REPLY_TYPE.NONE:
        if (p.length !== 0 || !(flags & REPLY_FLAG_DONE)) this.fail('bad NONE chunk');
        break;
      case REPLY_TYPE.OFFSET_DATA: {
        if (r.type !== CMD.READ || p.length < 9) this.fail(`bad OFFSET_DATA chunk (${p.length} bytes)`);
        const off = p.readBigUInt64BE(0);
        if (!inRange(off, p.length - 8)) this.fail(`OFFSET_DATA ${off}+${p.length - 8} outside the request`);
        st.covered += p.length - 8;
        break;
      }
      case REPLY_TYPE.OFFSET_HOLE: {
        if (r.type !== CMD.READ || p.length !== 12) this.fail('bad OFFSET_HOLE chunk');
        const off = p.readBigUInt64BE(0);
        const len = p.readUInt32BE(8);
        if (len === 0 || !inRange(off, len)) this.fail(`OFFSET_HOLE ${off}+${len} outside the request`);
        st.covered += len;
        break;
      }
      case REPLY_TYPE.BLOCK_STATUS: {
        if (r.type !== CMD.BLOCK_STATUS || p.length < 12 || (p.length - 4) % 8 !== 0) this.fail(`bad BLOCK_STATUS chunk (${p.length} bytes)`);
        if (p.readUInt32BE(0) !== 1) this.fail('BLOCK_STATUS for a context never selected');
        let sum = 0;
        for (let at = 4; at < p.length; at += 8) {
          const len = p.readUInt32BE(at);
          if (len === 0) this.fail('zero-length extent');
          if (p.readUInt32BE(at + 4) & ~3) this.fail('unknown base:allocation flags');
          sum += len;
        }
        if (sum > r.length) this.fail(`extents cover ${sum} bytes, the request ${r.length}`);
        if ((r.flags & CMD_FLAG.REQ_ONE) && p.length !== 12) this.fail('REQ_ONE answered with several extents');
        st.covered += sum;
        break;
      }
      case REPLY_TYPE.ERROR:
      case REPLY_TYPE.ERROR_OFFSET: {
        if (p.length < 6) this.fail('short ERROR chunk');
        const errno = p.readUInt32BE(0);
        const msgLen = p.readUInt16BE(4);
        if (errno === 0 || !ERRNOS.has(errno)) this.fail(`ERROR chunk with error ${errno}`);
        if (6 + msgLen + (type === REPLY_TYPE.ERROR_OFFSET ? 8 : 0) !== p.length) this.fail('ERROR chunk length mismatch');
        st.error = true;
        break;
      }
      default:
        this.fail(`unknown structured chunk type ${type}`);
    }
    if (flags & REPLY_FLAG_DONE) {
      this.open.delete(cookie);
      if (!st.error && r.type === CMD.READ && st.covered !== r.length) this.fail(`READ chunks cover ${st.covered} of ${r.length} bytes`);
      if (!st.error && r.type === CMD.BLOCK_STATUS && st.covered === 0) this.fail('BLOCK_STATUS without extents');
      this.answered(r, st.error ? 1 : 0);
    }
  }
}

// ---- the target -------------------------------------------------------------------------------------

const BUDGET: TargetBudget = { runs: 300, capMs: 3000 };

describe('fuzz: NBD transmission', function () {
  this.timeout(timeoutFor(BUDGET));
  let fx: Fixture;
  const guard = new ProcessGuard();
  const outcome = new Map<string, number>();

  before(async function () {
    fx = await Fixture.start([{ name: EXPORT, size: SIZE, fill: [[0, 65536], [512 * 1024, 65536]] }]);
  });

  after(async function () {
    guard.disarm();
    await fx?.stop();
  });

  async function drive(input: Input): Promise<void> {
    const hs = handshakeBytes(input);
    const cookies = input.items.map((_, i) => (input.cookieBase << 32n) | BigInt(i));
    const stream = Buffer.concat(input.items.map((it, i) => (it.kind === 'req' ? encodeReq(it.r, cookies[i]) : it.b)));
    const model = modelStream(stream);
    const checker = new ReplyChecker(hs.options);
    checker.expect(model.requests);

    const socket = net.connect({ host: '127.0.0.1', port: fx.port, noDelay: true });
    socket.on('error', () => undefined);
    let ended = false;
    let wake: () => void = () => undefined;
    socket.on('data', (d: Buffer) => checker.push(d));
    socket.on('end', () => { ended = true; wake(); });
    socket.on('close', () => { ended = true; wake(); });
    checker.onProgress = () => wake();
    const until = async (cond: () => boolean, what: string): Promise<void> => {
      const deadline = Date.now() + SETTLE_MS;
      while (!cond()) {
        if (checker.error) throw checker.error;
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`HANG: ${what} (answered ${checker.done.size}/${model.requests.length}, ending ${model.ending}, closed ${ended})`);
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, left);
          wake = () => { clearTimeout(t); resolve(); };
        });
      }
      if (checker.error) throw checker.error;
    };
    try {
      await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
      if (input.pipelined) {
        socket.write(hs.bytes);
      } else {
        socket.write(hs.bytes);
        await until(() => checker.transmitting || ended, 'the handshake');
        if (ended) throw new Error('server closed the connection during a valid handshake');
      }
      for (const c of splitAt(stream, input.cuts)) {
        socket.write(c);
        if (input.pauses) await sleep(0);
      }
      const allAnswered = () => model.requests.every((r) => checker.done.has(r.cookie));
      if (model.ending === null) {
        await until(allAnswered, 'replies to every complete request');
        if (ended) throw new Error('server closed the connection although the client broke no rule');
      } else if (model.ending === 'disc') {
        await until(() => allAnswered() && ended, 'replies to every request before DISC, then the close');
      } else {
        await until(() => ended, 'the server closing the connection after a protocol violation');
      }
      // Nothing may be left over once everything is answered: a partial reply is a malformed one.
      if (model.ending === null && checker.pendingBytes !== 0) throw new Error(`${checker.pendingBytes} stray bytes after the last reply`);
      const key = `${model.ending ?? 'open'}/${checker.structuredOk ? 'structured' : 'simple'}`;
      outcome.set(key, (outcome.get(key) ?? 0) + 1);
    } finally {
      socket.destroy();
    }
    await sleep(0);
    guard.check();
  }

  it('answers every complete request with well-formed replies, or closes the connection, and never crashes', async function () {
    guard.arm();
    try {
      await fuzz('nbd transmission (server)', fc.asyncProperty(inputArb, drive), BUDGET);
    } finally {
      guard.disarm();
      console.log(`      outcomes: ${JSON.stringify(Object.fromEntries(outcome))}`);
    }
  });
});
