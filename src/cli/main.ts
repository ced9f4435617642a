/**
 * The `till` command: runs the broker headless and drives it over the control channel.
 * Exit 0 on success; otherwise a one-line error on stderr and exit 1 (2 for usage errors).
 */
import { spawn } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { constants } from 'node:os';
import { basename, join, resolve as resolvePath } from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { setFlagsFromString } from 'node:v8';
import { AGENTS, agentSetup, agentTargets, isAgentName, newAgentScratchDir } from '../core/agents/agents';
import { ControlClient, NotRunningError } from '../core/runtime/control';
import { CredentialList, CredentialStore, checkCredentialName } from '../core/credentials/credentials';
import { describeSource } from '../core/credentials/secretSource';
import type { KeySummary, TillEvent } from '../core/events';
import { defaultHome, isLedgerUrl, openHome, readConfig, type TillPaths } from '../core/runtime/home';
import { limitsOf, type Amounts } from '../core/policy/policy';
import { callsUsed, describePolicy, formatAmount, formatCount, formatUsd, spendUsed, timeLeft } from '../core/keys/present';
import { holdLease, type HeldLease } from '../core/runtime/leases';
import { providerEnvNames, ProviderRegistry } from '../core/providers/providers';
import { TillService } from '../core/runtime/service';
import { ControlApi, type IssuedKey, type IssueInput } from '../core/runtime/controlApi';
import { readSecret } from './secretInput';
import { capYoungGeneration } from './youngGeneration';
import { RemoteControlClient } from '../core/runtime/remoteControl';

class UsageError extends Error {}

const VERSION = '0.1.0';

const ISSUE_OPTIONS = {
  uses: { type: 'string' },
  'max-tokens': { type: 'string' },
  'max-spend': { type: 'string' },
  ttl: { type: 'string' },
  rpm: { type: 'string' },
  concurrency: { type: 'string' },
  models: { type: 'string' },
  methods: { type: 'string' },
  paths: { type: 'string' },
  label: { type: 'string' },
} as const satisfies ParseArgsConfig['options'];

const ISSUE_HELP = `  --uses N            billable calls allowed (default: unlimited)
  --max-tokens N      tokens (input + output) allowed
  --max-spend USD     US dollars allowed, e.g. 1.50 (at Till's price table)
  --ttl 30m           lifetime: 90s, 30m, 2h, 7d (default: none)
  --rpm N             requests per minute
  --concurrency N     requests in flight at once
  --models a,b        allowed models (* wildcards)
  --methods GET,POST  allowed HTTP methods
  --paths '/v1/chat/*'  allowed paths (* wildcards), in the provider's own API paths
  --label TEXT        a name to recognise the key by`;

