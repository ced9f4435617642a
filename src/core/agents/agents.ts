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
import type { IssuedKey } from '../runtime/service';

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

// ---- Gemini CLI settings ---------------------------------------------------------------------

/**
 * Gemini CLI's system settings for a run through Till: the machine's own (`systemJson`, JSON
 * with comments allowed; unreadable ones are left out) with API-key auth chosen, since with
 * `GOOGLE_GEMINI_BASE_URL` set and no auth chosen Gemini CLI picks a "gateway" auth it then
 * refuses, and a Google login would go around the broker; and usage statistics off, which Gemini
 * CLI otherwise sends to play.googleapis.com.
 */
export function geminiSettings(systemJson: string): string {
  let settings: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(stripJsonComments(systemJson || '{}'));
    if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) settings = parsed as Record<string, unknown>;
  } catch {
    // An unreadable file is one Gemini CLI cannot use either.
  }
  const section = (parent: Record<string, unknown>, name: string): Record<string, unknown> => {
    const value = parent[name];
    if (value !== null && typeof value === 'object' && !Array.isArray(value)) return value as Record<string, unknown>;
    return (parent[name] = {});
  };
  const auth = section(section(settings, 'security'), 'auth');
  auth.selectedType = 'gemini-api-key';
  delete auth.useExternal;
  section(settings, 'privacy').usageStatisticsEnabled = false;
  return JSON.stringify(settings, null, 2) + '\n';
}

/** JSON with `//` and `/* *\/` comments, as Gemini CLI reads its settings, made plain JSON. */
function stripJsonComments(text: string): string {
  return text.replace(/("(?:[^"\\]|\\.)*")|\/\/[^\n]*|\/\*[\s\S]*?\*\//g, (_match, string: string | undefined) => string ?? '');
}

// ---- config.toml, edited line by line -------------------------------------------------------

/** One statement of a TOML file: a table header, a key (with its continuation lines), or other (blank, comment). */
interface Statement {
  kind: 'header' | 'key' | 'other';
  lines: string[];
  /** Table name for headers, dotted key for keys; quotes and spaces around dots removed. */
  name?: string;
}

interface Section {
  /** Undefined for the top level (before the first header). */
  table?: string;
  header?: Statement;
  body: Statement[];
}

const BARE_OR_QUOTED = String.raw`(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')`;
const KEY_RE = new RegExp(String.raw`^\s*(${BARE_OR_QUOTED}(?:\s*\.\s*${BARE_OR_QUOTED})*)\s*=`);
const HEADER_RE = new RegExp(String.raw`^\s*\[(\[?)\s*(${BARE_OR_QUOTED}(?:\s*\.\s*${BARE_OR_QUOTED})*)\s*\]\1\s*(?:#.*)?$`);

function normalizeName(dotted: string): string {
  const parts: string[] = [];
  const re = new RegExp(BARE_OR_QUOTED, 'g');
  for (const m of dotted.matchAll(re)) {
    const p = m[0];
    parts.push(p.startsWith('"') ? (JSON.parse(p) as string) : p.startsWith("'") ? p.slice(1, -1) : p);
  }
  return parts.join('.');
}

/** Scanner state carried across lines: open multi-line string, bracket/brace depth. */
interface ScanState {
  string?: '"""' | "'''";
  depth: number;
}

/** Advances the state over one line (strings, comments, brackets). */
function scanLine(line: string, state: ScanState): void {
  let i = 0;
  while (i < line.length) {
    if (state.string) {
      const end = line.indexOf(state.string, i);
      if (state.string === '"""') {
        // Skip escaped characters inside basic multi-line strings.
        let j = i;
        let found = -1;
        while (j < line.length) {
          if (line[j] === '\\') j += 2;
          else if (line.startsWith('"""', j)) {
            found = j;
            break;
          } else j++;
        }
        if (found < 0) return;
        i = found + 3;
        while (line[i] === '"') i++; // up to two quotes may close with the delimiter
      } else {
        if (end < 0) return;
        i = end + 3;
        while (line[i] === "'") i++;
      }
      state.string = undefined;
      continue;
    }
    const c = line[i]!;
    if (c === '#') return;
    if (line.startsWith('"""', i) || line.startsWith("'''", i)) {
      state.string = line.startsWith('"""', i) ? '"""' : "'''";
      i += 3;
      continue;
    }
    if (c === '"') {
      i++;
      while (i < line.length && line[i] !== '"') i += line[i] === '\\' ? 2 : 1;
      i++;
      continue;
    }
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      i = end < 0 ? line.length : end + 1;
      continue;
    }
    if (c === '[' || c === '{') state.depth++;
    else if ((c === ']' || c === '}') && state.depth > 0) state.depth--;
    i++;
  }
}

/** Splits a TOML text into sections of statements; multi-line values stay with their key. */
function parseSections(text: string): Section[] {
  const lines = text.replace(/\r\n/g, '\n').split('\n');
  if (lines.at(-1) === '') lines.pop();
  const sections: Section[] = [{ body: [] }];
  const state: ScanState = { depth: 0 };
  let current: Statement | undefined;
  for (const line of lines) {
    if (current && (state.string || state.depth > 0)) {
      current.lines.push(line);
      scanLine(line, state);
      continue;
    }
    const header = HEADER_RE.exec(line);
    if (header) {
      const stmt: Statement = { kind: 'header', lines: [line], name: normalizeName(header[2]!) };
      sections.push({ table: stmt.name, header: stmt, body: [] });
      current = stmt;
      continue;
    }
    const key = KEY_RE.exec(line);
    current = key ? { kind: 'key', lines: [line], name: normalizeName(key[1]!) } : { kind: 'other', lines: [line] };
    sections.at(-1)!.body.push(current);
    scanLine(line, state);
  }
  return sections;
}

