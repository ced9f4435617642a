/**
 * Runs a real agent CLI (Claude Code, Codex CLI) headless through `till exec --agent`, the way a
 * user would, and records what a reviewer would check afterwards: its exit, its output, the
 * environment it was given, every network address it tried (strace), and the files it left in
 * its HOME. The agents are installed by scripts/install-agents.sh into ~/.cache/till/agents.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { appendFileSync, chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { userInfo } from 'node:os';
import { dirname, join } from 'node:path';
import type { KeySummary } from '../../../src/core/events';
import type { Reply, Turn } from '../../support/upstreams';
import { filesUnder } from '../../support/files';
import { collectOutput, type RunResult } from '../../support/process';
import { logFile, runTill, testRoot, TILL_JS } from '../../support/till';

/**
 * Where scripts/install-agents.sh puts the agent packages: $TILL_CACHE/agents. The account's
 * home comes from the password database, since the test setup points HOME elsewhere.
 */
export const AGENTS_DIR = join(process.env.TILL_CACHE ?? join(userInfo().homedir, '.cache', 'till'), 'agents');

/** The agent CLIs the tests run, by their `till exec --agent` names. */
export type AgentCli = 'claude' | 'codex' | 'gemini';

/** The installed binary of an agent package; a clear error when it is missing. */
export function agentBinary(name: AgentCli): string {
  const bin = join(AGENTS_DIR, 'node_modules', '.bin', name);
  if (!existsSync(bin))
    throw new Error(`${name} is not installed in ${AGENTS_DIR}: run \`bash scripts/install-agents.sh\` (npm test does)`);
  return bin;
}

/** A network address an agent process tried to reach, from strace. */
export interface Destination {
  syscall: string;
  family: 'AF_INET' | 'AF_INET6';
  address: string;
  port: number;
}

/** Parses strace's connect/sendto/sendmsg/sendmmsg lines into the internet addresses they name. */
export function destinations(trace: string): Destination[] {
  const found: Destination[] = [];
  for (const line of trace.split('\n')) {
    const call = /\b(connect|sendto|sendmsg|sendmmsg)\(/.exec(line)?.[1];
    if (!call) continue;
    const v4 = /sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)/.exec(line);
    if (v4) found.push({ syscall: call, family: 'AF_INET', address: v4[2]!, port: Number(v4[1]) });
    const v6 = /sa_family=AF_INET6, sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"/.exec(line);
    if (v6) found.push({ syscall: call, family: 'AF_INET6', address: v6[2]!, port: Number(v6[1]) });
  }
  return found;
}

/** True for 127.0.0.0/8, ::1 and ::ffff:127.x. */
export const isLoopback = (address: string): boolean => /^127\./.test(address) || address === '::1' || /^::ffff:127\./.test(address);

/** A workspace folder with a note the agent is asked to read (the tool round trip). */
export function workspace(marker: string): string {
  const dir = join(testRoot(), 'agents', `work-${randomBytes(4).toString('hex')}`);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'note.txt'), `${marker}\n`);
  return dir;
}

/**
 * The scripted model both agents talk to: asked to read note.txt, it calls the agent's file or
 * shell tool; given the tool's output, it answers with the marker it found there; asked to
 * keep talking, it streams until the client leaves.
 */
export function noteReader(dir: string, marker: string): (turn: Turn) => Reply {
  return (turn) => {
    if (turn.toolResult !== undefined)
      return {
        text: turn.toolResult.includes(marker) ? `The note says ${marker}.` : `The tool gave no note: ${turn.toolResult.slice(0, 200)}`,
      };
    if (/keep talking/i.test(turn.userText)) return { text: 'Talking and talking', hold: true };
    if (/read note\.txt/i.test(turn.userText)) {
      if (turn.tools.includes('Read')) return { tool: 'Read', input: { file_path: join(dir, 'note.txt') } };
      if (turn.tools.includes('read_file')) return { tool: 'read_file', input: { file_path: join(dir, 'note.txt') } };
      if (turn.tools.includes('exec_command')) return { tool: 'exec_command', input: { cmd: 'cat note.txt', workdir: dir } };
      if (turn.tools.includes('shell')) return { tool: 'shell', input: { command: ['cat', 'note.txt'], workdir: dir } };
      return { text: `No tool to read files among: ${turn.tools.join(', ')}` };
    }
    return { text: 'Hello.' };
  };
}

/**
 * The shell wrapper `till exec` runs: records the agent's environment, traces its network calls,
 * keeps a copy of the files Till wrote for it (Codex's home, Gemini CLI's system settings).
 */
