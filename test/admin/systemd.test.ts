// sd_notify through libsystemd (koffi): off without NOTIFY_SOCKET, delivered to a real unix
// datagram socket (file path and abstract "@name"), WATCHDOG_USEC/WATCHDOG_PID parsing, and the
// watchdog pinger.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { createNotifier, notify, startWatchdog, watchdogIntervalMs } from '../../src/admin/systemd.js';

const PYTHON = '/usr/bin/python3';

// Binds an AF_UNIX SOCK_DGRAM socket at argv[1] ("@name": abstract namespace), prints
// "bound", then one JSON line per datagram received.
const LISTENER = `
import json, socket, sys
addr = sys.argv[1]
if addr.startswith('@'):
    addr = '\\0' + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(addr)
print('bound', flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps(data.decode('utf-8', 'replace')), flush=True)
`;

interface Listener {
  child: ChildProcessWithoutNullStreams;
  /** Resolves with the next datagram (decoded) within timeoutMs. */
  next(timeoutMs?: number): Promise<string>;
  stop(): Promise<void>;
}

function listen(address: string): Promise<Listener> {
  const child = spawn(PYTHON, ['-c', LISTENER, address], { stdio: ['pipe', 'pipe', 'pipe'] });
  const received: string[] = [];
  const waiters: ((s: string) => void)[] = [];
  let stderr = '';
  let buffered = '';
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  return new Promise((resolve, reject) => {
    let bound = false;
    child.on('error', reject);
    child.on('exit', (code) => { if (!bound) reject(new Error(`listener exited (${code}): ${stderr}`)); });
    child.stdout.on('data', (d: Buffer) => {
      buffered += d.toString();
      let nl: number;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        if (!bound && line === 'bound') {
          bound = true;
          resolve({
            child,
            next(timeoutMs = 5000) {
              if (received.length) return Promise.resolve(received.shift()!);
              return new Promise<string>((res, rej) => {
                const t = setTimeout(() => rej(new Error(`no datagram within ${timeoutMs} ms (stderr: ${stderr})`)), timeoutMs);
                waiters.push((s) => { clearTimeout(t); res(s); });
              });
            },
            stop() {
              if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
              return new Promise<void>((res) => { child.once('exit', () => res()); child.kill('SIGTERM'); });
            },
          });
          continue;
        }
        const msg = JSON.parse(line) as string;
        const w = waiters.shift();
        if (w) w(msg);
        else received.push(msg);
      }
    });
  });
}