const HELP: Record<string, string> = {
  main: `till ${VERSION}: scoped, limited, revocable keys for AI agents; your real keys stay in the OS keychain.

Usage: till <command> [options]

Commands:
  serve                 run the broker in the foreground
  credential add|ls|rm  manage real credentials (kept in the OS keychain)
  issue                 issue a till key
  ls                    list till keys
  revoke                revoke a key, or all
  extend                raise a key's limits
  watch                 print live events
  exec                  run a command with fresh till keys, revoked when it exits

Run \`till <command> --help\` for a command's options. TILL_HOME selects the data folder.

A team broker on another machine (issue, ls, revoke, extend, watch, exec):
  till --broker https://till.example.com:8455 [--ca FILE] [--admin-token-file FILE] <command> …
  (or TILL_BROKER and TILL_CA; the admin token from TILL_ADMIN_TOKEN or --admin-token-file)`,
  serve: `Usage: till serve [--port N] [--ledger postgres://…] [--listen ADDR --tls-cert F --tls-key F --allow-host NAME] [--verbose]

Runs the broker on 127.0.0.1 in the foreground and prints its URL, then key events, limits and
refused requests. Stop it with Ctrl-C. \`till watch\` shows every request live.
  --port N          port to listen on (default: config.json's port, else 8455)
  --ledger URL      keep keys and limits in a team ledger on PostgreSQL, shared by every broker
                    given the same URL (default: TILL_LEDGER, else config.json's "ledger", else
                    the data folder's own ledger)
  --listen ADDR     address to listen on (default: 127.0.0.1); any other needs TLS
  --tls-cert FILE   PEM certificate chain: serve HTTPS
  --tls-key FILE    its PEM private key
  --allow-host NAME a name clients reach the broker by (repeat for more); the first is the one
                    in the base URLs it hands out
  -v, --verbose     also print a line for every request served
With an admin token (TILL_ADMIN_TOKEN, or config.json's "adminToken"), admins elsewhere can run
\`till --broker https://NAME:PORT issue …\` (and ls, revoke, extend, watch, exec).`,
  credential: `Usage:
  till credential add <provider> [--name NAME]   the secret is read from stdin or a hidden prompt, never from arguments
  till credential ls [--json]
  till credential rm <name>`,
  issue: `Usage: till issue <provider|credential> [options] [--json]

Issues a till key bound to one credential and prints it once.
${ISSUE_HELP}
  --json              print {"id","key","provider","baseUrl","env","policy"}`,
  ls: `Usage: till ls [--json]

Lists till keys with their state, use and expiry.`,
  extend: `Usage: till extend <id> [--uses N] [--max-tokens N] [--max-spend USD]

Raises a live key's limits by the amounts given.`,
  revoke: `Usage: till revoke <id> | --all

Revokes keys at once, ending their requests and streams in flight.`,
  watch: `Usage: till watch [--json]

Prints the broker's events, one per line, until interrupted.`,
  exec: `Usage: till exec [<provider|credential>…] [options] -- <command…>
       till exec --agent <claude|codex|gemini|aider> [options] -- <command…>

Issues a fresh key for each named provider or credential (default: every stored credential),
runs the command with their env vars, and revokes the keys when it exits.
  --agent NAME        set an agent CLI up to go through Till unchanged: keys for the providers
                      it needs and its settings (claude: no traffic around the broker; codex: a
                      CODEX_HOME whose config.toml layers a "till" provider over ~/.codex's),
                      in a folder under the data folder removed when the command exits
${ISSUE_HELP}`,
};

