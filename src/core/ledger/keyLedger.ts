/**
 * What the broker needs of a ledger, local (ledger.ts: one journal file, answers at once) or
 * shared by a team (postgres.ts: one database, answers after a round trip). Both keep the same
 * guarantees: a hold is checked and taken atomically against the key's limits, a growth too; what
 * was acknowledged survives a crash; a hold open at a crash counts as spent.
 */
import type { Maybe } from '../maybe';
import type { Amounts, Policy } from '../policy/policy';
import type { HoldRefusal, KeyRecord, LedgerHold, SettleDetails } from './ledger';

export interface KeyLedger {
  /** The keys, as last seen (a shared ledger's other brokers' changes arrive by notification). */
  keys(): KeyRecord[];
  get(id: string): KeyRecord | undefined;
  /** Amounts held by requests in flight. */
  reserved(id: string): Amounts;
  addKey(key: KeyRecord): Maybe<void>;
  updatePolicy(id: string, policy: Policy): Maybe<void>;
  /** False when it was already revoked or is unknown. */
  revoke(id: string, at?: number): Maybe<boolean>;
  /** `batch`: the local ledger may write the hold with the turn's others (see {@link whenDurable}). */
  hold(keyId: string, amounts: Amounts, batch?: boolean): Maybe<LedgerHold | HoldRefusal>;
  resize(hold: LedgerHold, amounts: Amounts): Maybe<HoldRefusal | undefined>;
  settle(hold: LedgerHold, actual?: Amounts, details?: SettleDetails): Maybe<unknown>;
  release(hold: LedgerHold): Maybe<unknown>;
  /** Runs `then` once every hold taken so far is durable. */
  whenDurable(then: () => void): void;
  /** Keys changed elsewhere (another broker revoked or extended one). Only a shared ledger has them. */
  onKeyChanged?(listener: (key: KeyRecord) => void): () => void;
  /** True when holds are answered after a round trip: streams are held whole rather than grown in slices. */
  readonly shared?: boolean;
  close(): Maybe<void>;
}
