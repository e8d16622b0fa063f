// Support for the NBD unit tests (not a test file itself): a byte-exact NBD client over node:net
// that speaks both simple and structured replies, and a fixture that serves temp image files
// through a real NbdServer on 127.0.0.1:0.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import winston from 'winston';
import { Lun, type LunSpec } from '../../src/lun/lun.js';
import { LunRegistry } from '../../src/lun/registry.js';
import { NbdServer } from '../../src/nbd/server.js';
import { Backing } from '../../src/storage/backing.js';
import {
  CMD, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, OPT, REP, REPLY_FLAG_DONE, REPLY_MAGIC_OPT, REPLY_TYPE,
  REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/constants.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

/** Upper bound for any single wait in these tests; a failing server fails the test, it does not hang it. */
export const WAIT_MS = 5000;

export class PeerClosed extends Error {
  constructor(what: string) { super(`connection closed while ${what}`); }
}

export interface OptionReply { option: number; type: number; data: Buffer }

export interface RequestSpec {
  type: number;
  flags?: number;
  cookie: bigint;
  offset?: bigint | number;
  length: number;
  magic?: number;
}

export interface Chunk { flags: number; type: number; cookie: bigint; payload: Buffer }

export interface Reply {
  cookie: bigint;
  /** 0 for success; for structured replies, the errno of the first ERROR chunk. */
  error: number;
  structured: boolean;
  /** Simple READ reply data. */
  data?: Buffer;
  /** Structured reply chunks, DONE chunk last. */
  chunks: Chunk[];
}

export function encodeRequest(r: RequestSpec): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset ?? 0), 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const h = Buffer.alloc(16);
  IHAVEOPT.copy(h, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(length, 12);
  return Buffer.concat([h, data]);
}

/** INFO/GO payload. */
export function infoPayload(name: string, requests: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * requests.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(requests.length, 4 + n.length);
  requests.forEach((r, i) => b.writeUInt16BE(r, 4 + n.length + 2 + 2 * i));
  return b;
}

