// The fault-injecting proxy itself: pass, drop (black hole), heal, reset and flap, for TCP and
// UDP, against an echo server listening on one port number for both.
import dgram from 'node:dgram';
import { once } from 'node:events';
import net from 'node:net';
import { expect } from 'chai';
import { FaultProxy, listenTcpAndUdp, type FaultMode } from './fault-proxy.js';

const HOST = '127.0.0.1';

/** TCP and UDP echo on the same port; counts what reaches it. */
class EchoServer {
  tcpBytes = 0;
  connections = 0;
  readonly datagrams: string[] = [];
  readonly sockets = new Set<net.Socket>();
  /** Where the last datagram came from (the proxy's upstream socket). */
  lastSender: dgram.RemoteInfo | null = null;
  private server!: net.Server;
  private udp!: dgram.Socket;
  port = 0;

  async start(): Promise<this> {
    const r = await listenTcpAndUdp(HOST, (socket) => {
      this.connections++;
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
      socket.on('error', () => undefined);
      socket.on('data', (d) => {
        this.tcpBytes += d.length;
        socket.write(d);
      });
    }, (msg, rinfo) => {
      this.datagrams.push(msg.toString());
      this.lastSender = rinfo;
      this.udp.send(msg, rinfo.port, rinfo.address);
    });
    this.server = r.server;
    this.udp = r.udp;
    this.port = r.port;
    return this;
  }

  /** An unsolicited datagram to whoever sent the last one. */
  push(text: string): void {
    this.udp.send(text, this.lastSender!.port, this.lastSender!.address);
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all([
      new Promise<void>((resolve) => this.server.close(() => resolve())),
      new Promise<void>((resolve) => this.udp.close(() => resolve())),
    ]);
  }
}

/** A TCP client that collects what it receives and how it ended. */
class Client {
  readonly socket: net.Socket;
  private received = Buffer.alloc(0);
  private readonly waiters: (() => void)[] = [];
  readonly closed: Promise<{ error: NodeJS.ErrnoException | null }>;