function parse<T extends NonNullable<ParseArgsConfig['options']>>(args: string[], options: T) {
  try {
    return parseArgs({ args, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

function int(value: string | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) throw new UsageError(`--${name} needs a whole number, got "${value}"`);
  return Number(value);
}

function csv(value: string | undefined): string[] | undefined {
  return value === undefined ? undefined : value.split(',');
}

function usd(value: string | undefined, name: string): number | undefined {
  if (value === undefined) return undefined;
  const m = /^\$?(\d+(?:\.\d+)?)$/.exec(value.trim());
  if (!m) throw new UsageError(`--${name} needs an amount of US dollars such as 1.50, got "${value}"`);
  return Number(m[1]);
}

function issueInput(target: string, v: Partial<Record<keyof typeof ISSUE_OPTIONS, string | undefined>>): IssueInput {
  const input: IssueInput = { target, owner: 'cli' };
  const uses = int(v.uses, 'uses');
  if (uses !== undefined) input.uses = uses;
  const maxTokens = int(v['max-tokens'], 'max-tokens');
  if (maxTokens !== undefined) input.maxTokens = maxTokens;
  const maxSpend = usd(v['max-spend'], 'max-spend');
  if (maxSpend !== undefined) input.maxSpend = maxSpend;
  if (v.ttl !== undefined) input.ttl = v.ttl;
  const rpm = int(v.rpm, 'rpm');
  if (rpm !== undefined) input.rpm = rpm;
  const concurrency = int(v.concurrency, 'concurrency');
  if (concurrency !== undefined) input.concurrency = concurrency;
  if (v.models !== undefined) input.models = csv(v.models);
  if (v.methods !== undefined) input.methods = csv(v.methods);
  if (v.paths !== undefined) input.paths = csv(v.paths);
  if (v.label !== undefined) input.label = v.label;
  return input;
}

function out(line = ''): void {
  process.stdout.write(line + '\n');
}

let clock = { second: -1, text: '' };

/** `HH:MM:SS`, formatted once per second (a busy broker prints many lines a second). */
function time(at: number): string {
  const second = Math.floor(at / 1000);
  if (second !== clock.second) clock = { second, text: new Date(at).toTimeString().slice(0, 8) };
  return clock.text;
}

/** Tokens and dollars, used / limit, for `till ls`. */
function spending(key: KeySummary): string {
  const tokens = key.used.tokens ?? 0;
  const tokensHeld = (key.reserved.tokens ?? 0) > 0 ? ` (+${formatCount(key.reserved.tokens!)} held)` : '';
  const t = `${formatCount(tokens)}${key.policy.maxTokens !== undefined ? `/${key.policy.maxTokens}` : ''}${tokensHeld}`;
  const held = (key.reserved.spend ?? 0) > 0 ? ` (+${formatUsd(key.reserved.spend!)} held)` : '';
  return `${t} tok ${spendUsed(key)}${held}`;
}

function expiry(key: KeySummary): string {
  const left = timeLeft(key, Date.now());
  return left === undefined ? 'never' : left === 'expired' ? left : `in ${left}`;
}

/**
 * Text from requests (a model name, a path, a refusal that quotes them) shown in a terminal:
 * control characters are replaced, so an agent cannot send escape sequences to the user's
 * terminal (retitle it, rewrite earlier lines) through `till watch`.
 */
function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, '\ufffd');
}

/** One readable line per event, for `till watch` and `till serve`. */
function formatEvent(e: TillEvent): string {
  return printable(eventLine(e));
}

function eventLine(e: TillEvent): string {
  const t = time(e.at);
  switch (e.type) {
    case 'request.finished': {
      const r = e.request;
      const u = e.usage
        ? ` ${e.usage.tokens.input}+${e.usage.tokens.output} tok${e.usage.spend !== undefined ? ` ${formatUsd(e.usage.spend)}` : ''}${e.usage.estimated ? ' (estimated)' : ''}`
        : '';
      return `${t} ${e.status} ${r.method} /${r.provider}${r.path}${r.model ? ` ${r.model}` : ''} ${e.latencyMs}ms${u} key ${r.keyId} "${r.label}"${e.aborted ? ` (${e.aborted})` : ''}`;
    }
    case 'request.denied': {
      const r = e.request;
      return `${t} ${e.status} ${r.method} /${r.provider}${r.path} denied (${e.code}): ${e.reason}${r.keyId ? ` key ${r.keyId}` : ''}`;
    }
    case 'request.progress':
      return `${t} ... ${e.request.method} /${e.request.provider}${e.request.path} so far ${e.usage.tokens.output} tok out${e.usage.spend !== undefined ? ` ${formatUsd(e.usage.spend)}` : ''}${heldText(e.held)} key ${e.request.keyId}`;
    case 'request.started':
      return `${t} ... ${e.request.method} /${e.request.provider}${e.request.path}${heldText(e.held)}${e.basis ? ` (input bound by ${e.basis})` : ''} key ${e.request.keyId}`;
    case 'limit.near':
      return `${t} key ${e.key.id} "${e.key.label}" at ${e.percent}% of its ${e.meter} limit: ${formatAmount(e.meter, e.used)} of ${formatAmount(e.meter, e.limit)}`;
    case 'key.exhausted': {
      const limit = limitsOf(e.key.policy)[e.meter];
      const figures = limit === undefined ? '' : ` (${formatAmount(e.meter, e.key.used[e.meter] ?? 0)} of ${formatAmount(e.meter, limit)})`;
      return `${t} key exhausted: ${e.key.id} "${e.key.label}" has no ${e.meter} left for another request${figures}`;
    }
    default:
      return `${t} ${e.type.replace('key.', 'key ')}: ${e.key.id} "${e.key.label}" (${e.key.provider}, ${callsUsed(e.key)} calls)`;
  }
}

/** `, holding $0.12` / `, holding 2,048 tok`: what a request holds of its key's limits (budgeted keys). */
function heldText(held: Amounts | undefined): string {
  if (held?.spend !== undefined) return `, holding ${formatUsd(held.spend)}`;
  if (held?.tokens !== undefined) return `, holding ${formatCount(held.tokens)} tok`;
  return '';
}

function printIssued(k: IssuedKey): void {
  out(`Issued till key ${k.id} "${k.label}" for ${k.credential} (${k.provider}): ${describePolicy(k.policy)}`);
  out(`  key:      ${k.key}`);
  out(`  base URL: ${k.baseUrl}`);
  out('');
  for (const [name, value] of Object.entries(k.env)) out(`export ${name}=${value}`);
  out('');
  out('The key is shown only now; `till revoke ' + k.id + '` ends it.');
}

async function serve(args: string[], paths: TillPaths): Promise<void> {
  const { values } = parse(args, {
    port: { type: 'string' },
    ledger: { type: 'string' },
    listen: { type: 'string' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
    'allow-host': { type: 'string', multiple: true },
    verbose: { type: 'boolean', short: 'v' },
  });
  if (values.help) return out(HELP.serve);
  const port = int(values.port, 'port');
  const ledger = values.ledger ?? (process.env.TILL_LEDGER || undefined);
  if (ledger !== undefined && !isLedgerUrl(ledger)) throw new UsageError('--ledger must be a postgres:// URL');
  const holdTtl = process.env.TILL_LEDGER_HOLD_TTL_MS ? int(process.env.TILL_LEDGER_HOLD_TTL_MS, 'TILL_LEDGER_HOLD_TTL_MS') : undefined;
  capYoungGeneration();
  // This process is Till's own (the editor's extension host is not, and is left as it is): V8's
  // optimizing compiler took some 27 MB at its peak compiling undici's HTTP parser (WebAssembly,
  // used here: `pooledUpstream`), for no CPU per request the bench could tell; its baseline
  // compiler alone takes a few.
  setFlagsFromString('--liftoff-only');
  const service = await TillService.start({
    home: paths.home,
    port,
    ledger,
    ledgerHoldTtlMs: holdTtl,
    listen: { host: values.listen, tlsCert: values['tls-cert'], tlsKey: values['tls-key'], allowedHosts: values['allow-host'] },
    adminToken: process.env.TILL_ADMIN_TOKEN || undefined,
    log: (line) => process.stderr.write(`till: ${line}\n`),
    // Answers read whole through undici's pooled client: this process is Till's alone (upstream.ts).
    broker: { pooledUpstream: true },
  });
  out(`Till broker listening on ${service.url}`);
  out(`data folder: ${paths.home}`);
  if (service.ledgerName) out(`team ledger: ${service.ledgerName}`);
  if (service.remoteAdmin) out(`remote admin: till --broker ${service.url} … (with the admin token)`);
  // One write per 50 ms however busy the broker is: a line per request would cost a write each.
  // The timer runs only while lines wait: an idle broker is not woken up 20 times a second.
  let lines = '';
  let timer: NodeJS.Timeout | undefined;
  const flush = () => {
    timer = undefined;
    if (lines) process.stdout.write(lines);
    lines = '';
  };
  // Keys, limits and refusals always; every served request only with --verbose (`till watch`
  // shows them live, and a line per request costs a busy broker several percent of its CPU).
  service.events.on((e) => {
    if (e.type === 'request.started' || e.type === 'request.progress') return;
    if (e.type === 'request.finished' && !values.verbose) return;
    lines += formatEvent(e) + '\n';
    timer ??= setTimeout(flush, 50);
  });
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
  clearTimeout(timer);
  await service.close();
  flush();
}

/** A team broker elsewhere, from `till --broker URL …` or TILL_BROKER. */
interface RemoteBroker {
  url: string;
  ca?: string;
  tokenFile?: string;
}

let remoteBroker: RemoteBroker | undefined;

/** The typed control API of the broker: the one serving `paths`, or the team broker given with --broker. */
function control(paths: TillPaths): ControlApi {
  if (!remoteBroker) return new ControlApi(new ControlClient(paths));
  const { url, ca, tokenFile } = remoteBroker;
  const token = tokenFile !== undefined ? readFileSync(tokenFile, 'utf8').trim() : process.env.TILL_ADMIN_TOKEN;
  if (!token) throw new UsageError('--broker needs the admin token: set TILL_ADMIN_TOKEN or give --admin-token-file FILE');
  return new ControlApi(new RemoteControlClient({ url, token, ca: ca === undefined ? undefined : readFileSync(ca) }));
}

/** Takes `--broker URL`, `--ca FILE` and `--admin-token-file FILE` off the front of argv. */
function takeBrokerOptions(argv: string[]): string[] {
  const rest = [...argv];
  const found: Partial<RemoteBroker> = {};
  const names = { '--broker': 'url', '--ca': 'ca', '--admin-token-file': 'tokenFile' } as const;
  for (;;) {
    const [flag, value] = (rest[0] ?? '').split(/=(.*)/s, 2);
    const field = names[flag as keyof typeof names];
    if (!field) break;
    rest.shift();
    const given = value ?? rest.shift();
    if (!given) throw new UsageError(`${flag} needs a value`);
    found[field] = given;
  }
  const url = found.url ?? (process.env.TILL_BROKER || undefined);
  if (url === undefined && (found.ca !== undefined || found.tokenFile !== undefined))
    throw new UsageError('--ca and --admin-token-file go with --broker URL');
  if (url !== undefined) remoteBroker = { url, ca: found.ca ?? (process.env.TILL_CA || undefined), tokenFile: found.tokenFile };
  // `till serve` and `till credential` are this machine's: TILL_BROKER in the environment leaves
  // them alone (only an explicit --broker is refused for them).
  const command = rest[0];
  if (found.url === undefined && (command === 'serve' || command === 'credential' || command === 'credentials')) remoteBroker = undefined;
  return rest;
}

async function notifyBroker(paths: TillPaths, name: string): Promise<void> {
  try {
    await control(paths).credentialChanged(name);
  } catch (err) {
    if (!(err instanceof NotRunningError)) throw err;
  }
}

async function credential(args: string[], paths: TillPaths): Promise<void> {
  const [sub, ...rest] = args;
  const { values, positionals } = parse(rest, { name: { type: 'string' }, json: { type: 'boolean' } });
  if (values.help || !sub || sub === '--help' || sub === '-h') return out(HELP.credential);
  const config = readConfig(paths);
  const configured = config.credentials ?? {};
  const store = CredentialStore.outsideEditor(paths.credentials, paths.keychainService, configured);
  if (sub === 'ls') {
    const all = store.all();
    if (values.json) return out(JSON.stringify(all));
    if (all.length === 0) return out('no credentials: add one with `till credential add <provider>`');
    for (const c of all) {
      const from =
        c.store === 'config' ? `from ${describeSource(configured[c.name]!)}` : `added ${new Date(c.addedAt).toISOString().slice(0, 10)}`;
      out(`${c.name.padEnd(20)} ${c.provider.padEnd(14)} ${from}`);
    }
    return;
  }
  if (sub === 'add') {
    const [providerId] = positionals;
    if (!providerId || positionals.length > 1) throw new UsageError('usage: till credential add <provider> [--name NAME]');
    const provider = new ProviderRegistry(config.providers, config.upstreams).get(providerId);
    if (!provider)
      throw new Error(
        `unknown provider "${providerId}"; known: ${new ProviderRegistry(config.providers)
          .all()
          .map((p) => p.id)
          .join(', ')}`,
      );
    const name = values.name ?? provider.id;
    checkCredentialName(name);
    const secret = await readSecret(`${provider.displayName} API key for "${name}" (input hidden): `);
    if (!secret) throw new Error('no secret given: pipe it on stdin or type it at the prompt');
    await store.add(provider.id, secret, name);
    await notifyBroker(paths, name);
    return out(`stored credential "${name}" (${provider.displayName}) in the OS keychain`);
  }
  if (sub === 'rm') {
    const [name] = positionals;
    if (!name || positionals.length > 1) throw new UsageError('usage: till credential rm <name>');
    await store.remove(name);
    await notifyBroker(paths, name);
    return out(`removed credential "${name}" from the OS keychain (keys bound to it stop working)`);
  }
  throw new UsageError(`unknown subcommand "credential ${sub}": use add, ls or rm`);
}

async function issue(args: string[], paths: TillPaths): Promise<void> {
  const { values, positionals } = parse(args, { ...ISSUE_OPTIONS, json: { type: 'boolean' } });
  if (values.help) return out(HELP.issue);
  const [target] = positionals;
  if (!target || positionals.length > 1) throw new UsageError('usage: till issue <provider|credential> [options]');
  const issued = await control(paths).issue(issueInput(target, values));
  if (values.json) return out(JSON.stringify(issued));
  printIssued(issued);
}

async function ls(args: string[], paths: TillPaths): Promise<void> {
  const { values } = parse(args, { json: { type: 'boolean' } });
  if (values.help) return out(HELP.ls);
  const keys = await control(paths).list();
  if (values.json) return out(JSON.stringify(keys));
  if (keys.length === 0) return out('no till keys: issue one with `till issue <provider>`');
  out(
    `${'ID'.padEnd(11)} ${'STATE'.padEnd(9)} ${'PROVIDER'.padEnd(12)} ${'CALLS'.padEnd(9)} ${'TOKENS / SPEND'.padEnd(28)} ${'EXPIRES'.padEnd(12)} LABEL`,
  );
  for (const k of keys)
    out(
      `${k.id.padEnd(11)} ${k.state.padEnd(9)} ${k.provider.padEnd(12)} ${callsUsed(k).padEnd(9)} ${spending(k).padEnd(28)} ${expiry(k).padEnd(12)} ${printable(k.label)}`,
    );
}

async function revoke(args: string[], paths: TillPaths): Promise<void> {
  const { values, positionals } = parse(args, { all: { type: 'boolean' } });
  if (values.help) return out(HELP.revoke);
  if (Boolean(values.all) === positionals.length > 0 || positionals.length > 1) throw new UsageError('usage: till revoke <id> | --all');
  const api = control(paths);
  const revoked = values.all ? await api.revokeAll() : Number(await api.revoke(positionals[0]!));
  out(
    values.all
      ? `revoked ${revoked} key${revoked === 1 ? '' : 's'}`
      : revoked
        ? `revoked ${positionals[0]}`
        : `${positionals[0]} was already revoked`,
  );
}

async function extend(args: string[], paths: TillPaths): Promise<void> {
  const { values, positionals } = parse(args, {
    uses: { type: 'string' },
    'max-tokens': { type: 'string' },
    'max-spend': { type: 'string' },
  });
  if (values.help) return out(HELP.extend);
  const [id] = positionals;
  if (!id || positionals.length > 1) throw new UsageError('usage: till extend <id> [--uses N] [--max-tokens N] [--max-spend USD]');
  const by = {
    uses: int(values.uses, 'uses'),
    maxTokens: int(values['max-tokens'], 'max-tokens'),
    maxSpend: usd(values['max-spend'], 'max-spend'),
  };
  if (Object.values(by).every((v) => v === undefined)) throw new UsageError('till extend needs --uses, --max-tokens or --max-spend');
  const key = await control(paths).extend(id, by);
  out(`extended ${key.id} "${key.label}": ${describePolicy(key.policy)}`);
}

async function watch(args: string[], paths: TillPaths): Promise<void> {
  const { values } = parse(args, { json: { type: 'boolean' } });
  if (values.help) return out(HELP.watch);
  const abort = new AbortController();
  process.once('SIGINT', () => abort.abort());
  process.once('SIGTERM', () => abort.abort());
  await control(paths).events((e) => out(values.json ? JSON.stringify(e) : formatEvent(e)), abort.signal);
}

async function exec(args: string[], paths: TillPaths): Promise<number> {
  const dash = args.indexOf('--');
  const { values, positionals } = parse(dash < 0 ? args : args.slice(0, dash), { ...ISSUE_OPTIONS, agent: { type: 'string' } });
  if (values.help) {
    out(HELP.exec);
    return 0;
  }
  const command = dash < 0 ? [] : args.slice(dash + 1);
  if (command.length === 0) throw new UsageError('usage: till exec [<provider|credential>…] [options] -- <command…>');
  const agent = values.agent;
  if (agent !== undefined && !isAgentName(agent)) throw new UsageError(`unknown agent "${agent}": use ${Object.keys(AGENTS).join(', ')}`);
  if (agent !== undefined && positionals.length > 0)
    throw new UsageError('till exec --agent picks the credentials itself: name no provider or credential');
  const api = control(paths);
  // Read before any key is issued: a config.json that cannot be read leaves none behind.
  const config = readConfig(paths);
  // A team broker's credentials are its own; a local broker's are listed in this data folder.
  const credentials = remoteBroker ? await api.credentials() : new CredentialList(paths.credentials, config.credentials).all();
  const inherited = providerEnvNames(new ProviderRegistry(config.providers));
  const targets =
    agent !== undefined ? agentTargets(agent, credentials) : positionals.length > 0 ? positionals : credentials.map((c) => c.name);
  if (targets.length === 0) throw new Error('no credentials: add one with `till credential add <provider>`');
  const issued: IssuedKey[] = [];
  let lease: HeldLease | undefined;
  const revokeAll = async () => {
    await Promise.allSettled(issued.map((k) => api.revoke(k.id)));
    lease?.stop();
  };
  try {
    for (const target of targets) {
      const input = issueInput(target, values);
      input.label ??= `exec ${basename(command[0]!)}`;
      // Tied to this process: if it dies (even by kill -9), the broker revokes the keys at once.
      input.lease = true;
      issued.push(await api.issue(input));
    }
    lease = holdLease(
      api.client,
      issued.map((k) => k.id),
    );
    await lease.ready;
  } catch (err) {
    await revokeAll();
    throw err;
  }
  // The command sees Till's variables for every provider and no one else's: a real key inherited
  // from this shell (OPENAI_API_KEY=sk-…) would reach it otherwise.
  const env = { ...process.env };
  for (const name of inherited) delete env[name];
  const ca = remoteBroker?.ca;
  let scratch: string | undefined;
  try {
    if (agent !== undefined || ca !== undefined) scratch = newAgentScratchDir(paths.home);
    // A team broker's own CA, given with --ca, is what the command's Node programs (the agents, the
    // SDKs) must trust to reach it: added to the certificates they trust, never instead of them.
    if (ca !== undefined) env.NODE_EXTRA_CA_CERTS = extraCertificates(ca, env.NODE_EXTRA_CA_CERTS, scratch!);
    if (agent !== undefined) {
      for (const name of AGENTS[agent].unset ?? []) delete env[name];
      const setup = agentSetup(agent, issued, { scratchDir: scratch! });
      for (const warning of setup.warnings) process.stderr.write(`till: warning: ${warning}\n`);
      Object.assign(env, setup.env);
    } else {
      for (const k of issued) Object.assign(env, k.env);
    }
    const child = spawn(command[0]!, command.slice(1), { stdio: 'inherit', env });
    const forward = (signal: NodeJS.Signals) => child.kill(signal);
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    return await new Promise<number>((resolve) => {
      child.on('error', (err) => {
        process.stderr.write(`till: cannot run ${command[0]}: ${err.message}\n`);
        resolve(127);
      });
      child.on('exit', (status, signal) => resolve(status ?? 128 + (signal ? (constants.signals[signal] ?? 0) : 0)));
    });
  } finally {
    if (scratch) rmSync(scratch, { recursive: true, force: true });
    await revokeAll();
  }
}

/** NODE_EXTRA_CA_CERTS for a command that must trust `ca` too: `ca` itself, or both in one file in `dir` when one was set already. */
function extraCertificates(ca: string, already: string | undefined, dir: string): string {
  if (already === undefined || already === '') return resolvePath(ca);
  const both = join(dir, 'ca-certificates.pem');
  let before = '';
  try {
    before = readFileSync(already, 'utf8');
  } catch {
    // Node would skip an unreadable file with a warning: so does this.
  }
  writeFileSync(both, `${before.trimEnd()}\n${readFileSync(ca, 'utf8')}`);
  return both;
}

export async function main(argv: string[]): Promise<number> {
  remoteBroker = undefined;
  try {
    const [command, ...rest] = takeBrokerOptions(argv);
    switch (command) {
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        out(HELP.main);
        return 0;
      case '--version':
      case '-v':
        out(VERSION);
        return 0;
    }
    // Refused, with the reason, when another user could change the folder (privateFolder.ts).
    const paths = openHome(defaultHome());
    if (remoteBroker && (command === 'serve' || command === 'credential' || command === 'credentials'))
      throw new UsageError(`till ${command} runs on the broker's machine, not with --broker`);
    switch (command) {
      case 'serve':
        await serve(rest, paths);
        return 0;
      case 'credential':
      case 'credentials':
        await credential(rest, paths);
        return 0;
      case 'issue':
        await issue(rest, paths);
        return 0;
      case 'ls':
        await ls(rest, paths);
        return 0;
      case 'revoke':
        await revoke(rest, paths);
        return 0;
      case 'extend':
        await extend(rest, paths);
        return 0;
      case 'watch':
        await watch(rest, paths);
        return 0;
      case 'exec':
        return await exec(rest, paths);
      default:
        throw new UsageError(`unknown command "${command}": see \`till --help\``);
    }
  } catch (err) {
    process.stderr.write(`till: ${(err as Error).message.split('\n')[0]}\n`);
    return err instanceof UsageError ? 2 : 1;
  }
}

if (require.main === module) {
  // Output piped into a program that stops reading (`till ls | head -1`): done, not a crash.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(process.exitCode ?? 0);
  });
  void main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
