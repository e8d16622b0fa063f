// examples/site-a.json and site-b.json: each validates with the real loader (LUN paths swapped
// for temp files, since /dev/mapper/... and /srv/... do not exist here), and together they form
// a consistent pair.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { parseConfig } from '../../src/config/load.js';
import type { SiteConfig } from '../../src/config/schema.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

describe('examples/: the site-a / site-b pair', function () {
  let dir: string;
  const parsed: Record<string, SiteConfig> = {};
  const raw: Record<string, { luns: { name: string; path: string }[] }> = {};

  before(function () {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdm-examples-'));
  });
  after(function () {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  for (const name of ['site-a', 'site-b']) {
    it(`${name}.json validates once its LUN paths exist`, function () {
      const file = path.join(ROOT, 'examples', `${name}.json`);
      const text = fs.readFileSync(file, 'utf8');
      const doc = JSON.parse(text) as { luns: { name: string; path: string }[]; mirror: { credentials: { pskFile: string } } };
      raw[name] = JSON.parse(text);
      // The shared mirror key lives in /etc/nbd-mirror on a real site; here a test key stands in.
      expect(doc.mirror.credentials.pskFile).to.equal('/etc/nbd-mirror/mirror.psk');
      doc.mirror.credentials.pskFile = path.join(dir, 'mirror.psk');
      fs.writeFileSync(doc.mirror.credentials.pskFile, `nbd-mirror:${'ab'.repeat(32)}\n`, { mode: 0o600 });
      for (const lun of doc.luns) {
        expect(lun.path, `${name} ${lun.name}: a block device or an image under /srv/nbd-mirror`).to.match(/^(\/dev\/|\/srv\/nbd-mirror\/.+\.img$)/);
        const img = path.join(dir, `${name}-${lun.name}.img`);
        fs.writeFileSync(img, Buffer.alloc(64 * 1024));
        lun.path = img;
      }
      // No NBD_MIRROR_* overrides from the test environment.
      parsed[name] = parseConfig(JSON.stringify(doc), file, {});
    });
  }

  it('the two files describe each other', function () {
    const a = parsed['site-a'];
    const b = parsed['site-b'];
    expect(a && b, 'both parsed').to.be.ok;
    for (const [self, peer] of [[a, b], [b, a]]) {
      expect(self.mirror, `${self.site}: has a mirror section`).to.not.equal(null);
      expect(self.mirror!.peer.site).to.equal(peer.site);
      expect(self.mirror!.peer.host).to.equal(peer.mirror!.listen.host);
      expect(self.mirror!.peer.port).to.equal(peer.mirror!.listen.port);
      expect(self.dataDir).to.equal('/var/lib/nbd-mirror');
      expect(self.admin.host).to.equal('127.0.0.1');
      // Documentation addresses only (RFC 5737 TEST-NET-1).
      expect(self.listen.host).to.match(/^192\.0\.2\.\d+$/);
      // Every mirrored primary has a secondary of the same name on the peer, and vice versa.
      for (const lun of self.luns) {
        const other = peer.luns.find((l) => l.name === lun.name);
        if (lun.role === 'primary' && lun.mirror !== 'none') expect(other?.role, `${peer.site} ${lun.name}`).to.equal('secondary');
        if (lun.role === 'secondary') {
          expect(other?.role, `${peer.site} ${lun.name}`).to.equal('primary');
          expect(other?.mirror, `${peer.site} ${lun.name}`).to.not.equal('none');
        }
      }
    }
    expect(a.site).to.not.equal(b.site);
    expect([a.listen.port, a.mirror!.listen.port, a.admin.port]).to.deep.equal([10809, 10810, 10811]);
    expect([b.listen.port, b.mirror!.listen.port, b.admin.port]).to.deep.equal([10809, 10810, 10811]);
    expect(a.luns.find((l) => l.name === 'lun0')).to.include({ role: 'primary', mirror: 'sync' });
    expect(a.luns.find((l) => l.name === 'lun1')).to.include({ role: 'secondary' });
    expect(b.luns.find((l) => l.name === 'lun0')).to.include({ role: 'secondary' });
    expect(b.luns.find((l) => l.name === 'lun1')?.role).to.equal('primary');
  });
});
