/**
 * The provider catalogue: where each upstream API lives, where its key goes, which env vars
 * its SDKs and agents read, and which routes cost nothing. Facts: ../shared/PROVIDERS.md.
 */

/** Where a provider expects its key. */
export type KeyPlacement = { kind: 'bearer' } | { kind: 'header'; name: string } | { kind: 'query'; name: string };

/** A route matcher: an HTTP method (or `*`) and a path pattern (see {@link matchPattern}). */
export interface Route {
  method: string;
  path: string;
}

export interface Provider {
  /** Id used in URLs (`/openai/…`), in `till issue openai` and in `TILL_UPSTREAM_OPENAI`. */
  id: string;
  displayName: string;
  /** Upstream base URL, the one the provider's own SDKs use. Overridable. */
  baseUrl: string;
  /**
   * The path of the catalogue's base URL (`/v1` for OpenAI, empty for Anthropic). Clients use
   * `http://127.0.0.1:<port>/<id><basePath>`; scopes and free routes match paths in this
   * namespace (`/v1/chat/completions`) whatever the upstream override.
   */
  basePath: string;
  /** Where the credential is put on the way upstream. */
  placement: KeyPlacement;
  /** Env var(s) SDKs and agents read for the key; the first is the main one. */
  keyEnv: string[];
  /** Env var(s) SDKs and agents read for the base URL. */
  baseUrlEnv: string[];
  /**
   * Env vars set alongside the key that keep this provider's tools from calling home around the
   * broker (`@openai/agents` posts traces, prompts included, to api.openai.com unless told not to).
   */
  quietEnv?: Record<string, string>;
  /**
   * Other env vars tools read this provider's key or endpoint from. Till never sets them, and
   * removes them (with {@link keyEnv} and {@link baseUrlEnv}) from the environment of what it runs.
   */
  otherEnv?: string[];
  /** Routes that are not billable: they never spend an activation. HEAD and OPTIONS never are. */
  freeRoutes: Route[];
  /** Extracts the model from the upstream path when the provider puts it there (Gemini). */
  modelFromPath?: RegExp;
  /** Headers always sent upstream unless the client sent them. */
  defaultHeaders?: Record<string, string>;
  /** True when the catalogue's base URL is only a placeholder (Azure): an override is required. */
  needsUpstream?: boolean;
  /**
   * The prefix every endpoint of the API has (`/v1` for Anthropic), when clients differ on
   * whether the base URL includes it: the official SDKs and Claude Code append `/v1/messages` to
   * `ANTHROPIC_BASE_URL`, the Vercel AI SDK appends `/messages`. A path without it is served as
   * the same path with it (see {@link apiPath}).
   */
  versionPrefix?: string;
}

/**
 * The path a request names in the provider's API: as sent, or with the provider's
 * {@link Provider.versionPrefix} put in front when a client left it out (`/messages` →
 * `/v1/messages`). The root (`HEAD /`) stays as it is.
 */
export function apiPath(provider: Provider | undefined, path: string): string {
  const prefix = provider?.versionPrefix;
  if (!prefix || path === '' || path === '/' || path === prefix || path.startsWith(`${prefix}/`)) return path;
  return `${prefix}${path}`;
}

const bearer: KeyPlacement = { kind: 'bearer' };
const openAiFree: Route[] = [
  { method: 'GET', path: '/v1/models' },
  { method: 'GET', path: '/v1/models/*' },
];

function pathOf(url: string): string {
  return new URL(url).pathname.replace(/\/+$/, '');
}

function openAiCompatible(id: string, displayName: string, baseUrl: string, keyEnv: string[], baseUrlEnv: string[]): Provider {
  const basePath = pathOf(baseUrl);
  return {
    id,
    displayName,
    baseUrl,
    basePath,
    placement: bearer,
    keyEnv,
    baseUrlEnv,
    freeRoutes: [
      { method: 'GET', path: `${basePath}/models` },
      { method: 'GET', path: `${basePath}/models/*` },
    ],
  };
}

