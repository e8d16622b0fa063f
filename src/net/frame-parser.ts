// Framing of "fixed header + optional payload" protocols (NBD transmission, the mirror wire).
// The sink reads each header and says how many payload bytes follow; a payload that fits in
// one socket chunk is handed on as a slice of it (no copy), otherwise it is gathered once.

export interface FrameSink {
  /**
   * A complete header at buf[at, at + headerSize). Return the payload length to collect (0 for
   * none), DISCARD(n) to skip n bytes unread, or STOP to end parsing (protocol violation).
   */
  onHeader(buf: Buffer, at: number): number;
  /** The payload of the last header (null when it had none). */
  onFrame(payload: Buffer | null): void;
  /** The bytes announced by DISCARD(n) were skipped. */
  onDiscarded(): void;
}

export const STOP = Number.NaN;
export const DISCARD = (n: number): number => -n - 1;

const enum Phase { Header, Payload, Discard, Stopped }

export class FrameParser {
  private phase = Phase.Header;
  private readonly header: Buffer;
  private headerFill = 0;
  private payload: Buffer | null = null;
  private payloadLen = 0;
  private payloadFill = 0;
  private discardLeft = 0;

  constructor(private readonly headerSize: number, private readonly sink: FrameSink) {
    this.header = Buffer.allocUnsafe(headerSize);
  }

  /** Stop parsing for good (violation, disconnect request). */
  stop(): void {
    this.phase = Phase.Stopped;
  }

  get stopped(): boolean {
    return this.phase === Phase.Stopped;
  }

  push(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length && this.phase !== Phase.Stopped) {
      if (this.phase === Phase.Header) at = this.takeHeader(chunk, at);
      else if (this.phase === Phase.Payload) at = this.takePayload(chunk, at);
      else at = this.takeDiscard(chunk, at);
    }
  }

  private takeHeader(chunk: Buffer, at: number): number {
    let plan: number;
    if (this.headerFill === 0 && chunk.length - at >= this.headerSize) {
      plan = this.sink.onHeader(chunk, at);
      at += this.headerSize;
    } else {
      const n = Math.min(this.headerSize - this.headerFill, chunk.length - at);
      chunk.copy(this.header, this.headerFill, at, at + n);
      this.headerFill += n;
      at += n;
      if (this.headerFill < this.headerSize) return at;
      this.headerFill = 0;
      plan = this.sink.onHeader(this.header, 0);
    }
    if (this.phase === Phase.Stopped) return chunk.length;   // the sink stopped us
    if (Number.isNaN(plan)) {
      this.phase = Phase.Stopped;
      return chunk.length;
    }
    if (plan < 0) {
      this.discardLeft = -plan - 1;
      this.phase = Phase.Discard;
      if (this.discardLeft === 0) this.finishDiscard();
    } else if (plan === 0) {
      this.sink.onFrame(null);
    } else {
      this.payload = null;
      this.payloadLen = plan;
      this.payloadFill = 0;
      this.phase = Phase.Payload;
    }
    return at;
  }

  private takePayload(chunk: Buffer, at: number): number {
    const avail = chunk.length - at;
    if (this.payload === null && avail >= this.payloadLen) {
      return this.deliver(chunk.subarray(at, at + this.payloadLen), at + this.payloadLen);
    }
    if (this.payload === null) this.payload = Buffer.allocUnsafe(this.payloadLen);
    const n = Math.min(this.payloadLen - this.payloadFill, avail);
    chunk.copy(this.payload, this.payloadFill, at, at + n);
    this.payloadFill += n;
    return this.payloadFill === this.payloadLen ? this.deliver(this.payload, at + n) : at + n;
  }

  private deliver(payload: Buffer, at: number): number {
    this.payload = null;
    this.phase = Phase.Header;
    this.sink.onFrame(payload);
    return at;
  }

  private takeDiscard(chunk: Buffer, at: number): number {
    const n = Math.min(this.discardLeft, chunk.length - at);
    this.discardLeft -= n;
    if (this.discardLeft === 0) this.finishDiscard();
    return at + n;
  }

  private finishDiscard(): void {
    this.phase = Phase.Header;
    this.sink.onDiscarded();
  }
}
