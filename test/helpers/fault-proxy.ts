// A fault-injecting network path for outage tests: one TCP listener and one UDP socket on the
// same free port of 127.0.0.1, forwarding both to a target host:port, that can black-hole,
// heal, reset and flap the path.
//
// Use with a mirrored pair: point site A's mirror.peer.port at proxy AB (target: B's mirror
// port). A's pool connections (TCP) and A's heartbeats (UDP) to B then go through the proxy.
// B's heartbeats to A go to B's own mirror.peer.port: a second proxy BA (target: A's mirror
// port) to cut that direction too, or A's port directly. Heartbeats do not reply to the
// datagram's source, so forwarding the client → target direction is all they need; the proxy
// still relays replies (per client address, through an upstream socket of its own) so that
// request/response UDP (an echo server) works as well.
//
// Modes: 'pass' forwards everything. 'drop' silently discards all bytes both ways: TCP
// connections stay open but black-holed (nothing forwarded, FIN and close not propagated), new
// TCP connections are accepted and black-holed at once (no upstream connection), UDP datagrams
// are dropped. heal() returns to 'pass' and destroys (RST) every black-holed connection, so
// their endpoints see a reset; new connections work.
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';

export type FaultMode = 'pass' | 'drop';

export interface FaultProxyStats {
  /** TCP payload bytes forwarded (both directions). */
  tcpBytes: number;
  /** UDP datagrams forwarded (both directions). */
  udpDatagrams: number;
  /** UDP datagrams dropped (both directions). */
  droppedUdp: number;
  /** TCP connections accepted since start. */
  connections: number;
  /** TCP payload bytes discarded on black-holed connections (both directions). */
  droppedTcpBytes: number;
}

export interface FaultProxyEvents {
  /** Bytes or a datagram were discarded. */
  drop: [kind: 'tcp' | 'udp', bytes: number];
  /** A TCP connection was accepted (before it is forwarded or black-holed). */
  connection: [];
  /** The mode changed (cut, heal, flap). */
  mode: [mode: FaultMode];
}

interface Pair {
  client: net.Socket;
  upstream: net.Socket | null;
  blackholed: boolean;
}

/**
 * Listen on one port number for both TCP and UDP on `host`: a TCP listener on port 0, then a UDP
 * bind of the same number, retrying with a new port while the UDP bind fails.
 */
export async function listenTcpAndUdp(
  host: string,
  onConnection: (socket: net.Socket) => void,
  onMessage: (msg: Buffer, rinfo: dgram.RemoteInfo) => void,
  attempts = 50,
): Promise<{ server: net.Server; udp: dgram.Socket; port: number }> {
  let lastError: unknown = null;
  for (let i = 0; i < attempts; i++) {
    const server = net.createServer(onConnection);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port: 0, exclusive: true }, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const port = (server.address() as net.AddressInfo).port;
    const udp = dgram.createSocket(net.isIPv6(host) ? 'udp6' : 'udp4');
    try {
      await new Promise<void>((resolve, reject) => {
        udp.once('error', reject);
        udp.bind({ address: host, port, exclusive: true }, () => {
          udp.off('error', reject);
          resolve();
        });
      });
    } catch (err) {
      lastError = err;
      try { udp.close(); } catch { /* never bound */ }
      await new Promise<void>((resolve) => server.close(() => resolve()));
      continue;
    }
    udp.on('message', onMessage);
    return { server, udp, port };
  }
  throw new Error(`no port free for both TCP and UDP on ${host} after ${attempts} attempts`, { cause: lastError });
}

/** Destroy a socket with a TCP RST where possible. */
function rst(socket: net.Socket): void {
  if (socket.destroyed) return;
  // A socket whose sending side is already ended cannot be reset: libuv refuses (EINVAL), Node
  // then drops the handle unclosed and the process spins at exit. Close those normally.
  if (socket.connecting || socket.pending || socket.writableEnded) socket.destroy();
  else socket.resetAndDestroy();
}

export class FaultProxy extends EventEmitter<FaultProxyEvents> {
  private current: FaultMode = 'pass';
  readonly stats: FaultProxyStats = { tcpBytes: 0, udpDatagrams: 0, droppedUdp: 0, connections: 0, droppedTcpBytes: 0 };
  private readonly pairs = new Set<Pair>();
  /** Per client address: the socket we forward its datagrams from (replies come back on it). */
  private readonly upstreams = new Map<string, dgram.Socket>();
  private readonly closing = new AbortController();
  private server!: net.Server;
  private udp!: dgram.Socket;
  private boundPort = 0;

  private constructor(private readonly target: { host: string; port: number }) {
    super();
  }

  /** The proxy's port number, TCP and UDP, on 127.0.0.1. */
  get port(): number {
    return this.boundPort;
  }

  /** Assigning has the effect of cut() ('drop') or heal() ('pass'). */
  get mode(): FaultMode {
    return this.current;
  }

  set mode(mode: FaultMode) {
    if (mode === 'drop') this.cut();
    else this.heal();
  }

  static async start(target: { host: string; port: number }): Promise<FaultProxy> {
    const proxy = new FaultProxy(target);
    const { server, udp, port } = await listenTcpAndUdp('127.0.0.1',
      (socket) => proxy.accept(socket), (msg, rinfo) => proxy.fromClient(msg, rinfo));
    proxy.server = server;
    proxy.udp = udp;
    proxy.boundPort = port;
    return proxy;
  }

