#!/usr/bin/env node
// `npm start`: a demo pair of sites on loopback with file-backed LUNs under ./demo-data.
// Site a is primary for lun0 (sync), site b for lun1 (async); each is secondary for the other.
// A site that exits (killed, crashed) leaves the other running; typing its name (a or b) and
// Enter starts it again. Ctrl-C stops both (gracefully).
import { spawn } from 'node:child_process';
import http from 'node:http';
import readline from 'node:readline';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const data = path.resolve(process.env.DEMO_DIR ?? path.join(root, 'demo-data'));
const SIZE = 256 * 1024 * 1024;

// DEMO_PORTS="nbdA,mirrorA,adminA,nbdB,mirrorB,adminB" moves the demo off its usual ports (tests take free ones).
const ports = (process.env.DEMO_PORTS ?? '10809,10810,10811,10819,10820,10821').split(',').map(Number);
if (ports.length !== 6 || !ports.every((p) => Number.isInteger(p) && p > 0 && p < 65536)) {
  console.error('DEMO_PORTS: six port numbers, comma-separated (nbd, mirror, admin of a, then of b)');
  process.exit(2);
}
const sites = {
  a: { nbd: ports[0], mirror: ports[1], admin: ports[2], peerMirror: ports[4], peer: 'b' },
  b: { nbd: ports[3], mirror: ports[4], admin: ports[5], peerMirror: ports[1], peer: 'a' },
};

function image(file) {
  if (!fs.existsSync(file)) {
    fs.closeSync(fs.openSync(file, 'w'));
    fs.truncateSync(file, SIZE);       // sparse: costs no disk until written
  }
  return file;
}

/** The key both sites share for the mirror link (TLS-PSK) and heartbeats; made once, kept private. */
function mirrorKey() {
  const file = path.join(data, 'mirror.psk');
  if (!fs.existsSync(file)) fs.writeFileSync(file, `demo:${crypto.randomBytes(32).toString('hex')}\n`, { mode: 0o600 });
  return file;
}

function config(name) {
  const s = sites[name];
  const dir = path.join(data, name);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cfg = {
    site: name,
    listen: { host: '127.0.0.1', port: s.nbd },
    admin: { host: '127.0.0.1', port: s.admin },
    dataDir: path.join(dir, 'state'),
    mirror: {
      listen: { host: '127.0.0.1', port: s.mirror },
      peer: { host: '127.0.0.1', port: s.peerMirror, site: s.peer },
      tls: 'psk',
      credentials: { pskFile: mirrorKey() },
      connections: 4,
    },
    luns: [
      { name: 'lun0', path: image(path.join(dir, 'lun0.img')), ...(name === 'a' ? { role: 'primary', mirror: 'sync' } : { role: 'secondary' }) },
      { name: 'lun1', path: image(path.join(dir, 'lun1.img')), ...(name === 'b' ? { role: 'primary', mirror: 'async' } : { role: 'secondary' }) },
    ],
    log: { level: 'info', format: 'pretty' },
  };
  const file = path.join(dir, 'site.json');
  fs.writeFileSync(file, JSON.stringify(cfg, null, 2) + '\n');
  return file;
}

const files = {};
const running = {};
let stopping = false;
const rel = (p) => { const r = path.relative(process.cwd(), p); return r && !r.startsWith('..') ? r : p; };

function startSite(name) {
  if (running[name]) return;
  const child = spawn(process.execPath, [path.join(root, 'dist', 'cli.js'), 'serve', '--config', files[name]], {
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, NBD_MIRROR_LOG_FORMAT: 'pretty' },
  });
  running[name] = child;
  fs.writeFileSync(path.join(data, name, 'site.pid'), `${child.pid}\n`);
  child.on('exit', (code, signal) => {
    running[name] = null;
    fs.rmSync(path.join(data, name, 'site.pid'), { force: true });
    if (stopping) return;
    const other = sites[name].peer;
    console.log(`\nsite ${name} exited (${signal ?? `exit code ${code}`}); site ${other} keeps running.`
      + `\nType "${name}" and Enter here to start site ${name} again (or Ctrl-C to stop the demo).\n`);
  });
}