/** Every built-in provider, by id. */
export const CATALOGUE: readonly Provider[] = [
  {
    id: 'openai',
    displayName: 'OpenAI',
    baseUrl: 'https://api.openai.com/v1',
    basePath: '/v1',
    placement: bearer,
    keyEnv: ['OPENAI_API_KEY'],
    baseUrlEnv: ['OPENAI_BASE_URL', 'OPENAI_API_BASE'],
    quietEnv: { OPENAI_AGENTS_DISABLE_TRACING: '1' },
    otherEnv: ['OPENAI_ADMIN_KEY', 'CODEX_API_KEY'],
    freeRoutes: openAiFree,
  },
  {
    id: 'anthropic',
    displayName: 'Anthropic',
    baseUrl: 'https://api.anthropic.com',
    basePath: '',
    placement: { kind: 'header', name: 'x-api-key' },
    keyEnv: ['ANTHROPIC_API_KEY'],
    baseUrlEnv: ['ANTHROPIC_BASE_URL'],
    otherEnv: ['ANTHROPIC_AUTH_TOKEN', 'CLAUDE_CODE_OAUTH_TOKEN', 'ANTHROPIC_ADMIN_KEY'],
    versionPrefix: '/v1',
    freeRoutes: [
      { method: 'GET', path: '/v1/models' },
      { method: 'GET', path: '/v1/models/*' },
      { method: 'POST', path: '/v1/messages/count_tokens' },
    ],
    defaultHeaders: { 'anthropic-version': '2023-06-01' },
  },
  {
    id: 'gemini',
    displayName: 'Google Gemini',
    baseUrl: 'https://generativelanguage.googleapis.com',
    basePath: '',
    placement: { kind: 'header', name: 'x-goog-api-key' },
    // GOOGLE_GENERATIVE_AI_API_KEY: the Vercel AI SDK's Google provider (it reads no base URL).
    keyEnv: ['GEMINI_API_KEY', 'GOOGLE_API_KEY', 'GOOGLE_GENERATIVE_AI_API_KEY'],
    baseUrlEnv: ['GOOGLE_GEMINI_BASE_URL'],
    otherEnv: ['GOOGLE_VERTEX_BASE_URL'],
    freeRoutes: [
      { method: 'GET', path: '/*/models' },
      { method: 'GET', path: '/*/models/*' },
      { method: 'POST', path: '/*/models/*:countTokens' },
    ],
    modelFromPath: /\/models\/([^/:]+)(?::|$)/,
  },
  openAiCompatible('openrouter', 'OpenRouter', 'https://openrouter.ai/api/v1', ['OPENROUTER_API_KEY'], ['OPENROUTER_BASE_URL']),
  openAiCompatible('mistral', 'Mistral', 'https://api.mistral.ai/v1', ['MISTRAL_API_KEY'], ['MISTRAL_BASE_URL']),
  openAiCompatible('groq', 'Groq', 'https://api.groq.com/openai/v1', ['GROQ_API_KEY'], ['GROQ_BASE_URL']),
  openAiCompatible('together', 'Together AI', 'https://api.together.xyz/v1', ['TOGETHER_API_KEY'], ['TOGETHER_BASE_URL']),
  openAiCompatible('fireworks', 'Fireworks AI', 'https://api.fireworks.ai/inference/v1', ['FIREWORKS_API_KEY'], ['FIREWORKS_BASE_URL']),
  openAiCompatible(
    'perplexity',
    'Perplexity',
    'https://api.perplexity.ai',
    ['PERPLEXITY_API_KEY', 'PPLX_API_KEY'],
    ['PERPLEXITY_BASE_URL'],
  ),
  openAiCompatible('deepseek', 'DeepSeek', 'https://api.deepseek.com', ['DEEPSEEK_API_KEY'], ['DEEPSEEK_BASE_URL']),
  openAiCompatible('xai', 'xAI', 'https://api.x.ai/v1', ['XAI_API_KEY'], ['XAI_BASE_URL']),
  {
    id: 'cohere',
    displayName: 'Cohere',
    baseUrl: 'https://api.cohere.com',
    basePath: '',
    placement: bearer,
    keyEnv: ['CO_API_KEY', 'COHERE_API_KEY'],
    baseUrlEnv: ['CO_API_URL'],
    freeRoutes: [
      { method: 'GET', path: '/*/models' },
      { method: 'GET', path: '/*/models/*' },
      { method: 'POST', path: '/*/tokenize' },
      { method: 'POST', path: '/*/detokenize' },
    ],
  },
  {
    id: 'azure-openai',
    displayName: 'Azure OpenAI',
    // Each Azure resource has its own host: set TILL_UPSTREAM_AZURE_OPENAI=https://<resource>.openai.azure.com
    baseUrl: 'https://your-resource.openai.azure.com',
    basePath: '',
    placement: { kind: 'header', name: 'api-key' },
    keyEnv: ['AZURE_OPENAI_API_KEY'],
    baseUrlEnv: ['AZURE_OPENAI_ENDPOINT'],
    freeRoutes: [
      { method: 'GET', path: '/openai/models' },
      { method: 'GET', path: '/openai/models/*' },
      { method: 'GET', path: '/openai/v1/models' },
      { method: 'GET', path: '/openai/deployments' },
    ],
    needsUpstream: true,
  },
  {
    id: 'github',
    displayName: 'GitHub REST',
    baseUrl: 'https://api.github.com',
    basePath: '',
    placement: bearer,
    keyEnv: ['GH_TOKEN', 'GITHUB_TOKEN'],
    baseUrlEnv: ['GITHUB_API_URL'],
    otherEnv: ['GH_ENTERPRISE_TOKEN', 'GITHUB_ENTERPRISE_TOKEN', 'GH_HOST'],
    freeRoutes: [{ method: 'GET', path: '/rate_limit' }],
    defaultHeaders: { 'user-agent': 'till' },
  },
];

