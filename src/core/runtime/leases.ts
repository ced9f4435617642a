/**
 * Keys that live only as long as a process: `till exec` issues its keys leased and holds the
 * lease over the control channel (one open stream) while its command runs.
 *
 * Guarantees:
 * - When the holder goes away for any reason (it exits, crashes, is killed with -9: the kernel
 *   closes its socket), its leased keys are revoked at once, and with them the requests and
 *   streams in flight: an orphaned child keeps nothing that works.
 * - A broker that starts (after a restart, or taking over from another window) gives each active
 *   leased key a grace period for its holder to come back; unclaimed, the key is revoked then. So a
 *   key whose holder died while no broker ran is revoked within the grace period.
 * - A broker that is closing revokes nothing: its holders will reattach to the next one.
 */
import type { ControlChannel } from './control';
import type { TillKeys } from '../keys/keys';

/** How long a leased key waits for its holder after a broker starts. Default of {@link Leases}. */
export const LEASE_GRACE_MS = 10_000;

/** The leases of one broker. */
export class Leases {
  /** Holders per leased key id. */
  private readonly holders = new Map<string, number>();
  private readonly unclaimed = new Map<string, NodeJS.Timeout>();
  private closing = false;

  constructor(
    private readonly keys: TillKeys,
    private readonly graceMs = LEASE_GRACE_MS,
  ) {}

  /** Starts the grace period of every active leased key (call once, when the broker starts). */
  start(): void {
    for (const key of this.keys.list()) if (key.leased && key.state !== 'revoked' && key.state !== 'expired') this.awaitHolder(key.id);
  }

  /**
   * A leased key was just issued: its holder has the grace period to take the lease (a process
   * killed between issuing and holding leaves no key behind).
   */
  awaitHolder(id: string): void {
    if (this.closing || this.holders.has(id) || this.unclaimed.has(id)) return;
    const timer = setTimeout(() => this.lapse(id), this.graceMs);
    timer.unref();
    this.unclaimed.set(id, timer);
  }

  /**
   * Holds the leases of `ids` (unknown, unleased or ended keys are left out) until `release` is
   * called, when the holder has gone: the keys no one holds any more are revoked.
   */
  hold(ids: string[]): { held: string[]; release: () => void } {
    const held = ids.filter((id) => {
      const key = this.keys.get(id);
      return key?.leased === true && key.revokedAt === undefined;
    });
    for (const id of held) {
      clearTimeout(this.unclaimed.get(id));
      this.unclaimed.delete(id);
      this.holders.set(id, (this.holders.get(id) ?? 0) + 1);
    }
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      for (const id of held) {
        const left = (this.holders.get(id) ?? 1) - 1;
        if (left > 0) this.holders.set(id, left);
        else {
          this.holders.delete(id);
          this.lapse(id);
        }
      }
    };
    return { held, release };
  }

  private lapse(id: string): void {
    this.unclaimed.delete(id);
    if (this.closing || this.holders.has(id)) return;
    void this.keys.revoke(id);
  }

  /** The broker is closing: holders that drop off now are not gone, only waiting for the next broker. */
  close(): void {
    this.closing = true;
    for (const timer of this.unclaimed.values()) clearTimeout(timer);
    this.unclaimed.clear();
  }
}

/** The holder's side of a lease: `ready` once the broker holds every key; `stop()` lets go. */
export interface HeldLease {
  ready: Promise<void>;
  stop(): void;
}

/**
 * Holds the lease of `ids` from this process for as long as it lives (or until `stop()`), over
 * `client`'s control channel. When the broker goes away (a restart, a window handing over) the
 * holder reattaches to the next one, within its grace period.
 */
export function holdLease(client: ControlChannel, ids: string[], retryMs = 250): HeldLease {
  const abort = new AbortController();
  let confirm: (() => void) | undefined;
  let fail: ((err: Error) => void) | undefined;
  const ready = new Promise<void>((resolve, reject) => {
    confirm = resolve;
    fail = reject;
  });
  const path = `/leases/${ids.map(encodeURIComponent).join(',')}`;
  const onValue = (value: unknown) => {
    const held = (value as { held?: string[] }).held ?? [];
    const missing = ids.filter((id) => !held.includes(id));
    if (missing.length > 0) fail?.(new Error(`the broker does not hold the lease of key ${missing.join(', ')}`));
    else confirm?.();
    confirm = fail = undefined;
  };
  void (async () => {
    while (!abort.signal.aborted) {
      try {
        await client.stream(path, onValue, abort.signal);
      } catch (err) {
        // The first hold must work; later, a broker that is away is waited for.
        fail?.(err as Error);
        confirm = fail = undefined;
      }
      if (!abort.signal.aborted) await new Promise((r) => setTimeout(r, retryMs));
    }
  })();
  return { ready, stop: () => abort.abort() };
}
