// A minimal hand-rolled NBD client over node:net, for tests that must send what real clients
// never send (garbage, bad magic, unknown commands, oversized lengths) or need exact control of
// what is in flight. Fixed-newstyle handshake + NBD_OPT_GO, simple replies only.
import net from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

export const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, INFO: 6, GO: 7, STRUCTURED_REPLY: 8 } as const;
export const REP = { ACK: 1, SERVER: 2, INFO: 3, ERR_BIT: 0x80000000 } as const;
export const INFO_EXPORT = 0;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

/** NBD error numbers (the wire values, which match Linux errno). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export interface RequestHeader {
  magic?: number;
  flags?: number;
  type: number;
  cookie: bigint;
  offset?: bigint;
  length: number;
}

/** Encode a 28-byte request header. */
export function encodeRequest(h: RequestHeader): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(h.magic ?? REQUEST_MAGIC, 0);
  b.writeUInt16BE(h.flags ?? 0, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeBigUInt64BE(h.cookie, 8);
  b.writeBigUInt64BE(h.offset ?? 0n, 16);
  b.writeUInt32BE(h.length >>> 0, 24);
  return b;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
  data?: Buffer;
}

export interface ExportInfo {
  size: bigint;
  transmissionFlags: number;
}

export class ConnectionClosedError extends Error {
  constructor(what: string) {
    super(`connection closed by peer while ${what}`);
    this.name = 'ConnectionClosedError';
  }
}

interface Waiter {
  n: number;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
  what: string;
}

export class RawNbdClient {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiters: Waiter[] = [];
  private closedFlag = false;
  /** Set when the socket saw an error (ECONNRESET, EPIPE...). */
  lastError: Error | undefined;
  /** Resolves when the socket is fully closed (by either side). */
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.service();
    });
    socket.on('error', (err) => {
      this.lastError = err;
    });
    this.closed = new Promise<void>((resolve) => {
      socket.once('close', () => {
        this.closedFlag = true;
        for (const w of this.waiters.splice(0)) w.reject(new ConnectionClosedError(w.what));
        resolve();
      });
    });
  }

  static connect(host: string, port: number, timeoutMs = 5_000): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect to ${host}:${port} timed out`));
      }, timeoutMs);
      socket.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new RawNbdClient(socket));
      });
    });
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  private service(): void {
    while (this.waiters.length > 0 && this.buffered >= this.waiters[0]!.n) {
      const w = this.waiters.shift()!;
      const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
      const out = Buffer.from(all.subarray(0, w.n));
      const rest = all.subarray(w.n);
      this.chunks = rest.length > 0 ? [rest] : [];
      this.buffered = rest.length;
      w.resolve(out);
    }
  }

  /** Read exactly `n` bytes; rejects with ConnectionClosedError if the socket closes first. */
  read(n: number, what = `reading ${n} bytes`, timeoutMs = 10_000): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new Error(`timed out after ${timeoutMs} ms ${what}`));
      }, timeoutMs);
      const w: Waiter = {
        n,
        what,
        resolve: (b) => {
          clearTimeout(timer);
          resolve(b);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      if (this.closedFlag && this.buffered < n) {
        w.reject(new ConnectionClosedError(what));
        return;
      }
      this.waiters.push(w);
      this.service();
    });
  }

  /** Write and wait until the data is handed to the kernel. Rejects if the socket errors. */
  write(data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.socket.destroyed) {
        reject(new ConnectionClosedError('writing'));
        return;
      }
      this.socket.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }

  /** Resolves true if the connection closes within `timeoutMs`, false otherwise. */
  async waitClosed(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const res = await Promise.race([
      this.closed.then(() => true),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), timeoutMs);
      }),
    ]);
    clearTimeout(timer);
    return res;
  }

  /** Half-close our side (FIN). */
  end(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Read and check the server greeting; returns the handshake flags. */
  async readGreeting(): Promise<number> {
    const g = await this.read(18, 'reading the greeting');
    const magic = g.readBigUInt64BE(0);
    const opt = g.readBigUInt64BE(8);
    if (magic !== NBDMAGIC) throw new Error(`bad greeting magic 0x${magic.toString(16)}`);
    if (opt !== IHAVEOPT) throw new Error(`not a newstyle server (0x${opt.toString(16)})`);
    return g.readUInt16BE(16);
  }

  async sendOption(option: number, data: Buffer = Buffer.alloc(0)): Promise<void> {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    await this.write(Buffer.concat([h, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20, 'reading an option reply header');
    const magic = h.readBigUInt64BE(0);
    if (magic !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)}`);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    const data = len > 0 ? await this.read(len, 'reading option reply data') : Buffer.alloc(0);
    return { option, type, data };
  }

  /**
   * Full fixed-newstyle handshake: greeting, client flags (FIXED_NEWSTYLE, plus NO_ZEROES when
   * offered), then NBD_OPT_GO for `exportName`. Simple replies only (no STRUCTURED_REPLY).
   */
  async handshake(exportName: string): Promise<ExportInfo> {
    const serverFlags = await this.readGreeting();
    if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new Error('server does not offer fixed newstyle');
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(serverFlags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    await this.write(clientFlags);

    const name = Buffer.from(exportName, 'utf8');
    const go = Buffer.alloc(4 + name.length + 2);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    go.writeUInt16BE(0, 4 + name.length); // no information requests
    await this.sendOption(OPT.GO, go);

    let info: ExportInfo | undefined;
    for (;;) {
      const r = await this.readOptionReply();
      if (r.option !== OPT.GO) throw new Error(`option reply for ${r.option}, expected NBD_OPT_GO`);
      if (r.type & REP.ERR_BIT) throw new Error(`NBD_OPT_GO(${exportName}) failed: reply type 0x${r.type.toString(16)} ${r.data.toString('utf8')}`);
      if (r.type === REP.INFO && r.data.length >= 12 && r.data.readUInt16BE(0) === INFO_EXPORT) {
        info = { size: r.data.readBigUInt64BE(2), transmissionFlags: r.data.readUInt16BE(10) };
      } else if (r.type === REP.ACK) {
        break;
      }
    }
    if (!info) throw new Error('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
    return info;
  }

  async sendRequest(h: RequestHeader, payload?: Buffer): Promise<void> {
    const hdr = encodeRequest(h);
    await this.write(payload ? Buffer.concat([hdr, payload]) : hdr);
  }

  /**
   * Read one simple reply. `readLength(cookie)` tells how many data bytes follow a successful
   * reply for that cookie (a READ's length), default 0.
   */
  async readSimpleReply(readLength: (cookie: bigint) => number = () => 0, timeoutMs = 10_000): Promise<SimpleReply> {
    const h = await this.read(16, 'reading a reply', timeoutMs);
    const magic = h.readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`unexpected reply magic 0x${magic.toString(16)}`);
    const error = h.readUInt32BE(4);
    const cookie = h.readBigUInt64BE(8);
    const n = error === 0 ? readLength(cookie) : 0;
    const data = n > 0 ? await this.read(n, 'reading read data', timeoutMs) : undefined;
    return { error, cookie, data };
  }
}

/** Connect + handshake to `exportName`. */
export async function rawConnect(host: string, port: number, exportName: string): Promise<{ client: RawNbdClient; info: ExportInfo }> {
  const client = await RawNbdClient.connect(host, port);
  try {
    const info = await client.handshake(exportName);
    return { client, info };
  } catch (err) {
    client.destroy();
    throw err;
  }
}