/** The header names and query parameters where any catalogue client may put a key. */
export const KEY_HEADERS = ['authorization', 'x-api-key', 'api-key', 'x-goog-api-key'] as const;
export const KEY_QUERY_PARAMS = ['key'] as const;

/** A user-defined provider, as written in the data folder's config. */
export interface CustomProviderConfig {
  id: string;
  baseUrl: string;
  /** `bearer` (default), `header:<name>` or `query:<name>`. */
  auth?: string;
  keyEnv?: string[];
  baseUrlEnv?: string[];
  freeRoutes?: Route[];
}

const PROVIDER_ID = /^[a-z][a-z0-9-]{0,31}$/;

/** Parses `bearer`, `header:<name>` or `query:<name>`. */
export function parsePlacement(auth: string | undefined): KeyPlacement {
  if (!auth || auth === 'bearer') return bearer;
  const [kind, name] = auth.split(':', 2);
  if ((kind === 'header' || kind === 'query') && name && /^[A-Za-z0-9_-]+$/.test(name)) {
    return { kind, name: kind === 'header' ? name.toLowerCase() : name };
  }
  throw new Error(`unknown auth "${auth}": use bearer, header:<name> or query:<name>`);
}

function envName(id: string): string {
  return id.toUpperCase().replace(/-/g, '_');
}

/** The base URL clients use for a provider through a broker at `brokerUrl`: `<broker>/<id><base path>`. */
export function providerBaseUrl(brokerUrl: string, provider: Pick<Provider, 'id' | 'basePath'>): string {
  return `${brokerUrl}/${provider.id}${provider.basePath}`;
}

/** Every env var through which a provider's key or endpoint reaches a program, for all `providers`. */
export function providerEnvNames(providers: ProviderRegistry): Set<string> {
  const names = new Set<string>();
  for (const p of providers.all()) for (const name of [...p.keyEnv, ...p.baseUrlEnv, ...(p.otherEnv ?? [])]) names.add(name);
  return names;
}

/** The env var that overrides a provider's upstream base URL, e.g. `TILL_UPSTREAM_AZURE_OPENAI`. */
export function upstreamEnvVar(id: string): string {
  return `TILL_UPSTREAM_${envName(id)}`;
}

