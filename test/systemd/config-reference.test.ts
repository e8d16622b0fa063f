// The README's configuration reference is generated from the schema by
// scripts/config-reference.js; regenerating it must give exactly what the README holds.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import { schema } from '../../src/config/schema.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const START = '<!-- config-reference:start -->';
const END = '<!-- config-reference:end -->';

function generate(): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [path.join(ROOT, 'scripts', 'config-reference.js')], { encoding: 'utf8', timeout: 30_000 },
      (err, stdout, stderr) => (err ? reject(new Error(`config-reference.js failed: ${err.message}\n${stderr}`)) : resolve(stdout)));
  });
}

function leafKeys(node: object, prefix = ''): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(node)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === 'object' && !Array.isArray(v)) {
      if ('doc' in v) out.push(key);
      else out.push(...leafKeys(v, key));
    }
  }
  return out;
}

describe('README: configuration reference', function () {
  it('matches what scripts/config-reference.js generates from the schema', async function () {
    expect(fs.existsSync(path.join(ROOT, 'dist', 'config', 'schema.js')), 'dist/ (run npm run build)').to.equal(true);
    const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    const a = readme.indexOf(START);
    const b = readme.indexOf(END);
    expect(a, `README has ${START}`).to.be.greaterThan(-1);
    expect(b, `README has ${END} after the start marker`).to.be.greaterThan(a);
    const inReadme = readme.slice(a + START.length, b).trim();
    const generated = (await generate()).trim();
    expect(inReadme, 'README out of date: run `npm run build && node scripts/config-reference.js --write`').to.equal(generated);
  });

  it('lists every key of the schema', async function () {
    const generated = await generate();
    for (const key of leafKeys(schema)) expect(generated, key).to.include(`| \`${key}\` |`);
    for (const key of ['name', 'path', 'role', 'mirror', 'readOnly', 'description']) {
      expect(generated, `luns[].${key}`).to.include(`| \`luns[].${key}\` |`);
    }
  });
});
