/**
 * Wrong admin tokens, by client address: a team broker's control API is on the network, and a
 * token someone chose by hand can be guessed faster than a random one. After
 * {@link ADMIN_FAILURES} wrong tokens from one address within {@link ADMIN_LOCKOUT_MS}, that
 * address is refused without its token being checked until the window that began with its first
 * failure has passed.
 *
 * Guarantees: an address is never refused for its right token before it sent the wrong ones; the
 * memory kept is bounded (at most {@link TRACKED_ADDRESSES} addresses, the oldest dropped first).
 * Behind a proxy on the broker's machine every client has the proxy's address: one client's
 * guesses then lock out the others too, for a minute at most.
 */

/** Wrong tokens from one address before it is locked out. */
export const ADMIN_FAILURES = 10;
/** How long a window of wrong tokens lasts, from the first. */
export const ADMIN_LOCKOUT_MS = 60_000;
/** Addresses followed at most. */
const TRACKED_ADDRESSES = 10_000;

export class AdminLockout {
  /** Failures by address, in the order their windows began. */
  private readonly failures = new Map<string, { count: number; since: number }>();

  constructor(private readonly now: () => number = Date.now) {}

  /** Seconds `address` must wait before its token is checked again; 0 when it may try now. */
  retryAfter(address: string): number {
    const entry = this.current(address);
    if (!entry || entry.count < ADMIN_FAILURES) return 0;
    return Math.max(1, Math.ceil((entry.since + ADMIN_LOCKOUT_MS - this.now()) / 1000));
  }

  /** Counts a wrong token from `address`; true when it is the one that locks the address out. */
  failed(address: string): boolean {
    let entry = this.current(address);
    if (!entry) {
      if (this.failures.size >= TRACKED_ADDRESSES) this.failures.delete(this.failures.keys().next().value!);
      entry = { count: 0, since: this.now() };
      this.failures.set(address, entry);
    }
    entry.count++;
    return entry.count === ADMIN_FAILURES;
  }

  /** The address's window, when one is open (an ended one is forgotten). */
  private current(address: string): { count: number; since: number } | undefined {
    const entry = this.failures.get(address);
    if (entry && this.now() - entry.since >= ADMIN_LOCKOUT_MS) {
      this.failures.delete(address);
      return undefined;
    }
    return entry;
  }
}
