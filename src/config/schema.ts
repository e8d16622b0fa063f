// The configuration schema: the public interface of `serve`. Every key has a doc, a default
// where one makes sense, validation, and (for scalars) an environment override.
import convict from 'convict';
import { parseCidr } from '../net/cidr.js';
import type { HostTlsMode, MirrorTlsMode, TlsCredentials } from '../security/credentials.js';
import type { SenderConfig } from '../mirror/sender.js';

export const LUN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export const lunSchema = {
  name: {
    doc: 'Export name hosts attach to; pairs a primary with the secondary of the same name on the peer.',
    format: (v: unknown) => {
      if (typeof v !== 'string' || !LUN_NAME.test(v)) {
        throw new Error('must be 1-128 characters of letters, digits, ".", "_" or "-", not starting with a punctuation mark');
      }
    },
    default: '',
  },
  path: {
    doc: 'Backing store: an existing regular (image) file or block device. Its size is the export size.',
    format: (v: unknown) => {
      if (typeof v !== 'string' || v.length === 0) throw new Error('must be a non-empty path');
    },
    default: '',
  },
  role: {
    doc: 'primary: hosts write here and writes are mirrored to the peer; secondary: receives the peer\'s writes, exported read-only.',
    format: ['primary', 'secondary'],
    default: 'primary',
  },
  mirror: {
    doc: 'For a primary: sync (ack after the peer stored the write), async (ack after the local write), none.',
    format: ['sync', 'async', 'none'],
    default: 'none',
  },
  readOnly: {
    doc: 'Export read-only to hosts (writes get EPERM).',
    format: Boolean,
    default: false,
  },
  description: {
    doc: 'Free text shown to clients by NBD LIST/INFO.',
    format: String,
    default: '',
  },
  allowedNetworks: {
    doc: 'Client networks allowed to see and attach this export, as CIDRs ("10.0.0.0/8", "::1/128"); empty allows every client that reaches the listener.',
    format: 'cidr-array',
    default: [] as string[],
  },
};

export type LunConfig = {
  name: string; path: string; role: 'primary' | 'secondary'; mirror: 'sync' | 'async' | 'none';
  readOnly: boolean; description: string; allowedNetworks: string[];
};

convict.addFormat({
  name: 'lun-array',
  validate(items: unknown) {
    if (!Array.isArray(items)) throw new Error('must be an array of LUN objects');
    items.forEach((item, i) => {
      try {
        if (item === null || typeof item !== 'object' || Array.isArray(item)) throw new Error('must be an object');
        lunChild().load(item).validate({ allowed: 'strict' });
      } catch (err) {
        throw new Error(`[${i}]${describeChildError((err as Error).message)}`);
      }
    });
  },
});

convict.addFormat({
  name: 'cidr-array',
  validate(items: unknown) {
    if (!Array.isArray(items)) throw new Error('must be an array of CIDR strings');
    for (const item of items) {
      if (typeof item !== 'string' || !parseCidr(item)) throw new Error(`"${String(item)}" is not a CIDR such as 10.0.0.0/8 or ::1/128`);
    }
  },
});

convict.addFormat({
  name: 'optional-path',
  validate(v: unknown) {
    if (typeof v !== 'string') throw new Error('must be a path (or "" for none)');
  },
});

convict.addFormat({
  name: 'host',
  validate(v: unknown) {
    if (typeof v !== 'string' || v.length === 0 || /\s/.test(v)) throw new Error('must be a host name or IP address');
  },
});

/** convict's child messages read "name: must ...: value was ..." — make them "[i].name: must ...". */
function describeChildError(msg: string): string {
  const first = msg.split('\n')[0];
  const declared = /configuration param '([^']+)' not declared/.exec(first);
  if (declared) return `.${declared[1]}: unknown key`;
  return first.startsWith('must') ? `: ${first}` : `.${first}`;
}

export function lunChild() {
  return convict<LunConfig>(lunSchema as convict.Schema<LunConfig>);
}

/** TLS material, shared by the host listener and the mirror link. Paths; "" means none. */
function credentialsSchema(what: string, envPrefix: string, pskNote = '') {
  return {
    pskFile: {
      doc: `${what}: pre-shared keys, one "identity:hexkey" per line (the format of GnuTLS psktool), at least 16 bytes of key each.${pskNote}`,
      format: 'optional-path', default: '', env: `${envPrefix}_PSK_FILE`,
    },
    certFile: { doc: `${what}: this site's X.509 certificate chain (PEM).`, format: 'optional-path', default: '', env: `${envPrefix}_CERT_FILE` },
    keyFile: { doc: `${what}: the private key of certFile (PEM); must not be readable by others.`, format: 'optional-path', default: '', env: `${envPrefix}_KEY_FILE` },
    caFile: { doc: `${what}: CA certificates (PEM) the other side's certificate must chain to.`, format: 'optional-path', default: '', env: `${envPrefix}_CA_FILE` },
  };
}

