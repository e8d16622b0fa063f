// A secondary that loses power loses what it had applied but not flushed, although it had
// answered it. The primary must notice (the pairing answer says how far the copy really got) and
// resend it; it can, because a dirty bit goes only after a peer FLUSH (lun/flushed-clears.ts).
// Power loss is simulated: SIGKILL, the copy put back to what it held at its last flush, and a
// new boot id (NBD_MIRROR_TEST_BOOT_ID) so the restarted site sees a reboot.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { once } from 'node:events';
import { expect } from 'chai';
import { OutagePair } from '../helpers/outage-pair.js';
import { Cleanup, pollUntil, tmpDir } from '../helpers/site.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const PYTHON = '/usr/bin/python3';
// Write 64 KiB of `pattern` at each offset, FLUSH if asked, print "done", stay connected until stdin closes.
const SCRIPT = `import sys, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
pattern = int(sys.argv[2]); flush = sys.argv[3] == '1'
for off in sys.argv[4:]:
    h.pwrite(bytes([pattern]) * 65536, int(off))
if flush: h.flush()
print('done', flush=True)
sys.stdin.read()
`;

/** Run the writer; resolves once every write (and the FLUSH) was acknowledged, the client still connected. */
async function writeRegions(uri: string, pattern: number, offsets: number[], flush: boolean): Promise<ChildProcess> {
  const proc = spawn(PYTHON, ['-c', SCRIPT, uri, String(pattern), flush ? '1' : '0', ...offsets.map(String)], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout!.on('data', (c: Buffer) => { out += c.toString(); });
  proc.stderr!.on('data', (c: Buffer) => { err += c.toString(); });
  await pollUntil(() => out.includes('done') || proc.exitCode !== null, { timeoutMs: 20_000, intervalMs: 10, what: 'the writes acknowledged' });
  if (!out.includes('done')) throw new Error(`writer exited ${proc.exitCode}: ${err}`);
  return proc;
}

async function endWriter(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null) return;
  proc.kill('SIGKILL');
  await once(proc, 'exit');
}

describe('a secondary that reboots after answering writes it had not flushed', function () {
  this.timeout(120_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  for (const mode of ['sync', 'async'] as const) {
    it(`${mode}: the primary learns of the loss from the pairing answer and resends every region written since the peer's last flush`, async function () {
      const dir = await tmpDir('nbd-mirror-power-');
      cleanup.add('remove temp dir', () => dir.cleanup());
      const pair = await OutagePair.start(dir, { mode, size: SIZE, connections: 2 });
      cleanup.add('stop sites and proxies', () => pair.stop());
      await pair.waitLun((l) => l.state === 'uptodate', 'uptodate at start', 30_000);

      // 1. Data, flushed: the secondary's durable point; every dirty bit goes once a peer FLUSH covers it.
      const first = await writeRegions(pair.a.uri('lun0'), 0xa1, Array.from({ length: 64 }, (_, i) => i * 128 * 1024), true);
      cleanup.add('first writer', () => endWriter(first));
      await pair.waitConverged(30_000);
      await pair.waitLun((l) => l.dirtyRegions === 0, 'every dirty bit cleared (after a peer flush)', 20_000);
      const durable = await fs.readFile(pair.files.b);

      // 2. More writes, acknowledged (sync: by the peer) but never flushed there; the power goes at once.
      const offsets = Array.from({ length: 16 }, (_, i) => i * 1024 * 1024 + 64 * 1024);
      const second = await writeRegions(pair.a.uri('lun0'), 0xb2, offsets, false);
      cleanup.add('second writer', () => endWriter(second));
      if (mode === 'async') await pair.waitLun((l) => l.inflight === 0, 'the async writes answered by the peer', 10_000);
      const marked = (await pair.lun()).dirtyRegions;
      await pair.kill('b');
      const before = await fs.readFile(pair.files.b);
      expect(offsets.every((o) => before[o] === 0xb2), 'the peer had applied the unflushed writes before the power went').to.equal(true);
      await fs.writeFile(pair.files.b, durable);   // what survives the power loss: the copy as of its last flush

      // 3. The secondary boots again (a new boot id): it must say how far it really got.
      const from = pair.a.logs.length;
      await pair.restart('b', { ...process.env, NBD_MIRROR_TEST_BOOT_ID: randomBytes(16).toString('hex') });
      const conv = await pair.waitConverged(20_000);
      const after = await fs.readFile(pair.files.b);
      expect(offsets.filter((o) => after[o] !== 0xb2), 'regions written before the power loss, resent').to.deep.equal([]);
      expect(pair.a.logs.slice(from).some((l) => l.includes('"message":"the peer lost writes it had acknowledged')), 'a says the peer lost acknowledged writes').to.equal(true);
      expect(pair.b.logs.some((l) => l.includes('restarted after a reboot')), 'b says it rebooted with unflushed requests').to.equal(true);
      expect(conv.hash).to.be.a('string');
      const transitions = pair.logLines('a', 'LUN mirror state').map((l) => String(l.to));
      expect(transitions.slice(-3), 'a resynced the marked regions').to.include('resyncing');
      expect(marked, 'the unflushed writes kept their dirty bits').to.be.at.least(offsets.length);
    });
  }
});