/** LIST/SET_META_CONTEXT payload. */
export function metaPayload(exportName: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(exportName, 'utf8');
  parts.push(u32(n.length), n, u32(queries.length));
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

interface Pending { type: number; length: number }

/** A hand-driven NBD client: every byte it sends is chosen by the test. */
export class NbdTestClient {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; what: string; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closedFlag = false;
  private readonly pending = new Map<bigint, Pending>();
  readonly closed: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.service();
    });
    socket.on('error', () => { /* resets are expected when the server hangs up on us */ });
    this.closed = new Promise((resolve) => {
      socket.once('close', () => {
        this.closedFlag = true;
        const w = this.waiter;
        this.waiter = null;
        w?.reject(new PeerClosed(w.what));
        resolve();
      });
    });
  }

  static connect(port: number): Promise<NbdTestClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new NbdTestClient(s));
      });
    });
  }

  get isClosed(): boolean { return this.closedFlag; }
  /** Bytes received but not consumed by a read. */
  get unread(): number { return this.buffered; }

  private service(): void {
    const w = this.waiter;
    if (!w || this.buffered < w.n) return;
    this.waiter = null;
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, w.n));
    const rest = all.subarray(w.n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    w.resolve(out);
  }

  read(n: number, what = `reading ${n} bytes`): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('concurrent reads'));
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new Error(`no data after ${WAIT_MS} ms ${what}`));
      }, WAIT_MS);
      this.waiter = {
        n, what,
        resolve: (b) => { clearTimeout(timer); resolve(b); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      if (this.buffered >= n) this.service();
      else if (this.closedFlag) this.waiter.reject(new PeerClosed(what));
    });
  }

  write(data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(data, (err) => (err ? reject(err) : resolve())));
  }

  /** True when the connection is closed within `ms` (a deadline, not a synchronisation sleep). */
  async waitClosed(ms = WAIT_MS): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const result = await Promise.race([
      this.closed.then(() => true),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms); }),
    ]);
    clearTimeout(timer);
    return result;
  }

  destroy(): void { this.socket.destroy(); }

  // ---- handshake --------------------------------------------------------------------------------

  async greeting(): Promise<Buffer> {
    return this.read(18, 'reading the greeting');
  }

  /** Read the greeting and send client flags. */
  async start(flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES): Promise<void> {
    await this.greeting();
    await this.write(u32(flags));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): Promise<void> {
    return this.write(encodeOption(option, data));
  }

  async readOptionReply(): Promise<OptionReply> {
    const h = await this.read(20, 'reading an option reply header');
    if (!h.subarray(0, 8).equals(REPLY_MAGIC_OPT)) throw new Error(`bad option reply magic ${h.subarray(0, 8).toString('hex')}`);
    const len = h.readUInt32BE(16);
    const data = len ? await this.read(len, 'reading option reply data') : Buffer.alloc(0);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Read replies up to and including the final one (ACK or an error). */
  async readOptionReplies(): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type === REP.ACK || (r.type & 0x80000000)) return out;
    }
  }

  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    await this.sendOption(option, data);
    return this.readOptionReplies();
  }

  /** Full handshake to an export; returns the GO replies. */
  async connectExport(name: string, opts: { structured?: boolean; meta?: string | null } = {}): Promise<OptionReply[]> {
    await this.start();
    if (opts.structured) {
      const r = await this.option(OPT.STRUCTURED_REPLY);
      if (r[0].type !== REP.ACK) throw new Error('STRUCTURED_REPLY refused');
      if (opts.meta !== undefined && opts.meta !== null) {
        const m = await this.option(OPT.SET_META_CONTEXT, metaPayload(opts.meta, ['base:allocation']));
        if (m[m.length - 1].type !== REP.ACK) throw new Error('SET_META_CONTEXT refused');
      }
    }
    const replies = await this.option(OPT.GO, infoPayload(name));
    const last = replies[replies.length - 1];
    if (last.type !== REP.ACK) throw new Error(`GO ${name} refused: 0x${last.type.toString(16)} ${last.data.toString()}`);
    return replies;
  }

  // ---- transmission -------------------------------------------------------------------------------

  encode(r: RequestSpec, payload?: Buffer): Buffer {
    this.pending.set(r.cookie, { type: r.type, length: r.length });
    return payload ? Buffer.concat([encodeRequest(r), payload]) : encodeRequest(r);
  }

  request(r: RequestSpec, payload?: Buffer): Promise<void> {
    return this.write(this.encode(r, payload));
  }

  async readChunk(): Promise<Chunk> {
    const h = await this.read(20, 'reading a structured reply header');
    const magic = h.readUInt32BE(0);
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`expected a structured reply, got magic 0x${magic.toString(16)}`);
    const len = h.readUInt32BE(16);
    const payload = len ? await this.read(len, 'reading a structured chunk') : Buffer.alloc(0);
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload };
  }

  /** One whole reply: a simple reply (with READ data on success) or structured chunks up to DONE. */
  async readReply(): Promise<Reply> {
    const head = await this.read(4, 'reading a reply magic');
    const magic = head.readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.read(12, 'reading a simple reply');
      const error = rest.readUInt32BE(0);
      const cookie = rest.readBigUInt64BE(4);
      const p = this.pending.get(cookie);
      this.pending.delete(cookie);
      const data = error === 0 && p?.type === CMD.READ ? await this.read(p.length, 'reading READ data') : undefined;
      return { cookie, error, structured: false, data, chunks: [] };
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    // Put the magic back and read whole chunks.
    this.chunks.unshift(head);
    this.buffered += 4;
    const chunks: Chunk[] = [];
    for (;;) {
      const c = await this.readChunk();
      if (chunks.length && c.cookie !== chunks[0].cookie) throw new Error('structured chunks of two replies interleaved');
      chunks.push(c);
      if (c.flags & REPLY_FLAG_DONE) break;
    }
    this.pending.delete(chunks[0].cookie);
    const err = chunks.find((c) => c.type & 0x8000);
    return { cookie: chunks[0].cookie, error: err ? err.payload.readUInt32BE(0) : 0, structured: true, chunks };
  }

  /** Send one request and read its reply. */
  async roundTrip(r: RequestSpec, payload?: Buffer): Promise<Reply> {
    await this.request(r, payload);
    const reply = await this.readReply();
    if (reply.cookie !== r.cookie) throw new Error(`reply for cookie ${reply.cookie}, expected ${r.cookie}`);
    return reply;
  }
}

/** Concatenated data of a structured READ reply, holes as zeros, checking the chunks tile the range. */
export function assembleRead(reply: Reply, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const c of reply.chunks) {
    const at = Number(c.payload.readBigUInt64BE(0)) - offset;
    if (c.type === REPLY_TYPE.OFFSET_DATA) c.payload.copy(out, at, 8);
    else if (c.type !== REPLY_TYPE.OFFSET_HOLE) throw new Error(`unexpected chunk type ${c.type}`);
  }
  return out;
}

