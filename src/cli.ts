#!/usr/bin/env node
// The nbd-mirror command: dispatch to a command (src/cli/), and turn what it throws into a line
// on stderr and an exit code, by the error's code (src/errors.ts), in this one place.
import './threadpool.js';
import { cliMessage, EXIT, exitCodeOf } from './errors.js';
import { action } from './cli/actions.js';
import { config, journal } from './cli/config.js';
import { HELP } from './cli/help.js';
import { serve } from './cli/serve.js';
import { status } from './cli/status.js';

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    console.log(HELP.main);
    return command ? EXIT.ok : EXIT.usage;
  }
  switch (command) {
    case 'serve': return serve(rest);
    case 'status': return status(rest);
    case 'config': return config(rest);
    case 'journal': return journal(rest);
    case 'promote':
    case 'demote':
    case 'resolve':
    case 'verify':
      return action(command, rest);
    default:
      console.error(`nbd-mirror: unknown command "${command}"\n\n${HELP.main}`);
      return EXIT.usage;
  }
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (err: unknown) => {
    console.error(`nbd-mirror: ${cliMessage(err)}`);
    process.exitCode = exitCodeOf(err);
  },
);
