/**
 * The keys a ledger knows, and what requests in flight hold of each: what the broker reads on
 * every request without touching the ledger's file or database. Each ledger keeps these up to
 * date its own way (ledger.ts from its journal, postgres.ts from its statements and notifications).
 */
import type { KeyRecord } from './keyLedger';
import type { Amounts } from '../policy/policy';

export abstract class KnownKeys {
  protected readonly keysById = new Map<string, KeyRecord>();
  protected readonly heldByKey = new Map<string, Amounts>();

  keys(): KeyRecord[] {
    return [...this.keysById.values()];
  }

  get(id: string): KeyRecord | undefined {
    return this.keysById.get(id);
  }

  /** Amounts held by requests in flight (on a team ledger, on every broker, as last seen). */
  reserved(id: string): Amounts {
    return this.heldByKey.get(id) ?? {};
  }
}
