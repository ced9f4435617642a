/**
 * Till where the extension host's machine has no OS keychain (no D-Bus session, no Secret
 * Service), as in a dev container: run by `node dist/test/run.js --no-keychain`. The real key is
 * kept by VS Code's secret storage on the client side (here, the browser), and a scan of the
 * server side finds it nowhere: not in code-server's data, Till's data folder, HOME, temp files,
 * code-server's log or a terminal's environment.
 */
import * as assert from 'node:assert/strict';
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'mocha';
import OpenAI from 'openai';
import * as vscode from 'vscode';
import { KeychainVault } from '../../../src/core/credentials/vault';
import { COMMANDS } from '../../../src/vscode/constants';
import type { TillApi } from '../../../src/vscode/extension';
import type { Upstream } from '../../support/upstreams';
import {
  cancelledAddCredential,
  handBrokerOver,
  keyedTerminalEnv,
  openSecondWindow,
  ScriptedPrompter,
  startTill,
  terminalEnv,
  withKeychainChosen,
} from './helpers';

const SECRET = `sk-REALCRED-nokeychain-${Date.now().toString(36)}`;

/** Files under `root` holding `needle`, leaving out `skip` (folder names). */
function filesHolding(root: string, needle: string, skip: Set<string>): string[] {
  const found: string[] = [];
  const bytes = Buffer.from(needle);
  const walk = (dir: string) => {
    let entries: string[];
    try {
      entries = readdirSync(dir);
    } catch {
      return; // gone meanwhile, or a socket's folder
    }
    for (const name of entries) {
      if (skip.has(name)) continue;
      const path = join(dir, name);
      let info;
      try {
        info = statSync(path);
      } catch {
        continue;
      }
      if (info.isDirectory()) walk(path);
      else if (info.isFile() && info.size < 64 * 1024 * 1024 && readFileSync(path).includes(bytes)) found.push(path);
    }
  };
  walk(root);
  return found;
}

describe('Till on a server with no OS keychain (a dev container)', function () {
  this.timeout(60_000);
  let api: TillApi;
  let up: Upstream;
  const prompter = new ScriptedPrompter();

  before(async () => {
    ({ api, up } = await startTill(prompter, SECRET));
  });

  after(async () => {
    await up?.close();
  });

  it('has no keychain to use: the keychain store fails at once', async () => {
    await assert.rejects(new KeychainVault({ service: api.session.paths.keychainService }).get('probe'), /no OS keychain is reachable/);
  });

  it("Add Credential keeps the key in VS Code's secret storage, without a question, and says where", async () => {
    prompter.answer('openai', SECRET);
    const name = await vscode.commands.executeCommand<string>(COMMANDS.addCredential);
    assert.equal(name, 'openai');
    assert.equal(api.session.credentials.storeOf('openai'), 'editor');
    assert.ok(!prompter.messages.some((m) => /cannot keep/.test(m) && /Use VS Code/.test(m)), 'it asked');
    assert.match(prompter.messages.at(-1) ?? '', /stored "openai" \(OpenAI\) in VS Code's secret storage/);
    await api.ready();
    assert.equal(api.connection().role, 'host');
    // What the status bar's tooltip and the Usage view say: where the broker runs, where the keys are.
    assert.match(
      api.session.placement(),
      /runs in this window, on the remote \(.+\)\. Real keys: in VS Code's secret storage \(this browser's storage/,
    );
  });

  it('terminals get till keys; a request through the broker reaches the upstream with the real key; revoke ends the key', async () => {
    await keyedTerminalEnv(api, SECRET);
    const key = await api.connection().issue({ target: 'openai', label: 'container agent' });
    const client = new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries: 0 });
    const answer = await client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }] });
    assert.ok(answer.choices.length > 0);
    assert.equal(await api.connection().revoke(key.id), true);
    await assert.rejects(
      client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }] }),
      (err: { status?: number }) => err.status === 401 || err.status === 403,
    );
  });

  it("a second window on the same remote shares the broker, and serves with the key from VS Code's store when it takes over", async () => {
    // The other window attaches: its terminals get a key from this window's broker.
    await openSecondWindow(api);
    const key = await api.connection().issue({ target: 'openai', label: 'before the takeover' });
    const client = new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries: 0 });
    const ask = () => client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }] });
    await ask();
    // This window lets go; the other hosts, reading the real key from its own extension host's
    // view of VS Code's secret storage (nothing cached there yet).
    await handBrokerOver(api);
    assert.equal(api.connection().role, 'attached');
    assert.ok((await ask()).choices.length > 0);
  });

  it('the real key is nowhere on the server side', async () => {
    // The runner's sandbox holds everything the server writes (HOME, code-server's user data and
    // extensions, Till's data folder, TMPDIR, code-server's log); the browser's profile is the
    // client side, where VS Code keeps the secret (encrypted), as a desktop keeps it on your machine.
    const sandbox = dirname(homedir());
    assert.ok(process.env.TILL_HOME?.startsWith(sandbox), `Till's data folder ${process.env.TILL_HOME} is outside ${sandbox}`);
    // The scan finds a file that holds it (a control), then none.
    const control = join(tmpdir(), 'scan-control.txt');
    writeFileSync(control, `x${SECRET}x`);
    assert.deepEqual(filesHolding(sandbox, SECRET, new Set(['chromium-profile'])), [control]);
    rmSync(control);
    assert.deepEqual(filesHolding(sandbox, SECRET, new Set(['chromium-profile'])), []);
    assert.ok(!(await terminalEnv()).includes(SECRET));
  });

  it("with till.credentials.store set to keychain, a keychain that cannot keep the key asks once: Cancel stores nothing and says how to come back; VS Code's storage then keeps it", async () => {
    const other = `sk-ant-REALCRED-asked-${Date.now().toString(36)}`;
    await withKeychainChosen(async () => {
      const said = await cancelledAddCredential(api, prompter, 'anthropic', other);
      assert.match(
        said.find((m) => /cannot keep/.test(m))!,
        /VS Code's secret storage can/,
      );
      assert.match(said.at(-1)!, /nothing was stored.*"Till: Add Credential" again/);
      const setting = () => vscode.workspace.getConfiguration('till').inspect('credentials.store')?.globalValue;
      assert.equal(setting(), 'keychain');
      // Asked again, and this time VS Code's secret storage is chosen.
      prompter.answer('anthropic', other, "button:Use VS Code's Secret Storage");
      assert.equal(await vscode.commands.executeCommand<string>(COMMANDS.addCredential), 'anthropic');
      assert.equal(api.session.credentials.storeOf('anthropic'), 'editor');
      assert.equal(setting(), 'vscode');
      assert.ok(!(await terminalEnv()).includes(other));
    });
  });
});
