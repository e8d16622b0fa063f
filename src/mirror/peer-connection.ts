// One element of the connection array: a TCP connection to the peer's mirror listener, the
// time of its last sign of life, and its status. Requests go out with a per-connection id;
// replies come back in any order and complete them.
import type net from 'node:net';
import type { MirrorTransport } from '../security/mirror-tls.js';
import { FrameParser, STOP, type FrameSink } from '../net/frame-parser.js';
import { SocketReader } from '../net/socket-reader.js';
import { CorkedWriter } from '../net/corked-writer.js';
import {
  CONTROL_REQID, decodeHello, HelloError, MAX_HELLO_LENGTH, REPLY_DATA_MAGIC, REPLY_DATA_SIZE, REPLY_MAGIC, REPLY_SIZE, REQUEST_HEADER_SIZE, writeRequestHeader,
  type Hello, type MirrorRequestHeader,
} from './wire.js';

/** errno used when a request could not reach the peer (no answer: the link failed). */
export const ENOTCONN = 107;

export interface MirrorOp extends MirrorRequestHeader {
  payload: Buffer | null;
  /** Called once: 0, the peer's errno, or ENOTCONN when the link failed first; `data` for a HASH. */
  done(errno: number, data?: Buffer): void;
}

export type ElementStatus = 'down' | 'connecting' | 'up';

export class PeerConnection implements FrameSink {
  status: ElementStatus = 'down';
  /** Last sign of life from the peer (ms since epoch): a reply, the hello, or a heartbeat. */
  lastSeen = 0;
  /** Last time a reply arrived, or a request was sent to an idle connection (stall detection). */
  lastProgress = 0;
  socket: net.Socket | null = null;
  private out: CorkedWriter | null = null;
  private readonly pending = new Map<number, MirrorOp>();
  private nextReqId = 1;
  private parser: FrameParser | null = null;
  private reply = { reqId: 0, errno: 0 };
  private onDown: ((reason: string) => void) | null = null;
  /** Control messages from the receiver (CONTROL codes). */
  onControl: ((code: number) => void) | null = null;

  constructor(readonly index: number) {}

  get inflight(): number {
    return this.pending.size;
  }

  /** Requests wait for answers while none came for `ms` (heartbeats may flow while TCP is black-holed). */
  stalledFor(now: number): number {
    return this.pending.size > 0 ? now - this.lastProgress : 0;
  }

  /** Connect, send our hello, and resolve with the peer's. */
  async open(
    transport: MirrorTransport, host: string, port: number, hello: Buffer, timeoutMs: number, onDown: (reason: string) => void,
  ): Promise<Hello> {
    this.status = 'connecting';
    const { socket, ready } = transport.connect(host, port);
    this.socket = socket;
    this.out = new CorkedWriter(socket);
    socket.setKeepAlive(true, 1000);
    const timer = setTimeout(() => socket.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
    timer.unref();
    // Settles on an error, or when the socket is closed under us (the pool gave up on this attempt).
    const failed = new Promise<never>((_, reject) => {
      socket.once('error', reject);
      socket.once('close', () => reject(new Error('connection closed during the hello')));
    });
    failed.catch(() => undefined);   // after the hello, errors are handled by the close path
    try {
      await Promise.race([new Promise<void>((resolve) => socket.once(ready, resolve)), failed]);
      socket.write(hello);
      const reader = new SocketReader(socket);
      const len = (await Promise.race([reader.read(4), failed])).readUInt32BE(0);
      if (len > MAX_HELLO_LENGTH) throw new HelloError(`hello of ${len} bytes`);
      const answer = decodeHello(await Promise.race([reader.read(len), failed]));
      const rest = reader.detach();
      this.parser = new FrameParser(REPLY_SIZE, this);
      socket.on('data', (chunk: Buffer) => this.parser!.push(chunk));
      socket.on('error', () => undefined);
      socket.on('close', () => this.fail('connection closed'));
      this.onDown = onDown;
      this.status = 'up';
      this.lastSeen = Date.now();
      if (rest.length) this.parser.push(rest);
      return answer;
    } catch (err) {
      this.status = 'down';
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  send(op: MirrorOp): void {
    if (this.pending.size === 0) this.lastProgress = Date.now();
    op.reqId = this.nextReqId;
    this.nextReqId = (this.nextReqId + 1) >>> 0 || 1;
    this.pending.set(op.reqId, op);
    const header = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
    writeRequestHeader(header, op);
    const out = this.out!;
    out.write(header);
    if (op.payload) out.write(op.payload);
  }

  onHeader(buf: Buffer, at: number): number {
    const magic = buf.readUInt32BE(at);
    if (magic !== REPLY_MAGIC && magic !== REPLY_DATA_MAGIC) {
      this.close('bad reply magic from peer');
      return STOP;
    }
    this.reply.reqId = buf.readUInt32BE(at + 4);
    this.reply.errno = buf.readUInt32BE(at + 8);
    return magic === REPLY_DATA_MAGIC ? REPLY_DATA_SIZE : 0;
  }

  onFrame(payload: Buffer | null): void {
    if (this.reply.reqId === CONTROL_REQID) {
      this.lastSeen = Date.now();
      this.onControl?.(this.reply.errno);
      return;
    }
    const op = this.pending.get(this.reply.reqId);
    if (!op) {
      this.close(`reply for unknown request ${this.reply.reqId}`);
      return;
    }
    this.pending.delete(this.reply.reqId);
    this.lastSeen = this.lastProgress = Date.now();
    op.done(this.reply.errno, payload ? Buffer.from(payload) : undefined);
  }

  onDiscarded(): void { /* replies carry no payload */ }

  /** Close the connection; every request still waiting for an answer fails with ENOTCONN. */
  close(reason: string): void {
    this.socket?.destroy();
    this.fail(reason);
  }

  private fail(reason: string): void {
    if (this.status === 'down') return;
    this.status = 'down';
    this.parser?.stop();
    const ops = [...this.pending.values()];
    this.pending.clear();
    for (const op of ops) op.done(ENOTCONN);
    const cb = this.onDown;
    this.onDown = null;
    cb?.(reason);
  }
}
