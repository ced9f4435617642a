/**
 * One running Till: the broker, its ledger, audit log, keys and control channel, for one
 * data folder. `till serve` runs it in the foreground; the VS Code extension hosts it in its
 * extension host.
 */
import { AuditLog } from '../audit/audit';
import { Broker, type BrokerOptions } from '../broker/server';
import { ControlError, ControlServer, type ControlVia } from './control';
import { readFileSync } from 'node:fs';
import { listener, type ListenOptions } from '../broker/listener';
import { checkAdminToken, remoteControlHandler } from './remoteControl';
import { readSecretSource } from '../credentials/secretSource';
import { providerBaseUrl } from '../providers/providers';
import { readCredentialName, readExtension, readIssueInput, type BrokerStatus, type IssuedKey, type IssueInput } from './controlApi';
import { CredentialList, CredentialStore, type CredentialInfo } from '../credentials/credentials';
import { TillEvents, type KeySummary, type RequestRecord } from '../events';
import { isLedgerUrl, openHome, readConfig, type TillPaths } from './home';
import { withDefaults } from '../options';
import { TillKeys } from '../keys/keys';
import { ConversationSizes } from '../holds/contexts';
import { Leases } from './leases';
import { Ledger } from '../ledger/ledger';
import type { KeyLedger } from '../ledger/keyLedger';
import { PostgresLedger } from '../ledger/postgres';
import { buildPolicy, type Policy } from '../policy/policy';
import { ProviderRegistry, type Provider } from '../providers/providers';
import { VaultError, type Vault } from '../credentials/vault';
import { PriceTable, readPriceOverrides, type PriceOverrides } from '../metering/pricing';

export interface ServiceOptions {
  home: string;
  /** Broker port; overrides config.json. Default: config.json's, else 8455. */
  port?: number;
  /** Environment for upstream overrides. Default: process.env. */
  env?: NodeJS.ProcessEnv;
  vault?: Vault;
  /** Price overrides (provider → model → price), over the data folder's prices.json (the editor's settings). */
  prices?: PriceOverrides;
  log?: (line: string) => void;
  /** How long a leased key waits for its holder after the broker starts. Default: {@link ./leases!LEASE_GRACE_MS}. */
  leaseGraceMs?: number;
  /** Broker limits and timeouts, for tests and the settings. */
  broker?: Omit<BrokerSettings, 'port'>;
  /** A team ledger's URL (`postgres://…`), over config.json's `ledger`. Default: the data folder's ledger. */
  ledger?: string;
  /** A team ledger's hold expiry (ms): a dead broker's holds are reclaimed after it. Default: postgres.ts's. */
  ledgerHoldTtlMs?: number;
  /** Where the broker listens, over config.json's `listen`, `tlsCert`, `tlsKey` and `allowedHosts`. Default: 127.0.0.1. */
  listen?: ServiceListen;
  /**
   * The admin token of the control API over the network, over config.json's `adminToken`. Not read
   * from the environment here: `till serve` passes TILL_ADMIN_TOKEN, while a VS Code window, whose
   * environment may hold a teammate's token for a team broker, never serves admins.
   */
  adminToken?: string;
}

/** A listener as `till serve` and config.json give it: files, not their contents. */
export interface ServiceListen {
  host?: string;
  /** PEM certificate chain file. */
  tlsCert?: string;
  /** PEM private key file. */
  tlsKey?: string;
  allowedHosts?: string[];
}

/** The broker's settings a service layers: `options`, then `broker`, then config.json, then the broker's defaults. */
type BrokerSettings = Partial<
  Pick<
    BrokerOptions,
    'port' | 'maxBodyBytes' | 'maxHeaderBytes' | 'headersTimeoutMs' | 'requestTimeoutMs' | 'upstreamIdleTimeoutMs' | 'pooledUpstream'
  >
>;

/** What a control client sends to issue a key. */
/** The env vars that point a provider's SDKs and agents at the broker with a till key. */
export function envFor(provider: Provider, key: string, baseUrl: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of provider.keyEnv) env[name] = key;
  for (const name of provider.baseUrlEnv) env[name] = baseUrl;
  Object.assign(env, provider.quietEnv);
  return env;
}

/** How many ended requests the service remembers for late-opening views. */
export const RECENT_REQUESTS = 200;

export class TillService {
  private readonly recentRequests: RequestRecord[] = [];
  private readonly leases: Leases;

  private constructor(
    readonly paths: TillPaths,
    readonly events: TillEvents,
    readonly broker: Broker,
    readonly keys: TillKeys,
    readonly providers: ProviderRegistry,
    private readonly prices: PriceTable,
    private readonly configUpstreams: Record<string, string> | undefined,
    readonly credentials: CredentialList,
    private readonly ledger: KeyLedger,
    private readonly audit: AuditLog,
    private readonly conversations: ConversationSizes,
    private readonly control: ControlServer,
    private readonly vault: Vault,
    leaseGraceMs: number | undefined,
  ) {
    this.leases = new Leases(keys, leaseGraceMs);
    this.leases.start();
    events.on((e) => {
      if (e.type !== 'request.finished' && e.type !== 'request.denied') return;
      this.recentRequests.push(e);
      if (this.recentRequests.length > RECENT_REQUESTS) this.recentRequests.shift();
    });
  }