// ---- fixtures ---------------------------------------------------------------------------------------

export function silentLogger(): winston.Logger {
  return winston.createLogger({ silent: true });
}

export interface LunDef {
  name: string;
  size: number;
  readOnly?: boolean;
  role?: 'primary' | 'secondary';
  description?: string;
  /** Fill: 'random' (every byte written), 'sparse' (nothing written), or [offset, length] data ranges. */
  fill?: 'random' | 'sparse' | Array<[number, number]>;
  /** Build the Lun (for test doubles); defaults to a plain Lun. */
  make?: (spec: LunSpec, backing: Backing) => Lun;
}

export class Fixture {
  readonly registry = new LunRegistry();
  readonly server = new NbdServer(this.registry, silentLogger());
  readonly files = new Map<string, string>();
  readonly luns = new Map<string, Lun>();
  port = 0;
  private readonly clients = new Set<NbdTestClient>();
  private stopped = false;

  private constructor(readonly dir: string) {}

  static async start(defs: LunDef[]): Promise<Fixture> {
    const f = new Fixture(fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-unit-')));
    try {
      for (const d of defs) await f.addLun(d);
      f.port = (await f.server.listen('127.0.0.1', 0)).port;
    } catch (err) {
      await f.stop();
      throw err;
    }
    return f;
  }

  private async addLun(d: LunDef): Promise<void> {
    const file = path.join(this.dir, `${d.name}.img`);
    const fd = fs.openSync(file, 'w');
    try {
      fs.ftruncateSync(fd, d.size);
      const ranges = d.fill === 'sparse' ? [] : d.fill === undefined || d.fill === 'random' ? [[0, d.size] as [number, number]] : d.fill;
      for (const [off, len] of ranges) fs.writeSync(fd, randomBytes(len), 0, len, off);
    } finally {
      fs.closeSync(fd);
    }
    const spec: LunSpec = {
      name: d.name, path: file, role: d.role ?? 'primary', mirror: 'none',
      readOnly: d.readOnly ?? false, description: d.description ?? '',
    };
    const backing = await Backing.open(file, spec.readOnly);
    const lun = d.make ? d.make(spec, backing) : new Lun(spec, backing);
    this.registry.add(lun);
    this.files.set(d.name, file);
    this.luns.set(d.name, lun);
  }

  file(name: string): string {
    const f = this.files.get(name);
    if (!f) throw new Error(`no LUN ${name}`);
    return f;
  }

  lun(name: string): Lun {
    const l = this.luns.get(name);
    if (!l) throw new Error(`no LUN ${name}`);
    return l;
  }

  /** Current contents of a LUN's image file. */
  contents(name: string, offset = 0, length?: number): Buffer {
    const all = fs.readFileSync(this.file(name));
    return all.subarray(offset, length === undefined ? undefined : offset + length);
  }

  async connect(): Promise<NbdTestClient> {
    const c = await NbdTestClient.connect(this.port);
    this.clients.add(c);
    void c.closed.then(() => this.clients.delete(c));
    return c;
  }

  /** Destroy every client this fixture opened (afterEach). */
  async dropClients(): Promise<void> {
    const all = [...this.clients];
    for (const c of all) c.destroy();
    await Promise.all(all.map((c) => c.closed));
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    await this.dropClients();
    if (this.port) await this.server.shutdown(1000);
    for (const lun of this.luns.values()) await lun.close().catch(() => undefined);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A Lun whose next flush() waits until the test releases it: a request held in flight on demand. */
export class GatedLun extends Lun {
  private heldFlush: { entered: () => void; opened: Promise<void> } | null = null;

  /** Arm the gate for the next flush(); `entered` resolves when that flush has started. */
  arm(): { entered: Promise<void>; release: () => void } {
    let release!: () => void;
    let entered!: () => void;
    const opened = new Promise<void>((r) => { release = r; });
    const enteredP = new Promise<void>((r) => { entered = r; });
    this.heldFlush = { entered, opened };
    return { entered: enteredP, release };
  }

  override async flush(): Promise<void> {
    const g = this.heldFlush;
    if (g) {
      this.heldFlush = null;
      g.entered();
      await g.opened;
    }
    return super.flush();
  }
}

export { CMD, OPT, REP };
