// Transmission phase: frame requests off the socket, validate each once, run it against the
// LUN, and reply (out of order, cookie echoed). Hot path: plain Buffer calls, no logging,
// write payloads handed to the LUN as slices of the socket's own chunks where they fit.
import type { Socket } from 'node:net';
import type { Lun } from '../lun/lun.js';
import { NotFastError } from '../storage/backing.js';
import {
  CMD, CMD_FLAG, MAX_PAYLOAD, META_CONTEXT_ID_BASE_ALLOCATION, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP,
  NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN, REPLY_FLAG_DONE, REPLY_TYPE, REQUEST_HEADER_SIZE, REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_SIZE, STATE_HOLE, STATE_ZERO, STRUCTURED_HEADER_SIZE, STRUCTURED_REPLY_MAGIC,
} from './constants.js';
import { DISCARD, FrameParser, STOP, type FrameSink } from '../net/frame-parser.js';
import { writeU64 } from '../net/u64.js';
import { CorkedWriter } from '../net/corked-writer.js';
import { nbdErrno } from '../storage/errno.js';
import type { Session } from './handshake.js';

/** Flags each command accepts; anything else is EINVAL. The spec makes FUA valid on every command. */
const ALLOWED_FLAGS: Record<number, number> = {
  [CMD.READ]: CMD_FLAG.FUA | CMD_FLAG.DF,
  [CMD.WRITE]: CMD_FLAG.FUA,
  [CMD.DISC]: CMD_FLAG.FUA,
  [CMD.FLUSH]: CMD_FLAG.FUA,
  [CMD.TRIM]: CMD_FLAG.FUA,
  [CMD.CACHE]: CMD_FLAG.FUA,
  [CMD.WRITE_ZEROES]: CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
  [CMD.BLOCK_STATUS]: CMD_FLAG.FUA | CMD_FLAG.REQ_ONE,
};

/** Oversized write payloads up to this are read and thrown away (EINVAL); beyond, we hang up. */
const MAX_DISCARD = 2 * MAX_PAYLOAD;
/** Reads at least this long on sparse files are answered with OFFSET_HOLE chunks where they can. */
const SPARSE_READ_MIN = 64 * 1024;
const MAX_STATUS_EXTENTS = 1024;
/** Back-pressure: stop reading requests while this much is in flight or queued for the client. */
const MAX_INFLIGHT_BYTES = 128 * 1024 * 1024;
const MAX_INFLIGHT_REQUESTS = 1024;
const MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024;

export interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;   // Number: u64 values at or above 2^53 are replaced by Infinity (always out of range)
  length: number;
  payload: Buffer | null;
  /** performance.now() when the request was taken up (latency metrics). */
  start: number;
}

/** Why a connection was dropped for a protocol violation (reported once by the server). */
export class ProtocolViolation extends Error {}

export class Transmission implements FrameSink {
  private readonly parser = new FrameParser(REQUEST_HEADER_SIZE, this);
  private current: Request | null = null;
  private inflight = 0;
  private inflightBytes = 0;
  private paused = false;
  private draining = false;
  private idleWaiters: Array<() => void> = [];
  private readonly lun: Lun;
  private readonly out: CorkedWriter;

  constructor(
    private readonly socket: Socket,
    private readonly session: Session,
    private readonly onViolation: (err: ProtocolViolation) => void,
  ) {
    this.lun = session.lun;
    this.out = new CorkedWriter(socket);
    socket.on('data', this.onData);
    socket.on('drain', this.maybeResume);
    if (session.leftover.length) this.onData(session.leftover);
  }

  /** Graceful shutdown: requests from now on get ESHUTDOWN; in-flight ones finish. */
  drain(): void {
    this.draining = true;
  }