function status(name) {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port: sites[name].admin, path: '/status', timeout: 1000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => { try { resolve(JSON.parse(body)); } catch { resolve(null); } });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
}

/** The banner, from the sites' actual roles (a promote/demote outlives a restart of the demo). */
async function banner() {
  const st = {};
  for (let i = 0; i < 100; i++) {
    for (const n of Object.keys(sites)) if (running[n] && !st[n]) st[n] = await status(n);
    if (Object.keys(sites).every((n) => st[n] || !running[n])) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const cli = (n, cmd) => `npx nbd-mirror ${cmd} --config ${rel(files[n])}`;
  const rows = [];
  const primaryOf = {};
  for (const n of Object.keys(sites)) {
    const luns = st[n]?.luns ?? [];
    for (const l of luns) if (l.role === 'primary') primaryOf[l.name] = n;
    const desc = luns.map((l) => `${l.name} ${l.role}${l.role === 'primary' ? ` (${l.mode})` : ''}`).join(', ') || 'not running';
    rows.push(`  site ${n}  NBD 127.0.0.1:${sites[n].nbd}  admin 127.0.0.1:${sites[n].admin}   ${desc}`);
  }
  const tries = [`  nbdinfo --list nbd://127.0.0.1:${sites.a.nbd}`];
  const lun0 = primaryOf.lun0;
  if (lun0) {
    const other = sites[lun0].peer;
    tries.push(`  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://127.0.0.1:${sites[lun0].nbd}/lun0        # lun0 is primary on ${lun0}`);
    tries.push(`  qemu-io -r -f raw -c 'read -P 0xab 0 1M' nbd://127.0.0.1:${sites[other].nbd}/lun0     # the secondary, read-only`);
    tries.push(`  cmp <(head -c 1M ${rel(path.join(data, lun0, 'lun0.img'))}) <(head -c 1M ${rel(path.join(data, other, 'lun0.img'))}) && echo mirrored`);
  } else {
    tries.push('  (no site is primary for lun0 right now: promote it on one of them first)');
  }
  tries.push(`  ${cli('a', 'status')}`);
  tries.push(`  curl -s 127.0.0.1:${sites.a.admin}/metrics | grep ^nbd_mirror_lun_state`);
  const failover = lun0 ? [
    `Fail over lun0 (site ${lun0} lost, ${sites[lun0].peer} takes over):`,
    `  kill -9 $(cat ${rel(path.join(data, lun0, 'site.pid'))})                 # site ${lun0} dies; ${sites[lun0].peer} keeps serving`,
    `  ${cli(sites[lun0].peer, 'promote lun0')}`,
    `  then type "${lun0}" Enter here to start site ${lun0} again, and: ${cli(lun0, 'demote lun0')}`,
  ] : [];
  console.log(['', `nbd-mirror demo: two sites on loopback, data under ${rel(data)}`, ...rows, '', 'Try, from another terminal:', ...tries,
    `  sudo nbd-client 127.0.0.1 ${sites.a.nbd} /dev/nbd0 -N lun0        # kernel block device (needs the nbd module)`, '',
    ...failover, '', 'The CLI: npx nbd-mirror --help (or node dist/cli.js ...). Ctrl-C stops both sites.', ''].join('\n'));
}

for (const name of Object.keys(sites)) files[name] = config(name);
for (const name of Object.keys(sites)) startSite(name);

function stop(code = 0) {
  if (stopping) return;
  stopping = true;
  const live = Object.values(running).filter(Boolean);
  for (const c of live) c.kill('SIGTERM');
  Promise.all(live.map((c) => new Promise((r) => c.once('exit', r)))).then(() => process.exit(code));
}
process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));

if (process.stdin.isTTY || process.env.DEMO_STDIN) {
  readline.createInterface({ input: process.stdin }).on('line', (line) => {
    const name = line.trim();
    if (!(name in sites)) return void console.log(`type ${Object.keys(sites).join(' or ')} to start that site`);
    if (running[name]) return void console.log(`site ${name} is running`);
    startSite(name);
    void banner();
  });
}
void banner();
