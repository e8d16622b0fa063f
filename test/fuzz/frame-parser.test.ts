// Fuzz: the frame parser (src/net/frame-parser.ts) under arbitrary chunk splits. Splitting the
// same byte stream at random points (empty chunks included) must yield the same sequence of
// sink calls as delivering it at once, and both must match a reference model of the framing.
import { expect } from 'chai';
import fc from 'fast-check';
import { DISCARD, FrameParser, STOP, type FrameSink } from '../../src/net/frame-parser.js';
import { bytes, fuzz, splitAt, timeoutFor, type TargetBudget } from './harness.js';

// The sink's protocol, decoded from each header: byte 0 % 8 is the action, n the payload length.
const A = { PAYLOAD0: 0, PAYLOAD1: 1, PAYLOAD2: 2, DISCARD: 3, STOP: 4, STOP_IN_HEADER: 5, STOP_AFTER_FRAME: 6, DISCARD0: 7 } as const;

function decodeHeader(h: Buffer): { action: number; n: number } {
  const action = h[0] % 8;
  const n = h.length >= 3 ? h.readUInt16BE(1) % 600 : h[0] >> 3;
  return { action, n };
}

function encodeHeader(size: number, action: number, n: number, filler: number[]): Buffer {
  const h = Buffer.alloc(size);
  for (let i = 0; i < size; i++) h[i] = filler[i % filler.length] ?? 0;
  if (size >= 3) {
    h[0] = (h[0] & 0xf8) | action;
    h.writeUInt16BE(n % 600, 1);
  } else {
    h[0] = action | ((n % 32) << 3);
  }
  return h;
}

type Event = string;

class RecordingSink implements FrameSink {
  readonly events: Event[] = [];
  parser!: FrameParser;
  private stopAfterFrame = false;

  constructor(private readonly headerSize: number) {}

  onHeader(buf: Buffer, at: number): number {
    const h = buf.subarray(at, at + this.headerSize);
    this.events.push(`H ${h.toString('hex')}`);
    const { action, n } = decodeHeader(h);
    this.stopAfterFrame = action === A.STOP_AFTER_FRAME;
    switch (action) {
      case A.DISCARD: return DISCARD(n);
      case A.DISCARD0: return DISCARD(0);
      case A.STOP: return STOP;
      case A.STOP_IN_HEADER: this.parser.stop(); return 0;
      default: return n;
    }
  }

  onFrame(payload: Buffer | null): void {
    // Copy at once: the parser may hand a slice of a chunk or of a reused buffer.
    this.events.push(`F ${payload === null ? 'null' : payload.toString('hex')}`);
    if (this.stopAfterFrame) this.parser.stop();
  }

  onDiscarded(): void {
    this.events.push('D');
  }
}

function run(headerSize: number, chunks: Buffer[]): { events: Event[]; stopped: boolean } {
  const sink = new RecordingSink(headerSize);
  const parser = new FrameParser(headerSize, sink);
  sink.parser = parser;
  for (const c of chunks) parser.push(c);
  return { events: sink.events, stopped: parser.stopped };
}

/** What the parser must report for `stream`, computed directly over the whole byte array. */
function model(headerSize: number, stream: Buffer): { events: Event[]; stopped: boolean } {
  const events: Event[] = [];
  let pos = 0;
  for (;;) {
    if (pos + headerSize > stream.length) return { events, stopped: false };
    const h = stream.subarray(pos, pos + headerSize);
    events.push(`H ${h.toString('hex')}`);
    pos += headerSize;
    const { action, n } = decodeHeader(h);
    if (action === A.STOP || action === A.STOP_IN_HEADER) return { events, stopped: true };
    if (action === A.DISCARD || action === A.DISCARD0) {
      const len = action === A.DISCARD0 ? 0 : n;
      if (pos + len > stream.length) return { events, stopped: false };
      pos += len;
      events.push('D');
      continue;
    }
    if (n === 0) {
      events.push('F null');
    } else {
      if (pos + n > stream.length) return { events, stopped: false };
      events.push(`F ${stream.subarray(pos, pos + n).toString('hex')}`);
      pos += n;
    }
    if (action === A.STOP_AFTER_FRAME) return { events, stopped: true };
  }
}

// A stream of mostly well-formed frames (header + the payload it announces), with some garbage.
const frameArb = fc.record({
  action: fc.oneof({ weight: 6, arbitrary: fc.constantFrom(A.PAYLOAD0, A.PAYLOAD1, A.PAYLOAD2, A.DISCARD, A.DISCARD0) },
    { weight: 1, arbitrary: fc.constantFrom(A.STOP, A.STOP_IN_HEADER, A.STOP_AFTER_FRAME) }),
  n: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 40 }), fc.integer({ min: 0, max: 599 })),
  filler: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 1, maxLength: 4 }),
  payloadSeed: fc.integer({ min: 0, max: 255 }),
  garbage: fc.oneof({ weight: 8, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: bytes(24, 1) }),
});

const inputArb = fc.record({
  headerSize: fc.oneof(fc.integer({ min: 1, max: 4 }), fc.constantFrom(28, 40), fc.integer({ min: 1, max: 48 })),
  frames: fc.array(frameArb, { maxLength: 12 }),
  tail: bytes(30),
  cuts: fc.array(fc.nat(), { maxLength: 40 }),
  singleBytes: fc.boolean(),
});

type Frame = typeof frameArb extends fc.Arbitrary<infer T> ? T : never;

function buildStream(headerSize: number, frames: Frame[], tail: Buffer): Buffer {
  const parts: Buffer[] = [];
  for (const f of frames) {
    const h = encodeHeader(headerSize, f.action, f.n, f.filler);
    const { n } = decodeHeader(h);
    parts.push(h);
    if (f.action !== A.DISCARD0 && f.action !== A.STOP && f.action !== A.STOP_IN_HEADER) {
      const p = Buffer.alloc(n);
      for (let i = 0; i < n; i++) p[i] = (f.payloadSeed + i * 31) & 0xff;
      parts.push(p);
    }
    if (f.garbage) parts.push(f.garbage);
  }
  parts.push(tail);
  return Buffer.concat(parts);
}

const BUDGET: TargetBudget = { runs: 3000, capMs: 2500 };

describe('fuzz: frame parser', function () {
  this.timeout(timeoutFor(BUDGET));

  it('yields the same frames whatever the chunk splits, as the reference model says', async function () {
    await fuzz('frame-parser split invariance', fc.property(inputArb, ({ headerSize, frames, tail, cuts, singleBytes }) => {
      const stream = buildStream(headerSize, frames, tail);
      const whole = run(headerSize, [stream]);
      const expected = model(headerSize, stream);
      expect(whole).to.deep.equal(expected);
      const chunks = singleBytes ? [...stream].map((b) => Buffer.from([b])) : splitAt(stream, cuts);
      // Chunks that are views into a larger buffer, as socket chunks can be.
      const split = run(headerSize, chunks.map((c) => {
        const host = Buffer.alloc(c.length + 8, 0xee);
        c.copy(host, 4);
        return host.subarray(4, 4 + c.length);
      }));
      expect(split).to.deep.equal(expected);
    }), BUDGET);
  });
});
