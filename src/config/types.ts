// Strict JSON types for a configuration file, checked before convict sees it: convict coerces
// ("readOnly": "no" became true, "port": "10809" a number), which hides mistakes. Environment
// overrides are strings by nature and stay convict's to coerce. Unknown keys get the nearest
// known key as a suggestion.

type Node = Record<string, unknown>;

/** What a schema leaf's JSON value must be, from its convict format. */
function expectedType(format: unknown): 'boolean' | 'integer' | 'string' | 'array' {
  if (format === Boolean) return 'boolean';
  if (format === 'port' || format === 'nat' || format === 'int' || format === Number) return 'integer';
  if (format === 'lun-array' || format === 'cidr-array') return 'array';
  // String, 'host', 'optional-path', enumerations, and the custom validators (names, paths).
  return 'string';
}

const DESCRIBE: Record<string, string> = {
  boolean: 'a boolean (true or false, without quotes)',
  integer: 'a number (an integer, without quotes)',
  string: 'a string',
  array: 'an array',
};

function isLeaf(v: unknown): v is { format: unknown } {
  return Boolean(v) && typeof v === 'object' && 'doc' in (v as Node) && 'default' in (v as Node);
}

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'number' && !Number.isInteger(v)) return `the number ${v}`;
  return `${typeof v === 'number' ? 'the number' : typeof v === 'boolean' ? 'the boolean' : typeof v} ${String(v)}`;
}

function matches(type: string, v: unknown): boolean {
  switch (type) {
    case 'boolean': return typeof v === 'boolean';
    case 'integer': return typeof v === 'number' && Number.isInteger(v);
    case 'array': return Array.isArray(v);
    default: return typeof v === 'string';
  }
}

/**
 * Every problem of `raw` against `schema` (unknown keys, wrong JSON types), each as
 * "key: problem"; `lunSchema` checks each element of `luns`.
 */
export function typeProblems(raw: Node, schema: Node, lunSchema: Node, prefix = ''): string[] {
  const out: string[] = [];
  for (const [name, value] of Object.entries(raw)) {
    const key = prefix ? `${prefix}.${name}` : name;
    const node = schema[name];
    if (node === undefined) {
      const near = nearest(name, Object.keys(schema));
      out.push(`${key}: unknown key${near ? ` (did you mean "${prefix ? `${prefix}.` : ''}${near}"?)` : ''}`);
      continue;
    }
    if (isLeaf(node)) {
      const type = expectedType(node.format);
      if (!matches(type, value)) {
        out.push(`${key}: must be ${DESCRIBE[type]}, got ${typeOf(value)}`);
      } else if (node.format === 'lun-array') {
        (value as unknown[]).forEach((lun, i) => {
          if (lun !== null && typeof lun === 'object' && !Array.isArray(lun)) {
            out.push(...typeProblems(lun as Node, lunSchema, lunSchema, `${key}[${i}]`));
          }
          // Not an object: the lun-array format says so.
        });
      }
      continue;
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      out.push(`${key}: must be an object, got ${typeOf(value)}`);
      continue;
    }
    out.push(...typeProblems(value as Node, node as Node, lunSchema, key));
  }
  return out;
}

/** The known key closest to `name` (case-insensitive Levenshtein), if it is close enough to be a typo. */
export function nearest(name: string, known: string[]): string | null {
  let best: string | null = null;
  let bestD = Infinity;
  for (const k of known) {
    const d = levenshtein(name.toLowerCase(), k.toLowerCase());
    if (d < bestD) { best = k; bestD = d; }
  }
  return best !== null && bestD <= Math.max(2, Math.floor(name.length / 3)) ? best : null;
}

export function levenshtein(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length];
}