  /** Resolves when no request is in flight. */
  idle(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  // ---- framing ------------------------------------------------------------------------------

  private readonly onData = (chunk: Buffer): void => {
    this.parser.push(chunk);
  };

  onHeader(buf: Buffer, at: number): number {
    if (buf.readUInt32BE(at) !== REQUEST_MAGIC) {
      this.violate(`bad request magic 0x${buf.readUInt32BE(at).toString(16)}`);
      return STOP;
    }
    const offsetHi = buf.readUInt32BE(at + 16);
    const req: Request = {
      flags: buf.readUInt16BE(at + 4),
      type: buf.readUInt16BE(at + 6),
      cookieHi: buf.readUInt32BE(at + 8),
      cookieLo: buf.readUInt32BE(at + 12),
      offset: offsetHi >= 0x200000 ? Infinity : offsetHi * 0x100000000 + buf.readUInt32BE(at + 20),
      length: buf.readUInt32BE(at + 24),
      payload: null,
      start: 0,
    };
    this.current = req;
    if (req.type !== CMD.WRITE) return 0;
    if (req.length <= MAX_PAYLOAD) return req.length;
    if (req.length <= MAX_DISCARD) return DISCARD(req.length);
    this.violate(`write payload of ${req.length} bytes`);
    return STOP;
  }

  onFrame(payload: Buffer | null): void {
    const req = this.current!;
    this.current = null;
    req.payload = payload;
    this.dispatch(req);
  }

  onDiscarded(): void {
    const req = this.current!;
    this.current = null;
    this.begin(req);
    this.finish(req, NBD_EINVAL);
  }

  private violate(reason: string): void {
    this.parser.stop();
    this.socket.off('data', this.onData);
    this.onViolation(new ProtocolViolation(reason));
  }

  // ---- validation and dispatch ----------------------------------------------------------------

  private dispatch(req: Request): void {
    if (req.type === CMD.DISC) {
      // Finish what is in flight, then close; nothing after DISC is read.
      this.parser.stop();
      this.socket.off('data', this.onData);
      void this.idle().then(() => this.socket.end());
      return;
    }
    this.begin(req);
    const errno = this.draining ? NBD_ESHUTDOWN : this.validate(req);
    if (errno !== 0) this.finish(req, errno);
    else void this.handle(req);
  }

  /** Every check a request needs, in one place; handle() then trusts the fields. */
  validate(req: Request): number {
    const { type, flags, offset, length } = req;
    const allowed = ALLOWED_FLAGS[type];
    if (allowed === undefined) return NBD_EINVAL;
    if (flags & ~allowed) return NBD_EINVAL;
    if (type === CMD.FLUSH) return 0;   // offset and length are reserved; the spec asks servers not to check
    if ((flags & CMD_FLAG.DF) && !this.session.structured) return NBD_EINVAL;
    const writes = type === CMD.WRITE || type === CMD.TRIM || type === CMD.WRITE_ZEROES;
    if (writes && this.lun.readOnly) return NBD_EPERM;
    if (type === CMD.BLOCK_STATUS && !this.session.baseAllocation) return NBD_EINVAL;
    // Payload over the advertised maximum: EINVAL, except EOVERFLOW for a read that may not be fragmented.
    if ((type === CMD.READ || type === CMD.WRITE) && length > MAX_PAYLOAD) {
      return flags & CMD_FLAG.DF ? NBD_EOVERFLOW : NBD_EINVAL;
    }
    if (length === 0) return NBD_EINVAL;
    if (offset > this.lun.size || length > this.lun.size - offset) {
      return type === CMD.WRITE || type === CMD.WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    }
    return 0;
  }

  private async handle(req: Request): Promise<void> {
    const lun = this.lun;
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    try {
      switch (req.type) {
        case CMD.READ: return await this.read(req);
        case CMD.WRITE: await lun.write(req.payload!, req.offset, fua); break;
        case CMD.FLUSH: await lun.flush(); break;
        case CMD.TRIM: await lun.trim(req.offset, req.length, fua); break;
        case CMD.WRITE_ZEROES:
          await lun.zero(req.offset, req.length, (req.flags & CMD_FLAG.NO_HOLE) === 0, (req.flags & CMD_FLAG.FAST_ZERO) !== 0, fua);
          break;
        case CMD.CACHE: await lun.cache(req.offset, req.length); break;
        case CMD.BLOCK_STATUS: return this.blockStatus(req);
      }
      this.finish(req, 0);
    } catch (err) {
      lun.counters.errors++;
      this.finish(req, err instanceof NotFastError ? NBD_ENOTSUP : nbdErrno(err));
    }
  }

  private async read(req: Request): Promise<void> {
    const structured = this.session.structured;
    const headerSize = structured ? STRUCTURED_HEADER_SIZE + 8 : SIMPLE_REPLY_SIZE;
    if (structured && req.length >= SPARSE_READ_MIN && !(req.flags & CMD_FLAG.DF)
        && this.lun.sparse) {
      const extents = this.lun.extents(req.offset, req.length, 64);
      if (extents.length > 1 || extents[0]?.hole) return this.sparseRead(req, extents);
    }
    // One buffer for reply header and data: one socket write, no copy.
    const out = Buffer.allocUnsafe(headerSize + req.length);
    await this.lun.read(out.subarray(headerSize), req.offset);
    if (structured) {
      writeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, req, 8 + req.length);
      writeU64(out, STRUCTURED_HEADER_SIZE, req.offset);
    } else {
      writeSimpleReply(out, 0, 0, req);
    }
    this.send(out, req);
  }