describe('admin/systemd: sd_notify', function () {
  const saved: Record<string, string | undefined> = {};
  const KEYS = ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'];
  let dir: string;
  const listeners: Listener[] = [];

  before(function () {
    for (const k of KEYS) saved[k] = process.env[k];
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-sd-'));
  });
  afterEach(async function () {
    for (const k of KEYS) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
    await Promise.all(listeners.splice(0).map((l) => l.stop()));
  });
  after(function () {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('is a no-op returning false without NOTIFY_SOCKET', function () {
    delete process.env.NOTIFY_SOCKET;
    expect(notify('READY=1')).to.equal(false);
  });

  it('delivers READY=1 to a unix datagram socket named by NOTIFY_SOCKET', async function () {
    const sock = path.join(dir, 'notify.sock');
    const l = await listen(sock);
    listeners.push(l);
    process.env.NOTIFY_SOCKET = sock;
    expect(notify('READY=1')).to.equal(true);
    expect(await l.next()).to.equal('READY=1');
    expect(notify('STATUS=2 LUNs, peer b up\nWATCHDOG=1')).to.equal(true);
    expect(await l.next()).to.equal('STATUS=2 LUNs, peer b up\nWATCHDOG=1');
  });

  it('supports an abstract-namespace NOTIFY_SOCKET (@name)', async function () {
    const name = `@nbdm-sd-test-${process.pid}-${Date.now()}`;
    const l = await listen(name);
    listeners.push(l);
    process.env.NOTIFY_SOCKET = name;
    expect(notify('READY=1')).to.equal(true);
    expect(await l.next()).to.equal('READY=1');
  });

  it('startWatchdog pings WATCHDOG=1 to the socket through notify()', async function () {
    const sock = path.join(dir, 'watchdog.sock');
    const l = await listen(sock);
    listeners.push(l);
    process.env.NOTIFY_SOCKET = sock;
    process.env.WATCHDOG_USEC = '100000';   // a ping every 50 ms
    process.env.WATCHDOG_PID = String(process.pid);
    const stop = startWatchdog(() => true);
    try {
      expect(await l.next()).to.equal('WATCHDOG=1');
      expect(await l.next()).to.equal('WATCHDOG=1');
    } finally {
      stop();
    }
  });

  it('returns false (no throw) when the socket does not exist', function () {
    process.env.NOTIFY_SOCKET = path.join(dir, 'nobody-listens.sock');
    expect(notify('READY=1')).to.equal(false);
  });

  it('returns false (no throw) when the library cannot be loaded', function () {
    process.env.NOTIFY_SOCKET = path.join(dir, 'whatever.sock');
    const missing = createNotifier('libnbdm-no-such-library.so.0');
    expect(missing('READY=1')).to.equal(false);
    expect(missing('READY=1'), 'second call, library not retried').to.equal(false);
  });
});

describe('admin/systemd: watchdog', function () {
  const saved: Record<string, string | undefined> = {};
  const KEYS = ['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'];
  beforeEach(function () { for (const k of KEYS) saved[k] = process.env[k]; });
  afterEach(function () {
    for (const k of KEYS) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  });

  it('pings at half of WATCHDOG_USEC', function () {
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '10000000' }, 42)).to.equal(5000);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '3000' }, 42)).to.equal(1);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '1' }, 42), 'never below 1 ms').to.equal(1);
  });

  it('is off without a usable WATCHDOG_USEC', function () {
    expect(watchdogIntervalMs({}, 42)).to.equal(null);
    for (const bad of ['', '0', '-5', 'abc', '1.5', '10s', '99999999999999999999']) {
      expect(watchdogIntervalMs({ WATCHDOG_USEC: bad }, 42), bad).to.equal(null);
    }
  });

  it('honours WATCHDOG_PID: only the named process pings', function () {
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '4000000', WATCHDOG_PID: '42' }, 42)).to.equal(2000);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '4000000', WATCHDOG_PID: '43' }, 42)).to.equal(null);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '4000000', WATCHDOG_PID: 'x' }, 42)).to.equal(null);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '4000000', WATCHDOG_PID: String(process.pid) })).to.equal(2000);
  });

  it('startWatchdog does nothing when the watchdog is off', function () {
    delete process.env.WATCHDOG_USEC;
    const sent: string[] = [];
    const stop = startWatchdog(() => true, (s) => { sent.push(s); return true; });
    stop();
    expect(sent).to.deep.equal([]);
  });

  it('startWatchdog sends WATCHDOG=1 only while healthy, until stopped', async function () {
    process.env.WATCHDOG_USEC = '40000';   // 40 ms: a ping every 20 ms
    delete process.env.WATCHDOG_PID;
    const sent: string[] = [];
    let health: 'ok' | 'bad' | 'throws' = 'ok';
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const stop = startWatchdog(() => {
      if (health === 'throws') throw new Error('check failed');
      return health === 'ok';
    }, (s) => { sent.push(s); return true; });
    try {
      await sleep(150);
      expect(sent.length, 'pings while healthy').to.be.greaterThan(2);
      expect(new Set(sent)).to.deep.equal(new Set(['WATCHDOG=1']));
      health = 'bad';
      const atTurn = sent.length;
      await sleep(120);
      expect(sent.length, 'no pings while unhealthy').to.equal(atTurn);
      health = 'throws';
      await sleep(80);
      expect(sent.length, 'no pings while the check throws').to.equal(atTurn);
      health = 'ok';
      await sleep(100);
      expect(sent.length, 'pings again').to.be.greaterThan(atTurn);
    } finally {
      stop();
    }
    const stopped = sent.length;
    await sleep(80);
    expect(sent.length, 'no pings after stop').to.equal(stopped);
  });
});