  /** Whether admins elsewhere may call the control API over the network (`/_till/`, an admin token is set). */
  get remoteAdmin(): boolean {
    return this.broker.servesControl;
  }

  /** The team ledger's database, without its password; undefined on the data folder's own ledger. */
  get ledgerName(): string | undefined {
    return this.ledger instanceof PostgresLedger ? this.ledger.name : undefined;
  }

  /** The last ended requests, oldest first. */
  recent(): RequestRecord[] {
    return [...this.recentRequests];
  }

  /** Claims the data folder, opens the ledger, starts the broker and the control channel. */
  static async start(options: ServiceOptions): Promise<TillService> {
    const paths = openHome(options.home);
    const config = readConfig(paths);
    const env = options.env ?? process.env;
    const providers = new ProviderRegistry(config.providers, config.upstreams, options.env);
    // Read before anything is claimed: a listener or token that cannot be used stops the start here.
    const listen = listenOptions(
      withDefaults<ServiceListen, object>(
        {},
        { host: config.listen, tlsCert: config.tlsCert, tlsKey: config.tlsKey, allowedHosts: config.allowedHosts },
        options.listen,
      ),
    );
    const adminToken = options.adminToken ?? (config.adminToken ? readSecretSource(config.adminToken, env) : undefined);
    if (adminToken !== undefined) checkAdminToken(adminToken);
    listener(listen);
    const control = new ControlServer(paths);
    await control.claim();
    let ledger: KeyLedger | undefined;
    let audit: AuditLog | undefined;
    let conversations: ConversationSizes | undefined;
    try {
      const team = options.ledger ?? config.ledger;
      if (team !== undefined && !isLedgerUrl(team)) throw new Error('the ledger must be a postgres:// URL');
      ledger = team ? await PostgresLedger.open(team, { holdTtlMs: options.ledgerHoldTtlMs }) : Ledger.open(paths.ledger);
      const teamLedger = ledger instanceof PostgresLedger ? ledger : undefined;
      audit = new AuditLog(paths.audit, { copyTo: teamLedger && ((records) => teamLedger.recordAudit(records)) });
      // Each credential from its own store; a credential another process's store keeps (VS Code's) says so.
      const configured = config.credentials ?? {};
      const vault = options.vault ?? CredentialStore.outsideEditor(paths.credentials, paths.keychainService, configured, env).vault;
      const events = new TillEvents();
      const keys = new TillKeys(ledger, events);
      const prices = new PriceTable(priceOverrides(paths, options.prices));
      // Layered: a setting not given (undefined) never replaces the one below it or the broker's default.
      const settings = withDefaults<BrokerSettings, object>({}, { port: config.port, maxBodyBytes: config.maxBodyBytes }, options.broker, {
        port: options.port,
      });
      conversations = new ConversationSizes(paths.contexts);
      const broker = new Broker({
        keys,
        vault,
        providers,
        prices,
        events,
        audit,
        conversations,
        log: options.log,
        listen,
        ...settings,
      });
      await broker.start();
      const service = new TillService(
        paths,
        events,
        broker,
        keys,
        providers,
        prices,
        config.upstreams,
        new CredentialList(paths.credentials, configured),
        ledger,
        audit,
        conversations,
        control,
        vault,
        options.leaseGraceMs,
      );
      const routes = service.controlRoutes();
      control.serve(routes);
      if (adminToken !== undefined)
        broker.serveControl(remoteControlHandler(routes, adminToken, listen.tls ? 'https' : 'http', options.log));
      return service;
    } catch (err) {
      await ledger?.close();
      audit?.close();
      conversations?.close();
      await control.close();
      throw err;
    }
  }

  get url(): string {
    return this.broker.url;
  }

  /**
   * Applies changed upstreams and prices (the editor's settings) to the running broker, keeping
   * keys, the port and requests in flight: a request already forwarded finishes where it went.
   * Throws, changing nothing, when a setting is malformed.
   */
  reconfigure(settings: Pick<ServiceOptions, 'env' | 'prices'>): void {
    const overrides = priceOverrides(this.paths, settings.prices);
    // Both steps are all-or-nothing; the prices are checked first so neither half lands alone.
    new PriceTable(overrides);
    this.providers.setUpstreams(this.configUpstreams ?? {}, settings.env);
    this.prices.setOverrides(overrides);
  }

  private resolveCredential(target: string): CredentialInfo {
    const named = this.credentials.get(target);
    if (named) return named;
    if (!this.providers.get(target)) {
      throw new ControlError(404, `"${target}" is neither a credential nor a provider; see \`till credential ls\``);
    }
    const all = this.credentials.forProvider(target);
    if (all.length === 0) throw new ControlError(404, `no credential for ${target}: add one with \`till credential add ${target}\``);
    if (all.length > 1)
      throw new ControlError(409, `${target} has ${all.length} credentials (${all.map((c) => c.name).join(', ')}): name one`);
    return all[0]!;
  }

