// Logging never takes a site down: a stream that fails (EPIPE) costs log lines, counted in
// metrics, not the process. Unit test of the transport, then a real site whose log reader goes away.
import http from 'node:http';
import { PassThrough, Writable } from 'node:stream';
import { expect } from 'chai';
import winston from 'winston';
import { logLinesLost, SafeStreamTransport } from '../src/log.js';
import { Cleanup, exec, pollUntil, sparseFile, startSite, tmpDir, type Site } from './helpers/site.js';

const MiB = 1024 * 1024;

function get(site: Site, path: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: site.adminPort, path, timeout: 5000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path} timed out`)));
    req.on('error', reject);
  });
}

function lostLines(metrics: string): number {
  const m = /^nbd_mirror_log_lines_lost_total (\d+)$/m.exec(metrics);
  if (!m) throw new Error('no nbd_mirror_log_lines_lost_total sample in /metrics');
  return Number(m[1]);
}

describe('log: a failing log stream never stops the site', function () {
  this.timeout(60_000);
  const cleanup = new Cleanup();
  afterEach(() => cleanup.run());

  it('SafeStreamTransport: a stream that fails with EPIPE costs counted lines, not an exception', async function () {
    const written: string[] = [];
    let fail = false;
    const stream = new Writable({
      write(chunk: Buffer, _enc, cb) {
        if (fail) {
          cb(Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }));
          return;
        }
        written.push(chunk.toString());
        cb();
      },
    });
    const broken: Error[] = [];
    const logger = winston.createLogger({
      format: winston.format.json(),
      transports: [new SafeStreamTransport(stream, (err) => broken.push(err))],
    });
    const before = logLinesLost();
    logger.info('one');
    await new Promise((r) => setImmediate(r));
    expect(written).to.have.length(1);
    expect(JSON.parse(written[0])).to.include({ message: 'one' });
    fail = true;
    logger.info('two');
    const errored = new Promise((r) => stream.once('error', r));
    await errored;
    logger.info('three');
    logger.warn('four');
    await new Promise((r) => setImmediate(r));
    expect(broken.map((e) => (e as NodeJS.ErrnoException).code)).to.deep.equal(['EPIPE']);
    expect(logLinesLost() - before).to.equal(3);
    expect(written).to.have.length(1);
  });

  it('SafeStreamTransport: a stream already ended counts every line as lost', async function () {
    const stream = new PassThrough();
    stream.resume();
    stream.end();
    await new Promise((r) => stream.once('finish', r));
    const logger = winston.createLogger({ transports: [new SafeStreamTransport(stream)] });
    const before = logLinesLost();
    logger.info('a');
    logger.error('b');
    await new Promise((r) => setImmediate(r));
    expect(logLinesLost() - before).to.equal(2);
  });

  it('a real site whose stdout and stderr readers go away keeps serving, and counts the lost lines', async function () {
    const dir = await tmpDir('nbd-mirror-log-');
    cleanup.add('temp dir', () => dir.cleanup());
    const image = await sparseFile(dir.join('lun0.img'), 8 * MiB);
    const site = await startSite({ luns: [{ name: 'lun0', path: image, role: 'primary', mirror: 'none' }], log: { level: 'debug' } });
    cleanup.add('site', () => site.stop());
    await exec('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', site.uri('lun0')], { timeoutMs: 20_000 });
    expect(lostLines((await get(site, '/metrics')).text)).to.equal(0);

    // Close the read ends of both pipes: the site's next write to either fails with EPIPE.
    site.proc.stdout!.destroy();
    site.proc.stderr!.destroy();
    // Log lines: a reload (SIGHUP) logs what it did; host connections log at debug level.
    site.proc.kill('SIGHUP');
    await exec('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 0 1M', site.uri('lun0')], { timeoutMs: 20_000 });
    site.proc.kill('SIGHUP');
    // No event tells the test that the site tried to log: wait for the counter.
    const lost = await pollUntil(async () => {
      const n = lostLines((await get(site, '/metrics')).text);
      return n > 0 && n;
    }, { timeoutMs: 15_000, what: 'lost log lines counted' });
    expect(lost).to.be.above(0);

    // Still serving, data intact, and writable.
    expect(site.isAlive(), 'site still running').to.equal(true);
    const read = await exec('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 0 1M', site.uri('lun0')], { timeoutMs: 20_000 });
    expect(read.stdout).to.match(/read 1048576\/1048576 bytes/);
    await exec('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 1M 64k', '-c', 'read -P 0x33 1M 64k', site.uri('lun0')], { timeoutMs: 20_000 });
    expect((await get(site, '/status')).status).to.equal(200);
    expect(site.isAlive(), 'site still running').to.equal(true);
    // And it still shuts down cleanly.
    const exit = await site.stop();
    expect(exit).to.deep.equal({ code: 0, signal: null });
  });
});
