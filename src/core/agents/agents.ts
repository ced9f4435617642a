/**
 * Agent CLIs through the broker, unchanged: which credentials each needs, the env vars that
 * point it at Till, and the files it must read (Codex reads its base URL only from
 * `$CODEX_HOME/config.toml`). Facts: ../shared/PROVIDERS.md, "What agent CLIs read".
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { ensurePrivateFolder } from '../files/privateFolder';
import type { IssuedKey } from '../runtime/controlApi';
import { codexConfig } from './codexConfig';
import { geminiSettings } from './geminiSettings';

/** The agent CLIs Till knows how to set up. */
export type AgentName = 'claude' | 'codex' | 'gemini' | 'aider';

/** What an agent needs. */
export interface AgentInfo {
  /** Provider ids whose credentials it uses. */
  providers: string[];
  /** A human name, for pickers and messages. */
  describe: string;
  /** `all`: it needs every provider listed; `any`: at least one (aider works with either). Default `all`. */
  needs?: 'all' | 'any';
  /** Inherited env vars to drop: they would take priority over Till's or send traffic around it. */
  unset?: string[];
}

/** Every agent, by name. */
export const AGENTS: Record<AgentName, AgentInfo> = {
  claude: { providers: ['anthropic'], describe: 'Claude Code', unset: ['ANTHROPIC_AUTH_TOKEN'] },
  codex: { providers: ['openai'], describe: 'Codex CLI', unset: ['CODEX_API_KEY', 'OPENAI_BASE_URL'] },
  gemini: { providers: ['gemini'], describe: 'Gemini CLI', unset: ['GOOGLE_GENAI_USE_VERTEXAI', 'GOOGLE_GENAI_USE_GCA'] },
  aider: { providers: ['openai', 'anthropic'], describe: 'aider', needs: 'any' },
};

/** True when `name` is a known agent. */
export function isAgentName(name: string): name is AgentName {
  return Object.prototype.hasOwnProperty.call(AGENTS, name);
}

/**
 * The credentials to issue keys from for an agent: the first stored credential of each provider
 * it needs. Throws a one-line error naming `till credential add <provider>` when one is missing.
 */
export function agentTargets(agent: AgentName, credentials: { name: string; provider: string }[]): string[] {
  const info = AGENTS[agent];
  const names: string[] = [];
  const missing: string[] = [];
  for (const provider of info.providers) {
    const found = credentials.find((c) => c.provider === provider);
    if (found) names.push(found.name);
    else missing.push(provider);
  }
  if (
    !agentServed(
      agent,
      credentials.map((c) => c.provider),
    )
  ) {
    const wanted = info.needs === 'any' ? info.providers.join(' or ') : missing.join(' and ');
    throw new Error(
      `${info.describe} needs ${/^[aeiou]/.test(wanted) ? 'an' : 'a'} ${wanted} credential: add one with \`till credential add ${missing[0] ?? info.providers[0]}\``,
    );
  }
  return names;
}

/** True when keys for `providers` are enough for the agent (each provider it needs, or any one for aider). */
export function agentServed(agent: AgentName, providers: Iterable<string>): boolean {
  const info = AGENTS[agent];
  const have = new Set(providers);
  return (info.needs ?? 'all') === 'all' ? info.providers.every((p) => have.has(p)) : info.providers.some((p) => have.has(p));
}

function keyFor(keys: IssuedKey[], provider: string): IssuedKey | undefined {
  return keys.find((k) => k.provider === provider);
}

function needKey(agent: AgentName, keys: IssuedKey[], provider: string): IssuedKey {
  const key = keyFor(keys, provider);
  if (!key) throw new Error(`${AGENTS[agent].describe} needs a till key for ${provider}`);
  return key;
}

/**
 * A fresh folder, private to this user, under the data folder's `agents/`: the `scratchDir` of
 * one run of {@link agentSetup}, removed by whoever made it. `prefix` says what it is for.
 */
export function newAgentScratchDir(home: string, prefix = ''): string {
  const dir = join(home, 'agents');
  ensurePrivateFolder(dir, "the agents' folder");
  const scratch = join(dir, prefix + randomBytes(8).toString('hex'));
  mkdirSync(scratch, { mode: 0o700 });
  return scratch;
}

/**
 * Where an agent's own settings are, from the user's environment: Codex's home, and the Gemini
 * CLI system settings file (which overrides every other settings file of Gemini CLI's).
 */
