// How mirror connections are made and accepted: TLS 1.3 with a pre-shared key or with mutual
// certificates, or (only when configured) plain TCP. A peer that fails the TLS handshake never
// reaches the hello parser; the refusal is logged and counted here.
import net from 'node:net';
import tls from 'node:tls';
import type { Logger } from '../log.js';
import type { Credentials, MirrorTlsMode } from './credentials.js';

/** TLS 1.3 suites OpenSSL can use with an external PSK (its PSK callbacks need a SHA-256 suite). */
const TLS13_SUITES = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384';

/** A peer must finish the TLS handshake within this time. */
const HANDSHAKE_TIMEOUT_MS = 10_000;

export interface MirrorTlsStats {
  /** Incoming connections whose TLS handshake failed (wrong key, wrong certificate, not TLS). */
  refused: number;
  /** Our own connection attempts the peer's TLS refused, or whose certificate we refused. */
  failedOutgoing: number;
}

export class MirrorTransport {
  readonly stats: MirrorTlsStats = { refused: 0, failedOutgoing: 0 };

  constructor(readonly mode: MirrorTlsMode, private readonly creds: Credentials, private readonly log: Logger) {}

  /** A connecting socket, and the event after which the hello may be sent. */
  connect(host: string, port: number): { socket: net.Socket; ready: 'connect' | 'secureConnect' } {
    if (this.mode === 'off') return { socket: net.connect({ host, port, noDelay: true }), ready: 'connect' };
    const socket = tls.connect({ host, port, ...this.clientOptions() });
    socket.setNoDelay(true);
    socket.once('error', (err) => {
      if (isTlsError(err)) this.stats.failedOutgoing++;
    });
    return { socket, ready: 'secureConnect' };
  }

  /** The mirror listener; `accept` sees only peers that passed authentication. */
  createServer(accept: (socket: net.Socket) => void): net.Server {
    if (this.mode === 'off') return net.createServer({ noDelay: true }, accept);
    // A tls.Server that never listens: it verifies the peer (Node checks client certificates
    // only for its sockets), while the outer listener sees every raw connection and so can name
    // the peer of a failed handshake (by then the TLS socket has lost its address).
    const secured = new Set<string>();
    let lastError = '';
    const tlsServer = tls.createServer({ ...this.serverOptions(), handshakeTimeout: HANDSHAKE_TIMEOUT_MS }, (socket) => {
      const peer = `${socket.remoteAddress}:${socket.remotePort}`;
      secured.add(peer);
      socket.once('close', () => secured.delete(peer));
      accept(socket);
    });
    tlsServer.on('tlsClientError', (err, socket) => { lastError = socket.authorizationError ? String(socket.authorizationError) : err.message; });
    return net.createServer({ noDelay: true }, (raw) => {
      const peer = `${raw.remoteAddress}:${raw.remotePort}`;
      raw.once('close', () => {
        if (secured.has(peer)) return;
        this.stats.refused++;
        this.log.warn('mirror peer refused: TLS authentication failed', { peer, reason: lastError || 'closed during the handshake' });
        lastError = '';
      });
      tlsServer.emit('connection', raw);
    });
  }

  /** Subject of the peer certificate, for the log (cert mode). */
  static peerName(socket: net.Socket): string | undefined {
    if (!(socket instanceof tls.TLSSocket)) return undefined;
    const cert = socket.getPeerCertificate();
    const cn = cert?.subject?.CN;
    return Array.isArray(cn) ? cn.join(',') : cn;
  }

  private clientOptions(): tls.ConnectionOptions {
    const base: tls.ConnectionOptions = { minVersion: 'TLSv1.3', ciphers: TLS13_SUITES };
    if (this.mode === 'psk') {
      const { identity, key } = this.creds.psk!.first;
      // No certificates: the key proves both sides; there is no host name to check.
      return { ...base, pskCallback: () => ({ identity, psk: key }), checkServerIdentity: () => undefined };
    }
    // Mutual certificates under a CA kept for this mirror: the chain is the identity, so the
    // peer address (often an IP) is not matched against the certificate's names.
    return {
      ...base, cert: this.creds.cert!, key: this.creds.key!, ca: this.creds.ca!, rejectUnauthorized: true,
      checkServerIdentity: () => undefined,
    };
  }

  private serverOptions(): tls.TlsOptions {
    const base: tls.TlsOptions = { minVersion: 'TLSv1.3', ciphers: TLS13_SUITES };
    if (this.mode === 'psk') {
      const keys = this.creds.psk!.keys;
      return { ...base, pskCallback: (_socket, identity) => keys.get(identity) ?? null };
    }
    return { ...base, cert: this.creds.cert!, key: this.creds.key!, ca: this.creds.ca!, requestCert: true, rejectUnauthorized: true };
  }
}

function isTlsError(err: Error): boolean {
  const code = (err as NodeJS.ErrnoException).code ?? '';
  return code.startsWith('ERR_SSL') || code.startsWith('ERR_TLS') || /alert|certificate|ssl|tls/i.test(err.message);
}
