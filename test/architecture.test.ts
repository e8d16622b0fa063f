// The rooms of src/ and the one direction imports may run (docs/architecture.md): a module
// imports only its own room or rooms below it, mirror/primary and mirror/secondary do not
// import each other, and no module is on an import cycle.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';

const SRC = path.resolve(import.meta.dirname, '..', 'src');

/** Higher imports lower, never the other way. Edges (config, admin, site, cli) sit on top. */
const RANK: Record<string, number> = {
  '.': 0, types: 0, net: 0, storage: 0, security: 0, health: 0,
  persist: 1,
  mirror: 2, 'mirror/primary': 2, 'mirror/secondary': 2,
  lun: 3,
  nbd: 4,
  config: 5, admin: 5, site: 5, cli: 5,
};
/** Root files that are edges rather than leaves (log.ts, errors.ts, threadpool.ts are leaves). */
const ROOT_EDGES = new Set(['cli.ts']);

function sources(dir: string, out: string[] = []): string[] {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) sources(p, out);
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

function roomOf(file: string): string {
  const rel = path.relative(SRC, file);
  const dir = path.dirname(rel);
  if (dir === '.') return ROOT_EDGES.has(rel) ? 'cli' : '.';
  return dir;
}

function importsOf(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(/(?:from|import)\s*\(?\s*'(\.[^']*)'/g)) {
    out.push(path.resolve(path.dirname(file), m[1]).replace(/\.js$/, '.ts'));
  }
  return out;
}

describe('architecture: the direction of imports in src/', function () {
  const files = sources(SRC);
  const graph = new Map(files.map((f) => [f, importsOf(f).filter((t) => fs.existsSync(t))]));

  it('every folder of src/ has a place in the layering', function () {
    const rooms = new Set(files.map(roomOf));
    expect([...rooms].filter((r) => !(r in RANK)), 'folders without a rank').to.deep.equal([]);
  });

  it('no module imports a room above its own; primary and secondary stay apart', function () {
    const wrong: string[] = [];
    for (const [file, targets] of graph) {
      const from = roomOf(file);
      for (const t of targets) {
        const to = roomOf(t);
        const apart = (from === 'mirror/primary' && to === 'mirror/secondary') || (from === 'mirror/secondary' && to === 'mirror/primary');
        if (RANK[to] > RANK[from] || apart) wrong.push(`${path.relative(SRC, file)} -> ${path.relative(SRC, t)}`);
      }
    }
    expect(wrong, 'upward imports').to.deep.equal([]);
  });

  it('no import cycle', function () {
    const state = new Map<string, 1 | 2>();
    const cycles: string[] = [];
    const visit = (f: string, stack: string[]): void => {
      state.set(f, 1);
      for (const t of graph.get(f) ?? []) {
        if (state.get(t) === 1) cycles.push([...stack.slice(stack.indexOf(t)), t].map((x) => path.relative(SRC, x)).join(' > '));
        else if (!state.has(t)) visit(t, [...stack, t]);
      }
      state.set(f, 2);
    };
    for (const f of files) if (!state.has(f)) visit(f, [f]);
    expect(cycles, 'cycles').to.deep.equal([]);
  });
});
