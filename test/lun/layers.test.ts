// The LUN's layer stack (stats → mirror → backing) and its role object, without a site: a fake
// mirror stands in for LunMirror (its write/zero/flush forward to the backing and are recorded).
import { expect } from 'chai';
import fs from 'node:fs';
import { Lun, type LunSpec } from '../../src/lun/lun.js';
import { PrimaryRole, SecondaryRole } from '../../src/lun/roles.js';
import type { LunMirror } from '../../src/mirror/primary/lun-mirror.js';
import { Backing } from '../../src/storage/backing.js';
import { tmpDir, type TmpDir } from '../helpers/tmp.js';

const SIZE = 1024 * 1024;

/** Records what reaches the mirror and applies it to the backing, as a LunMirror would locally. */
class FakeMirror {
  readonly calls: string[] = [];
  constructor(private readonly backing: Backing) {}
  async write(buf: Buffer, pos: number, fua: boolean): Promise<void> {
    this.calls.push(`write ${pos} ${buf.length} fua=${fua}`);
    await this.backing.write(buf, pos);
  }
  async zero(pos: number, len: number, mayPunch: boolean, fastOnly: boolean, fua: boolean): Promise<void> {
    this.calls.push(`zero ${pos} ${len} punch=${mayPunch} fast=${fastOnly} fua=${fua}`);
    await this.backing.zero(pos, len, mayPunch, fastOnly);
  }
  async flush(): Promise<void> {
    this.calls.push('flush');
    await this.backing.flush();
  }
  asMirror(): LunMirror { return this as unknown as LunMirror; }
}

describe('LUN layers and roles', function () {
  let dir: TmpDir;
  let file: string;
  let lun: Lun;
  let backing: Backing;

  async function open(role: LunSpec['role'], fill = 0x11): Promise<void> {
    fs.writeFileSync(file, Buffer.alloc(SIZE, fill));
    backing = await Backing.open(file, false);
    lun = new Lun({ name: 'l', path: file, role, mirror: role === 'primary' ? 'sync' : 'none', readOnly: false, description: '' }, backing);
  }

  beforeEach(async function () {
    dir = await tmpDir('nbd-lun-layers-');
    file = dir.join('l.img');
  });

  afterEach(async function () {
    await lun?.close().catch(() => undefined);
    await dir.cleanup();
  });

  it('a write through stats → mirror → backing counts once, goes through the mirror once and reaches the backing', async function () {
    await open('primary');
    const mirror = new FakeMirror(backing);
    lun.become(new PrimaryRole('sync', mirror.asMirror()));
    await lun.write(Buffer.alloc(4096, 0xab), 8192, true);
    expect(lun.counters).to.include({ writeOps: 1, writeBytes: 4096, errors: 0 });
    expect(mirror.calls).to.deep.equal(['write 8192 4096 fua=true']);
    const got = fs.readFileSync(file).subarray(8192, 8192 + 4096);
    expect(got.every((b) => b === 0xab), 'the backing holds the write').to.equal(true);
  });

  it('on a mirrored LUN, TRIM becomes a punch-hole zero through the mirror; zero and flush go through it too', async function () {
    await open('primary');
    const mirror = new FakeMirror(backing);
    lun.become(new PrimaryRole('async', mirror.asMirror()));
    await lun.trim(0, 65536, false);
    await lun.zero(65536, 4096, false, false, true);
    await lun.flush();
    expect(mirror.calls).to.deep.equal([
      'zero 0 65536 punch=true fast=false fua=false', 'zero 65536 4096 punch=false fast=false fua=true', 'flush',
    ]);
    expect(lun.counters).to.include({ trimOps: 1, zeroOps: 1, flushOps: 1, writeOps: 0 });
    expect(fs.readFileSync(file).subarray(0, 65536 + 4096).every((b) => b === 0), 'trimmed and zeroed ranges read as zeros').to.equal(true);
    expect(lun.mode).to.equal('async');
  });

  it('reads go below the mirror, and are counted once', async function () {
    await open('primary', 0x5c);
    const mirror = new FakeMirror(backing);
    lun.become(new PrimaryRole('sync', mirror.asMirror()));
    const buf = Buffer.alloc(512);
    await lun.read(buf, 1000);
    expect(buf.every((b) => b === 0x5c)).to.equal(true);
    expect(mirror.calls).to.deep.equal([]);
    expect(lun.counters).to.include({ readOps: 1, readBytes: 512 });
  });

  it('a sparse read served in pieces counts once (countRead), its pieces not at all', async function () {
    await open('primary', 0x33);
    const a = Buffer.alloc(100);
    const b = Buffer.alloc(200);
    await lun.readPiece(a, 0);
    await lun.readPiece(b, 100);
    lun.countRead(300);
    expect(lun.counters).to.include({ readOps: 1, readBytes: 300 });
    expect(a.every((x) => x === 0x33) && b.every((x) => x === 0x33)).to.equal(true);
    expect(lun.sparse, 'a regular file can report holes').to.equal(true);
  });

  it('a secondary-role LUN is exported read-only and serves reads from its backing', async function () {
    await open('secondary', 0x77);
    expect(lun.role).to.equal('secondary');
    expect(lun.readOnly).to.equal(true);
    expect(lun.mirror).to.equal(null);
    const buf = Buffer.alloc(4096);
    await lun.read(buf, SIZE - 4096);
    expect(buf.every((x) => x === 0x77)).to.equal(true);
    expect(lun.counters).to.include({ readOps: 1, readBytes: 4096 });
  });

  it('promote and demote swap the role whole: role, mode, read-only, mirror and the layer under the stats; counters stay', async function () {
    await open('secondary');
    const mirror = new FakeMirror(backing);
    const before = lun.become(new PrimaryRole('sync', mirror.asMirror()));
    expect(before).to.be.instanceOf(SecondaryRole);
    expect({ role: lun.role, mode: lun.mode, readOnly: lun.readOnly, mirrored: lun.mirror !== null })
      .to.deep.equal({ role: 'primary', mode: 'sync', readOnly: false, mirrored: true });
    await lun.write(Buffer.alloc(512, 1), 0, false);
    expect(mirror.calls).to.have.length(1);

    const was = lun.become(new SecondaryRole());
    expect(was).to.be.instanceOf(PrimaryRole);
    expect({ role: lun.role, mode: lun.mode, readOnly: lun.readOnly, mirror: lun.mirror, secondary: lun.secondary })
      .to.deep.equal({ role: 'secondary', mode: 'none', readOnly: true, mirror: null, secondary: null });
    // (Writes are refused by NBD on a read-only export; the stack itself no longer reaches the mirror.)
    await lun.write(Buffer.alloc(512, 2), 512, false);
    expect(mirror.calls, 'nothing reaches the detached mirror').to.have.length(1);
    expect(fs.readFileSync(file).subarray(512, 1024).every((x) => x === 2)).to.equal(true);
    expect(lun.counters.writeOps, 'counters kept across role changes').to.equal(2);
  });

  it('an explicitly read-only primary stays read-only whatever its role', async function () {
    fs.writeFileSync(file, Buffer.alloc(SIZE));
    backing = await Backing.open(file, true);
    lun = new Lun({ name: 'ro', path: file, role: 'primary', mirror: 'none', readOnly: true, description: '' }, backing);
    expect(lun.readOnly).to.equal(true);
    lun.become(new PrimaryRole('none'));
    expect(lun.readOnly).to.equal(true);
  });
});