  /** Structured READ over a sparse range: holes as OFFSET_HOLE chunks, data as OFFSET_DATA. */
  private async sparseRead(req: Request, extents: { length: number; hole: boolean }[]): Promise<void> {
    const covered = extents.reduce((n, e) => n + e.length, 0);
    if (covered < req.length) extents.push({ length: req.length - covered, hole: false });
    const chunks: Buffer[] = [];
    let pos = req.offset;
    for (const e of extents) {
      if (e.hole) {
        const c = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 12);
        writeStructuredHeader(c, 0, 0, REPLY_TYPE.OFFSET_HOLE, req, 12);
        writeU64(c, STRUCTURED_HEADER_SIZE, pos);
        c.writeUInt32BE(e.length, STRUCTURED_HEADER_SIZE + 8);
        chunks.push(c);
      } else {
        const c = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 8 + e.length);
        await this.lun.readPiece(c.subarray(STRUCTURED_HEADER_SIZE + 8), pos);
        writeStructuredHeader(c, 0, 0, REPLY_TYPE.OFFSET_DATA, req, 8 + e.length);
        writeU64(c, STRUCTURED_HEADER_SIZE, pos);
        chunks.push(c);
      }
      pos += e.length;
    }
    this.lun.countRead(req.length);
    const last = chunks[chunks.length - 1];
    last.writeUInt16BE(REPLY_FLAG_DONE, 4);
    this.send(chunks.length === 1 ? last : Buffer.concat(chunks), req);
  }

  private blockStatus(req: Request): void {
    const max = req.flags & CMD_FLAG.REQ_ONE ? 1 : MAX_STATUS_EXTENTS;
    const extents = this.lun.extents(req.offset, req.length, max);
    const payload = 4 + 8 * extents.length;
    const out = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + payload);
    writeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, req, payload);
    out.writeUInt32BE(META_CONTEXT_ID_BASE_ALLOCATION, STRUCTURED_HEADER_SIZE);
    let at = STRUCTURED_HEADER_SIZE + 4;
    for (const e of extents) {
      out.writeUInt32BE(e.length, at);
      out.writeUInt32BE(e.hole ? STATE_HOLE | STATE_ZERO : 0, at + 4);
      at += 8;
    }
    this.send(out, req);
  }

  // ---- replies and flow control ----------------------------------------------------------------

  private begin(req: Request): void {
    req.start = performance.now();
    this.inflight++;
    this.inflightBytes += req.length;
    if (!this.paused && (this.inflightBytes > MAX_INFLIGHT_BYTES || this.inflight > MAX_INFLIGHT_REQUESTS)) {
      this.paused = true;
      this.socket.pause();
    }
  }

  /** Reply with no data: success or an error (structured error chunk where a READ/BLOCK_STATUS needs one). */
  private finish(req: Request, errno: number): void {
    if (errno !== 0 && this.session.structured && (req.type === CMD.READ || req.type === CMD.BLOCK_STATUS)) {
      const out = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 6);
      writeStructuredHeader(out, 0, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, req, 6);
      out.writeUInt32BE(errno, STRUCTURED_HEADER_SIZE);
      out.writeUInt16BE(0, STRUCTURED_HEADER_SIZE + 4);
      this.send(out, req);
      return;
    }
    const out = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
    writeSimpleReply(out, 0, errno, req);
    this.send(out, req);
  }

  private send(out: Buffer, req: Request): void {
    if (!this.socket.destroyed) {
      this.out.write(out);
    }
    this.inflight--;
    this.inflightBytes -= req.length;
    this.lun.stats.latency?.(req.type, (performance.now() - req.start) / 1000);
    this.maybeResume();
    if (this.inflight === 0 && this.idleWaiters.length) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private readonly maybeResume = (): void => {
    if (!this.paused) {
      if (this.socket.writableLength > MAX_QUEUED_REPLY_BYTES) {
        this.paused = true;
        this.socket.pause();
      }
      return;
    }
    if (this.inflightBytes <= MAX_INFLIGHT_BYTES / 2 && this.inflight <= MAX_INFLIGHT_REQUESTS / 2
        && this.socket.writableLength <= MAX_QUEUED_REPLY_BYTES / 2) {
      this.paused = false;
      this.socket.resume();
    }
  };
}

function writeSimpleReply(out: Buffer, at: number, errno: number, req: Request): void {
  out.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  out.writeUInt32BE(errno, at + 4);
  out.writeUInt32BE(req.cookieHi, at + 8);
  out.writeUInt32BE(req.cookieLo, at + 12);
}

function writeStructuredHeader(out: Buffer, at: number, flags: number, type: number, req: Request, length: number): void {
  out.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  out.writeUInt16BE(flags, at + 4);
  out.writeUInt16BE(type, at + 6);
  out.writeUInt32BE(req.cookieHi, at + 8);
  out.writeUInt32BE(req.cookieLo, at + 12);
  out.writeUInt32BE(length, at + 16);
}
