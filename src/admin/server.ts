// Admin HTTP endpoint: GET /status returns the JSON behind `nbd-mirror status`, GET /metrics the
// Prometheus text, and POST /luns/NAME/ACTION runs an operator action (promote, demote, resolve,
// verify) through the site's SiteActions. It listens twice: on TCP (loopback by default), where
// reads are open to anyone who reaches it and actions need the bearer token of admin.tokenFile,
// and on a unix socket only its owner may open (mode 0600), where everything is allowed.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { listenOn } from '../net/listen.js';
import { httpStatusOf, NbdMirrorError, type ErrorCode } from '../errors.js';
import type { SiteActions } from './actions.js';

export type StatusSource = () => unknown;
export type MetricsSource = () => Promise<string>;

/** The operator actions, as the last path segment of POST /luns/NAME/ACTION. */
export const ACTIONS = ['promote', 'demote', 'resolve', 'verify'] as const;
export type ActionName = (typeof ACTIONS)[number];

/** A LUN name as the admin endpoint accepts it (after URL-decoding). */
export const LUN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

/** Query parameters each action accepts (anything else is refused, so a typo is not silently ignored). */
const PARAMS: Record<ActionName, readonly string[]> = {
  promote: ['force', 'never-synced'],
  demote: [],
  resolve: ['discard'],
  verify: ['repair'],
};

export interface AdminAuth {
  /** Bearer token that authorises actions over TCP; null: actions only on the socket. */
  token: string | null;
  /** Where actions are accepted, for the refusal message. */
  socketPath: string | null;
}

export class AdminServer {
  private readonly server: http.Server;
  private readonly socketServer: http.Server;
  private socketPath: string | null = null;

  constructor(
    private readonly status: StatusSource,
    private readonly metrics: MetricsSource,
    private readonly actions?: SiteActions,
    private readonly auth: AdminAuth = { token: null, socketPath: null },
  ) {
    // requestTimeout 0: a verify answers only when it has compared the whole LUN, which can take
    // longer than Node's default 300 s. (Stalled headers are still cut by headersTimeout; the
    // endpoint is bound to loopback.)
    this.server = http.createServer({ requestTimeout: 0 }, (req, res) => this.route(req, res, false));
    this.socketServer = http.createServer({ requestTimeout: 0 }, (req, res) => this.route(req, res, true));
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  /**
   * The owner-only unix socket. A leftover socket file (a crash) is replaced; one a live site still
   * answers on is EADDRINUSE; anything else at the path is refused rather than deleted.
   */
  async listenSocket(path: string, mode = 0o600): Promise<void> {
    let st: fs.Stats | null = null;
    try { st = fs.lstatSync(path); } catch { /* none */ }
    if (st) {
      if (!st.isSocket()) throw Object.assign(new Error(`admin socket ${path} exists and is not a socket`), { code: 'EEXIST' });
      if (await answers(path)) {
        throw Object.assign(new Error(`listen EADDRINUSE: ${path} (another site answers there)`), { code: 'EADDRINUSE', syscall: 'listen', address: path });
      }
      fs.unlinkSync(path);
    }
    // The umask closes the window between bind() (synchronous in listen()) and the chmod.
    const old = process.umask(0o777 & ~mode);
    let listening: Promise<void>;
    try {
      listening = new Promise<void>((resolve, reject) => {
        this.socketServer.once('error', reject);
        this.socketServer.listen(path, () => { this.socketServer.off('error', reject); resolve(); });
      });
    } finally {
      process.umask(old);
    }
    await listening;
    fs.chmodSync(path, mode);
    this.socketPath = path;
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse, trusted: boolean): void {
    // No route reads a body: drain whatever was sent so the request completes.
    req.resume();
    const url = new URL(req.url ?? '/', 'http://admin');
    const lunAction = /^\/luns\/([^/]+)\/([^/]+)$/.exec(url.pathname);
    if (lunAction) {
      if (!trusted && req.method === 'POST' && !this.authorised(req)) return this.refuse(req, res);
      return this.action(req, res, lunAction[1], lunAction[2], url.searchParams);
    }
    if (url.pathname === '/status' || url.pathname === '/metrics') {
      if (req.method !== 'GET') return fail(res, refusal('method-not-allowed', 'method not allowed'), { allow: 'GET' });
    }
    if (url.pathname === '/status') return send(res, 200, this.status());
    if (url.pathname === '/metrics') {
      this.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
          res.end(text);
        },
        (err: unknown) => fail(res, err),
      );
      return;
    }
    if (req.method !== 'GET' && req.method !== 'POST') return fail(res, refusal('method-not-allowed', 'method not allowed'));
    fail(res, refusal('not-found', `no such endpoint ${url.pathname}`));
  }

  private authorised(req: http.IncomingMessage): boolean {
    const token = this.auth.token;
    const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
    if (!token || !m) return false;
    const [a, b] = [Buffer.from(m[1]), Buffer.from(token)];
    return a.length === b.length && crypto.timingSafeEqual(a, b);
  }

  private refuse(req: http.IncomingMessage, res: http.ServerResponse): void {
    const where = this.auth.socketPath ? `the admin socket ${this.auth.socketPath}` : 'the admin socket';
    if (this.auth.token) {
      const why = req.headers.authorization ? 'wrong token' : 'no token';
      return fail(res, refusal('unauthorised', `operator actions over TCP need the token of admin.tokenFile (${why}); or use ${where}`),
        { 'www-authenticate': 'Bearer' });
    }
    fail(res, refusal('forbidden', `operator actions are only accepted on ${where} (or over TCP with admin.tokenFile set)`));
  }

  /** POST /luns/NAME/ACTION[?query]: run the action, answer with its result or its refusal. */
  private action(req: http.IncomingMessage, res: http.ServerResponse, rawName: string, rawAction: string,
    query: URLSearchParams): void {
    const action = ACTIONS.find((a) => a === rawAction);
    if (!action) {
      return fail(res, refusal('not-found', `no such action "${safe(rawAction)}" (one of ${ACTIONS.join(', ')})`));
    }
    if (req.method !== 'POST') {
      return fail(res, refusal('method-not-allowed', `method not allowed: ${action} takes POST`), { allow: 'POST' });
    }
    let lun: string;
    let run: (actions: SiteActions) => Promise<unknown>;
    try {
      lun = decodeName(rawName);
      run = parseAction(action, lun, query);
    } catch (err) {
      return fail(res, err);
    }
    if (!this.actions) {
      return fail(res, refusal('unavailable', `operator actions are not available on this admin endpoint (${action} ${lun})`));
    }
    let pending: Promise<unknown>;
    try {
      pending = run(this.actions);
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(
      (result) => send(res, 200, result),
      (err: unknown) => fail(res, err),
    );
  }

  async close(): Promise<void> {
    await Promise.all([this.server, this.socketServer].map((srv) => new Promise<void>((resolve) => {
      if (!srv.listening) return resolve();
      srv.close(() => resolve());
      srv.closeAllConnections();
    })));
    if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
    this.socketPath = null;
  }
}