const WRAPPER = `#!/bin/sh
env > "$TILL_AGENT_TRACE/env.txt"
strace -f -qq -e trace=connect,sendto,sendmsg,sendmmsg -o "$TILL_AGENT_TRACE/network.txt" "$@" </dev/null
status=$?
if [ -n "$CODEX_HOME" ] && [ -d "$CODEX_HOME" ]; then cp -R "$CODEX_HOME" "$TILL_AGENT_TRACE/codex-home"; fi
if [ -n "$GEMINI_CLI_SYSTEM_SETTINGS_PATH" ] && [ -f "$GEMINI_CLI_SYSTEM_SETTINGS_PATH" ]; then mkdir -p "$TILL_AGENT_TRACE/gemini" && cp "$GEMINI_CLI_SYSTEM_SETTINGS_PATH" "$TILL_AGENT_TRACE/gemini/system-settings.json"; fi
exit $status
`;

export interface AgentRun {
  /** Everything printed so far (stdout then stderr of `till exec` and the agent). */
  output(): string;
  /** Resolves when `till exec` has exited. */
  done: Promise<AgentResult>;
}

export interface AgentResult extends RunResult {
  /** The agent's environment, as it started. */
  env: Record<string, string>;
  /** Every internet address the agent or its children tried to reach. */
  destinations: Destination[];
  /** Files under the agent's HOME and those Till wrote for it, with their contents. */
  files: { path: string; text: string }[];
}

/**
 * Starts `till exec --agent <agent> [tillArgs] -- <bin> <args>` in `cwd` with a throw-away HOME.
 * The broker is the `till serve` already running on `home`.
 */
export function runAgent(options: {
  home: string;
  agent: AgentCli;
  tillArgs?: string[];
  args: string[];
  cwd: string;
  /** Files the user already has under HOME (e.g. `.codex/config.toml`), by relative path. */
  homeFiles?: Record<string, string>;
  timeoutMs?: number;
  /**
   * Runs the agent this many times at once under the one `till exec` (its keys shared), as a
   * script fanning work out to agents would; it fails when any of them does. Default 1.
   */
  parallel?: number;
}): AgentRun {
  const trace = join(testRoot(), 'agents', `trace-${randomBytes(4).toString('hex')}`);
  const agentHome = join(trace, 'home');
  mkdirSync(agentHome, { recursive: true });
  for (const [path, text] of Object.entries(options.homeFiles ?? {})) {
    mkdirSync(dirname(join(agentHome, path)), { recursive: true });
    writeFileSync(join(agentHome, path), text);
  }
  const wrapper = join(trace, 'run-agent.sh');
  writeFileSync(wrapper, WRAPPER);
  chmodSync(wrapper, 0o755);
  const log = logFile(`agent-${options.agent}`);
  const env: NodeJS.ProcessEnv = { ...process.env, HOME: agentHome, TILL_HOME: options.home, TILL_AGENT_TRACE: trace, NO_COLOR: '1' };
  // The user's Codex home is the throw-away HOME's.
  delete env.CODEX_HOME;
  const agent = [agentBinary(options.agent), ...options.args];
  const command = (options.parallel ?? 1) > 1 ? ['/bin/sh', '-c', fanOut(options.parallel!), 'fan-out', ...agent] : agent;
  const child = spawn(
    process.execPath,
    [TILL_JS, 'exec', '--agent', options.agent, ...(options.tillArgs ?? []), '--', wrapper, ...command],
    {
      cwd: options.cwd,
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  const run = collectOutput(child, options.agent, options.timeoutMs ?? 120_000, (c) => appendFileSync(log, c));
  const done = run.done.then((result): AgentResult => {
    const read = (file: string) => (existsSync(join(trace, file)) ? readFileSync(join(trace, file), 'utf8') : '');
    return {
      ...result,
      env: parseEnv(read('env.txt')),
      destinations: destinations(read('network.txt')),
      files: [...filesWithText(agentHome), ...filesWithText(join(trace, 'codex-home')), ...filesWithText(join(trace, 'gemini'))],
    };
  });
  return { output: run.output, done };
}

/** A shell script running its arguments `n` times at once; it fails when any run fails. */
function fanOut(n: number): string {
  return `pids=""; i=0; while [ $i -lt ${n} ]; do "$@" & pids="$pids $!"; i=$((i + 1)); done; status=0; for p in $pids; do wait "$p" || status=1; done; exit $status`;
}

function parseEnv(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) env[line.slice(0, eq)] = line.slice(eq + 1);
  }
  return env;
}

/** Every file under `dir` (none when it does not exist), with its contents. */
function filesWithText(dir: string): { path: string; text: string }[] {
  return existsSync(dir) ? filesUnder(dir).map((path) => ({ path, text: readFileSync(path).toString('latin1') })) : [];
}

/** The requests the broker on `home` refused for the key labelled `label`, from its audit log. */
export function denials(home: string, label: string): { status: number; denial?: string; reason?: string }[] {
  const file = join(home, 'audit.jsonl');
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as { label?: string; status: number; denial?: string; reason?: string })
    .filter((r) => r.label === label && r.denial !== undefined);
}

/** The keys the broker on `home` knows, with their usage (`till ls --json`). */
export async function listKeys(home: string): Promise<KeySummary[]> {
  const r = await runTill(['ls', '--json'], { home });
  if (r.code !== 0) throw new Error(`till ls failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as KeySummary[];
}
