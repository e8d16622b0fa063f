// Exact-length reads from a socket for the handshake phase. When negotiation ends, detach()
// hands whatever the client already pipelined to the transmission parser, so no byte is lost.
import type { Socket } from 'node:net';

export class ConnectionClosed extends Error {
  constructor() { super('connection closed by peer'); }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private closed = false;

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
  }

  /** Resolves with exactly n bytes; rejects with ConnectionClosed if the peer goes away first. */
  read(n: number): Promise<Buffer> {
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.closed) return Promise.reject(new ConnectionClosed());
    this.want = n;
    return new Promise((resolve, reject) => { this.waiter = { resolve, reject }; });
  }

  /** Stop listening and return the bytes received but not yet read. */
  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    const rest = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return rest ?? Buffer.alloc(0);
  }

  private take(n: number): Buffer {
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks, this.buffered);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.waiter && this.buffered >= this.want) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(this.take(this.want));
    }
  };

  private readonly onEnd = (): void => {
    this.closed = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(new ConnectionClosed());
    }
  };
}