/** True when something accepts connections on the unix socket at `path`. */
function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(path);
    c.once('connect', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  });
}

function decodeName(raw: string): string {
  let name: string;
  try {
    name = decodeURIComponent(raw);
  } catch {
    throw refusal('bad-request', `bad LUN name "${safe(raw)}": invalid URL encoding`);
  }
  if (!LUN_NAME.test(name)) {
    throw refusal('bad-request', `bad LUN name "${safe(name)}": letters, digits, ".", "_", "-" (not first), at most 128`);
  }
  return name;
}

function parseAction(action: ActionName, lun: string, query: URLSearchParams): (a: SiteActions) => Promise<unknown> {
  for (const key of new Set(query.keys())) {
    if (!PARAMS[action].includes(key)) {
      throw refusal('bad-request', `${action}: unknown parameter "${safe(key)}"` +
        (PARAMS[action].length ? ` (accepts ${PARAMS[action].join(', ')})` : ' (takes none)'));
    }
    if (query.getAll(key).length > 1) throw refusal('bad-request', `${action}: parameter "${safe(key)}" given more than once`);
  }
  switch (action) {
    case 'promote': {
      const force = flag(query, 'force');
      const neverSynced = flag(query, 'never-synced');
      return (a) => a.promote(lun, neverSynced ? { force, neverSynced } : { force });
    }
    case 'demote':
      return (a) => a.demote(lun);
    case 'resolve': {
      const discard = query.get('discard');
      if (discard !== 'local' && discard !== 'remote') {
        throw refusal('bad-request', discard === null
          ? 'resolve needs discard=local or discard=remote'
          : `resolve: discard must be local or remote (got "${safe(discard)}")`);
      }
      return (a) => a.resolve(lun, discard);
    }
    case 'verify': {
      const repair = flag(query, 'repair');
      return (a) => a.verify(lun, { repair });
    }
  }
}

/** A boolean query parameter: absent, 0/false → false; 1/true (or bare "?force") → true. */
function flag(query: URLSearchParams, key: string): boolean {
  const v = query.get(key);
  if (v === null || v === '0' || v === 'false') return false;
  if (v === '' || v === '1' || v === 'true') return true;
  throw refusal('bad-request', `${key} must be 1 or 0 (got "${safe(v)}")`);
}

/** Echo client input in messages without control characters, and not too long. */
function safe(s: string): string {
  const clean = s.replace(/[\u0000-\u001f\u007f]/g, '?');
  return clean.length > 64 ? `${clean.slice(0, 64)}…` : clean;
}

/** A request the endpoint refuses; its code is the HTTP status (src/errors.ts). */
function refusal(code: ErrorCode, message: string): NbdMirrorError {
  return new NbdMirrorError(message, { code });
}

/** Answer an error with the status its code means (500 for an error without one) and { error }. */
function fail(res: http.ServerResponse, err: unknown, headers: Record<string, string> = {}): void {
  send(res, httpStatusOf(err), { error: err instanceof Error ? err.message : String(err) }, headers);
}

function send(res: http.ServerResponse, code: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body ?? null, null, 2) + '\n';
  res.writeHead(code, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
