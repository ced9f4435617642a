/**
 * One broker per OS user, many users of it: a connection either hosts the broker in this
 * process or attaches to the one already running, over the control channel. When the host
 * goes away, attached connections race to take over (the control socket is the lock) and the
 * losers attach to the winner, from the same ledger, so no key or count is lost.
 *
 * VS Code windows use this; so could any other long-lived front end.
 */
import { AlreadyRunningError, ControlClient, NotRunningError } from './control';
import { ControlApi } from './controlApi';
import type { KeySummary, TillEvent } from '../events';
import type { Extension } from '../keys/keys';
import { openHome, tillPaths, type TillPaths } from './home';
import { TillService, type ServiceOptions } from './service';
import type { IssuedKey, IssueInput } from './controlApi';
import type { RequestRecord } from '../events';

/** Whether this process hosts the broker, uses another's, or has none (yet). */
export type TillRole = 'host' | 'attached' | 'down';

export interface ConnectionOptions extends ServiceOptions {
  /** Delay between takeover attempts in ms. Default: 250. */
  retryMs?: number;
  /** Whether this connection may start a broker itself. Default: true. */
  mayHost?: boolean;
}

/** A live link to this user's broker, hosted here or elsewhere. */
export class TillConnection {
  private service: TillService | undefined;
  private readonly api: ControlApi;
  private readonly paths: TillPaths;
  private readonly eventListeners = new Set<(e: TillEvent) => void>();
  private readonly roleListeners = new Set<(role: TillRole) => void>();
  private stopStream: AbortController | undefined;
  private disposed = false;
  private connecting: Promise<void> | undefined;
  private unsubscribeService: (() => void) | undefined;
  role: TillRole = 'down';
  /** The broker's URL, once known. */
  url: string | undefined;

  constructor(private options: ConnectionOptions) {
    this.paths = tillPaths(options.home);
    this.api = new ControlApi(new ControlClient(this.paths));
  }

  /**
   * Hosts or attaches; resolves once either worked (or throws why neither could). A connection
   * that is up already stays as it is (attaching again would subscribe to every event twice).
   */
  connect(): Promise<void> {
    if (this.role !== 'down') return Promise.resolve();
    this.connecting ??= this.establish().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async establish(): Promise<void> {
    // Neither host nor attach through a data folder another user could change.
    openHome(this.options.home);
    for (;;) {
      if (this.disposed) return;
      try {
        await this.attach();
        return;
      } catch (err) {
        if (!(err instanceof NotRunningError) || this.options.mayHost === false) throw err;
      }
      try {
        await this.host();
        return;
      } catch (err) {
        // Someone else won the race: attach to them on the next turn.
        if (!(err instanceof AlreadyRunningError)) throw err;
      }
      await new Promise((r) => setTimeout(r, this.options.retryMs ?? 250));
    }
  }

  private async host(): Promise<void> {
    // Keys, terminals and agents hold the broker's URL: taking over, keep the port they know
    // (it differs from ours when the host was started with another port, or port 0).
    const previous = this.url === undefined ? undefined : Number(new URL(this.url).port);
    let service: TillService;
    try {
      service = await TillService.start(previous === undefined ? this.options : { ...this.options, port: previous });
    } catch (err) {
      if (previous === undefined || previous === this.options.port || (err as NodeJS.ErrnoException).code !== 'EADDRINUSE') throw err;
      service = await TillService.start(this.options);
    }
    if (this.disposed) {
      await service.close();
      return;
    }
    this.service = service;
    this.url = service.url;
    this.unsubscribeService = service.events.on((e) => this.deliver(e));
    this.setRole('host');
  }

  private async attach(): Promise<void> {
    const status = await this.api.status();
    this.url = status.url;
    const abort = new AbortController();
    this.stopStream = abort;
    const ended = this.api.events((e) => this.deliver(e), abort.signal);
    this.setRole('attached');
    void ended.then(
      () => this.lost(abort),
      () => this.lost(abort),
    );
  }

  /** The host went away (or we stopped listening): take over or re-attach. */
  private lost(abort: AbortController): void {
    if (this.disposed || abort.signal.aborted || this.stopStream !== abort) return;
    this.setRole('down');
    void this.reconnect();
  }

  /** Keeps trying until it hosts or attaches again (a failure here is usually passing). */
  private async reconnect(): Promise<void> {
    for (let delay = this.options.retryMs ?? 250; !this.disposed && this.role === 'down'; delay = Math.min(delay * 2, 5000)) {
      try {
        await this.connect();
      } catch (err) {
        this.options.log?.(`reconnecting to the broker failed: ${(err as Error).message}`);
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  private deliver(e: TillEvent): void {
    for (const l of this.eventListeners) {
      try {
        l(e);
      } catch {
        // a listener's bug must not stop the others
      }
    }
  }

  private setRole(role: TillRole): void {
    if (this.role === role) return;
    this.role = role;
    for (const l of this.roleListeners) l(role);
  }

  onEvent(listener: (e: TillEvent) => void): () => void {
    this.eventListeners.add(listener);
    return () => this.eventListeners.delete(listener);
  }

  onRole(listener: (role: TillRole) => void): () => void {
    this.roleListeners.add(listener);
    return () => this.roleListeners.delete(listener);
  }

  async issue(input: IssueInput): Promise<IssuedKey> {
    await this.connect();
    if (this.service) return this.service.issue(input);
    return this.api.issue(input);
  }

  async list(): Promise<KeySummary[]> {
    await this.connect();
    if (this.service) return this.service.list();
    return this.api.list();
  }

  /** The last ended requests, oldest first (for views that open after they happened). */
  async recent(): Promise<RequestRecord[]> {
    await this.connect();
    if (this.service) return this.service.recent();
    return this.api.recent();
  }

  /** Raises a key's limits. */
  async extend(id: string, by: Extension): Promise<KeySummary> {
    await this.connect();
    if (this.service) return this.service.keys.extend(id, by);
    return this.api.extend(id, by);
  }

  /** Revokes one key; returns whether it was live. */
  async revoke(id: string): Promise<boolean> {
    await this.connect();
    if (this.service) return this.service.keys.revoke(id);
    return this.api.revoke(id);
  }

  async revokeAll(): Promise<number> {
    await this.connect();
    if (this.service) return this.service.keys.revokeAll();
    return this.api.revokeAll();
  }

  /**
   * Applies new upstreams and prices. A broker this process hosts takes them at once, keeping
   * keys, port and requests in flight ('applied'); they are kept for a takeover either way, and
   * so is the port, which takes a restart. 'elsewhere': another process hosts the broker and
   * keeps its own settings. Throws, changing nothing, when a setting is malformed.
   */
  reconfigure(settings: Pick<ServiceOptions, 'env' | 'prices' | 'port'>): 'applied' | 'elsewhere' | 'later' {
    this.service?.reconfigure(settings);
    this.options = { ...this.options, ...settings };
    return this.service ? 'applied' : this.role === 'attached' ? 'elsewhere' : 'later';
  }

  /** Tells the broker a credential changed, so it drops what it cached. */
  async credentialChanged(name: string): Promise<void> {
    if (this.role === 'down') return;
    if (this.service) return this.service.broker.forgetCredential(name);
    await this.api.credentialChanged(name);
  }

  async dispose(): Promise<void> {
    this.disposed = true;
    this.stopStream?.abort();
    this.stopStream = undefined;
    this.unsubscribeService?.();
    const service = this.service;
    this.service = undefined;
    this.setRole('down');
    await service?.close();
  }
}