  /** Black-hole everything (mode 'drop'). */
  cut(): void {
    this.current = 'drop';
    for (const pair of this.pairs) {
      pair.blackholed = true;
      // A side paused for back-pressure must keep flowing into the hole.
      pair.client.resume();
      pair.upstream?.resume();
    }
    this.emit('mode', 'drop');
  }

  /** Forward again (mode 'pass'); black-holed connections are reset. */
  heal(): void {
    this.current = 'pass';
    for (const pair of [...this.pairs]) {
      if (pair.blackholed) this.destroyPair(pair);
    }
    this.emit('mode', 'pass');
  }

  /** Reset (RST) every current TCP connection, both sides; the mode stays. */
  reset(): void {
    for (const pair of [...this.pairs]) this.destroyPair(pair);
  }

  /** count × (cut, wait periodMs, heal, wait periodMs). Stops early when the proxy closes. */
  async flap(opts: { periodMs: number; count: number }): Promise<void> {
    const signal = this.closing.signal;
    try {
      for (let i = 0; i < opts.count && !signal.aborted; i++) {
        this.cut();
        await delay(opts.periodMs, undefined, { signal });
        this.heal();
        await delay(opts.periodMs, undefined, { signal });
      }
    } catch (err) {
      if (!signal.aborted) throw err;
    }
  }

  async close(): Promise<void> {
    this.closing.abort();
    for (const pair of [...this.pairs]) this.destroyPair(pair);
    const closers: Promise<void>[] = [
      new Promise((resolve) => this.server.close(() => resolve())),
      new Promise((resolve) => this.udp.close(() => resolve())),
    ];
    for (const s of this.upstreams.values()) closers.push(new Promise((resolve) => s.close(() => resolve())));
    this.upstreams.clear();
    await Promise.all(closers);
  }

  // ---- TCP ------------------------------------------------------------------------------------

  private accept(client: net.Socket): void {
    this.stats.connections++;
    const pair: Pair = { client, upstream: null, blackholed: this.current === 'drop' };
    this.pairs.add(pair);
    client.on('error', () => undefined);
    client.on('close', (hadError) => this.sideClosed(pair, client, hadError));
    this.emit('connection');
    if (pair.blackholed) {
      client.on('data', (chunk: Buffer) => this.dropTcp(chunk));
      return;
    }
    const upstream = net.connect({ host: this.target.host, port: this.target.port, noDelay: true });
    pair.upstream = upstream;
    client.setNoDelay(true);
    upstream.on('error', () => undefined);
    upstream.on('close', (hadError) => this.sideClosed(pair, upstream, hadError));
    this.forward(pair, client, upstream);
    this.forward(pair, upstream, client);
  }

  private forward(pair: Pair, from: net.Socket, to: net.Socket): void {
    from.on('data', (chunk: Buffer) => {
      if (pair.blackholed) {
        this.dropTcp(chunk);
        return;
      }
      this.stats.tcpBytes += chunk.length;
      if (!to.write(chunk)) {
        from.pause();
        to.once('drain', () => {
          if (!pair.blackholed) from.resume();
        });
      }
    });
    from.on('end', () => {
      if (!pair.blackholed) to.end();
    });
  }

  private dropTcp(chunk: Buffer): void {
    this.stats.droppedTcpBytes += chunk.length;
    this.emit('drop', 'tcp', chunk.length);
  }

  /**
   * One side closed. A live pair passes it on: a reset as a reset; after a clean end (already
   * passed on by 'end') the other side finishes writing what it has and closes by itself.
   * A black-holed pair passes nothing on.
   */
  private sideClosed(pair: Pair, side: net.Socket, hadError: boolean): void {
    const other = side === pair.client ? pair.upstream : pair.client;
    if (!pair.blackholed && other && !other.destroyed) {
      if (hadError) rst(other);
      else if (!other.writableEnded) other.destroy();
    }
    if (pair.client.destroyed && (pair.upstream === null || pair.upstream.destroyed)) this.pairs.delete(pair);
  }

  private destroyPair(pair: Pair): void {
    this.pairs.delete(pair);
    pair.blackholed = true;   // nothing more is forwarded while the sockets go
    rst(pair.client);
    if (pair.upstream) rst(pair.upstream);
  }

  // ---- UDP ------------------------------------------------------------------------------------

  private fromClient(msg: Buffer, rinfo: dgram.RemoteInfo): void {
    if (this.current === 'drop') {
      this.dropUdp(msg);
      return;
    }
    this.stats.udpDatagrams++;
    this.upstreamFor(rinfo).send(msg, this.target.port, this.target.host, () => undefined);
  }

  private upstreamFor(client: dgram.RemoteInfo): dgram.Socket {
    const key = `${client.address}|${client.port}`;
    let socket = this.upstreams.get(key);
    if (!socket) {
      const s = dgram.createSocket(net.isIPv6(this.target.host) ? 'udp6' : 'udp4');
      s.on('error', () => undefined);
      s.on('message', (reply) => {
        if (this.current === 'drop') {
          this.dropUdp(reply);
          return;
        }
        this.stats.udpDatagrams++;
        this.udp.send(reply, client.port, client.address, () => undefined);
      });
      this.upstreams.set(key, s);
      socket = s;
    }
    return socket;
  }

  private dropUdp(msg: Buffer): void {
    this.stats.droppedUdp++;
    this.emit('drop', 'udp', msg.length);
  }
}
