// SecondaryLun through its own interface, over temp files (backing, metadata, undo log, applied
// point): the undo log saves what a resync overwrites and promote rolls it back, SET_GEN adopts
// the primary's generation, the state names status shows, and the applied point across a restart.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import winston from 'winston';
import { SecondaryLun } from '../../../src/mirror/secondary/secondary-lun.js';
import { encodeGeneration, MIRROR_FLAG, MIRROR_OP, type MirrorRequestHeader } from '../../../src/mirror/wire.js';
import { AppliedPoint } from '../../../src/persist/applied-point.js';
import { LunMeta, NO_GENERATION } from '../../../src/persist/lun-meta.js';
import { UndoLog } from '../../../src/persist/undo-log.js';
import { Backing } from '../../../src/storage/backing.js';
import { tmpDir, type TmpDir } from '../../helpers/tmp.js';

const SIZE = 1024 * 1024;
const REGION = 64 * 1024;
const gen = () => crypto.randomBytes(8).toString('hex');

function header(type: number, offset: number, length: number, flags = 0, seq = 1): MirrorRequestHeader {
  return { type, flags, lunId: 0, reqId: 1, seq, dep: seq - 1, offset, length };
}

describe('SecondaryLun', function () {
  let dir: TmpDir;
  let file: string;
  let backing: Backing;
  let meta: LunMeta;
  let sec: SecondaryLun;
  const log = winston.createLogger({ silent: true });

  async function open(point: AppliedPoint | null = null): Promise<SecondaryLun> {
    const undo = await UndoLog.open(dir.join('s.undo'), 's', SIZE);
    return new SecondaryLun('s', backing, meta, undo, point, log);
  }

  beforeEach(async function () {
    dir = await tmpDir('nbd-secondary-lun-');
    file = dir.join('s.img');
    fs.writeFileSync(file, Buffer.alloc(SIZE, 0x41));
    backing = await Backing.open(file, false);
    meta = await LunMeta.open(dir.join('s.meta'), 's', SIZE, 'secondary');
  });

  afterEach(async function () {
    await sec?.close();
    await backing.close().catch(() => undefined);
    await dir.cleanup();
  });

  it('a never-synced copy is inconsistent and says why; fed, it is syncing', async function () {
    sec = await open();
    expect(meta.current).to.equal(NO_GENERATION);
    const idle = sec.status();
    expect(idle.state).to.equal('secondary-inconsistent');
    expect(idle.reason).to.match(/^never synced/);
    sec.paired('a', crypto.randomBytes(8), 1, { sync: 'full', reason: 'initial sync' });
    expect(sec.status()).to.include({ state: 'secondary-syncing', peer: 'a', appliedSeq: 0 });
  });

  it('saves a region in the undo log before a resync overwrites it; promote rolls the old bytes back', async function () {
    await meta.adopt(gen(), []);   // a synced copy: its state is worth keeping
    sec = await open();
    expect(sec.status()).to.deep.include({ state: 'secondary-waiting', undoRegions: 0 });
    expect(sec.status().reason).to.equal(undefined);

    await sec.write(header(MIRROR_OP.WRITE, REGION, 4096, MIRROR_FLAG.RESYNC), Buffer.alloc(4096, 0xee));
    expect(meta.data.consistent, 'a resync write makes the copy inconsistent first').to.equal(false);
    expect(sec.undoRegions).to.equal(1);
    expect(fs.readFileSync(file).subarray(REGION, REGION + 4096).every((b) => b === 0xee), 'the write landed').to.equal(true);
    const st = sec.status();
    expect(st.state).to.equal('secondary-inconsistent');
    expect(st.reason).to.match(/interrupted resync/);

    // A second write in the same region: already saved, nothing more to keep.
    await sec.write(header(MIRROR_OP.WRITE_ZEROES, REGION + 8192, 4096, 0, 2), null);
    expect(sec.undoRegions).to.equal(1);

    const took = await sec.leave();
    expect(took).to.deep.equal({ neverSynced: false, rolledBack: 1 });
    expect(fs.readFileSync(file).every((b) => b === 0x41), 'every byte as before the resync').to.equal(true);
    expect(meta.data.consistent).to.equal(true);
    expect(sec.undoRegions, 'the undo log is discarded once rolled back').to.equal(0);
  });

  it('a live write to a consistent copy saves nothing', async function () {
    await meta.adopt(gen(), []);
    sec = await open();
    await sec.write(header(MIRROR_OP.WRITE, 0, 4096), Buffer.alloc(4096, 0x01));
    expect({ undo: sec.undoRegions, consistent: meta.data.consistent }).to.deep.equal({ undo: 0, consistent: true });
  });

  it('adopt (SET_GEN) takes the primary\'s generation, makes the copy consistent and drops the undo log', async function () {
    const old = gen();
    await meta.adopt(old, []);
    sec = await open();
    sec.paired('a', crypto.randomBytes(8), 1, { sync: 'incremental', reason: 'journal' });
    await sec.write(header(MIRROR_OP.WRITE, 0, 4096, MIRROR_FLAG.RESYNC), Buffer.alloc(4096, 0x02));
    expect(sec.status().state).to.equal('secondary-syncing');

    expect(await sec.adopt(null), 'no payload').to.equal(22);
    expect(await sec.adopt(Buffer.alloc(3)), 'a payload that is no generation').to.equal(22);
    expect(meta.current, 'refused SET_GENs change nothing').to.equal(old);

    const next = gen();
    expect(await sec.adopt(encodeGeneration(next, [old]))).to.equal(0);
    expect(meta.data).to.deep.include({ current: next, history: [old], consistent: true });
    expect(sec.undoRegions).to.equal(0);
    expect(sec.status()).to.include({ state: 'secondary-uptodate', peer: 'a' });
  });

  it('the feeder goes with the last connection; a split brain shows as such', async function () {
    await meta.adopt(gen(), []);
    sec = await open();
    sec.paired('a', crypto.randomBytes(8), 1, { sync: 'incremental', reason: 'r' });
    sec.connectionOpened();
    sec.connectionOpened();
    sec.connectionClosed();
    expect(sec.status().state).to.equal('secondary-uptodate');
    sec.connectionClosed();
    expect(sec.status()).to.include({ state: 'secondary-waiting', peer: null });
    await meta.update({ splitBrain: { detectedMs: 1, peerCurrent: gen() } });
    expect(sec.status().state).to.equal('split-brain');
  });

  it('promote of a never-synced copy rolls nothing back and marks it', async function () {
    sec = await open();
    await sec.write(header(MIRROR_OP.WRITE, 0, 4096, MIRROR_FLAG.RESYNC), Buffer.alloc(4096, 0x03));
    expect(sec.undoRegions, 'no undo log for a copy with no consistent state').to.equal(0);
    expect(await sec.leave()).to.deep.equal({ neverSynced: true, rolledBack: null });
    expect(meta.data.consistent).to.equal(true);
    expect(meta.data.promotedNeverSynced).to.be.a('number');
  });

  it('a restart resumes from the applied point: the run it followed and how far (made durable by a flush)', async function () {
    await meta.adopt(gen(), []);
    const instance = crypto.randomBytes(8);
    sec = await open(await AppliedPoint.open(dir.join('s.applied')));
    expect(sec.paired('a', instance, 11, { sync: 'incremental', reason: 'r' }), 'a new run resumes where it says').to.equal(10);
    await sec.flush();
    expect(sec.applied.flushes).to.equal(1);
    await sec.close();

    sec = await open(await AppliedPoint.open(dir.join('s.applied')));
    expect(sec.order.instance?.equals(instance)).to.equal(true);
    expect(sec.order.appliedPrefix).to.equal(10);
    expect(sec.lostAbove).to.equal(null);
    // The same run again, from further back: what is applied is not applied again.
    expect(sec.paired('a', instance, 5, { sync: 'incremental', reason: 'r' })).to.equal(10);
    expect(sec.order.isApplied(7)).to.equal(true);
  });
});