function render(sections: Section[]): string {
  const out: string[] = [];
  for (const s of sections) {
    if (s.header) out.push(...s.header.lines);
    for (const st of s.body) out.push(...st.lines);
  }
  return out.join('\n') + '\n';
}

function trimTrailingBlank(body: Statement[]): void {
  while (body.length > 0 && body.at(-1)!.kind === 'other' && body.at(-1)!.lines.join('').trim() === '') body.pop();
}

/** Sets `key = value` in a section: replaces the key's statement if present, else appends. */
function setIn(section: Section, key: string, value: string): void {
  const line = `${key} = ${value}`;
  const at = section.body.findIndex((st) => st.kind === 'key' && st.name === key);
  if (at >= 0) {
    section.body[at] = { kind: 'key', lines: [line], name: key };
    section.body = section.body.filter((st, i) => i <= at || !(st.kind === 'key' && st.name === key));
    return;
  }
  trimTrailingBlank(section.body);
  section.body.push({ kind: 'key', lines: [line], name: key });
  section.body.push({ kind: 'other', lines: [''] });
}

/** Sets `table.key = value`: in `[table]` if the file has it, as a dotted key if the top level uses `table.`, else in a new table at the end. */
function setTableKey(sections: Section[], table: string, key: string, value: string): void {
  const existing = sections.find((s) => s.table === table && s.header && !s.header.lines[0]!.trim().startsWith('[['));
  if (existing) return setIn(existing, key, value);
  const top = sections[0]!;
  if (top.body.some((st) => st.kind === 'key' && st.name!.startsWith(`${table}.`))) return setIn(top, `${table}.${key}`, value);
  const header = `[${table}]`;
  const last = sections.at(-1)!;
  trimTrailingBlank(last.body);
  if (sections.length > 1 || last.body.length > 0) last.body.push({ kind: 'other', lines: [''] });
  sections.push({
    table,
    header: { kind: 'header', lines: [header], name: table },
    body: [{ kind: 'key', lines: [`${key} = ${value}`], name: key }],
  });
}

/** TOML basic string (JSON's escapes are valid TOML for these values). */
function tomlString(value: string): string {
  return JSON.stringify(value);
}

/**
 * The user's Codex config.toml with Till layered on: `model_provider = "till"` (also in every
 * profile that names a provider), a `[model_providers.till]` pointing at the broker, analytics and
 * plugins off. Everything else the user set stays. Any existing `till` provider is replaced.
 */
export function codexConfig(userToml: string, baseUrl: string): string {
  let sections = parseSections(userToml);
  const isTill = (name: string | undefined) => name === 'model_providers.till' || Boolean(name?.startsWith('model_providers.till.'));
  // Drop the user's own "till" provider, however written.
  sections = sections.filter((s) => !isTill(s.table));
  for (const s of sections) {
    s.body = s.body.filter((st) => {
      if (st.kind !== 'key') return true;
      const full = s.table ? `${s.table}.${st.name}` : st.name!;
      return !isTill(full) && full !== 'model_providers.till';
    });
  }
  const top = sections[0]!;
  const provider = `model_provider = ${tomlString('till')}`;
  if (top.body.some((st) => st.kind === 'key' && st.name === 'model_provider')) setIn(top, 'model_provider', tomlString('till'));
  else {
    // Top-level keys stay before the first table header: after the leading comment block, if any.
    const firstKey = top.body.findIndex((st) => st.kind === 'key');
    const insertAt = firstKey >= 0 ? firstKey : top.body.length;
    top.body.splice(insertAt, 0, { kind: 'key', lines: [provider], name: 'model_provider' });
    if (insertAt === top.body.length - 1 && sections.length > 1) top.body.push({ kind: 'other', lines: [''] });
  }
  // A profile that names its own provider would go around the broker.
  for (const s of sections) {
    if (!s.table?.startsWith('profiles.')) continue;
    for (const st of s.body) if (st.kind === 'key' && st.name === 'model_provider') st.lines = [provider];
  }
  for (const st of top.body) {
    if (st.kind === 'key' && /^profiles\.[^]+\.model_provider$/.test(st.name!))
      st.lines = [`${st.lines[0]!.split('=')[0]!.trimEnd()} = ${tomlString('till')}`];
  }
  setTableKey(sections, 'analytics', 'enabled', 'false');
  setTableKey(sections, 'features', 'plugins', 'false');
  const last = sections.at(-1)!;
  trimTrailingBlank(last.body);
  last.body.push({ kind: 'other', lines: [''] });
  sections.push({
    table: 'model_providers.till',
    header: { kind: 'header', lines: ['[model_providers.till]'], name: 'model_providers.till' },
    body: [
      `name = ${tomlString('Till')}`,
      `base_url = ${tomlString(baseUrl)}`,
      `env_key = ${tomlString('OPENAI_API_KEY')}`,
      `wire_api = ${tomlString('responses')}`,
      'supports_websockets = true',
    ].map((line) => ({ kind: 'key' as const, lines: [line] })),
  });
  return render(sections);
}
