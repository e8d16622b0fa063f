// The schema as a flat list of keys (for `config schema` and the README's reference table).
import { schema } from './schema.js';

export interface KeyDoc { key: string; doc: string; default: unknown; env: string | null; format: string }

export function describeSchema(): KeyDoc[] {
  const out: KeyDoc[] = [];
  const walk = (node: Record<string, unknown>, prefix: string): void => {
    for (const [name, value] of Object.entries(node)) {
      const key = prefix ? `${prefix}.${name}` : name;
      const v = value as Record<string, unknown>;
      if (v && typeof v === 'object' && 'doc' in v && 'default' in v) {
        out.push({ key, doc: String(v.doc), default: v.default, env: (v.env as string | undefined) ?? null, format: formatName(v.format) });
      } else if (v && typeof v === 'object') {
        walk(v, key);
      }
    }
  };
  walk(schema as unknown as Record<string, unknown>, '');
  return out;
}

function formatName(f: unknown): string {
  if (Array.isArray(f)) return f.map((x) => JSON.stringify(x)).join(' | ');
  if (typeof f === 'string') return f;
  if (f === Boolean) return 'boolean';
  if (f === String) return 'string';
  return 'custom';
}

export function formatSchema(keys: KeyDoc[]): string {
  return keys.map((k) => `${k.key}  (${k.format}; default ${JSON.stringify(k.default)}${k.env ? `; env ${k.env}` : ''})\n    ${k.doc}`).join('\n');
}
