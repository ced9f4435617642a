/**
 * The provider catalogue: where each upstream API lives, where its key goes, which env vars
 * its SDKs and agents read, which routes cost nothing, how it behaves on the wire (wire.ts) and
 * where its prices are. Everything Till knows about a provider is on its entry: a new provider is
 * one entry here and its rows in metering/prices.json. Facts: ../shared/PROVIDERS.md.
 */
import { ANTHROPIC_WIRE, COHERE_WIRE, GEMINI_WIRE, openAiWire, unmeteredWire, type Wire } from './wire';

/** Where a provider expects its key. */
export type KeyPlacement = { kind: 'bearer' } | { kind: 'header'; name: string } | { kind: 'query'; name: string };

/** A route matcher: an HTTP method (or `*`) and a path pattern (see {@link matchPattern}). */
export interface Route {
  method: string;
  path: string;
}

/** Where a provider's prices are found in prices.json (metering/pricing.ts reads them). */
export interface PriceFacts {
  /** The table it bills by, when not its own (Azure resells OpenAI's models at OpenAI's prices). */
  table?: string;
  /** The names aggregators give its models' vendor in `vendor/model` ids (`google/gemini-2.5-pro`). */
  vendorNames?: string[];
  /** An aggregator: a `vendor/model` id without a row of its own is priced by the vendor's table. */
  resellsVendors?: boolean;
  /** Other ids its clients give a model (`claude-opus-4.8` for `claude-opus-4-8`), tried after the id itself. */
  modelIds?: (id: string) => string[];
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
  /** How its API behaves on the wire: usage, errors, streams, WebSockets. */
  wire: Wire;
  /** Where its prices are, when not simply in its own table. */
  pricing?: PriceFacts;
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

/** A provider that speaks the OpenAI API under its own base URL. */
function openAiCompatible(
  entry: Pick<Provider, 'id' | 'displayName' | 'baseUrl' | 'keyEnv' | 'baseUrlEnv' | 'pricing'> & { asksStreamUsage: boolean },
): Provider {
  const { asksStreamUsage, ...fields } = entry;
  const basePath = pathOf(entry.baseUrl);
  return {
    ...fields,
    basePath,
    placement: bearer,
    wire: openAiWire(asksStreamUsage),
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
    wire: openAiWire(true),
    pricing: { vendorNames: ['openai'] },
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
    wire: ANTHROPIC_WIRE,
    // OpenRouter-style `claude-opus-4.8` names the same model as Anthropic's `claude-opus-4-8`.
    pricing: { vendorNames: ['anthropic'], modelIds: (id) => (id.includes('.') ? [id.replace(/\./g, '-')] : []) },
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
    wire: GEMINI_WIRE,
    pricing: { vendorNames: ['google'] },
  },
  openAiCompatible({
    id: 'openrouter',
    displayName: 'OpenRouter',
    baseUrl: 'https://openrouter.ai/api/v1',
    keyEnv: ['OPENROUTER_API_KEY'],
    baseUrlEnv: ['OPENROUTER_BASE_URL'],
    // It always sends usage in the final chunk (`include_usage` is deprecated there), and passes
    // the vendors' prices through.
    asksStreamUsage: false,
    pricing: { resellsVendors: true },
  }),
  openAiCompatible({
    id: 'mistral',
    displayName: 'Mistral',
    baseUrl: 'https://api.mistral.ai/v1',
    keyEnv: ['MISTRAL_API_KEY'],
    baseUrlEnv: ['MISTRAL_BASE_URL'],
    // It sends usage in every stream's final chunk.
    asksStreamUsage: false,
    pricing: { vendorNames: ['mistralai'] },
  }),
  openAiCompatible({
    id: 'groq',
    displayName: 'Groq',
    baseUrl: 'https://api.groq.com/openai/v1',
    keyEnv: ['GROQ_API_KEY'],
    baseUrlEnv: ['GROQ_BASE_URL'],
    asksStreamUsage: true,
  }),
  openAiCompatible({
    id: 'together',
    displayName: 'Together AI',
    baseUrl: 'https://api.together.xyz/v1',
    keyEnv: ['TOGETHER_API_KEY'],
    baseUrlEnv: ['TOGETHER_BASE_URL'],
    asksStreamUsage: true,
  }),
  openAiCompatible({
    id: 'fireworks',
    displayName: 'Fireworks AI',
    baseUrl: 'https://api.fireworks.ai/inference/v1',
    keyEnv: ['FIREWORKS_API_KEY'],
    baseUrlEnv: ['FIREWORKS_BASE_URL'],
    asksStreamUsage: true,
    // Its API names models `accounts/fireworks/models/<id>`; clients often give the bare id.
    pricing: { modelIds: (id) => (id.startsWith('accounts/') ? [] : [`accounts/fireworks/models/${id}`]) },
  }),
  openAiCompatible({
    id: 'perplexity',
    displayName: 'Perplexity',
    baseUrl: 'https://api.perplexity.ai',
    keyEnv: ['PERPLEXITY_API_KEY', 'PPLX_API_KEY'],
    baseUrlEnv: ['PERPLEXITY_BASE_URL'],
    // It sends usage (and its cost) in the final chunk; its Agent API bills vendors' models at their prices.
    asksStreamUsage: false,
    pricing: { resellsVendors: true },
  }),
  openAiCompatible({
    id: 'deepseek',
    displayName: 'DeepSeek',
    baseUrl: 'https://api.deepseek.com',
    keyEnv: ['DEEPSEEK_API_KEY'],
    baseUrlEnv: ['DEEPSEEK_BASE_URL'],
    asksStreamUsage: true,
    pricing: { vendorNames: ['deepseek'] },
  }),
  openAiCompatible({
    id: 'xai',
    displayName: 'xAI',
    baseUrl: 'https://api.x.ai/v1',
    keyEnv: ['XAI_API_KEY'],
    baseUrlEnv: ['XAI_BASE_URL'],
    asksStreamUsage: true,
    pricing: { vendorNames: ['x-ai', 'xai'] },
  }),
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
    wire: COHERE_WIRE,
    pricing: { vendorNames: ['cohere'] },
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
    wire: openAiWire(true),
    pricing: { table: 'openai' },
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
    wire: unmeteredWire('github'),
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
const CUSTOM_WIRE = unmeteredWire('openai');

const BUILT_IN = new Map(CATALOGUE.map((p) => [p.id, p]));

/** The catalogue entry of a built-in provider; undefined for a custom one. */
export function builtInProvider(id: string): Provider | undefined {
  return BUILT_IN.get(id);
}

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
        // Till does not know its answers: counted in calls, refused in the OpenAI shape.
        wire: CUSTOM_WIRE,
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