function checkUrl(url: string, where: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error(`${where}: "${url}" is not a URL`);
  }
  if (parsed.protocol !== 'https:' && parsed.protocol !== 'http:') throw new Error(`${where}: "${url}" must be http(s)`);
  if (parsed.search || parsed.hash) throw new Error(`${where}: "${url}" must not have a query or fragment`);
  return url.replace(/\/+$/, '');
}

/** The providers in force: the catalogue plus custom ones, with upstream overrides applied. */
export class ProviderRegistry {
  private byId = new Map<string, Provider>();

  /**
   * @param custom user-defined providers (config file).
   * @param overrides upstream base URLs by provider id (config file).
   * @param env environment to read `TILL_UPSTREAM_<ID>` from; env wins over the config file.
   */
  constructor(
    private readonly custom: CustomProviderConfig[] = [],
    overrides: Record<string, string> = {},
    env: NodeJS.ProcessEnv = process.env,
  ) {
    this.setUpstreams(overrides, env);
  }

  /**
   * Points the providers at new upstreams (a settings change applied to a running broker):
   * requests from now on go there; one already forwarded finishes where it went. Throws,
   * changing nothing, when an address is malformed.
   */
  setUpstreams(overrides: Record<string, string>, env: NodeJS.ProcessEnv = process.env): void {
    const byId = new Map<string, Provider>();
    for (const p of CATALOGUE) byId.set(p.id, p);
    for (const c of this.custom) {
      if (!PROVIDER_ID.test(c.id)) throw new Error(`custom provider id "${c.id}" must be lower-case letters, digits and dashes`);
      if (byId.has(c.id)) throw new Error(`custom provider "${c.id}" clashes with a built-in provider`);
      const baseUrl = checkUrl(c.baseUrl, `custom provider ${c.id}`);
      byId.set(c.id, {
        id: c.id,
        displayName: c.id,
        baseUrl,
        basePath: pathOf(baseUrl),
        placement: parsePlacement(c.auth),
        keyEnv: c.keyEnv ?? [`${envName(c.id)}_API_KEY`],
        baseUrlEnv: c.baseUrlEnv ?? [`${envName(c.id)}_BASE_URL`],
        freeRoutes: c.freeRoutes ?? [],
      });
    }
    for (const [id, provider] of byId) {
      const override = env[upstreamEnvVar(id)] ?? overrides[id];
      if (override) {
        byId.set(id, { ...provider, baseUrl: checkUrl(override, upstreamEnvVar(id)), needsUpstream: false });
      }
    }
    this.byId = byId;
  }

  get(id: string): Provider | undefined {
    return this.byId.get(id);
  }

  all(): Provider[] {
    return [...this.byId.values()];
  }
}

const patternCache = new Map<string, RegExp>();

function compiled(pattern: string, star: string): RegExp {
  const cacheKey = star + pattern;
  let re = patternCache.get(cacheKey);
  if (!re) {
    re = new RegExp(
      `^${pattern
        .split('*')
        .map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&'))
        .join(star)}$`,
    );
    if (patternCache.size > 1000) patternCache.clear();
    patternCache.set(cacheKey, re);
  }
  return re;
}

/**
 * Glob match used for path and model scopes: `*` matches any run of characters (slashes
 * included), everything else is literal. `/v1/chat/*` matches `/v1/chat/completions`.
 */
export function matchPattern(pattern: string, value: string): boolean {
  return compiled(pattern, '.*').test(value);
}

/**
 * True when the request costs nothing: HEAD, OPTIONS and the provider's free routes. In a free
 * route a `*` stands for one path segment and never spans `/`, `:` or `;`: Gemini's free
 * `…/models/<model>:countTokens` is no free pass for `…/models/x:generateContent;:countTokens`,
 * which an upstream may read as a generation, nor its free `GET …/models/<model>` for
 * `GET …/models/x:generateContent`.
 */
export function isFreeRoute(provider: Provider, method: string, path: string): boolean {
  if (method === 'HEAD' || method === 'OPTIONS') return true;
  return provider.freeRoutes.some((r) => (r.method === '*' || r.method === method) && compiled(r.path, '[^/:;]*').test(path));
}
