/**
 * Agent CLIs through Till: the setup each agent gets (env, Codex's layered config.toml), and
 * `till exec --agent …` end to end with the built dist/till.js against a real `till serve`.
 */
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AGENTS, agentServed, agentSetup, agentTargets } from '../src/core/agents/agents';
import { codexConfig } from '../src/core/agents/codexConfig';
import { geminiSettings } from '../src/core/agents/geminiSettings';
import type { KeySummary } from '../src/core/events';
import type { IssuedKey } from '../src/core/runtime/controlApi';
import { addCredential, fakeCredential, runTill, spawnServe, tempHome, type ServeProcess, expectOneLineError } from './support/till';

// ---- a tiny TOML reader: enough to prove structure (tables, dotted keys, duplicates) -----------

type Toml = { [key: string]: unknown };

function splitKey(dotted: string): string[] {
  return [...dotted.matchAll(/[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'/g)].map((m) =>
    m[0].startsWith('"') ? (JSON.parse(m[0]) as string) : m[0].replace(/^'|'$/g, ''),
  );
}

/** Reads one value at `text[i]`; returns it and the index after it. */
function readValue(text: string, i: number): [unknown, number] {
  if (text.startsWith('"""', i)) {
    const end = text.indexOf('"""', i + 3);
    if (end < 0) throw new Error('unterminated """');
    return [text.slice(i + 3, end).replace(/^\n/, ''), end + 3];
  }
  if (text[i] === '"') {
    let j = i + 1;
    while (text[j] !== '"') {
      if (j >= text.length || text[j] === '\n') throw new Error('unterminated string');
      j += text[j] === '\\' ? 2 : 1;
    }
    return [JSON.parse(text.slice(i, j + 1)), j + 1];
  }
  if (text[i] === "'") {
    const end = text.indexOf("'", i + 1);
    return [text.slice(i + 1, end), end + 1];
  }
  if (text[i] === '[' || text[i] === '{') {
    const array = text[i] === '[';
    const close = array ? ']' : '}';
    const items: unknown[] = [];
    const table: Toml = {};
    let j = i + 1;
    for (;;) {
      while (/[\s,]/.test(text[j] ?? '') || text[j] === '#') {
        if (text[j] === '#') j = text.indexOf('\n', j);
        else j++;
      }
      if (text[j] === close) return [array ? items : table, j + 1];
      if (array) {
        const [v, next] = readValue(text, j);
        items.push(v);
        j = next;
      } else {
        const eq = text.indexOf('=', j);
        const [v, next] = readValue(text, skipSpace(text, eq + 1));
        assign(table, splitKey(text.slice(j, eq)), v);
        j = next;
      }
      if (j >= text.length) throw new Error('unterminated array or inline table');
    }
  }
  const m = /^(true|false|-?\d+(?:\.\d+)?)/.exec(text.slice(i));
  if (!m) throw new Error(`bad value at: ${text.slice(i, i + 20)}`);
  return [m[1] === 'true' ? true : m[1] === 'false' ? false : Number(m[1]), i + m[1]!.length];
}

function skipSpace(text: string, i: number): number {
  while (text[i] === ' ' || text[i] === '\t') i++;
  return i;
}

function assign(target: Toml, path: string[], value: unknown): void {
  let t = target;
  for (const part of path.slice(0, -1)) t = (t[part] ??= {}) as Toml;
  const last = path.at(-1)!;
  if (last in t) throw new Error(`duplicate key ${path.join('.')}`);
  t[last] = value;
}

/** Parses the subset of TOML the configs here use; throws on duplicate keys or tables. */
function parseToml(text: string): Toml {
  const root: Toml = {};
  let table = root;
  const seen = new Set<string>();
  let i = 0;
  while (i < text.length) {
    i = skipSpace(text, i);
    if (text[i] === '\n') {
      i++;
      continue;
    }
    if (text[i] === '#') {
      i = text.indexOf('\n', i) + 1 || text.length;
      continue;
    }
    const eol = text.indexOf('\n', i) < 0 ? text.length : text.indexOf('\n', i);
    if (text[i] === '[') {
      const name = text.slice(i + 1, text.indexOf(']', i)).trim();
      if (seen.has(name)) throw new Error(`table [${name}] defined twice`);
      seen.add(name);
      table = root;
      for (const part of splitKey(name)) table = (table[part] ??= {}) as Toml;
      i = eol + 1;
      continue;
    }
    const eq = text.indexOf('=', i);
    if (eq < 0 || eq > eol) throw new Error(`not a key line: ${text.slice(i, eol)}`);
    const [value, next] = readValue(text, skipSpace(text, eq + 1));
    assign(table, splitKey(text.slice(i, eq)), value);
    i = skipSpace(text, next);
    if (text[i] === '#') i = text.indexOf('\n', i) < 0 ? text.length : text.indexOf('\n', i);
    if (i < text.length && text[i] !== '\n') throw new Error(`junk after value: ${text.slice(i, i + 20)}`);
  }
  return root;
}

// ---- fixtures ----------------------------------------------------------------------------

const USER_CONFIG = `# my codex settings
model = "gpt-5-codex"
model_provider = "azure"
approval_policy = "on-request"
notify = [
  "notify-send",
  "[codex] done",
]
instructions = """
Be brief.
[not_a_table]
model_provider = "inside a string"
"""

[model_providers.azure]
name = "Azure"
base_url = "https://example.openai.azure.com/openai"
env_key = "AZURE_OPENAI_API_KEY"

[model_providers.till]
name = "an old till"
base_url = "http://127.0.0.1:1/old"

[analytics]
enabled = true # on
endpoint = "https://example.com/collect"

[features]
plugins = true
web_search = true

[profiles.fast]
model = "gpt-5-mini"
model_provider = "azure"

[mcp_servers.docs]
command = "npx"
args = ["-y", "docs-mcp"]
env = { "TOKEN_FILE" = "/tmp/x" }
`;

const BASE = 'http://127.0.0.1:8455/openai/v1';

function fakeKey(provider: string, baseUrl: string): IssuedKey {
  return { id: `k_${provider}`, key: `till_fake_${provider}`, provider, credential: provider, label: 'x', baseUrl, env: {}, policy: {} };
}

describe('codexConfig: Till layered over the user config.toml', () => {
  it('sets the till provider and keeps every other user setting', () => {
    const text = codexConfig(USER_CONFIG, BASE);
    const toml = parseToml(text);
    expect(toml).toMatchObject({
      model: 'gpt-5-codex',
      model_provider: 'till',
      approval_policy: 'on-request',
      notify: ['notify-send', '[codex] done'],
      model_providers: {
        azure: { name: 'Azure', base_url: 'https://example.openai.azure.com/openai', env_key: 'AZURE_OPENAI_API_KEY' },
        till: { name: 'Till', base_url: BASE, env_key: 'OPENAI_API_KEY', wire_api: 'responses', supports_websockets: true },
      },
      analytics: { enabled: false, endpoint: 'https://example.com/collect' },
      features: { plugins: false, web_search: true },
      profiles: { fast: { model: 'gpt-5-mini', model_provider: 'till' } },
      mcp_servers: { docs: { command: 'npx', args: ['-y', 'docs-mcp'], env: { TOKEN_FILE: '/tmp/x' } } },
    });
    expect(toml.instructions).toBe('Be brief.\n[not_a_table]\nmodel_provider = "inside a string"\n');
    // The user's own till provider is gone, not merged.
    expect(Object.keys((toml.model_providers as Toml).till as Toml).sort()).toEqual([
      'base_url',
      'env_key',
      'name',
      'supports_websockets',
      'wire_api',
    ]);
    expect(text).not.toContain('an old till');
    expect(text.match(/^model_provider = "till"$/gm)).toHaveLength(2); // top level and the profile; the one inside a string is untouched
    // Top-level keys stay before the first table header.
    expect(text.indexOf('model_provider = "till"')).toBeLessThan(text.indexOf('['));
    expect(text).toContain('# my codex settings');
  });

  it('works with no user config, and appends tables the user has not got', () => {
    const toml = parseToml(codexConfig('', BASE));
    expect(toml).toEqual({
      model_provider: 'till',
      analytics: { enabled: false },
      features: { plugins: false },
      model_providers: {
        till: { name: 'Till', base_url: BASE, env_key: 'OPENAI_API_KEY', wire_api: 'responses', supports_websockets: true },
      },
    });
    const onlyTop = parseToml(codexConfig('# hi\nmodel = "o3"\n', BASE));
    expect(onlyTop).toMatchObject({ model: 'o3', model_provider: 'till', analytics: { enabled: false } });
  });

  it('uses dotted keys where the user does, so no table is defined twice', () => {
    const toml = parseToml(
      codexConfig(
        'analytics.enabled = true\nfeatures.web_search = true\nmodel_providers.till.base_url = "http://evil"\n[tui]\nnotifications = true\n',
        BASE,
      ),
    );
    expect(toml).toMatchObject({
      analytics: { enabled: false },
      features: { plugins: false, web_search: true },
      tui: { notifications: true },
    });
    expect((toml.model_providers as Toml).till).toMatchObject({ base_url: BASE });
  });
});

describe('agentSetup', () => {
  it('claude and aider get env vars only; codex a CODEX_HOME with config.toml; gemini its system settings', () => {
    const scratchDir = tempHome();
    const userCodexHome = join(tempHome(), 'codex');
    mkdirSync(userCodexHome);
    writeFileSync(join(userCodexHome, 'config.toml'), USER_CONFIG);
    writeFileSync(join(userCodexHome, 'auth.json'), '{"OPENAI_API_KEY":"user-own-auth"}');
    const keys = [
      fakeKey('openai', BASE),
      fakeKey('anthropic', 'http://127.0.0.1:8455/anthropic'),
      fakeKey('gemini', 'http://127.0.0.1:8455/gemini'),
    ];

    expect(agentSetup('claude', keys, { scratchDir }).env).toEqual({
      ANTHROPIC_API_KEY: 'till_fake_anthropic',
      ANTHROPIC_BASE_URL: 'http://127.0.0.1:8455/anthropic',
      CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: '1',
    });
    const systemSettings = join(tempHome(), 'system-settings.json');
    writeFileSync(
      systemSettings,
      '{ "ui": { "theme": "GitHub" }, // the admin\'s\n "security": { "auth": { "selectedType": "oauth-personal" } } }',
    );
    const gemini = agentSetup('gemini', keys, { scratchDir, userEnv: { GEMINI_CLI_SYSTEM_SETTINGS_PATH: systemSettings } });
    const settingsFile = join(scratchDir, 'gemini', 'system-settings.json');
    expect(gemini.env).toEqual({
      GEMINI_API_KEY: 'till_fake_gemini',
      GOOGLE_API_KEY: 'till_fake_gemini',
      GOOGLE_GEMINI_BASE_URL: 'http://127.0.0.1:8455/gemini',
      GEMINI_CLI_SYSTEM_SETTINGS_PATH: settingsFile,
    });
    expect(JSON.parse(readFileSync(settingsFile, 'utf8'))).toEqual({
      ui: { theme: 'GitHub' },
      security: { auth: { selectedType: 'gemini-api-key' } },
      privacy: { usageStatisticsEnabled: false },
    });
    expect(agentSetup('claude', keys, { scratchDir }).warnings).toEqual([]);
    // Gemini CLI skips a settings file below a folder others can write to: Till says so.
    const shared = join(scratchDir, 'shared');
    mkdirSync(shared);
    chmodSync(shared, 0o777);
    expect(agentSetup('gemini', keys, { scratchDir: join(shared, 'run') }).warnings).toEqual([
      `Gemini CLI ignores Till's settings under ${shared}, which others can write to; it may then refuse the API key ("Invalid auth method selected"): keep Till's data folder (TILL_HOME) out of it`,
    ]);
    expect(agentSetup('aider', [keys[1]!], { scratchDir }).env).toEqual({
      ANTHROPIC_API_KEY: 'till_fake_anthropic',
      ANTHROPIC_BASE_URL: 'http://127.0.0.1:8455/anthropic',
    });
    expect(agentSetup('aider', keys, { scratchDir }).env).toMatchObject({ OPENAI_API_KEY: 'till_fake_openai', OPENAI_API_BASE: BASE });

    const codex = agentSetup('codex', keys, { scratchDir, userEnv: { CODEX_HOME: userCodexHome } });
    expect(codex.env).toEqual({ CODEX_HOME: join(scratchDir, 'codex'), OPENAI_API_KEY: 'till_fake_openai' });
    expect(codex.files).toEqual([join(scratchDir, 'codex', 'config.toml')]);
    expect(readdirSync(join(scratchDir, 'codex'))).toEqual(['config.toml']); // never auth.json
    expect(() => agentSetup('claude', [keys[0]!], { scratchDir })).toThrow(/Claude Code needs a till key for anthropic/);
  });

  it('agentTargets picks one credential per provider and names the missing one', () => {
    const creds = [
      { name: 'work', provider: 'openai' },
      { name: 'other', provider: 'openai' },
      { name: 'anthropic', provider: 'anthropic' },
    ];
    expect(agentTargets('codex', creds)).toEqual(['work']);
    expect(agentTargets('aider', creds)).toEqual(['work', 'anthropic']);
    expect(agentTargets('aider', [creds[2]!])).toEqual(['anthropic']);
    expect(() => agentTargets('gemini', creds)).toThrow('Gemini CLI needs a gemini credential: add one with `till credential add gemini`');
    expect(() => agentTargets('aider', [])).toThrow(/aider needs an openai or anthropic credential/);
    expect(Object.keys(AGENTS)).toEqual(['claude', 'codex', 'gemini', 'aider']);
  });

  it("geminiSettings: API-key auth and no usage statistics over the machine's settings, whatever they hold", () => {
    const ours = { security: { auth: { selectedType: 'gemini-api-key' } }, privacy: { usageStatisticsEnabled: false } };
    expect(JSON.parse(geminiSettings(''))).toEqual(ours);
    expect(JSON.parse(geminiSettings('not json {'))).toEqual(ours);
    expect(JSON.parse(geminiSettings('[1, 2]'))).toEqual(ours);
    expect(JSON.parse(geminiSettings('{"security": "odd", "privacy": {"usageStatisticsEnabled": true, "x": 1}}'))).toEqual({
      ...ours,
      privacy: { usageStatisticsEnabled: false, x: 1 },
    });
    // A URL in a string is not a comment.
    expect(JSON.parse(geminiSettings('{"a": "http://x/*y*/", /* c */ "b": 2}'))).toMatchObject({ a: 'http://x/*y*/', b: 2 });
    expect(
      JSON.parse(geminiSettings('{"security": {"auth": {"useExternal": true, "enforcedType": "gemini-api-key"}}}')).security.auth,
    ).toEqual({ selectedType: 'gemini-api-key', enforcedType: 'gemini-api-key' });
  });

  it('agentServed: which agents a set of providers can serve (terminals set up only those)', () => {
    expect(agentServed('claude', ['openai'])).toBe(false);
    expect(agentServed('claude', ['openai', 'anthropic'])).toBe(true);
    expect(agentServed('aider', ['anthropic'])).toBe(true);
    expect(agentServed('aider', ['gemini'])).toBe(false);
    expect(agentServed('codex', new Set(['openai']).keys())).toBe(true);
  });
});

// ---- till exec --agent, end to end -------------------------------------------------------

describe('till exec --agent', () => {
  let home: string;
  let serve: ServeProcess;
  const secrets = { openai: fakeCredential('agents-openai'), anthropic: fakeCredential('agents-anthropic') };

  beforeAll(async () => {
    home = tempHome();
    await addCredential(home, 'openai', 'openai', secrets.openai);
    await addCredential(home, 'anthropic', 'anthropic', secrets.anthropic);
    serve = await spawnServe(home);
  });
  afterAll(async () => {
    await serve?.stop();
  });

  async function keys(): Promise<KeySummary[]> {
    return JSON.parse((await runTill(['ls', '--json'], { home })).stdout) as KeySummary[];
  }

  it('codex: a CODEX_HOME with the layered config and a till key, removed afterwards with the key revoked', async () => {
    const userCodexHome = join(tempHome(), 'codex');
    mkdirSync(userCodexHome);
    writeFileSync(join(userCodexHome, 'config.toml'), USER_CONFIG);
    writeFileSync(join(userCodexHome, 'auth.json'), '{"OPENAI_API_KEY":"user-own-auth"}');
    const script = `
      const fs = require('fs'), path = require('path');
      const h = process.env.CODEX_HOME;
      console.log(JSON.stringify({ home: h, files: fs.readdirSync(h), config: fs.readFileSync(path.join(h, 'config.toml'), 'utf8'), key: process.env.OPENAI_API_KEY, codexApiKey: process.env.CODEX_API_KEY ?? null, mode: fs.statSync(path.dirname(h)).mode & 0o777 }));`;
    const r = await runTill(['exec', '--agent', 'codex', '--uses', '3', '--label', 'codex agent', '--', process.execPath, '-e', script], {
      home,
      env: { CODEX_HOME: userCodexHome, CODEX_API_KEY: 'should-not-pass' },
    });
    expect(r.code, r.stderr).toBe(0);
    const seen = JSON.parse(r.stdout.trim()) as {
      home: string;
      files: string[];
      config: string;
      key: string;
      codexApiKey: string | null;
      mode: number;
    };
    expect(seen.home.startsWith(join(home, 'agents') + '/')).toBe(true);
    expect(seen.files).toEqual(['config.toml']);
    expect(seen.mode).toBe(0o700);
    expect(seen.key).toMatch(/^till_/);
    expect(seen.codexApiKey).toBeNull();
    const toml = parseToml(seen.config);
    expect(toml).toMatchObject({
      model: 'gpt-5-codex',
      model_provider: 'till',
      model_providers: { till: { base_url: `${serve.url}/openai/v1`, env_key: 'OPENAI_API_KEY', supports_websockets: true } },
    });
    for (const secret of [secrets.openai, seen.key, 'user-own-auth']) expect(seen.config).not.toContain(secret);
    expect(existsSync(seen.home)).toBe(false);
    expect(readdirSync(join(home, 'agents'))).toEqual([]);
    expect((await keys()).filter((k) => k.label === 'codex agent').map((k) => [k.provider, k.state, k.policy.maxActivations])).toEqual([
      ['openai', 'revoked', 3],
    ]);
  });

  it('claude: the anthropic vars and no traffic around the broker; the folder is removed even when the command fails', async () => {
    const script = `console.log(JSON.stringify({ key: process.env.ANTHROPIC_API_KEY, base: process.env.ANTHROPIC_BASE_URL, quiet: process.env.CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC, token: process.env.ANTHROPIC_AUTH_TOKEN ?? null })); process.exit(3);`;
    const r = await runTill(['exec', '--agent', 'claude', '--label', 'claude agent', '--', process.execPath, '-e', script], {
      home,
      env: { ANTHROPIC_AUTH_TOKEN: 'should-not-pass' },
    });
    expect(r.code, r.stderr).toBe(3);
    const seen = JSON.parse(r.stdout.trim()) as Record<string, string | null>;
    expect(seen).toMatchObject({ base: `${serve.url}/anthropic`, quiet: '1', token: null });
    expect(seen.key).toMatch(/^till_/);
    expect(readdirSync(join(home, 'agents'))).toEqual([]);
    expect((await keys()).filter((k) => k.label === 'claude agent').map((k) => [k.provider, k.state])).toEqual([['anthropic', 'revoked']]);
  });

  it('a missing credential or an unknown agent is a one-line error', async () => {
    expectOneLineError(
      await runTill(['exec', '--agent', 'gemini', '--', process.execPath, '-e', ''], { home }),
      1,
      /Gemini CLI needs a gemini credential: add one with `till credential add gemini`$/,
    );
    expectOneLineError(
      await runTill(['exec', '--agent', 'cursor', '--', 'true'], { home }),
      2,
      /unknown agent "cursor": use claude, codex, gemini, aider/,
    );
    expectOneLineError(
      await runTill(['exec', '--agent', 'codex', 'openai', '--', 'true'], { home }),
      2,
      /--agent picks the credentials itself/,
    );
    const help = await runTill(['exec', '--help'], { home });
    expect(help.stdout).toMatch(/--agent <claude\|codex\|gemini\|aider>/);
  });
});
