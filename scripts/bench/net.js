// Ports (free ones, waiting for a listener) and the admin status of an nbd-mirror site.
import net from 'node:net';
// The CLI's own admin client (`nbd-mirror status` uses it); needs `npm run build`.
import { fetchStatus } from '../../dist/admin/client.js';
import { EXPORT_NAME, HOST, SETTINGS, sleep } from './common.js';

/** A port that was free a moment ago (bind to port 0 and let the kernel pick). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** n distinct ports that were free a moment ago. */
export async function freePorts(n) {
  const ports = new Set();
  for (let i = 0; ports.size < n; i++) {
    if (i > 20 * n) throw new Error(`could not find ${n} distinct free ports`);
    ports.add(await freePort());
  }
  return [...ports];
}

function tryConnect(port, timeoutMs = 1000) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(timeoutMs, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/**
 * Wait until something accepts TCP connections on port. `alive()` is polled so
 * a server that dies during startup fails fast instead of timing out.
 */
export async function waitForPort(port, { alive = () => true, timeoutMs = SETTINGS.startTimeoutMs, what = `port ${port}` } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await tryConnect(port)) return;
    if (!alive()) throw new Error(`${what} exited before accepting connections`);
    if (Date.now() > deadline) throw new Error(`${what} did not accept connections within ${timeoutMs} ms`);
    await sleep(100);
  }
}

/**
 * The status object of one LUN of a site (GET /status on its admin port). One retry on a
 * connection reset: the client keeps connections alive, and the site may close an idle one
 * just as it is reused.
 */
export async function lunStatus(adminPort, lun = EXPORT_NAME) {
  let st;
  try {
    st = await fetchStatus({ host: HOST, port: adminPort }, 2000);
  } catch (err) {
    if (err?.code !== 'ECONNRESET') throw err;
    st = await fetchStatus({ host: HOST, port: adminPort }, 2000);
  }
  const l = st?.luns?.find((x) => x.name === lun);
  if (!l) throw new Error(`status has no LUN ${lun}${st?.error ? ` (${st.error})` : ''}`);
  return l;
}

/**
 * Poll a LUN's status every intervalMs until its state is one of `states`.
 * Resolves { status, atMs } (atMs = Date.now() of the poll that saw it).
 * onPoll(status, now) sees every successful poll (for timelines).
 */
export async function waitForLunState(adminPort, states, { timeoutMs = 30_000, intervalMs = 50, alive = () => true, onPoll, what = 'LUN' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last = null;
  let lastErr = null;
  for (;;) {
    try {
      last = await lunStatus(adminPort);
      const now = Date.now();
      onPoll?.(last, now);
      if (states.includes(last.state)) return { status: last, atMs: now };
    } catch (err) {
      lastErr = err;
    }
    if (!alive()) throw new Error(`${what}: site exited while waiting for state ${states.join('|')}`);
    if (Date.now() > deadline) {
      const seen = last ? `state ${last.state} (${last.reason ?? ''})` : `no status (${lastErr?.message ?? '?'})`;
      throw new Error(`${what}: not ${states.join('|')} within ${timeoutMs} ms; last ${seen}`);
    }
    await sleep(intervalMs);
  }
}

/**
 * Wait until a LUN is uptodate, for as long as its catch-up moves: the deadline is `stallMs`
 * after the last poll whose state or progress counters changed. Resolves { status, atMs,
 * catchUpAt } (catchUpAt: the first poll in a catch-up state, null if none was seen).
 */
export async function waitUptodateByProgress(adminPort, { stallMs = SETTINGS.startTimeoutMs, intervalMs = 50, alive = () => true, what = 'LUN' } = {}) {
  let mark = '';
  let movedAt = Date.now();
  let catchUpAt = null;
  for (;;) {
    const left = movedAt + stallMs - Date.now();
    try {
      const done = await waitForLunState(adminPort, ['uptodate'], {
        timeoutMs: Math.max(0, Math.min(left, 5000)), intervalMs, alive, what,
        onPoll: (st, now) => {
          const p = st.progress ?? {};
          const m = `${st.state} ${p.replayDone} ${p.resyncDone} ${p.syncDone}`;
          if (m !== mark) { mark = m; movedAt = now; }
          if (['syncing', 'resyncing', 'replaying'].includes(st.state)) catchUpAt ??= now;
        },
      });
      return { ...done, catchUpAt };
    } catch (err) {
      if (!/ within /.test(err.message) || Date.now() >= movedAt + stallMs) {
        if (/ within /.test(err.message)) err.message = `${what}: not uptodate and no progress for ${stallMs} ms (last ${mark})`;
        throw err;
      }
    }
  }
}

/** Records distinct consecutive LUN states with their time relative to t0. */
export function stateTimeline(t0) {
  const events = [];
  return {
    events,
    onPoll(st, now) {
      const last = events[events.length - 1];
      if (!last || last.state !== st.state) events.push({ atS: +((now - t0) / 1000).toFixed(3), state: st.state, reason: st.reason ?? '' });
    },
    text() {
      return events.map((e) => `${e.atS.toFixed(2)}s ${e.state}`).join(' → ');
    },
  };
}
