// Admin HTTP endpoint (loopback by default): GET /status returns the JSON behind `nbd-mirror status`,
// GET /metrics the Prometheus text, and POST /luns/NAME/ACTION runs an operator action
// (promote, demote, resolve, verify) through the site's SiteActions.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { listenOn } from '../net/listen.js';
import { ActionError, type SiteActions } from './actions.js';

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

class BadRequest extends Error {}

export class AdminServer {
  private readonly server: http.Server;

  constructor(
    private readonly status: StatusSource,
    private readonly metrics: MetricsSource,
    private readonly actions?: SiteActions,
  ) {
    // requestTimeout 0: a verify answers only when it has compared the whole LUN, which can take
    // longer than Node's default 300 s. (Stalled headers are still cut by headersTimeout; the
    // endpoint is bound to loopback.)
    this.server = http.createServer({ requestTimeout: 0 }, (req, res) => this.route(req, res));
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return listenOn(this.server, host, port);
  }

  private route(req: http.IncomingMessage, res: http.ServerResponse): void {
    // No route reads a body: drain whatever was sent so the request completes.
    req.resume();
    const url = new URL(req.url ?? '/', 'http://admin');
    const lunAction = /^\/luns\/([^/]+)\/([^/]+)$/.exec(url.pathname);
    if (lunAction) return this.action(req, res, lunAction[1], lunAction[2], url.searchParams);
    if (url.pathname === '/status' || url.pathname === '/metrics') {
      if (req.method !== 'GET') return send(res, 405, { error: 'method not allowed' }, { allow: 'GET' });
    }
    if (url.pathname === '/status') return send(res, 200, this.status());
    if (url.pathname === '/metrics') {
      this.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
          res.end(text);
        },
        (err: Error) => send(res, 500, { error: err.message }),
      );
      return;
    }
    if (req.method !== 'GET' && req.method !== 'POST') return send(res, 405, { error: 'method not allowed' });
    send(res, 404, { error: `no such endpoint ${url.pathname}` });
  }

  /** POST /luns/NAME/ACTION[?query]: run the action, answer with its result or its refusal. */
  private action(req: http.IncomingMessage, res: http.ServerResponse, rawName: string, rawAction: string,
    query: URLSearchParams): void {
    const action = ACTIONS.find((a) => a === rawAction);
    if (!action) {
      return send(res, 404, { error: `no such action "${safe(rawAction)}" (one of ${ACTIONS.join(', ')})` });
    }
    if (req.method !== 'POST') {
      return send(res, 405, { error: `method not allowed: ${action} takes POST` }, { allow: 'POST' });
    }
    let lun: string;
    let run: (actions: SiteActions) => Promise<unknown>;
    try {
      lun = decodeName(rawName);
      run = parseAction(action, lun, query);
    } catch (err) {
      return send(res, err instanceof BadRequest ? 400 : 500, { error: (err as Error).message });
    }
    if (!this.actions) {
      return send(res, 501, { error: `operator actions are not available on this admin endpoint (${action} ${lun})` });
    }
    let pending: Promise<unknown>;
    try {
      pending = run(this.actions);
    } catch (err) {
      pending = Promise.reject(err);
    }
    pending.then(
      (result) => send(res, 200, result),
      (err: unknown) => {
        if (err instanceof ActionError) send(res, err.status, { error: err.message });
        else send(res, 500, { error: err instanceof Error ? err.message : String(err) });
      },
    );
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

function decodeName(raw: string): string {
  let name: string;
  try {
    name = decodeURIComponent(raw);
  } catch {
    throw new BadRequest(`bad LUN name "${safe(raw)}": invalid URL encoding`);
  }
  if (!LUN_NAME.test(name)) {
    throw new BadRequest(`bad LUN name "${safe(name)}": letters, digits, ".", "_", "-" (not first), at most 128`);
  }
  return name;
}

function parseAction(action: ActionName, lun: string, query: URLSearchParams): (a: SiteActions) => Promise<unknown> {
  for (const key of new Set(query.keys())) {
    if (!PARAMS[action].includes(key)) {
      throw new BadRequest(`${action}: unknown parameter "${safe(key)}"` +
        (PARAMS[action].length ? ` (accepts ${PARAMS[action].join(', ')})` : ' (takes none)'));
    }
    if (query.getAll(key).length > 1) throw new BadRequest(`${action}: parameter "${safe(key)}" given more than once`);
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
        throw new BadRequest(discard === null
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
  throw new BadRequest(`${key} must be 1 or 0 (got "${safe(v)}")`);
}

/** Echo client input in messages without control characters, and not too long. */
function safe(s: string): string {
  const clean = s.replace(/[\u0000-\u001f\u007f]/g, '?');
  return clean.length > 64 ? `${clean.slice(0, 64)}…` : clean;
}

function send(res: http.ServerResponse, code: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body ?? null, null, 2) + '\n';
  res.writeHead(code, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}
