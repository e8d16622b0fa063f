// The NBD listener: accepts host connections, runs the handshake (upgrading to TLS when the
// client asks, or must), then hands each connection to a Transmission. Owns connection
// lifetimes and graceful shutdown.
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import { listenOn } from '../net/listen.js';
import type { Credentials } from '../security/credentials.js';
import type { Logger } from '../log.js';
import type { LunRegistry } from '../lun/registry.js';
import { OPT } from './constants.js';
import { negotiate, NegotiationEnded, type HandshakeTls } from './handshake.js';
import { ConnectionClosed } from '../net/socket-reader.js';
import { HostTlsServer, TlsHandshakeFailed, type HostTlsStats } from './tls.js';
import { Transmission, type ProtocolViolation } from './transmission.js';

const HANDSHAKE_TIMEOUT_MS = 30_000;

/** Hosts' TLS: listen.tls and the material loaded from listen.credentials (null when off). */
export interface HostTls {
  mode: 'off' | 'allow' | 'require';
  credentials: Credentials | null;
}

interface Connection {
  /** The plain socket, then the TLS socket once STARTTLS succeeded. */
  socket: net.Socket;
  peer: string;
  lun: string | null;
  transmission: Transmission | null;
}

export class NbdServer {
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  private shuttingDown = false;
  private readonly hostTls: HostTlsServer | null = null;

  constructor(private readonly luns: LunRegistry, private readonly log: Logger, private readonly tls: HostTls = { mode: 'off', credentials: null }) {
    this.server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
    if (tls.mode !== 'off') {
      if (!tls.credentials) throw new Error(`listen.tls "${tls.mode}" without credentials`);
      this.hostTls = new HostTlsServer(tls.credentials, log);
    }
  }

  /** STARTTLS outcomes since start (zeros when listen.tls is off). */
  get tlsStats(): HostTlsStats {
    return { ...(this.hostTls?.stats ?? { established: 0, failed: 0 }) };
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  /** Host connections per LUN, for status. */
  connectionCount(lun: string): number {
    let n = 0;
    for (const c of this.connections) if (c.lun === lun) n++;
    return n;
  }

  /** Close the connections of one LUN (it is being removed). */
  dropLun(lun: string): void {
    for (const c of this.connections) if (c.lun === lun) c.socket.destroy();
  }

  private accept(socket: net.Socket): void {
    const conn: Connection = { socket, peer: `${socket.remoteAddress}:${socket.remotePort}`, lun: null, transmission: null };
    this.connections.add(conn);
    socket.on('error', (err) => this.log.debug('host connection error', { peer: conn.peer, error: err.message }));
    socket.on('close', () => {
      this.connections.delete(conn);
      if (conn.lun) this.log.debug('host disconnected', { peer: conn.peer, lun: conn.lun });
    });
    if (this.shuttingDown) {
      socket.destroy();
      return;
    }
    // A client that connects and never finishes the handshake is not kept forever.
    const timedOut = (): void => {
      this.log.info('handshake timed out', { peer: conn.peer, timeoutMs: HANDSHAKE_TIMEOUT_MS });
      conn.socket.destroy();
      socket.destroy();
    };
    socket.setTimeout(HANDSHAKE_TIMEOUT_MS, timedOut);
    negotiate(socket, {
      luns: this.luns,
      isShuttingDown: () => this.shuttingDown,
      tls: this.handshakeTls(conn, timedOut),
      onRefused: (lun, option) => this.log.info('export hidden from host: address not in allowedNetworks', {
        peer: conn.peer, lun, option: optionName(option),
      }),
    }).then(
      (session) => {
        session.socket.setTimeout(0);
        if (session.socket.destroyed) return;
        conn.lun = session.lun.name;
        conn.transmission = new Transmission(session.socket, session, (v) => this.violation(conn, v));
        if (this.shuttingDown) conn.transmission.drain();
        this.log.debug('host connected', { peer: conn.peer, lun: conn.lun, structured: session.structured });
      },
      (err: Error) => {
        if (err instanceof TlsHandshakeFailed) return;   // logged and counted by HostTlsServer
        if (err instanceof NegotiationEnded) this.log.info('handshake ended', { peer: conn.peer, reason: err.message });
        else if (!(err instanceof ConnectionClosed)) this.log.warn('handshake failed', { peer: conn.peer, error: err.message });
        conn.socket.end();
        conn.socket.destroySoon();
      },
    );
  }

  /** STARTTLS for one connection: the handshake timeout moves to the TLS socket once it is up. */
  private handshakeTls(conn: Connection, timedOut: () => void): HandshakeTls | null {
    const hostTls = this.hostTls;
    if (!hostTls) return null;
    return {
      required: this.tls.mode === 'require',
      upgrade: async (plain) => {
        // During the TLS handshake the plain socket's timer still runs (TLS traffic bypasses its
        // JS side, so it counts from the STARTTLS reply): a stalled handshake is cut after 30 s.
        const secure = await hostTls.upgrade(plain, conn.peer);
        secure.on('error', (err) => this.log.debug('host connection error', { peer: conn.peer, error: err.message }));
        plain.setTimeout(0);
        secure.setTimeout(HANDSHAKE_TIMEOUT_MS, timedOut);
        conn.socket = secure;
        return secure;
      },
    };
  }

  private violation(conn: Connection, v: ProtocolViolation): void {
    this.log.warn('protocol violation, closing host connection', { peer: conn.peer, lun: conn.lun, reason: v.message });
    conn.socket.destroy();
  }

  /**
   * Graceful shutdown: stop accepting, answer new requests with ESHUTDOWN, let in-flight
   * requests finish (up to timeoutMs), then close every connection.
   */
  async shutdown(timeoutMs: number): Promise<void> {
    this.shuttingDown = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    const idle: Promise<void>[] = [];
    for (const c of this.connections) {
      if (c.transmission) {
        c.transmission.drain();
        idle.push(c.transmission.idle());
      }
    }
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), timeoutMs); });
    const late = await Promise.race([Promise.all(idle).then(() => false), timedOut]);
    clearTimeout(timer);
    if (late) this.log.warn('shutdown timeout: closing connections with requests still in flight', { timeoutMs });
    // end() lets queued replies reach the client; a client that never closes its side is cut after a grace.
    for (const c of this.connections) c.socket.end();
    const grace = setTimeout(() => { for (const c of this.connections) c.socket.destroy(); }, 1000);
    await closed;
    clearTimeout(grace);
  }
}

function optionName(option: number): string {
  return Object.entries(OPT).find(([, v]) => v === option)?.[0] ?? String(option);
}
