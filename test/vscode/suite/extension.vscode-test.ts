/**
 * Till inside a real VS Code (code-server's extension host): the commands and the input
 * flows they drive (answered by a scripted prompter), the Keys tree, terminal env, agent
 * terminals, and one broker shared with another window, with takeover.
 *
 * The upstream is a fake OpenAI on 127.0.0.1 started here; the keychain is the runner's
 * private Secret Service.
 */
import * as assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import * as http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'mocha';
import OpenAI from 'openai';
import * as vscode from 'vscode';
import pkg from '../../../package.json';
import { KeychainVault } from '../../../src/core/credentials/vault';
import type { KeySummary } from '../../../src/core/events';
import type { IssuedKey } from '../../../src/core/runtime/controlApi';
import { COMMANDS } from '../../../src/vscode/constants';
import type { TillApi } from '../../../src/vscode/extension';
import { LOCK_LOGIN_COLLECTION } from '../../support/keyring';
import { startOpenAIUpstream, type Upstream } from '../../support/upstreams';
import {
  brokerHost,
  cancelledAddCredential,
  handBrokerOver,
  keyedTerminalEnv,
  openSecondWindow,
  poll,
  ScriptedPrompter,
  startTill,
  terminalEnv,
  withKeychainChosen,
} from './helpers';

const SECRET = `sk-REALCRED-vscode-${Date.now().toString(36)}`;

let api: TillApi;
let up: Upstream;
const prompter = new ScriptedPrompter();

async function treeKeys(): Promise<{ label: string; description: string; contextValue: string }[]> {
  const out: { label: string; description: string; contextValue: string }[] = [];
  const walk = async (node?: unknown) => {
    for (const child of (await api.tree.getChildren(node)) ?? []) {
      const item = await api.tree.getTreeItem(child);
      if (item.contextValue?.startsWith('till.key'))
        out.push({ label: String(item.label), description: String(item.description), contextValue: item.contextValue });
      else await walk(child);
    }
  };
  await walk();
  return out;
}

function chat(key: IssuedKey) {
  const client = new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries: 0 });
  return client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }] });
}

