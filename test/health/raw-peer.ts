// A plain UDP socket on a free port of 127.0.0.1, standing in for a heartbeat peer in the
// test/health tests (not a test file itself): it queues what arrives and sends raw datagrams.
import dgram from 'node:dgram';
import { expect } from 'chai';
import { decodeHeartbeat, type HeartbeatDatagram } from '../../src/health/heartbeat-wire.js';

export const HOST = '127.0.0.1';

export class RawPeer {
  readonly socket = dgram.createSocket('udp4');
  private readonly queue: Buffer[] = [];
  private waiting: ((b: Buffer) => void) | null = null;
  /** Called with every datagram as it arrives (before it is queued). */
  onMessage: ((msg: Buffer) => void) | null = null;

  async bind(): Promise<this> {
    this.socket.on('message', (msg) => {
      this.onMessage?.(msg);
      if (this.waiting) {
        const w = this.waiting;
        this.waiting = null;
        w(msg);
      } else {
        this.queue.push(msg);
      }
    });
    await new Promise<void>((resolve) => this.socket.bind(0, HOST, () => resolve()));
    return this;
  }

  get port(): number {
    return this.socket.address().port;
  }

  /** The next datagram that arrives (or the oldest one not read yet). */
  next(): Promise<Buffer> {
    const b = this.queue.shift();
    if (b) return Promise.resolve(b);
    return new Promise((resolve) => { this.waiting = resolve; });
  }

  /** Forget the datagrams received and not read yet. */
  drain(): Buffer[] {
    return this.queue.splice(0);
  }

  /** The next datagram that decodes as a heartbeat. */
  async nextHeartbeat(): Promise<HeartbeatDatagram> {
    const d = decodeHeartbeat(await this.next());
    expect(d, 'the endpoint sends valid heartbeats').to.not.equal(null);
    return d!;
  }

  send(buf: Buffer, port: number): Promise<void> {
    return new Promise((resolve, reject) => this.socket.send(buf, port, HOST, (err) => (err ? reject(err) : resolve())));
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.socket.close(() => resolve()));
  }
}
