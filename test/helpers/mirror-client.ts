// A hand-rolled mirror pool connection (the sending side of the mirror wire protocol), to
// drive a site's mirror listener with exactly the requests a test needs: out of order,
// duplicated, from a "previous run" of the primary...
import crypto from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import { parsePsk } from '../../src/security/psk.js';
import { TEST_MIRROR_PSK_LINE } from './site.js';
import {
  decodeHello, encodeHello, HELLO_OFFER, REPLY_MAGIC, REPLY_SIZE, REQUEST_HEADER_SIZE, writeRequestHeader,
  type Hello, type LunOffer, type MirrorRequestHeader,
} from '../../src/mirror/wire.js';

export interface MirrorRequest {
  type: number;
  flags?: number;
  lunId: number;
  seq: number;
  dep: number;
  offset: number;
  length: number;
  payload?: Buffer;
}

const TEST_PSK = parsePsk(TEST_MIRROR_PSK_LINE, 'test key').first;

export class MirrorClient {
  private buf: Buffer = Buffer.alloc(0);
  private answer: Hello | null = null;
  private helloWaiter: { resolve: (h: Hello) => void; reject: (e: Error) => void } | null = null;
  private readonly replies = new Map<number, { resolve: (errno: number) => void; reject: (e: Error) => void }>();
  private nextReqId = 1;
  private closedErr: Error | null = null;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.onClose(err));
    socket.on('close', () => this.onClose(new Error('mirror connection closed')));
  }

  /**
   * Connect to a mirror listener and exchange hellos; resolves with the client and the peer's
   * answer. Speaks TLS-PSK with the test sites' shared key unless `psk` is null (mirror.tls "off").
   */
  static async connect(
    port: number, site: string, offers: LunOffer[], session: Buffer = crypto.randomBytes(8),
    psk: { identity: string; key: Buffer } | null = TEST_PSK,
  ): Promise<{ client: MirrorClient; answer: Hello }> {
    const socket = psk
      ? tls.connect({ host: '127.0.0.1', port, minVersion: 'TLSv1.3', pskCallback: () => ({ identity: psk.identity, psk: psk.key }), checkServerIdentity: () => undefined })
      : net.connect({ host: '127.0.0.1', port, noDelay: true });
    await new Promise<void>((resolve, reject) => {
      socket.once(psk ? 'secureConnect' : 'connect', resolve);
      socket.once('error', reject);
    });
    const client = new MirrorClient(socket);
    const answer = new Promise<Hello>((resolve, reject) => { client.helloWaiter = { resolve, reject }; });
    socket.write(encodeHello({ kind: HELLO_OFFER, site, session, offers, answers: [] }));
    return { client, answer: await answer };
  }

  /** Send a request; resolves with the errno of its reply (rejects if the connection closes first). */
  request(r: MirrorRequest): Promise<number> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const reqId = this.nextReqId++;
    const h: MirrorRequestHeader = { flags: 0, ...r, reqId };
    const header = Buffer.alloc(REQUEST_HEADER_SIZE);
    writeRequestHeader(header, h);
    const p = new Promise<number>((resolve, reject) => this.replies.set(reqId, { resolve, reject }));
    this.socket.write(r.payload ? Buffer.concat([header, r.payload]) : header);
    return p;
  }

  /** Close the connection (requests still waiting for a reply reject). */
  close(): Promise<void> {
    if (this.socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.destroy();
    });
  }

  private onData(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    if (!this.answer) {
      if (this.buf.length < 4) return;
      const len = this.buf.readUInt32BE(0);
      if (this.buf.length < 4 + len) return;
      try {
        this.answer = decodeHello(this.buf.subarray(4, 4 + len));
      } catch (err) {
        this.helloWaiter?.reject(err as Error);
        this.socket.destroy();
        return;
      }
      this.buf = this.buf.subarray(4 + len);
      this.helloWaiter?.resolve(this.answer);
      this.helloWaiter = null;
    }
    while (this.buf.length >= REPLY_SIZE) {
      if (this.buf.readUInt32BE(0) !== REPLY_MAGIC) {
        this.onClose(new Error('bad reply magic'));
        this.socket.destroy();
        return;
      }
      const reqId = this.buf.readUInt32BE(4);
      const errno = this.buf.readUInt32BE(8);
      this.buf = this.buf.subarray(REPLY_SIZE);
      const waiter = this.replies.get(reqId);
      this.replies.delete(reqId);
      waiter?.resolve(errno);
    }
  }

  private onClose(err: Error): void {
    if (this.closedErr) return;
    this.closedErr = err;
    this.helloWaiter?.reject(err);
    this.helloWaiter = null;
    for (const w of this.replies.values()) w.reject(err);
    this.replies.clear();
  }
}
