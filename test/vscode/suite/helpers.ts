/** What the extension-host test files share: a scripted prompter, polling, a new terminal's environment. */
import * as assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as vscode from 'vscode';
import type { KeySummary } from '../../../src/core/events';
import { ControlClient } from '../../../src/core/runtime/control';
import { COMMANDS } from '../../../src/vscode/constants';
import type { TillApi } from '../../../src/vscode/extension';
import type { PickItem, Prompter } from '../../../src/vscode/prompter';
import { startOpenAIUpstream, type Upstream } from '../../support/upstreams';
import { waitFor } from '../../support/wait';

/** The environment a new integrated terminal starts with: a shell that writes it out and exits. */
export async function terminalEnv(): Promise<string> {
  const file = join(mkdtempSync(join(tmpdir(), 'till-term-')), 'env.txt');
  const terminal = vscode.window.createTerminal({
    name: 'till env check',
    shellPath: '/bin/sh',
    shellArgs: ['-c', `env > ${file}.tmp && mv ${file}.tmp ${file}`],
  });
  try {
    await poll(() => existsSync(file), Boolean, 'the terminal to write its env');
    return readFileSync(file, 'utf8');
  } finally {
    terminal.dispose();
  }
}

/** Answers the extension's questions from a queue; records every message it was shown. */
export class ScriptedPrompter implements Prompter {
  readonly answers: (string | undefined)[] = [];
  readonly messages: string[] = [];
  readonly asked: string[] = [];

  answer(...values: (string | undefined)[]): this {
    this.answers.push(...values);
    return this;
  }

  private next(question: string): string | undefined {
    this.asked.push(question);
    if (this.answers.length === 0) throw new Error(`unexpected question: ${question}`);
    return this.answers.shift();
  }

  async pick<T>(title: string, items: PickItem<T>[]): Promise<T | undefined> {
    const wanted = this.next(title);
    if (wanted === undefined) return undefined;
    const item = items.find((i) => i.label === wanted || String(i.value) === wanted);
    if (!item) throw new Error(`"${wanted}" is not among ${items.map((i) => i.label).join(', ')} for ${title}`);
    return item.value;
  }

  async input(title: string): Promise<string | undefined> {
    return this.next(title);
  }

  async message(_kind: string, text: string, buttons: string[]): Promise<string | undefined> {
    this.messages.push(text);
    // Messages with buttons wait for a person; the script dismisses them unless told otherwise.
    return buttons.length > 0 && this.answers[0]?.startsWith('button:') ? this.answers.shift()!.slice(7) : undefined;
  }
}

/** Reads until `ok`, failing after `ms` with what was last read. */
export async function poll<T>(read: () => T | Promise<T>, ok: (v: T) => boolean, what: string, ms = 10_000): Promise<T> {
  let last: T | undefined;
  const check = async () => {
    last = await read();
    return ok(last) ? { value: last } : undefined;
  };
  return (await waitFor(what, check, { timeoutMs: ms, everyMs: 100, describe: () => `last: ${JSON.stringify(last)}` })).value;
}

/** Activates Till with `prompter` answering it, and points it at a fake OpenAI that takes only `secret`. */
export async function startTill(prompter: Prompter, secret: string): Promise<{ api: TillApi; up: Upstream }> {
  const ext = vscode.extensions.getExtension<TillApi>('till.till');
  assert.ok(ext);
  const api = await ext.activate();
  api.setPrompter(prompter);
  const up = await startOpenAIUpstream({ credential: secret, streamDelayMs: 1 });
  await vscode.workspace.getConfiguration('till').update('upstreams', { openai: `${up.url}/v1` }, vscode.ConfigurationTarget.Global);
  return { api, up };
}

/** Once Till has a terminal key: a new terminal's environment, checked to hold a till key and never `secret`. */
export async function keyedTerminalEnv(api: TillApi, secret: string): Promise<string> {
  await poll(
    () => api.terminalKeyIds(),
    (ids) => ids.length === 1,
    'a terminal key',
  );
  const env = await terminalEnv();
  assert.match(env, /^OPENAI_API_KEY=till_/m);
  assert.ok(!env.includes(secret), 'the credential reached a terminal');
  return env;
}

/** The process hosting the broker, as its control channel says (undefined while none answers). */
export function brokerHost(api: TillApi): Promise<{ pid: number } | undefined> {
  return new ControlClient(api.session.paths).request('GET', '/status').then(
    (st) => st as { pid: number },
    () => undefined,
  );
}

/** Has the runner open a second window (its own extension host) and waits for its terminals' key from the broker. */
export async function openSecondWindow(api: TillApi): Promise<KeySummary> {
  console.log('[till-test] open a second window');
  return (await poll(
    async () => (await api.connection().list()).find((k) => k.label === 'terminals · window-two' && k.state === 'active'),
    Boolean,
    "the second window's terminal key",
    60_000,
  ))!;
}

/** This window lets its broker go: waits for the other window to host it, then attaches to it. */
export async function handBrokerOver(api: TillApi): Promise<void> {
  await api.connection().dispose();
  await poll(
    () => brokerHost(api),
    (st) => st !== undefined && st.pid !== process.pid,
    'the second window to host the broker',
    20_000,
  );
  await vscode.commands.executeCommand(COMMANDS.restartBroker);
}

/** Runs `use` with `till.credentials.store` set to `keychain`, as a user who chose the OS keychain; then unset. */
export async function withKeychainChosen(use: () => Promise<void>): Promise<void> {
  const settings = vscode.workspace.getConfiguration('till');
  await settings.update('credentials.store', 'keychain', vscode.ConfigurationTarget.Global);
  try {
    await use();
  } finally {
    await vscode.workspace.getConfiguration('till').update('credentials.store', undefined, vscode.ConfigurationTarget.Global);
  }
}

/**
 * Add Credential for `provider` when the keychain cannot keep it, the question dismissed (Cancel):
 * checks it was asked once and nothing was stored; returns what Till said.
 */
export async function cancelledAddCredential(
  api: TillApi,
  prompter: ScriptedPrompter,
  provider: string,
  secret: string,
): Promise<string[]> {
  const before = api.session.credentials.all().map((c) => c.name);
  const seen = prompter.messages.length;
  prompter.answer(provider, secret);
  assert.equal(await vscode.commands.executeCommand<string | undefined>(COMMANDS.addCredential), undefined);
  const said = prompter.messages.slice(seen);
  assert.equal(said.filter((m) => new RegExp(`the OS keychain cannot keep "${provider}"`).test(m)).length, 1, said.join('\n'));
  assert.deepEqual(
    api.session.credentials.all().map((c) => c.name),
    before,
  );
  return said;
}