describe('Till in VS Code', function () {
  this.timeout(60_000);

  before(async () => {
    ({ api, up } = await startTill(prompter, SECRET));
  });

  after(async () => {
    await up?.close();
  });

  it('declares every command it registers, and registers every command it declares', async () => {
    const declared = pkg.contributes.commands.map((c) => c.command).sort();
    assert.deepEqual(declared, Object.values(COMMANDS).sort());
    const registered = new Set(await vscode.commands.getCommands(true));
    for (const id of declared) assert.ok(registered.has(id), `${id} is declared but not registered`);
    for (const c of pkg.contributes.commands) assert.equal(c.category, 'Till', `${c.command} is not in the Till category`);
  });

  it('starts without a broker until there is something to broker', () => {
    assert.equal(api.connection().role, 'down');
  });

  it('Add Credential: picks a provider, takes the key in a hidden input, stores it in the keychain, starts the broker', async () => {
    prompter.answer('openai', SECRET);
    const name = await vscode.commands.executeCommand<string>(COMMANDS.addCredential);
    assert.equal(name, 'openai');
    assert.deepEqual(
      api.session.credentials.all().map((c) => c.provider),
      ['openai'],
    );
    // With a keychain on the server, the keychain keeps it (VS Code's secret storage is for where there is none).
    assert.equal(api.session.credentials.storeOf('openai'), 'keychain');
    assert.equal(await new KeychainVault({ service: api.session.paths.keychainService }).get('openai'), SECRET);
    await api.ready();
    assert.equal(api.connection().role, 'host');
    // VS Code's secret storage was not given a copy.
    await assert.rejects(api.session.editorSecrets.get('openai'), /not in VS Code's secret storage/);
    // The tree lists it (name and provider, never the secret), with Remove on the item.
    const credentials = await poll(
      async () => {
        for (const node of (await api.tree.getChildren(undefined)) ?? []) {
          const item = await api.tree.getTreeItem(node);
          if (item.contextValue === 'till.credentials')
            return Promise.all(
              ((await api.tree.getChildren(node as never)) ?? []).map(async (c) => await api.tree.getTreeItem(c as never)),
            );
        }
        return [];
      },
      (items) => items.length === 1,
      'the credential in the tree',
    );
    assert.equal(credentials[0]!.label, 'openai');
    assert.equal(credentials[0]!.contextValue, 'till.credential');
    const removeInline = pkg.contributes.menus['view/item/context'].find((m) => m.command === COMMANDS.removeCredential);
    assert.match(removeInline?.when ?? '', /viewItem == till\.credential/);
  });

  let issued: IssuedKey;
  it('Issue Key: preset, label, then the key once with copy buttons; the tree shows it', async () => {
    prompter.answer('50 calls, 1 hour', 'vscode test key', 'button:Copy Base URL');
    issued = (await vscode.commands.executeCommand<IssuedKey>(COMMANDS.issueKey))!;
    assert.ok(issued.key.startsWith('till_'));
    assert.equal(issued.policy.maxActivations, 50);
    assert.equal(issued.label, 'vscode test key');
    await poll(
      () => prompter.messages.at(-1) ?? '',
      (m) => /shown only now/.test(m),
      'the key to be shown once',
    );
    await poll(
      async () => vscode.env.clipboard.readText(),
      (t) => t === issued.baseUrl,
      'the base URL on the clipboard',
    );
    // The key itself is in the message, and the message that comes back says what was copied.
    const shown = prompter.messages.filter((m) => m.includes(issued.key));
    assert.equal(shown.length, 2, prompter.messages.join('\n'));
    assert.match(shown[1]!, /^Copied the base URL to the clipboard\./);
    const items = await poll(treeKeys, (ks) => ks.some((k) => k.label === 'vscode test key'), 'the key in the tree');
    const item = items.find((k) => k.label === 'vscode test key')!;
    assert.equal(item.contextValue, 'till.key.active');
    assert.match(item.description, /openai · 0\/50/);
  });

  it('Open Dashboard: the usage page in an editor tab, beside the sidebar view', async () => {
    await vscode.commands.executeCommand(COMMANDS.openDashboard);
    const tabs = () =>
      vscode.window.tabGroups.all
        .flatMap((g) => g.tabs)
        .filter((t) => t.input instanceof vscode.TabInputWebview && t.label === 'Till Dashboard');
    await poll(tabs, (ts) => ts.length === 1, 'the dashboard tab');
    await vscode.commands.executeCommand(COMMANDS.openDashboard); // shown again, not opened twice
    assert.equal(tabs().length, 1);
    await vscode.window.tabGroups.close(tabs());
  });

  it('a request through the broker reaches the upstream with the credential and shows in the tree', async () => {
    const answer = await chat(issued);
    assert.equal(answer.object, 'chat.completion');
    assert.equal(up.received.at(-1)?.headers.authorization, `Bearer ${SECRET}`);
    // Read from the keychain, where it is kept: VS Code's secret storage still holds nothing of it.
    await assert.rejects(api.session.editorSecrets.get('openai'), /not in VS Code's secret storage/);
    await poll(
      treeKeys,
      (ks) => ks.some((k) => k.label === 'vscode test key' && /1\/50/.test(k.description)),
      'the tree to count the call',
    );
  });

  it('a model without a price: its tokens counted, its spend shown as unknown in the tree, not as $0.00', async () => {
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    await client.chat.completions.create({ model: 'no-such-model-vscode', messages: [{ role: 'user', content: 'hi' }] });
    const key = await poll(
      treeKeys,
      (ks) => ks.some((k) => k.label === 'vscode test key' && /2\/50/.test(k.description)),
      'the tree to count the call',
    );
    assert.match(key.find((k) => k.label === 'vscode test key')!.description, /· (<?\$[\d.]+ \+ )?unknown\b/);
  });

  it("the window's own broker keeps the default limits: a 34 MiB body and a browser's request are refused before the upstream", async () => {
    // The same wiring users run (settings → TillConnection → TillService → Broker): a default
    // lost on the way (undefined over the 32 MiB limit) would show here.
    const before = up.received.length + up.rejected.length;
    const url = new URL(issued.baseUrl);
    const answer = (headers: Record<string, string>, sliver: string) =>
      new Promise<{ status: number; text: string }>((resolve, reject) => {
        const req = http.request(
          {
            host: url.hostname,
            port: url.port,
            method: 'POST',
            path: `${url.pathname}/chat/completions`,
            agent: false,
            headers: { 'content-type': 'application/json', authorization: `Bearer ${issued.key}`, ...headers },
          },
          (res) => {
            let text = '';
            res.on('data', (c: Buffer) => (text += c));
            res.on('end', () => {
              req.destroy();
              resolve({ status: res.statusCode ?? 0, text });
            });
          },
        );
        req.on('error', reject);
        req.write(sliver);
      });
    const big = await answer({ 'content-length': String(34 * 1024 * 1024) }, '{"model":"gpt-5-mini","messages":[');
    assert.equal(big.status, 413);
    assert.match(big.text, /over the broker's limit of 33554432/);
    const browser = await answer({ 'content-length': '2', origin: 'https://evil.example' }, '{}');
    assert.equal(browser.status, 403);
    assert.equal(up.received.length + up.rejected.length, before);
  });

  it('a change to till.upstreams applies at once: same broker, same key and base URL, the next request goes to the new upstream', async () => {
    const second = await startOpenAIUpstream({ credential: SECRET });
    const url = api.connection().url;
    const key = await vscode.commands.executeCommand<IssuedKey>(COMMANDS.issueKey, { target: 'openai', uses: 100, label: 'settings key' });
    try {
      await vscode.workspace
        .getConfiguration('till')
        .update('upstreams', { openai: `${second.url}/v1` }, vscode.ConfigurationTarget.Global);
      await poll(
        async () => (await chat(key), second.received.length),
        (n) => n > 0,
        'a request to reach the new upstream',
      );
      assert.equal(api.connection().url, url, 'the broker was restarted');
      assert.equal(second.received.at(-1)?.headers.authorization, `Bearer ${SECRET}`);
    } finally {
      await vscode.workspace.getConfiguration('till').update('upstreams', { openai: `${up.url}/v1` }, vscode.ConfigurationTarget.Global);
      const before = up.received.length;
      await poll(
        async () => (await chat(key), up.received.length),
        (n) => n > before,
        'requests to go to the first upstream again',
      );
      await second.close();
    }
  });

  it('Revoke Key from the tree item: the key ends and the next request is refused', async () => {
    const keys = await api.connection().list();
    const key = keys.find((k) => k.id === issued.id)!;
    const revoked = await vscode.commands.executeCommand<boolean>(COMMANDS.revokeKey, { kind: 'key', key });
    assert.equal(revoked, true);
    await assert.rejects(chat(issued), (err: Error) => /revoked/.test(err.message));
    await poll(
      treeKeys,
      (ks) => ks.some((k) => k.label === 'vscode test key' && k.contextValue === 'till.key.ended'),
      'the key among ended ones',
    );
  });

  it('Issue Key, custom limits: uses, lifetime, rate, models, paths', async () => {
    prompter.answer('Custom…', '7', '30m', '', '', '2.50', 'gpt-5*', '/v1/chat/*', 'custom key');
    const key = await vscode.commands.executeCommand<IssuedKey>(COMMANDS.issueKey);
    assert.equal(key.policy.maxActivations, 7);
    assert.equal(key.policy.maxSpendUsd, 2.5);
    assert.deepEqual(key.policy.models, ['gpt-5*']);
    assert.deepEqual(key.policy.paths, ['/v1/chat/*']);
    assert.ok(key.policy.expiresAt! > Date.now() + 29 * 60_000);
    await chat(key);
    const models = new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries: 0 });
    await assert.rejects(models.embeddings.create({ model: 'gpt-4o', input: 'x' }), (err: Error) => /not allowed/.test(err.message));
  });

  it('an exhausted key is announced with Extend, which raises the limit in place', async () => {
    const key = await vscode.commands.executeCommand<IssuedKey>(COMMANDS.issueKey, { target: 'openai', uses: 1, label: 'extend me' });
    prompter.answer('button:Extend', '+50 calls');
    await chat(key);
    await poll(() => prompter.messages.find((m) => m.includes('"extend me" ran out')), Boolean, 'the exhaustion notification');
    const after = await poll(
      async () => (await api.connection().list()).find((k) => k.id === key.id)!,
      (k) => k.policy.maxActivations === 51,
      'the key to be extended',
    );
    assert.equal(after.state, 'active');
    await chat(key);
  });

  it('new terminals get a till key and the broker URL, never the credential', async () => {
    const env = await keyedTerminalEnv(api, SECRET);
    assert.match(env, new RegExp(`^OPENAI_BASE_URL=${api.connection().url!.replace(/\./g, '\\.')}/openai/v1$`, 'm'));
    const keys = await api.connection().list();
    const terminalKey = keys.find((k) => k.id === api.terminalKeyIds()[0]);
    assert.match(terminalKey?.label ?? '', /^terminals/);
  });

  it("the bundled `till` is on every terminal's PATH: `till ls` shows this window's keys, `till exec -- env` a fresh key revoked at exit", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'till-cli-'));
    const terminal = vscode.window.createTerminal({
      name: 'till command check',
      shellPath: '/bin/sh',
      shellArgs: ['-c', `command -v till > ${dir}/which; till ls > ${dir}/ls 2>&1; till exec -- env > ${dir}/env 2>&1; touch ${dir}/done`],
    });
    try {
      await poll(() => existsSync(join(dir, 'done')), Boolean, 'the terminal to run till', 30_000);
    } finally {
      terminal.dispose();
    }
    assert.match(readFileSync(join(dir, 'which'), 'utf8'), /\/bin\/till$/m);
    const ls = readFileSync(join(dir, 'ls'), 'utf8');
    assert.match(ls, /terminals · /, ls);
    const env = readFileSync(join(dir, 'env'), 'utf8');
    assert.match(env, /^OPENAI_API_KEY=till_/m, env);
    assert.ok(!env.includes(SECRET), 'the credential reached a terminal');
    const execKey = env.match(/^OPENAI_API_KEY=(till_\S+)$/m)![1]!;
    const keys = await api.connection().list();
    const theirs = keys.filter((k) => k.label === 'exec env');
    assert.equal(theirs.length, 1, JSON.stringify(keys.map((k) => k.label)));
    assert.notEqual(theirs[0]!.state, 'active');
    assert.ok(!api.terminalKeyIds().includes(theirs[0]!.id));
    assert.ok(execKey.length > 10);
  });

  it("revoking the terminals' key asks once (a terminal uses it); new terminals then get a fresh key and the old one is marked", async () => {
    const [old] = api.terminalKeyIds();
    assert.ok(old);
    const holder = vscode.window.createTerminal({ name: 'holds the old key', shellPath: '/bin/sh' });
    // VS Code reports an opened terminal a moment after it starts: wait until Till has seen it.
    await poll(
      () => vscode.window.terminals.length === 1 && api.terminalsHolding(old),
      (n) => n === 1,
      "Till to see the terminal open (and the last check's close)",
    );
    const asked = prompter.messages.length;
    prompter.answer('button:Revoke');
    assert.equal(await vscode.commands.executeCommand<boolean>(COMMANDS.revokeKey, old), true);
    const questions = prompter.messages.slice(asked).filter((m) => /^Revoke ".*"\? It is in use by 1 open terminal/.test(m));
    assert.equal(questions.length, 1, prompter.messages.slice(asked).join('\n'));
    assert.ok(
      prompter.messages.slice(asked).some((m) => /^Till: revoked "terminals/.test(m)),
      'no feedback after revoking',
    );
    const [fresh] = await poll(
      () => api.terminalKeyIds(),
      (ids) => ids.length === 1 && ids[0] !== old,
      'a fresh terminal key',
    );
    assert.match(await terminalEnv(), /^OPENAI_API_KEY=till_/m);
    assert.equal((await api.connection().list()).find((k) => k.id === fresh)?.state, 'active');
    assert.deepEqual(api.staleTerminals(), ['holds the old key']);
    await poll(
      () => prompter.messages.slice(asked),
      (ms) => ms.some((m) => /1 open terminal holds the revoked key/.test(m)),
      'the warning about the old terminal',
    );
    holder.dispose();
    await poll(
      () => api.staleTerminals(),
      (names) => names.length === 0,
      'the marked terminal to go',
    );
  });

  it("till.terminal.agents sets new terminals up for the agents their keys serve (Codex: a CODEX_HOME of Till's)", async () => {
    const config = vscode.workspace.getConfiguration('till');
    const agentsDir = join(api.session.paths.home, 'agents');
    const codexConfigs = () =>
      existsSync(agentsDir)
        ? readdirSync(agentsDir)
            .filter((d) => d.startsWith('terminals-'))
            .map((d) => join(agentsDir, d, 'codex', 'config.toml'))
            .filter((f) => existsSync(f))
        : [];
    await config.update('terminal.agents', ['codex', 'aider', 'claude'], vscode.ConfigurationTarget.Global);
    try {
      const [file] = await poll(codexConfigs, (files) => files.length === 1, "Codex's terminal config");
      assert.match(readFileSync(file!, 'utf8'), new RegExp(`^base_url = "${api.connection().url!.replace(/\./g, '\\.')}/openai/v1"$`, 'm'));
      const env = await terminalEnv();
      assert.match(env, new RegExp(`^CODEX_HOME=${join(file!, '..').replace(/\./g, '\\.')}$`, 'm'));
      assert.match(env, /^OPENAI_API_BASE=http:\/\/127\.0\.0\.1:\d+\/openai\/v1$/m); // aider
      assert.doesNotMatch(env, /CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC/); // no anthropic key here: Claude Code is not set up
      assert.ok(!env.includes(SECRET), 'the credential reached a terminal');
    } finally {
      await config.update('terminal.agents', undefined, vscode.ConfigurationTarget.Global);
    }
    await poll(codexConfigs, (files) => files.length === 0, "Codex's terminal folder to be removed");
    assert.doesNotMatch(await terminalEnv(), /^CODEX_HOME=/m);
  });

  it('Open Agent Terminal: fresh keys for that terminal, revoked when it closes', async () => {
    const before = new Set((await api.connection().list()).map((k) => k.id));
    prompter.answer('Plain terminal (all credentials)');
    const terminal = await vscode.commands.executeCommand<vscode.Terminal>(COMMANDS.openAgentTerminal);
    assert.ok(terminal);
    const fresh = (await api.connection().list()).filter((k) => !before.has(k.id));
    assert.equal(fresh.length, 1);
    assert.match(fresh[0]!.label, /^Till agent/);
    assert.ok((terminal.creationOptions as vscode.TerminalOptions).env?.OPENAI_API_KEY?.startsWith('till_'));
    terminal.dispose();
    await poll(
      async () => (await api.connection().list()).find((k) => k.id === fresh[0]!.id)?.state,
      (s) => s === 'revoked',
      'the agent key to be revoked',
    );
  });

  it('Open Agent Terminal for Codex CLI: a CODEX_HOME with a till provider, removed with its key when the terminal closes', async () => {
    const before = new Set((await api.connection().list()).map((k) => k.id));
    const terminal = await vscode.commands.executeCommand<vscode.Terminal>(COMMANDS.openAgentTerminal, { agent: 'codex' });
    assert.ok(terminal);
    const env = (terminal.creationOptions as vscode.TerminalOptions).env ?? {};
    assert.ok(env.OPENAI_API_KEY?.startsWith('till_'));
    const codexHome = env.CODEX_HOME!;
    assert.ok(codexHome.startsWith(join(api.session.paths.home, 'agents')));
    const config = readFileSync(join(codexHome, 'config.toml'), 'utf8');
    assert.match(config, /^model_provider = "till"$/m);
    assert.match(config, /^\[model_providers\.till\]$/m);
    assert.ok(!config.includes(env.OPENAI_API_KEY!));
    const fresh = (await api.connection().list()).filter((k) => !before.has(k.id));
    assert.equal(fresh.length, 1);
    terminal.dispose();
    await poll(
      async () => (await api.connection().list()).find((k) => k.id === fresh[0]!.id)?.state,
      (s) => s === 'revoked',
      'the Codex terminal key to be revoked',
    );
    await poll(
      async () => existsSync(codexHome),
      (exists) => !exists,
      'the Codex folder to be removed',
    );
  });

  it("Add Credential with till.credentials.store = vscode keeps the key in VS Code's secret storage, never in the keychain, and the broker uses it", async () => {
    const config = vscode.workspace.getConfiguration('till');
    await config.update('credentials.store', 'vscode', vscode.ConfigurationTarget.Global);
    try {
      prompter.answer('openai', 'openai-vscode', SECRET);
      const name = await vscode.commands.executeCommand<string>(COMMANDS.addCredential);
      assert.equal(name, 'openai-vscode');
      assert.equal(api.session.credentials.storeOf('openai-vscode'), 'editor');
      assert.match(prompter.messages.at(-1) ?? '', /stored "openai-vscode" \(OpenAI\) in VS Code's secret storage/);
      // Not in the OS keychain: the keychain was never asked to keep it.
      await assert.rejects(
        new KeychainVault({ service: api.session.paths.keychainService }).get('openai-vscode'),
        /not in the OS keychain/,
      );
      // The broker reads it from VS Code's store: the real key reaches the upstream.
      const key = await api.connection().issue({ target: 'openai-vscode', label: 'from secret storage' });
      const answer = await chat(key);
      assert.ok(answer.choices.length > 0);
      // Moved to the keychain when asked (and only then): the same key goes on working.
      prompter.answer('button:Move');
      assert.equal(
        await vscode.commands.executeCommand(COMMANDS.moveCredential, { kind: 'credential', credential: { name: 'openai-vscode' } }),
        'keychain',
      );
      assert.equal(await new KeychainVault({ service: api.session.paths.keychainService }).get('openai-vscode'), SECRET);
      // The move told the broker (it drops its cached secret): the next request reads the keychain.
      assert.ok((await chat(key)).choices.length > 0);
      prompter.answer('button:Move');
      await vscode.commands.executeCommand(COMMANDS.moveCredential, { kind: 'credential', credential: { name: 'openai-vscode' } });
      await assert.rejects(
        new KeychainVault({ service: api.session.paths.keychainService }).get('openai-vscode'),
        /not in the OS keychain/,
      );
      // Remove takes it out of VS Code's store.
      prompter.answer('button:Remove');
      await vscode.commands.executeCommand(COMMANDS.removeCredential, { kind: 'credential', credential: { name: 'openai-vscode' } });
      assert.equal(
        api.session.credentials.all().some((c) => c.name === 'openai-vscode'),
        false,
      );
      assert.match(prompter.messages.at(-1) ?? '', /removed "openai-vscode" from VS Code's secret storage/);
    } finally {
      await config.update('credentials.store', undefined, vscode.ConfigurationTarget.Global);
    }
  });

  it('Revoke All asks first, then ends every key', async () => {
    prompter.answer('button:Revoke All');
    const before = new Set((await api.connection().list()).map((k) => k.id));
    const n = await vscode.commands.executeCommand<number>(COMMANDS.revokeAll);
    assert.ok((n ?? 0) >= 1);
    const live = (await api.connection().list()).filter((k: KeySummary) => k.state === 'active');
    // Every key there was has ended; new terminals get a fresh key (old terminals keep the dead one).
    assert.deepEqual(
      live.filter((k) => before.has(k.id)),
      [],
    );
    assert.ok(
      live.every((k) => k.label.startsWith('terminals')),
      JSON.stringify(live.map((k) => k.label)),
    );
  });

  it('a second real VS Code window shares this broker, and takes it over when this window lets go', async () => {
    // The runner opens another workbench window (its own extension host) on the same machine.
    // Its terminals get a key from the broker this window hosts, and this window's tree shows it.
    const theirs = await openSecondWindow(api);
    assert.equal((await brokerHost(api))?.pid, process.pid);
    assert.equal(api.connection().role, 'host');
    await poll(treeKeys, (ks) => ks.some((k) => k.label === 'terminals · window-two'), "the second window's key in this tree");
    const key = await vscode.commands.executeCommand<IssuedKey>(COMMANDS.issueKey, {
      target: 'openai',
      uses: 3,
      label: 'before the takeover',
    });
    await chat(key);

    // This window lets go: the other window's extension host takes the broker over, from the same ledger.
    await handBrokerOver(api);
    assert.equal(api.connection().role, 'attached');
    const keys = await api.connection().list();
    assert.ok(keys.some((k) => k.id === theirs.id));
    assert.equal(keys.find((k) => k.id === key.id)?.used.activations, 1);
    await chat(key); // served by the other window's broker
    assert.equal((await api.connection().list()).find((k) => k.id === key.id)?.used.activations, 2);
  });

  // Last: it leaves the runner's keychain locked.
  it('a locked keychain (with the keychain chosen): Add Credential asks once; Cancel stores nothing and says how to come back', async () => {
    // As a screen lock or a timeout would.
    execFileSync('gdbus', LOCK_LOGIN_COLLECTION);
    await withKeychainChosen(async () => {
      const said = await cancelledAddCredential(api, prompter, 'anthropic', `sk-ant-REALCRED-locked-${Date.now().toString(36)}`);
      assert.match(said.at(-1)!, /nothing was stored\. Unlock or start your OS keychain/);
    });
  });
});
