// LUN metadata (src/persist/lun-meta.ts): created on first open (0600, a new generation for a
// primary, none for a secondary), rotate/adopt/update persisted across reopen, written
// atomically, and bound to its LUN's name.
import fs from 'node:fs/promises';
import { expect } from 'chai';
import { LunMeta, newGeneration, NO_GENERATION, type LunMetaData } from '../../src/persist/lun-meta.js';
import { tmpDir, type TmpDir } from '../helpers/tmp.js';

const SIZE = 64 * 1024 * 1024;
const HEX16 = /^[0-9a-f]{16}$/;
const HISTORY_MAX = 16;

describe('LUN metadata (lun-meta)', function () {
  let dir: TmpDir;

  beforeEach(async function () {
    dir = await tmpDir('nbd-lun-meta-');
  });

  afterEach(async function () {
    await dir.cleanup();
  });

  const read = async (file: string) => JSON.parse(await fs.readFile(file, 'utf8')) as LunMetaData;

  it('a new primary gets a file of mode 0600 with a random generation', async function () {
    const file = dir.join('p.meta');
    const meta = await LunMeta.open(file, 'p', SIZE, 'primary');
    expect((await fs.stat(file)).mode & 0o777).to.equal(0o600);
    expect(meta.current).to.match(HEX16);
    expect(meta.current).to.not.equal(NO_GENERATION);
    expect(meta.data).to.include({
      version: 1, lun: 'p', size: SIZE, role: null, consistent: true, localChanges: false, splitBrain: null,
      discardPeer: false, peerBase: '', syncCompare: false,
    });
    expect(meta.data.history).to.deep.equal([]);
    const disk = await read(file);
    expect(disk).to.deep.equal(meta.data);
    // Random: another primary starts another history.
    const other = await LunMeta.open(dir.join('q.meta'), 'q', SIZE, 'primary');
    expect(other.current).to.not.equal(meta.current);
  });

  it('a new secondary gets a file of mode 0600 with NO_GENERATION', async function () {
    const file = dir.join('s.meta');
    const meta = await LunMeta.open(file, 's', SIZE, 'secondary');
    expect((await fs.stat(file)).mode & 0o777).to.equal(0o600);
    expect(meta.current).to.equal(NO_GENERATION);
    expect(meta.data.history).to.deep.equal([]);
    expect((await read(file)).current).to.equal(NO_GENERATION);
  });

  it('reopening keeps what is there, whatever the configured role says now', async function () {
    const file = dir.join('x.meta');
    const first = await LunMeta.open(file, 'x', SIZE, 'primary');
    const again = await LunMeta.open(file, 'x', SIZE, 'secondary');
    expect(again.data).to.deep.equal(first.data);
  });

  it('rotate() pushes the old id onto the history (newest first, at most 16) and persists', async function () {
    const file = dir.join('r.meta');
    const meta = await LunMeta.open(file, 'r', SIZE, 'primary');
    const seen = [meta.current];
    await meta.rotate();
    expect(meta.current).to.match(HEX16);
    expect(meta.current).to.not.equal(seen[0]);
    expect(meta.data.history).to.deep.equal([seen[0]]);
    seen.unshift(meta.current);
    for (let i = 0; i < HISTORY_MAX + 4; i++) {
      await meta.rotate();
      expect(meta.data.history[0], 'the previous current is first').to.equal(seen[0]);
      seen.unshift(meta.current);
    }
    expect(meta.data.history).to.have.length(HISTORY_MAX);
    expect(meta.data.history).to.deep.equal(seen.slice(1, 1 + HISTORY_MAX));
    const reopened = await LunMeta.open(file, 'r', SIZE, 'primary');
    expect(reopened.current).to.equal(meta.current);
    expect(reopened.data.history).to.deep.equal(meta.data.history);
  });

  it('rotate() never pushes NO_GENERATION (a secondary promoted without a copy)', async function () {
    const file = dir.join('n.meta');
    const meta = await LunMeta.open(file, 'n', SIZE, 'secondary');
    await meta.rotate();
    expect(meta.current).to.match(HEX16);
    expect(meta.current).to.not.equal(NO_GENERATION);
    expect(meta.data.history).to.deep.equal([]);
    // NO_GENERATION already in a history is dropped on the next rotation too.
    const g = meta.current;
    await meta.update({ history: [NO_GENERATION, 'abcdefabcdefabcd'] });
    await meta.rotate();
    expect(meta.data.history).to.deep.equal([g, 'abcdefabcdefabcd']);
    expect((await LunMeta.open(file, 'n', SIZE, 'secondary')).data.history).to.deep.equal([g, 'abcdefabcdefabcd']);
  });

  it('adopt() takes current and history (at most 16), is consistent with no local changes, and persists', async function () {
    const file = dir.join('a.meta');
    const meta = await LunMeta.open(file, 'a', SIZE, 'secondary');
    await meta.update({ consistent: false, localChanges: true });
    const current = newGeneration();
    const history = Array.from({ length: HISTORY_MAX + 3 }, () => newGeneration());
    await meta.adopt(current, history);
    expect(meta.data).to.include({ current, consistent: true, localChanges: false });
    expect(meta.data.history).to.deep.equal(history.slice(0, HISTORY_MAX));
    const reopened = await LunMeta.open(file, 'a', SIZE, 'secondary');
    expect(reopened.data).to.include({ current, consistent: true, localChanges: false });
    expect(reopened.data.history).to.deep.equal(history.slice(0, HISTORY_MAX));
    // adopt() does not touch what it is not about.
    await meta.update({ splitBrain: { detectedMs: 5, peerCurrent: current }, role: 'secondary' });
    await meta.adopt(newGeneration(), []);
    expect(meta.data.splitBrain).to.deep.equal({ detectedMs: 5, peerCurrent: current });
    expect(meta.data.role).to.equal('secondary');
  });

  it('update() persists what it changes and stamps the time', async function () {
    const file = dir.join('u.meta');
    const meta = await LunMeta.open(file, 'u', SIZE, 'primary');
    const t0 = Date.now();
    await meta.update({ role: 'secondary', peerBase: meta.current, syncCompare: true, discardPeer: true });
    const disk = await read(file);
    expect(disk).to.include({ role: 'secondary', peerBase: meta.current, syncCompare: true, discardPeer: true });
    expect(disk.updatedMs).to.be.at.least(t0);
  });

  it('opening the metadata of another LUN throws (and leaves the file alone)', async function () {
    const file = dir.join('shared.meta');
    await LunMeta.open(file, 'lun-a', SIZE, 'primary');
    const before = await fs.readFile(file, 'utf8');
    let err: Error | null = null;
    try {
      await LunMeta.open(file, 'lun-b', SIZE, 'primary');
    } catch (e) {
      err = e as Error;
    }
    expect(err, 'opening as lun-b').to.be.instanceOf(Error);
    expect(err!.message).to.include(file).and.to.include('lun-a');
    expect(await fs.readFile(file, 'utf8')).to.equal(before);
  });

  it('a file of another version, or unreadable JSON, throws', async function () {
    const v2 = dir.join('v2.meta');
    await fs.writeFile(v2, JSON.stringify({ version: 2, lun: 'v2', current: NO_GENERATION }));
    let err: unknown = null;
    await LunMeta.open(v2, 'v2', SIZE, 'secondary').catch((e: unknown) => { err = e; });
    expect(err, 'version 2').to.be.instanceOf(Error);
    const junk = dir.join('junk.meta');
    await fs.writeFile(junk, '{ not json');
    err = null;
    await LunMeta.open(junk, 'junk', SIZE, 'secondary').catch((e: unknown) => { err = e; });
    expect(err, 'bad JSON').to.be.instanceOf(Error);
    expect((err as Error).message).to.match(/unreadable LUN metadata/);
  });

  it('saves atomically: no .tmp file is left behind, and the file is complete JSON after every save', async function () {
    const file = dir.join('t.meta');
    const meta = await LunMeta.open(file, 't', SIZE, 'primary');
    const expectClean = async (what: string) => {
      expect((await fs.readdir(dir.path)).sort(), what).to.deep.equal(['t.meta']);
      expect(await read(file), what).to.deep.equal(meta.data);
      expect((await fs.stat(file)).mode & 0o777, what).to.equal(0o600);
    };
    await expectClean('after open');
    await meta.rotate();
    await expectClean('after rotate');
    await meta.adopt(newGeneration(), [meta.current]);
    await expectClean('after adopt');
    await meta.update({ localChanges: true });
    await expectClean('after update');
  });

  // Concurrent saves once shared one `${file}.tmp`: the second open truncated the first's file and
  // a rename failed with ENOENT. The receiver gets there: each connection of a forcing session
  // updates the metadata in pair() at the same time. save() now runs one write at a time.
  it('concurrent saves all complete, and the last one wins (they once raced on one .tmp file)', async function () {
    const file = dir.join('t.meta');
    const meta = await LunMeta.open(file, 't', SIZE, 'primary');
    await Promise.all([meta.update({ consistent: false }), meta.save(), meta.update({ consistent: true, peerBase: meta.current })]);
    expect(await fs.readdir(dir.path)).to.deep.equal(['t.meta']);
    expect(await read(file)).to.deep.equal(meta.data);
    expect(meta.data.consistent).to.equal(true);
  });

  it('a stale .tmp from a crash before the rename is ignored and replaced', async function () {
    const file = dir.join('c.meta');
    const meta = await LunMeta.open(file, 'c', SIZE, 'primary');
    await fs.writeFile(`${file}.tmp`, '{ torn');
    const reopened = await LunMeta.open(file, 'c', SIZE, 'primary');
    expect(reopened.data).to.deep.equal(meta.data);
    await reopened.rotate();
    expect(await fs.readdir(dir.path)).to.deep.equal(['c.meta']);
    expect((await read(file)).current).to.equal(reopened.current);
  });
});
