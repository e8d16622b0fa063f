// A LUN backed by a block device (a loop device over a 64 MiB file).
import { expect } from 'chai';
import { loopAttach, loopDetach } from '../helpers/blockdev.js';
import { Cleanup, exec, execNoThrow, readAt, sparseFile, startSite, tmpDir, type Site } from '../helpers/site.js';

const MiB = 1024 * 1024;

describe('LUN on a loop device', function () {
  const cleanup = new Cleanup();
  const SIZE = 64 * MiB;
  let site: Site;
  let file: string;
  let dev: string;

  before(async function () {
    const dir = await tmpDir();
    cleanup.add('remove temp dir', () => dir.cleanup());
    file = await sparseFile(dir.join('backing.img'), SIZE);
    dev = await loopAttach(file);
    cleanup.add(`detach ${dev}`, () => loopDetach(dev));
    site = await startSite({ luns: [{ name: 'lun0', path: dev, role: 'primary', mirror: 'none' }] });
    cleanup.add('stop site', () => site.stop());
  });

  after(() => cleanup.run());

  it('nbdinfo reports the block device size (64 MiB), writable', async function () {
    const r = await exec('nbdinfo', ['--json', '--no-content', site.uri('lun0')], { timeoutMs: 30_000 });
    const e = (JSON.parse(r.stdout) as { exports: { 'export-size': number; is_read_only: boolean }[] }).exports[0]!;
    expect(e['export-size']).to.equal(SIZE);
    expect(e.is_read_only).to.equal(false);
  });

  it('qemu-io writes and reads back (aligned and unaligned), and after a flush the data is in the file', async function () {
    const w = await execNoThrow(
      'qemu-io',
      ['-f', 'raw', site.uri('lun0'), '-c', 'write -P 0x5a 65536 131072', '-c', 'write -P 0x3c 1000 12345', '-c', 'flush'],
      { timeoutMs: 30_000 },
    );
    expect(w.code, w.stdout + w.stderr).to.equal(0);

    const r = await execNoThrow(
      'qemu-io',
      ['-f', 'raw', site.uri('lun0'), '-c', 'read -P 0x5a 65536 131072', '-c', 'read -P 0x3c 1000 12345', '-c', 'read -P 0 0 1000', '-c', 'read -P 0 13345 52191'],
      { timeoutMs: 30_000 },
    );
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(r.stdout).to.not.include('Pattern verification failed');

    // NBD FLUSH must have pushed the data through the loop device into its backing file.
    const head = await readAt(file, 0, 65536 + 131072 + 4096);
    expect(head.subarray(0, 1000).every((b) => b === 0), '[0, 1000) zero').to.equal(true);
    expect(head.subarray(1000, 13345).every((b) => b === 0x3c), '[1000, 13345) = 0x3c').to.equal(true);
    expect(head.subarray(13345, 65536).every((b) => b === 0), '[13345, 64 KiB) zero').to.equal(true);
    expect(head.subarray(65536, 65536 + 131072).every((b) => b === 0x5a), '[64 KiB, 192 KiB) = 0x5a').to.equal(true);
    expect(head.subarray(65536 + 131072).every((b) => b === 0), 'after the write zero').to.equal(true);
  });

  it('the last 4 KiB of the device can be written and read back', async function () {
    const ok = await execNoThrow('qemu-io', ['-f', 'raw', site.uri('lun0'), '-c', `write -P 0x77 ${SIZE - 4096} 4096`, '-c', `read -P 0x77 ${SIZE - 4096} 4096`], {
      timeoutMs: 30_000,
    });
    expect(ok.code, ok.stdout + ok.stderr).to.equal(0);
    expect(ok.stdout).to.not.include('Pattern verification failed');
  });
});
