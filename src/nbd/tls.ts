// Hosts' TLS (NBD_OPT_STARTTLS): one SecureContext built at start from listen.credentials, and
// the in-place upgrade of a connection once the server has sent its NBD_REP_ACK. A failed
// handshake is logged and counted here; the connection then ends.
import type net from 'node:net';
import tls from 'node:tls';
import type { Logger } from '../log.js';
import type { Credentials } from '../security/credentials.js';
import { NegotiationEnded } from './handshake.js';

export interface HostTlsStats {
  /** Connections upgraded by STARTTLS (handshake and client authentication passed). */
  established: number;
  /** STARTTLS handshakes that failed: unknown identity or wrong key, refused or missing client
   *  certificate, not TLS at all, or the client gone or timed out mid-handshake. */
  failed: number;
}

/**
 * With a PSK file, TLS 1.3 is limited to SHA-256 suites: OpenSSL's PSK callback only serves
 * SHA-256, and once the server also has a certificate it no longer steers the choice towards
 * them, so a client preferring AES-256-GCM-SHA384 (GnuTLS: libnbd, qemu) would silently lose its
 * PSK and fail on the certificate instead. TLS 1.2 keeps Node's default (certificate) suites.
 */
const TLS13_PSK_SUITES = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256';

function ciphers(psk: boolean): string {
  if (!psk) return tls.DEFAULT_CIPHERS;
  const tls12 = tls.DEFAULT_CIPHERS.split(':').filter((c) => !c.startsWith('TLS_'));
  return [TLS13_PSK_SUITES, ...tls12].join(':');
}

/** The TLS handshake after STARTTLS failed (already logged and counted). */
export class TlsHandshakeFailed extends NegotiationEnded {}

export class HostTlsServer {
  readonly stats: HostTlsStats = { established: 0, failed: 0 };
  private readonly context: tls.SecureContext;
  /** Client certificates are asked for, and required, only when a CA to check them is configured. */
  private readonly verifyClients: boolean;
  private readonly keys: ReadonlyMap<string, Buffer> | null;

  constructor(creds: Credentials, private readonly log: Logger) {
    this.keys = creds.psk?.keys ?? null;
    this.verifyClients = creds.cert !== null && creds.ca !== null;
    this.context = tls.createSecureContext({
      // The NBD spec asks for TLS 1.2 at least; 1.3 is what current clients pick.
      minVersion: 'TLSv1.2',
      ...(creds.cert ? { cert: creds.cert, key: creds.key! } : {}),
      ...(this.verifyClients ? { ca: creds.ca! } : {}),
      ciphers: ciphers(this.keys !== null),
      // OpenSSL refuses to resume without one once client certificates are requested, and a
      // TLS 1.3 PSK handshake counts as a resumption (tls.Server sets one for its sockets too).
      sessionIdContext: 'nbd-mirror-hosts',
    });
  }

  /**
   * Wrap `socket` as the TLS server and wait for the handshake. The TLSSocket is created before
   * this returns (nothing the client sends next can reach the plain socket); the promise settles
   * once the client is authenticated, or rejects with TlsHandshakeFailed.
   */
  upgrade(socket: net.Socket, peer: string): Promise<tls.TLSSocket> {
    let identity: string | null = null;
    const keys = this.keys;
    // TLSSocket takes pskCallback like tls.Server does (@types/node lists it for the server only).
    const options: tls.TLSSocketOptions & Pick<tls.TlsOptions, 'pskCallback'> = {
      isServer: true,
      secureContext: this.context,
      requestCert: this.verifyClients,
      // A client without a certificate fails in the handshake (with an alert it can report);
      // the chain itself is checked below: Node does that only for its tls.Server's sockets.
      rejectUnauthorized: this.verifyClients,
    };
    if (keys) {
      options.pskCallback = (_s, id) => {
        const key = keys.get(id) ?? null;
        if (key) identity = id;
        return key;
      };
    }
    const secure = new tls.TLSSocket(socket, options);
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (reason: string): void => {
        if (settled) return;
        settled = true;
        this.stats.failed++;
        this.log.warn('host refused: TLS handshake failed', { peer, reason });
        secure.destroy();
        socket.destroy();
        reject(new TlsHandshakeFailed(`TLS handshake failed: ${reason}`));
      };
      // Stays for the socket's life: a late error must never go unhandled (the server adds its own).
      secure.on('error', (err: Error & { reason?: string }) => fail(err.reason ?? err.message.trim()));
      secure.once('close', () => fail('connection closed during the TLS handshake'));
      secure.once('secure', () => {
        if (settled) return;
        // Not "a key was found": OpenSSL may still drop the PSK (suite mismatch) and go on with
        // certificates. Node's verdict counts a PSK only when the session really used one.
        const certError = this.verifyClients ? clientCertError(secure) : null;
        if (certError) return fail(`client certificate refused: ${certError}`);
        settled = true;
        this.stats.established++;
        const psk = identity !== null && secure.isSessionReused();   // a TLS 1.3 PSK is a "resumption"
        this.log.debug('host TLS established', {
          peer, protocol: secure.getProtocol(), cipher: secure.getCipher()?.name,
          ...(psk ? { pskIdentity: identity } : { client: peerName(secure) }),
        });
        resolve(secure);
      });
    });
  }
}

/**
 * The verdict OpenSSL recorded on the client's certificate chain (null: valid, or no certificate
 * needed because a PSK authenticated the client). Node applies it itself only for sockets its
 * tls.Server accepted; for an upgraded socket this is the same call its server makes. No way to
 * check is a refusal, never a pass.
 */
function clientCertError(socket: tls.TLSSocket): string | null {
  const ssl = (socket as unknown as { ssl?: { verifyError?: () => Error | null } }).ssl;
  if (typeof ssl?.verifyError !== 'function') return 'cannot check client certificates on this Node.js';
  const err = ssl.verifyError();
  return err ? (err as NodeJS.ErrnoException).code ?? err.message : null;
}

function peerName(socket: tls.TLSSocket): string | undefined {
  const cn = socket.getPeerCertificate()?.subject?.CN;
  return Array.isArray(cn) ? cn.join(',') : cn;
}