function userSettingsPaths(env: Record<string, string | undefined>): { codexHome: string; geminiSystemSettings: string } {
  const geminiDefault =
    process.platform === 'darwin'
      ? '/Library/Application Support/GeminiCli/settings.json'
      : process.platform === 'win32'
        ? 'C:\\ProgramData\\gemini-cli\\settings.json'
        : '/etc/gemini-cli/settings.json';
  return {
    codexHome: env.CODEX_HOME || join(homedir(), '.codex'),
    geminiSystemSettings: env.GEMINI_CLI_SYSTEM_SETTINGS_PATH || geminiDefault,
  };
}

/**
 * What makes an agent go through the broker unchanged: env vars, and files it must read
 * (Codex's `CODEX_HOME/config.toml`, layered over the user's own; Gemini CLI's system settings,
 * layered over the machine's). Files go in `scratchDir/<agent>`, in a folder Till owns and
 * removes afterwards; nothing else is copied from the user's folders (never Codex's auth.json). `userEnv`
 * (default: this process's) says where the user's own settings are. The env holds till keys
 * only, never a real credential.
 */
export function agentSetup(
  agent: AgentName,
  keys: IssuedKey[],
  options: { scratchDir: string; userEnv?: Record<string, string | undefined> },
): { env: Record<string, string>; files: string[]; warnings: string[] } {
  const env: Record<string, string> = {};
  const files: string[] = [];
  const warnings: string[] = [];
  const paths = userSettingsPaths(options.userEnv ?? process.env);
  const write = (folder: string, name: string, text: string): string => {
    const dir = join(options.scratchDir, folder);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = join(dir, name);
    writeFileSync(file, text, { mode: 0o600 });
    files.push(file);
    return file;
  };
  switch (agent) {
    case 'claude': {
      const k = needKey(agent, keys, 'anthropic');
      Object.assign(env, { ANTHROPIC_API_KEY: k.key, ANTHROPIC_BASE_URL: k.baseUrl, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: '1' });
      break;
    }
    case 'codex': {
      const k = needKey(agent, keys, 'openai');
      const userConfig = join(paths.codexHome, 'config.toml');
      const base = existsSync(userConfig) ? readFileSync(userConfig, 'utf8') : '';
      const file = write('codex', 'config.toml', codexConfig(base, k.baseUrl));
      Object.assign(env, { CODEX_HOME: dirname(file), OPENAI_API_KEY: k.key });
      break;
    }
    case 'gemini': {
      const k = needKey(agent, keys, 'gemini');
      const base = existsSync(paths.geminiSystemSettings) ? readFileSync(paths.geminiSystemSettings, 'utf8') : '';
      const file = write('gemini', 'system-settings.json', geminiSettings(base));
      Object.assign(env, {
        GEMINI_API_KEY: k.key,
        GOOGLE_API_KEY: k.key,
        GOOGLE_GEMINI_BASE_URL: k.baseUrl,
        GEMINI_CLI_SYSTEM_SETTINGS_PATH: file,
      });
      const open = writableByOthers(file);
      if (open)
        warnings.push(
          `Gemini CLI ignores Till's settings under ${open}, which others can write to; it may then refuse the API key ("Invalid auth method selected"): keep Till's data folder (TILL_HOME) out of it`,
        );
      break;
    }
    case 'aider': {
      const openai = keyFor(keys, 'openai');
      const anthropic = keyFor(keys, 'anthropic');
      if (!openai && !anthropic) throw new Error('aider needs a till key for openai or anthropic');
      if (openai) Object.assign(env, { OPENAI_API_KEY: openai.key, OPENAI_API_BASE: openai.baseUrl });
      if (anthropic) Object.assign(env, { ANTHROPIC_API_KEY: anthropic.key, ANTHROPIC_BASE_URL: anthropic.baseUrl });
      break;
    }
  }
  return { env, files, warnings };
}

/** The first folder above `file` that others may write to, if any: Gemini CLI refuses settings files below one. */
function writableByOthers(file: string): string | undefined {
  if (process.platform === 'win32') return undefined;
  for (let dir = dirname(file); ; dir = dirname(dir)) {
    const st = statSync(dir, { throwIfNoEntry: false });
    if (st && (st.mode & 0o022) !== 0) return dir;
    if (dirname(dir) === dir) return undefined;
  }
}