  constructor(port: number) {
    this.socket = net.connect({ host: HOST, port });
    let error: NodeJS.ErrnoException | null = null;
    this.socket.on('error', (err) => { error = err; });
    // (not events.once: it would reject on 'error', and the error is what tests look at)
    this.closed = new Promise((resolve) => this.socket.on('close', () => resolve({ error })));
    this.socket.on('data', (d) => {
      this.received = Buffer.concat([this.received, d]);
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /** Wait until n bytes arrived in total, and return them. */
  async read(n: number): Promise<string> {
    while (this.received.length < n) await new Promise<void>((resolve) => this.waiters.push(resolve));
    return this.received.subarray(0, n).toString();
  }

  get receivedBytes(): number {
    return this.received.length;
  }
}

class UdpClient {
  readonly socket = dgram.createSocket('udp4');

  async bind(): Promise<this> {
    await new Promise<void>((resolve) => this.socket.bind(0, HOST, () => resolve()));
    return this;
  }

  send(text: string, port: number): Promise<void> {
    return new Promise((resolve, reject) => this.socket.send(text, port, HOST, (err) => (err ? reject(err) : resolve())));
  }

  async receive(): Promise<string> {
    const [msg] = await once(this.socket, 'message');
    return (msg as Buffer).toString();
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.socket.close(() => resolve()));
  }
}

describe('helpers/fault-proxy', () => {
  let echo: EchoServer;
  let proxy: FaultProxy;
  const cleanup: (() => unknown)[] = [];

  beforeEach(async () => {
    echo = await new EchoServer().start();
    proxy = await FaultProxy.start({ host: HOST, port: echo.port });
  });

  afterEach(async () => {
    while (cleanup.length) await cleanup.pop()!();
    await proxy.close();
    await echo.close();
  });

  /** A client connected through the proxy, once the proxy has accepted it too. */
  async function client(): Promise<Client> {
    const accepted = once(proxy, 'connection');
    const c = new Client(proxy.port);
    cleanup.push(() => c.socket.destroy());
    await Promise.all([once(c.socket, 'connect'), accepted]);
    return c;
  }

  async function udpClient(): Promise<UdpClient> {
    const c = await new UdpClient().bind();
    cleanup.push(() => c.close());
    return c;
  }

  it('listens on one port number for TCP and UDP, different from the target', () => {
    expect(proxy.port).to.be.above(0);
    expect(proxy.port).to.not.equal(echo.port);
    expect(proxy.mode).to.equal('pass');
  });

  it('pass: TCP and UDP round trips through the proxy', async () => {
    const c = await client();
    c.socket.write('hello');
    expect(await c.read(5)).to.equal('hello');
    const u = await udpClient();
    const reply = u.receive();
    await u.send('ping', proxy.port);
    expect(await reply).to.equal('ping');
    expect(echo.datagrams).to.deep.equal(['ping']);
    expect(proxy.stats).to.deep.equal({ tcpBytes: 10, udpDatagrams: 2, droppedUdp: 0, connections: 1, droppedTcpBytes: 0 });
    // A clean close from the client reaches the server and back.
    c.socket.end();
    expect((await c.closed).error).to.equal(null);
  });

  it('drop: TCP bytes and UDP datagrams are discarded both ways; connections stay open', async () => {
    const c = await client();
    c.socket.write('a');
    expect(await c.read(1)).to.equal('a');
    proxy.cut();
    expect(proxy.mode).to.equal('drop');
    let dropped = once(proxy, 'drop');
    c.socket.write('lost');
    expect(await dropped).to.deep.equal(['tcp', 4]);
    // A new connection is accepted but never reaches the target.
    const c2 = await client();
    dropped = once(proxy, 'drop');
    c2.socket.write('also lost');
    expect(await dropped).to.deep.equal(['tcp', 9]);
    const u = await udpClient();
    dropped = once(proxy, 'drop');
    await u.send('gone', proxy.port);
    expect(await dropped).to.deep.equal(['udp', 4]);
    expect(echo.tcpBytes).to.equal(1);
    expect(echo.connections).to.equal(1);
    expect(echo.datagrams).to.deep.equal([]);
    expect(c.receivedBytes).to.equal(1);
    expect(c.socket.destroyed || c2.socket.destroyed).to.equal(false);
    expect(proxy.stats).to.deep.equal({ tcpBytes: 2, udpDatagrams: 0, droppedUdp: 1, connections: 2, droppedTcpBytes: 13 });
    // After healing, datagrams pass again.
    proxy.heal();
    const reply = u.receive();
    await u.send('back', proxy.port);
    expect(await reply).to.equal('back');
    expect(echo.datagrams).to.deep.equal(['back']);
  });

  it('drop: what the target sends is dropped too', async () => {
    const c = await client();
    c.socket.write('x');
    expect(await c.read(1)).to.equal('x');
    const u = await udpClient();
    await u.send('first', proxy.port);
    expect(await u.receive()).to.equal('first');
    proxy.cut();
    // The server side sends on its own, over TCP and UDP: the proxy drops both.
    let dropped = once(proxy, 'drop');
    for (const s of echo.sockets) s.write('push');
    expect(await dropped).to.deep.equal(['tcp', 4]);
    dropped = once(proxy, 'drop');
    echo.push('late');
    expect(await dropped).to.deep.equal(['udp', 4]);
    expect(c.receivedBytes).to.equal(1);
    expect(proxy.stats.droppedUdp).to.equal(1);
  });

  it('heal: black-holed connections are reset, new ones work', async () => {
    const c = await client();
    c.socket.write('a');
    await c.read(1);
    proxy.cut();
    const c2 = await client();
    proxy.heal();
    expect(proxy.mode).to.equal('pass');
    const [r1, r2] = await Promise.all([c.closed, c2.closed]);
    expect(r1.error?.code).to.equal('ECONNRESET');
    expect(r2.error?.code).to.equal('ECONNRESET');
    const c3 = await client();
    c3.socket.write('again');
    expect(await c3.read(5)).to.equal('again');
    expect(echo.connections, 'the black-holed c2 never reached the target').to.equal(2);
  });

  it('reset: current connections see a reset, the mode stays, new ones work', async () => {
    const c = await client();
    c.socket.write('a');
    await c.read(1);
    proxy.reset();
    const r = await c.closed;
    expect(r.error?.code).to.equal('ECONNRESET');
    expect(proxy.mode).to.equal('pass');
    const c2 = await client();
    c2.socket.write('b');
    expect(await c2.read(1)).to.equal('b');
    // In drop mode, reset keeps dropping.
    proxy.cut();
    const c3 = await client();
    proxy.reset();
    expect((await c3.closed).error?.code).to.equal('ECONNRESET');
    expect(proxy.mode).to.equal('drop');
  });

  it('a target that is down: the client connection is reset', async () => {
    const dead = await new EchoServer().start();
    await dead.close();
    const p = await FaultProxy.start({ host: HOST, port: dead.port });
    cleanup.push(() => p.close());
    const c = new Client(p.port);
    cleanup.push(() => c.socket.destroy());
    const r = await c.closed;
    expect(c.receivedBytes).to.equal(0);
    expect(r.error?.code).to.equal('ECONNRESET');
  });

  it('flap: alternates cut and heal count times and ends healed', async () => {
    const modes: FaultMode[] = [];
    proxy.on('mode', (m) => modes.push(m));
    await proxy.flap({ periodMs: 5, count: 3 });
    expect(modes).to.deep.equal(['drop', 'pass', 'drop', 'pass', 'drop', 'pass']);
    expect(proxy.mode).to.equal('pass');
  });

  it('mode can be assigned directly, with the effect of cut() and heal()', async () => {
    const c = await client();
    proxy.mode = 'drop';
    const dropped = once(proxy, 'drop');
    c.socket.write('zz');
    expect(await dropped).to.deep.equal(['tcp', 2]);
    proxy.mode = 'pass';
    expect((await c.closed).error?.code).to.equal('ECONNRESET');
  });

  it('close() stops a running flap and frees the port', async () => {
    const flapping = proxy.flap({ periodMs: 10_000, count: 100 });
    const port = proxy.port;
    await proxy.close();
    await flapping;
    // The port is free again for both protocols.
    const srv = net.createServer();
    await new Promise<void>((resolve) => srv.listen(port, HOST, () => resolve()));
    await new Promise<void>((resolve) => srv.close(() => resolve()));
    proxy = await FaultProxy.start({ host: HOST, port: echo.port });   // for afterEach
  });
});