  /**
   * Issues a key; `input` is checked as the control API checks it, wherever it comes from. Checks
   * first that the credential can be read, so a locked keychain shows now, not at the first request.
   * `origin`: the broker as the client reached it over the network, for the key's base URL.
   */
  async issue(request: IssueInput, origin?: string): Promise<IssuedKey> {
    const input = readIssueInput(request);
    const credential = this.resolveCredential(input.target);
    const provider = this.providers.get(credential.provider);
    if (!provider) throw new ControlError(404, `credential ${credential.name} is for unknown provider ${credential.provider}`);
    let policy: Policy;
    try {
      policy = buildPolicy(input);
    } catch (err) {
      throw new ControlError(400, (err as Error).message);
    }
    try {
      await this.vault.get(credential.name);
    } catch (err) {
      throw new ControlError(503, err instanceof VaultError ? err.message : `the keychain failed: ${(err as Error).message}`);
    }
    const { key, record } = await this.keys.issue({
      provider: provider.id,
      credential: credential.name,
      label: input.label,
      owner: input.owner,
      policy,
      lease: input.lease === true,
    });
    if (record.leased) this.leases.awaitHolder(record.id);
    const baseUrl = origin === undefined ? this.broker.baseUrlFor(provider) : providerBaseUrl(origin, provider);
    return {
      id: record.id,
      key,
      provider: provider.id,
      credential: credential.name,
      label: record.label,
      baseUrl,
      env: envFor(provider, key, baseUrl),
      policy,
    };
  }

  list(): KeySummary[] {
    return this.keys.list();
  }

  private controlRoutes() {
    return {
      routes: {
        'GET /status': (_: unknown, __: string[], via: ControlVia): BrokerStatus => ({
          url: via.origin ?? this.url,
          pid: process.pid,
          home: this.paths.home,
          keys: this.list().filter((k) => k.state === 'active').length,
        }),
        'POST /keys': (body: unknown, params: string[], via: ControlVia) => {
          const [id, action] = params;
          if (id === undefined) return this.issue(body as IssueInput, via.origin);
          if (action !== 'extend') throw new ControlError(404, `no control route POST /keys/${id}/${action ?? ''}`);
          const by = readExtension(body);
          return Promise.resolve()
            .then(() => this.keys.extend(id, by))
            .catch((err: unknown) => {
              throw new ControlError(400, (err as Error).message);
            });
        },
        'GET /keys': () => this.list(),
        'GET /requests': () => this.recent(),
        'DELETE /keys': async (_: unknown, params: string[]) => {
          const [id] = params;
          if (id === undefined || id === '') return { revoked: await this.keys.revokeAll() };
          if (!this.keys.get(id)) throw new ControlError(404, `no till key with id ${id}`);
          return { revoked: (await this.keys.revoke(id)) ? 1 : 0 };
        },
        // Names and providers only: what `till exec` on another machine picks keys for.
        'GET /credentials': () => this.credentials.all().map(({ name, provider }) => ({ name, provider })),
        'POST /credentials': (body: unknown) => {
          this.broker.forgetCredential(readCredentialName(body));
          return {};
        },
      },
      streams: {
        'GET /events': (send: (value: unknown) => void) => this.events.on(send),
        // Held open by `till exec` while its command runs: the keys are revoked when it goes away.
        'GET /leases': (send: (value: unknown) => void, params: string[]) => {
          const lease = this.leases.hold((params[0] ?? '').split(',').filter(Boolean));
          send({ held: lease.held });
          return lease.release;
        },
      },
    };
  }

  async close(): Promise<void> {
    this.leases.close();
    this.keys.close();
    await this.control.close();
    await this.broker.close();
    this.audit.close();
    this.conversations.close();
    await this.ledger.close();
  }
}

/** The listener with its certificate and key read (each named in the error when it cannot be). */
function listenOptions(listen: ServiceListen): ListenOptions {
  const { host, tlsCert, tlsKey, allowedHosts } = listen;
  if ((tlsCert === undefined) !== (tlsKey === undefined)) throw new Error('a TLS listener needs both --tls-cert and --tls-key');
  const read = (file: string, what: string) => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new Error(`cannot read the TLS ${what} ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, {
        cause: err,
      });
    }
  };
  const options: ListenOptions = { host, allowedHosts };
  if (tlsCert !== undefined && tlsKey !== undefined) options.tls = { cert: read(tlsCert, 'certificate'), key: read(tlsKey, 'key') };
  return options;
}

/** The data folder's prices.json with the editor's price settings over it. */
function priceOverrides(paths: TillPaths, settings: PriceOverrides | undefined): PriceOverrides {
  const overrides = readPriceOverrides(paths.prices);
  for (const [provider, models] of Object.entries(settings ?? {})) overrides[provider] = { ...overrides[provider], ...models };
  return overrides;
}
