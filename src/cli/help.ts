// The CLI's help texts: `nbd-mirror --help` and each command's `--help`.

const ACTION_EXITS = `Exit codes: 0 done, 1 refused by the site (409: not possible in the current state) or failed,
2 usage error, not authorised (401/403), or the site answered 400/404 (bad or unknown LUN), 3 site not reachable.`;

const ACTION_TARGET = `The site is asked on its admin socket (admin.socket of FILE, by default admin.sock in dataDir,
mode 0600: run as the site's user, root under systemd). --admin SOCKET names the socket without a
configuration file; --admin HOST:PORT --token-file FILE uses TCP with the token of admin.tokenFile.`;

export const HELP: Record<string, string> = {
  main: `nbd-mirror — NBD block storage mirrored between two sites

Usage:
  nbd-mirror serve --config FILE                     run a site (NBD listener, mirror, admin endpoint)
  nbd-mirror status --config FILE [--json] [--watch] show LUN roles, modes, states and counters
                                                     (--admin HOST:PORT instead: no config file needed)
  nbd-mirror config check FILE                       validate a configuration without serving
  nbd-mirror config schema [--json]                  every configuration key: doc, default, env variable
  nbd-mirror journal inspect LUN --config FILE [--json]  a LUN's journal: records, bytes, oldest age

Failover (ask the running site, through its admin socket; ADDR: the socket path, or HOST:PORT with --token-file):
  nbd-mirror promote LUN --config FILE [--force]     make this site's copy the primary
  nbd-mirror demote LUN --config FILE                make this site's copy a secondary
  nbd-mirror resolve LUN --config FILE (--discard-local | --discard-remote)   end a split brain
  nbd-mirror verify LUN --config FILE [--repair] [--json]   compare both copies (and resend what differs)

Exit codes: 0 ok, 1 failure, 2 usage or configuration error, 3 site not reachable.
Failover commands: 1 also when the site refuses (HTTP 409) or verify finds differences it did not
repair; 2 also when the site answers 400/404 (bad or unknown LUN).
Run 'nbd-mirror COMMAND --help' for a command's options.`,
  serve: `Usage: nbd-mirror serve --config FILE

Serves the site's LUNs over NBD until SIGTERM/SIGINT, then finishes in-flight requests and exits 0.
Logs go to stdout (JSON lines unless log.format is pretty or stdout is a terminal).`,
  status: `Usage: nbd-mirror status --config FILE [--json] [--watch [SECONDS]]
       nbd-mirror status --admin HOST:PORT|SOCKET [--json] [--watch [SECONDS]]

Asks the running site's admin endpoint (admin.host:admin.port of FILE, or ADDR) for its status.
--admin needs no configuration file (no LUN paths or key files).
--watch redraws the table every 2 seconds (or SECONDS) until interrupted.`,
  config: `Usage: nbd-mirror config check FILE
       nbd-mirror config schema [--json]

check: validates FILE against the schema and checks every LUN path; prints "FILE: ok" or
one line naming the key and the problem (exit 2).
schema: prints every key with its doc, default and environment variable.`,
  journal: `Usage: nbd-mirror journal inspect LUN --config FILE [--json]

Reads the LUN's journal under dataDir (read-only, safe while the site runs) and prints its
records, bytes and the age of the oldest record; --json adds every record's header.`,
  promote: `Usage: nbd-mirror promote LUN --config FILE [--force] [--force-never-synced] [--json]
       nbd-mirror promote LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--force] [--force-never-synced] [--json]

${ACTION_TARGET}

Asks the running site to make its copy of LUN the primary, writable
for hosts. Refused (exit 1) while the peer is reachable and primary for LUN; --force promotes anyway
(both sites are then primary: a split brain, ended with 'nbd-mirror resolve'). A copy that never
completed an initial sync is no state of the old primary: promoting it is refused (exit 1) unless
--force-never-synced says that is accepted; its status then keeps saying so.
${ACTION_EXITS}`,
  demote: `Usage: nbd-mirror demote LUN --config FILE [--json]
       nbd-mirror demote LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--json]

${ACTION_TARGET}

Asks the running site to make its copy of LUN a secondary: hosts' connections to it are closed and
it then takes the peer's data.
${ACTION_EXITS}`,
  resolve: `Usage: nbd-mirror resolve LUN --config FILE (--discard-local | --discard-remote) [--json]
       nbd-mirror resolve LUN --admin SOCKET|HOST:PORT [--token-file FILE] (--discard-local | --discard-remote) [--json]

${ACTION_TARGET}

Ends a split brain of LUN: --discard-local drops this site's changes (it takes the peer's data),
--discard-remote drops the peer's. Exactly one of the two.
${ACTION_EXITS}`,
  verify: `Usage: nbd-mirror verify LUN --config FILE [--repair] [--json]
       nbd-mirror verify LUN --admin SOCKET|HOST:PORT [--token-file FILE] [--repair] [--json]

${ACTION_TARGET}

Compares both sites' copies of LUN by range hashes while hosts keep writing (this can take minutes;
there is no time limit). --repair resends the differing ranges from the primary. --json prints the
report (bytes, regionSize, differing ranges, repaired, durationMs).
Exit codes: 0 identical (or every difference repaired), 1 differences left (without --repair) or
refused by the site (409), 2 usage error or the site answered 400/404, 3 site not reachable.`,
};
