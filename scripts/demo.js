#!/usr/bin/env node
// `npm start`: a demo pair of sites on loopback with file-backed LUNs under ./demo-data.
// Site a is primary for lun0 (sync), site b for lun1 (async); each is secondary for the other.
// Ctrl-C stops both (gracefully).
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const data = path.resolve(process.env.DEMO_DIR ?? path.join(root, 'demo-data'));
const SIZE = 256 * 1024 * 1024;

const sites = {
  a: { nbd: 10809, mirror: 10810, admin: 10811, peerMirror: 10820, peer: 'b' },
  b: { nbd: 10819, mirror: 10820, admin: 10821, peerMirror: 10810, peer: 'a' },
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

const children = [];
for (const name of Object.keys(sites)) {
  const file = config(name);
  const child = spawn(process.execPath, [path.join(root, 'dist', 'cli.js'), 'serve', '--config', file], {
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, NBD_MIRROR_LOG_FORMAT: 'pretty' },
  });
  child.on('exit', (code, signal) => {
    console.log(`site ${name} exited (${signal ?? code})`);
    if (!stopping) stop(1);
  });
  children.push(child);
}

let stopping = false;
function stop(code = 0) {
  if (stopping) return;
  stopping = true;
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  Promise.all(children.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once('exit', r))))).then(() => process.exit(code));
}
process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));

console.log(`
nbd-mirror demo: two sites on loopback, data under ${data}
  site a  NBD 127.0.0.1:10809  admin 127.0.0.1:10811   lun0 primary (sync)   lun1 secondary
  site b  NBD 127.0.0.1:10819  admin 127.0.0.1:10821   lun1 primary (async)  lun0 secondary

Try, from another terminal:
  nbdinfo --list nbd://127.0.0.1:10809
  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://127.0.0.1:10809/lun0
  cmp <(head -c 1M ${data}/a/lun0.img) <(head -c 1M ${data}/b/lun0.img) && echo mirrored
  sudo nbd-client 127.0.0.1 10809 /dev/nbd0 -N lun0        # kernel block device (needs the nbd module)
  node dist/cli.js status --config ${data}/a/site.json
Ctrl-C stops both sites.
`);