export const schema = {
  site: {
    doc: 'This site\'s name; the peer checks it on every mirror connection and heartbeat.',
    format: (v: unknown) => {
      if (typeof v !== 'string' || !LUN_NAME.test(v)) throw new Error('must be 1-128 letters, digits, ".", "_" or "-"');
    },
    default: '',
    env: 'NBD_MIRROR_SITE',
  },
  listen: {
    host: { doc: 'Address the NBD listener binds (hosts connect here).', format: 'host', default: '127.0.0.1', env: 'NBD_MIRROR_LISTEN_HOST' },
    port: { doc: 'NBD listener TCP port (10809 is the IANA NBD port; 0 picks a free one).', format: 'port', default: 10809, env: 'NBD_MIRROR_LISTEN_PORT' },
    tls: {
      doc: 'NBD STARTTLS for hosts: off (not offered), allow (offered, plain clients still served), require (plain clients refused with NBD_REP_ERR_TLS_REQD).',
      format: ['off', 'allow', 'require'], default: 'off', env: 'NBD_MIRROR_LISTEN_TLS',
    },
    credentials: credentialsSchema('Hosts\' TLS (listen.tls)', 'NBD_MIRROR_LISTEN_TLS'),
  },
  dataDir: {
    doc: 'Directory for journals and per-LUN metadata; created if missing.',
    format: (v: unknown) => {
      if (typeof v !== 'string' || v.length === 0) throw new Error('must be a non-empty path');
    },
    default: '/var/lib/nbd-mirror',
    env: 'NBD_MIRROR_DATA_DIR',
  },
  admin: {
    host: { doc: 'Address of the admin HTTP endpoint: GET /status and /metrics for anyone who reaches it; operator actions (promote/demote/resolve/verify) only with the token of admin.tokenFile. Keep it on loopback.', format: 'host', default: '127.0.0.1', env: 'NBD_MIRROR_ADMIN_HOST' },
    port: { doc: 'Admin HTTP port (0 picks a free one).', format: 'port', default: 10811, env: 'NBD_MIRROR_ADMIN_PORT' },
    socket: {
      doc: 'Unix socket of the admin endpoint, mode 0600 (only the site\'s user, root under systemd, may connect): status, metrics and the operator actions. "" means admin.sock in dataDir.',
      format: 'optional-path', default: '', env: 'NBD_MIRROR_ADMIN_SOCKET',
    },
    tokenFile: {
      doc: 'File holding a secret token (at least 16 characters, not readable by others) that authorises operator actions over TCP (HTTP "Authorization: Bearer TOKEN"); "" allows actions on the socket only.',
      format: 'optional-path', default: '', env: 'NBD_MIRROR_ADMIN_TOKEN_FILE',
    },
  },
  luns: {
    doc: 'The LUNs this site exports: [{ name, path, role, mirror, readOnly, description }].',
    format: 'lun-array',
    default: [] as LunConfig[],
  },
  mirror: {
    listen: {
      host: { doc: 'Address of the mirror listener the peer\'s pool connects to (TCP) and heartbeats arrive at (UDP).', format: 'host', default: '127.0.0.1', env: 'NBD_MIRROR_MIRROR_LISTEN_HOST' },
      port: { doc: 'Mirror listener port, TCP and UDP.', format: 'port', default: 10810, env: 'NBD_MIRROR_MIRROR_LISTEN_PORT' },
    },
    peer: {
      host: { doc: 'The peer site\'s mirror host.', format: 'host', default: '127.0.0.1', env: 'NBD_MIRROR_PEER_HOST' },
      port: { doc: 'The peer site\'s mirror port (TCP pool and UDP heartbeats).', format: 'port', default: 10810, env: 'NBD_MIRROR_PEER_PORT' },
      site: { doc: 'The peer\'s site name, checked on every connection; empty accepts any name but our own.', format: String, default: '', env: 'NBD_MIRROR_PEER_SITE' },
    },
    tls: {
      doc: 'Mirror link security: psk (TLS 1.3 with the key in credentials.pskFile), cert (TLS 1.3, mutual X.509 certificates), off (plain TCP: anyone who reaches the port can write the secondaries; warned at startup).',
      format: ['psk', 'cert', 'off'], default: 'psk', env: 'NBD_MIRROR_MIRROR_TLS',
    },
    credentials: credentialsSchema('Mirror link (mirror.tls)', 'NBD_MIRROR_MIRROR',
      ' One key, the same file at both sites; it also signs the heartbeats (HMAC-SHA256), so "cert" needs it too.'),
    connections: { doc: 'TCP connections in the pool toward the peer (the connection array).', format: 'int', default: 4, env: 'NBD_MIRROR_CONNECTIONS' },
    connectTimeoutMs: { doc: 'How long one pool connection may take to connect and exchange hellos.', format: 'nat', default: 5000 },
    reconnectMs: { doc: 'Pause between attempts to bring the pool up while the peer is unreachable.', format: 'nat', default: 1000 },
    asyncWindowBytes: {
      doc: 'async mode: bytes of mirror requests in flight per LUN before new host writes wait (back-pressure).',
      format: 'nat', default: 64 * 1024 * 1024, env: 'NBD_MIRROR_ASYNC_WINDOW_BYTES',
    },
    syncRateBytes: {
      doc: 'Bytes per second the background work of a site may read and send (initial sync, resync, verify), over all LUNs; at least 1 MiB.',
      format: 'nat', default: 200 * 1024 * 1024, env: 'NBD_MIRROR_SYNC_RATE_BYTES',
    },
    journal: {
      maxBytes: {
        doc: 'Per-LUN journal limit. Beyond it the journal collapses into the dirty-region bitmap (resync after reconnect).',
        format: 'nat', default: 1024 * 1024 * 1024, env: 'NBD_MIRROR_JOURNAL_MAX_BYTES',
      },
      regionSize: {
        doc: 'Bytes per bit of the dirty-region bitmap (a power of two, 4 KiB to 64 MiB).',
        format: 'nat', default: 64 * 1024, env: 'NBD_MIRROR_REGION_SIZE',
      },
    },
    heartbeat: {
      intervalMs: { doc: 'UDP heartbeat period.', format: 'nat', default: 1500 },
      timeoutMs: { doc: 'Silence after which the link is declared down and the pool closed.', format: 'nat', default: 4000 },
      probationMs: { doc: 'Uninterrupted heartbeats required after an outage before reconnecting.', format: 'nat', default: 10000 },
    },
  },
  io: {
    fastPath: {
      doc: 'Serve page-cache hits and fast small writes on the event loop instead of the thread pool (a slow write turns it off for 1 s).',
      format: Boolean, default: true, env: 'NBD_MIRROR_IO_FAST_PATH',
    },
  },
  shutdownTimeoutMs: {
    doc: 'On SIGTERM, how long in-flight requests may take before connections are closed anyway.',
    format: 'nat',
    default: 10000,
    env: 'NBD_MIRROR_SHUTDOWN_TIMEOUT_MS',
  },
  log: {
    level: { doc: 'Log level.', format: ['error', 'warn', 'info', 'debug'], default: 'info', env: 'NBD_MIRROR_LOG_LEVEL' },
    format: {
      doc: 'json (one object per line, for journald), pretty (for a terminal), or auto (pretty on a TTY).',
      format: ['json', 'pretty', 'auto'],
      default: 'auto',
      env: 'NBD_MIRROR_LOG_FORMAT',
    },
  },
};

export type { TlsCredentials };

/** The mirror section: what the sender uses (mirror/sender.ts SenderConfig), and the rest. */
export interface MirrorConfig extends SenderConfig {
  listen: { host: string; port: number };
  tls: MirrorTlsMode;
  credentials: TlsCredentials;
  journal: { maxBytes: number; regionSize: number };
}

export interface SiteConfig {
  site: string;
  /** null when the file has no "mirror" section: the site runs alone. */
  mirror: MirrorConfig | null;
  listen: { host: string; port: number; tls: HostTlsMode; credentials: TlsCredentials };
  dataDir: string;
  admin: { host: string; port: number; socket: string; tokenFile: string };
  luns: LunConfig[];
  io: { fastPath: boolean };
  shutdownTimeoutMs: number;
  log: { level: 'error' | 'warn' | 'info' | 'debug'; format: 'json' | 'pretty' | 'auto' };
}

/** The admin socket's path: admin.socket, or admin.sock in dataDir. */
export function adminSocketPath(cfg: Pick<SiteConfig, 'admin' | 'dataDir'>): string {
  return cfg.admin.socket || `${cfg.dataDir.replace(/\/+$/, '')}/admin.sock`;
}
