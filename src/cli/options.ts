// Command-line options of one command, and the error of a wrong command line.
import { parseArgs } from 'node:util';
import { NbdMirrorError } from '../errors.js';

/** The command line is wrong (exit 2); the message usually ends with the command's help. */
export class UsageError extends NbdMirrorError { override readonly code = 'usage'; }

export type OptionSpec = Record<string, { type: 'string' | 'boolean'; short?: string }>;
export interface Parsed { values: Record<string, string | boolean | undefined>; positionals: string[] }

/** Parse `args` by `spec` (plus --help); null when --help printed `help` (the command is done). */
export function options(args: string[], spec: OptionSpec, help: string): Parsed | null {
  try {
    const parsed = parseArgs({ args, options: { ...spec, help: { type: 'boolean', short: 'h' } }, allowPositionals: true });
    if (parsed.values.help) {
      console.log(help);
      return null;
    }
    return parsed as Parsed;
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${help}`);
  }
}
