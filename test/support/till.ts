/**
 * Test harness for Till: data folders, credentials in the (private) real keychain, an
 * in-process broker, and the built `till` command. Everything a test writes goes under
 * TILL_TEST_ROOT, which the global teardown scans for leaked credentials.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { expect } from 'vitest';
import { collectOutput, type RunResult } from './process';
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { CredentialList } from '../../src/core/credentials/credentials';
import { tillPaths } from '../../src/core/runtime/home';
import { TillService, type ServiceOptions } from '../../src/core/runtime/service';
import { KeychainVault } from '../../src/core/credentials/vault';

export const TILL_JS = resolve(__dirname, '../../dist/till.js');

/** Marker in every fake real credential, so a leak scan can find any of them anywhere. */
export const CREDENTIAL_MARKER = 'REALCRED';

export function testRoot(): string {
  const root = process.env.TILL_TEST_ROOT;
  if (!root) throw new Error('TILL_TEST_ROOT is not set: run the tests through vitest (globalSetup)');
  return root;
}

/** A fresh fake "real" credential, e.g. `sk-REALCRED-openai-3f9a…`. */
export function fakeCredential(label: string): string {
  return `sk-${CREDENTIAL_MARKER}-${label}-${randomBytes(12).toString('hex')}`;
}

/** A fresh data folder under the test root. */
export function tempHome(): string {
  mkdirSync(join(testRoot(), 'homes'), { recursive: true });
  return mkdtempSync(join(testRoot(), 'homes', 'h-'));
}

/** A log file under the test root (scanned at the end). */
export function logFile(name: string): string {
  mkdirSync(join(testRoot(), 'logs'), { recursive: true });
  return join(testRoot(), 'logs', `${name}-${randomBytes(4).toString('hex')}.log`);
}

/** Stores a credential the way `till credential add` does: secret in the keychain, name in credentials.json. */
export async function addCredential(home: string, name: string, provider: string, secret: string): Promise<void> {
  const paths = tillPaths(home);
  await new KeychainVault({ service: paths.keychainService }).set(name, secret);
  new CredentialList(paths.credentials).put({ name, provider, addedAt: Date.now() });
}

/** Writes config.json in a data folder. */
export function writeConfig(home: string, config: object): void {
  writeFileSync(join(home, 'config.json'), JSON.stringify(config));
}

/** Starts Till in this process on a free port, logging to a scanned file. */
export async function startTill(options: Partial<ServiceOptions> & { home: string }): Promise<TillService> {
  const log = logFile('broker');
  return TillService.start({ port: 0, log: (line) => appendFileSync(log, line + '\n'), ...options });
}

export type { RunResult } from './process';

/** Runs the built `till` command with a data folder; output is also kept in a scanned log. */
export async function runTill(
  args: string[],
  options: { home: string; input?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number },
): Promise<RunResult> {
  const child = spawn(process.execPath, [TILL_JS, ...args], {
    env: { ...process.env, ...options.env, TILL_HOME: options.home },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const run = collectOutput(child, `till ${args.join(' ')}`, options.timeoutMs ?? 15_000);
  child.stdin.end(options.input ?? '');
  const result = await run.done;
  appendFileSync(logFile('cli'), `$ till ${args.join(' ')}\n${result.stdout}${result.stderr}`);
  return result;
}

export interface ServeProcess {
  url: string;
  child: ChildProcess;
  /** Everything the process printed so far. */
  output(): string;
  /** Sends a signal and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Runs `till serve` in a child process and waits for its URL: on a free port, on `port`, or with
 * `port: 'default'` without `--port` at all, as a user runs it. `fileLimit` runs it under
 * `ulimit -n`; `args` are more of `till serve`'s options.
 */
export function spawnServe(
  home: string,
  options: { port?: number | 'default'; env?: NodeJS.ProcessEnv; fileLimit?: number; args?: string[] } = {},
): Promise<ServeProcess> {
  const log = logFile('serve');
  const args = [TILL_JS, 'serve', ...(options.port === 'default' ? [] : ['--port', String(options.port ?? 0)]), ...(options.args ?? [])];
  const env = { ...process.env, ...options.env, TILL_HOME: home };
  const child =
    options.fileLimit === undefined
      ? spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('bash', ['-c', `ulimit -n ${options.fileLimit} && exec "$0" "$@"`, process.execPath, ...args], {
          env,
          stdio: ['ignore', 'pipe', 'pipe'],
        });
  let text = '';
  const onData = (c: Buffer) => {
    text += c;
    appendFileSync(log, c);
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`till serve did not start within 10 s: ${text}`)), 10_000);
    const check = () => {
      const m = /listening on (https?:\/\/[^\s/]+:\d+)/.exec(text);
      if (m) {
        clearTimeout(timer);
        child.stdout.off('data', check);
        resolvePromise({
          url: m[1]!,
          child,
          output: () => text,
          stop: async (signal = 'SIGTERM') => {
            if (child.exitCode === null && child.signalCode === null) child.kill(signal);
            await exited;
          },
        });
      }
    };
    child.stdout.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`till serve exited with ${code}: ${text}`));
    });
  });
}

/**
 * A failed command: the exit code (or any non-zero one when `code` is omitted) and exactly
 * one line on stderr, starting `till: `.
 */
export function expectOneLineError(r: RunResult, code: number | undefined, pattern: RegExp): void {
  if (code === undefined) expect(r.code, `stdout: ${r.stdout}\nstderr: ${r.stderr}`).not.toBe(0);
  else expect(r.code, `stdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(code);
  expect(r.code).not.toBeNull();
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(/^till: /);
  expect(lines[0]).toMatch(pattern);
}
