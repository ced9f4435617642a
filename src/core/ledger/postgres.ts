/**
 * The team ledger: till keys and their counters in PostgreSQL, shared by any number of brokers.
 *
 * Guarantees, across brokers:
 * - **A limit is never overrun.** A hold is checked and taken in one statement: a conditional
 *   `UPDATE` of the key's row (used + held + wanted <= limit) that inserts the hold only when it
 *   matched. PostgreSQL re-checks the condition against the row as the last committer left it, so
 *   two brokers can never both take the last activation. A hold's growth is checked the same way;
 *   shrinks, settlements and releases are single statements too. Nothing is read, then written
 *   over the network.
 * - **A dead broker neither blocks a key nor lets it overrun.** Every hold carries its broker and
 *   an expiry that the broker renews while it runs ({@link PostgresLedgerOptions.holdTtlMs}). Any
 *   broker reclaims expired holds by counting them as spent, as the local ledger does with holds
 *   open at a crash (they may have reached the upstream). A settlement or release of a hold that
 *   was reclaimed changes nothing: it is never counted twice.
 * - **What was acknowledged is committed.** Each statement commits before its promise resolves
 *   (PostgreSQL's synchronous commit: on disk). A statement that fails leaves the database as it
 *   was, and the broker refuses the request (fail closed).
 *
 * Each broker keeps the rows it has seen in memory (authentication and the Usage view read them
 * without a round trip), refreshed by every statement's result and by a notification
 * (`LISTEN till_keys`) when another broker changes a key, so a revocation reaches every broker.
 * The real credentials are never here: the database holds key hashes, policies and counters,
 * and (`till_audit`) each broker's audit records, written in batches (audit.ts's, every 100 ms).
 */
import { randomBytes } from 'node:crypto';
import type { Client, Pool } from 'pg';

import { KeyBatches } from './keyBatches';
import { KnownKeys } from './knownKeys';
import {
  overLimit,
  type HoldAnswer,
  type HoldRefusal,
  type KeyLedger,
  type KeyRecord,
  type LedgerHold,
  type SettleDetails,
  type TokenCounts,
} from './keyLedger';
import { limitsOf, METERS, type Amounts, type Policy } from '../policy/policy';

type Pg = typeof import('pg');
let pgModule: Pg | undefined;

/**
 * The PostgreSQL client, loaded when a team ledger is first opened: required at startup it
 * would cost every broker on the local ledger (and every VS Code window) some 14 MiB.
 */
function pg(): Pg {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  pgModule ??= require('pg') as Pg;
  return pgModule;
}

export interface PostgresLedgerOptions {
  /** How long a hold lives without renewal: a dead broker's holds are reclaimed after it. Default 15 s. */
  holdTtlMs?: number;
  /** This broker's name in the holds it takes. Default: random, new at every start. */
  brokerId?: string;
  /** Connections in the pool. Default 8. */
  poolSize?: number;
}

/** Thrown when the database cannot be reached or refused a statement: the request is refused, nothing changed. */
export class LedgerUnavailableError extends Error {
  constructor(override readonly cause: unknown) {
    super(`the team ledger (PostgreSQL) is unavailable: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = 'LedgerUnavailableError';
  }
}

const SCHEMA = `
create table if not exists till_keys (
  id text primary key,
  record jsonb not null,
  policy jsonb not null,
  lim_activations bigint, lim_tokens bigint, lim_spend bigint,
  used_activations bigint not null default 0, used_tokens bigint not null default 0, used_spend bigint not null default 0,
  held_activations bigint not null default 0, held_tokens bigint not null default 0, held_spend bigint not null default 0,
  tok_input bigint not null default 0, tok_output bigint not null default 0,
  tok_cached bigint not null default 0, tok_reasoning bigint not null default 0,
  estimated_spend bigint not null default 0, unpriced bigint not null default 0,
  revoked_at bigint,
  v bigint not null default 0
);
create table if not exists till_holds (
  id bigserial primary key,
  key_id text not null references till_keys(id),
  broker text not null,
  activations bigint not null, tokens bigint not null, spend bigint not null,
  expires_at timestamptz not null
);
create table if not exists till_audit (
  id bigserial primary key,
  at timestamptz not null, broker text not null, key_id text, label text,
  provider text not null, method text not null, path text not null, model text,
  status int not null, latency_ms real not null, denial text, reason text
);
create index if not exists till_audit_key on till_audit (key_id, at);
alter table till_keys add column if not exists v bigint not null default 0;
alter table till_keys add column if not exists lim_concurrency bigint;
update till_keys set lim_concurrency = (policy->>'concurrency')::bigint where lim_concurrency is null and policy ? 'concurrency';
alter table till_keys add column if not exists lim_rpm bigint;
update till_keys set lim_rpm = (policy->>'rpm')::bigint where lim_rpm is null and policy ? 'rpm';
create index if not exists till_holds_key on till_holds (key_id);
create table if not exists till_rate (key_id text not null, at timestamptz not null);
create index if not exists till_rate_key on till_rate (key_id, at);
do $$ begin
  -- Made by an earlier build without the rate's retry column: its result type cannot be replaced in place.
  if exists (select 1 from pg_proc where proname = 'till_change_holds' and not ('retry_s' = any(proargnames))) then
    drop function till_change_holds(text, jsonb, text, bigint);
  end if;
end $$;
create index if not exists till_holds_expiry on till_holds (expires_at);
create index if not exists till_holds_broker on till_holds (broker);
`;

// The columns a key's row is read with.
const COUNTER_COLUMNS = [
  'id',
  'v',
  'used_activations',
  'used_tokens',
  'used_spend',
  'held_activations',
  'held_tokens',
  'held_spend',
  'tok_input',
  'tok_output',
  'tok_cached',
  'tok_reasoning',
  'estimated_spend',
  'unpriced',
  'revoked_at',
];
const KEY_COLUMNS = `record, policy, ${COUNTER_COLUMNS.join(', ')}`;

/**
 * The counters of a changed key's row `t`, and a notification of them to every broker (in the
 * same statement: no round trip of its own). Counters only, so the payload stays far below
 * PostgreSQL's 8,000 bytes whatever the key's label and policy.
 */
const RETURN_AND_TELL = `${COUNTER_COLUMNS.map((c) => `t.${c}`).join(', ')},
  pg_notify('till_use', json_build_object(${COUNTER_COLUMNS.map((c) => `'${c}', t.${c}`).join(', ')})::text)`;

/**
 * Takes, grows and shrinks a batch of holds on one key, in order, as one statement: the key's row
 * is locked (PostgreSQL hands it over as the last committer left it), each change is checked
 * against what the ones before it left, exactly as one statement per change would (a later,
 * smaller hold can fit where an earlier one did not), and the row is written once. A new hold (no
 * id) or a growth must fit the key's limits (a revoked key takes no new hold), and a new hold
 * must find the key's requests in flight, on every broker (its holds), under its concurrency
 * limit; a shrink always passes. One row per change: its place in the batch (1-based), `held`
 * (done), `refused` (a limit: nothing changed), `busy` (the concurrency limit), `rated` (the
 * rate limit: `retry_s` says when a place frees; every broker's new holds of the last minute are
 * in `till_rate`) or `gone` (the hold is no longer open: reclaimed), the hold's id, and what the
 * key holds afterwards.
 */
const CHANGE_HOLDS_FUNCTION = `
drop function if exists till_take_holds(text, jsonb, text, bigint);
drop function if exists till_resize_holds(text, jsonb, text, bigint);
create or replace function till_change_holds(p_key text, p_items jsonb, p_broker text, p_ttl_ms bigint)
returns table (n int, state text, hold_id bigint, ha bigint, ht bigint, hs bigint, retry_s int) language plpgsql as $fn$
declare
  k record;
  h record;
  hid bigint;
  a bigint; t bigint; s bigint;
  da bigint; dt bigint; ds bigint;
  outcome text;
  ns int[] := '{}';
  states text[] := '{}';
  ids bigint[] := '{}';
  changed boolean := false;
  slots bigint;
  recent bigint;
  oldest timestamptz;
  waits int[] := '{}';
  wait int;
begin
  select lim_activations, lim_tokens, lim_spend, lim_concurrency, lim_rpm, used_activations, used_tokens, used_spend,
         held_activations, held_tokens, held_spend, revoked_at
    into k from till_keys where till_keys.id = p_key for update;
  if not found then return; end if;
  -- Requests in flight on every broker: one hold each (the key's row lock keeps the count still).
  if k.lim_concurrency is not null then
    select count(*) into slots from till_holds where key_id = p_key;
  end if;
  -- Requests of the last minute on every broker, for the rate limit.
  if k.lim_rpm is not null then
    select count(*), min(at) into recent, oldest from till_rate where key_id = p_key and at > now() - interval '1 minute';
  end if;
  for i in 0 .. jsonb_array_length(p_items) - 1 loop
    hid := (p_items->i->>0)::bigint;
    a := (p_items->i->>1)::bigint; t := (p_items->i->>2)::bigint; s := (p_items->i->>3)::bigint;
    outcome := 'held';
    wait := null;
    if hid is null then
      da := a; dt := t; ds := s;
      if k.revoked_at is not null then outcome := 'refused';
      elsif k.lim_concurrency is not null and slots >= k.lim_concurrency then outcome := 'busy';
      elsif k.lim_rpm is not null and recent >= k.lim_rpm then
        outcome := 'rated';
        wait := greatest(1, ceil(extract(epoch from (coalesce(oldest, now()) + interval '1 minute' - now()))))::int;
      end if;
    else
      select activations, tokens, spend into h from till_holds
        where till_holds.id = hid and broker = p_broker and key_id = p_key for update;
      if not found then outcome := 'gone';
      else da := a - h.activations; dt := t - h.tokens; ds := s - h.spend;
      end if;
    end if;
    if outcome = 'held' and not (
         (k.lim_activations is null or da <= 0 or k.used_activations + k.held_activations + da <= k.lim_activations)
         and (k.lim_tokens is null or dt <= 0 or k.used_tokens + k.held_tokens + dt <= k.lim_tokens)
         and (k.lim_spend is null or ds <= 0 or k.used_spend + k.held_spend + ds <= k.lim_spend)) then
      outcome := 'refused';
    end if;
    if outcome = 'held' then
      k.held_activations := k.held_activations + da;
      k.held_tokens := k.held_tokens + dt;
      k.held_spend := k.held_spend + ds;
      if hid is null then
        slots := slots + 1;
        if k.lim_rpm is not null then
          recent := recent + 1;
          oldest := coalesce(oldest, now());
          insert into till_rate (key_id, at) values (p_key, now());
        end if;
        insert into till_holds (key_id, broker, activations, tokens, spend, expires_at)
          values (p_key, p_broker, a, t, s, now() + p_ttl_ms * interval '1 millisecond') returning till_holds.id into hid;
      else
        update till_holds set activations = a, tokens = t, spend = s, expires_at = now() + p_ttl_ms * interval '1 millisecond'
          where till_holds.id = hid;
      end if;
      changed := true;
    end if;
    ns := ns || (i + 1);
    states := states || outcome;
    ids := array_append(ids, hid);
    waits := array_append(waits, wait);
  end loop;
  if changed then
    update till_keys set held_activations = k.held_activations, held_tokens = k.held_tokens, held_spend = k.held_spend, v = v + 1
      where till_keys.id = p_key;
  end if;
  return query select u.n, u.state, u.id, k.held_activations, k.held_tokens, k.held_spend, u.w
    from unnest(ns, states, ids, waits) as u(n, state, id, w);
end $fn$;
`;

// $1 key, $2 JSON [[hold id or null, activations, tokens, spend], …], $3 broker, $4 ttl ms.
const CHANGE_HOLDS = `select n, state, hold_id, ha, ht, hs, retry_s from till_change_holds($1, $2::jsonb, $3, $4)`;

/**
 * Ends a batch of one key's holds in one statement: settles each (its amounts become spending of
 * what it used) or releases it (it used nothing); the key's row is written once, and its counters
 * told to every broker. `ended` lists the holds that were still open: one reclaimed meanwhile (its
 * broker taken for dead) matches no row and changes nothing. $1 JSON of {@link Ending}s, $2
 * broker, $3 key.
 *
 * Every statement that changes holds locks the key's row before any of its holds: here (`k`:
 * no hold row can be deleted before the join has it), in {@link CHANGE_HOLDS_FUNCTION}, and in
 * {@link RECLAIM} (keys in id order). A hold is then only ever waited for by a statement that
 * already holds its key, so none of them can deadlock with another.
 */
const END = `with k as (select id from till_keys where id = $3 for update),
s as (select * from jsonb_to_recordset($1::jsonb)
    as x(id bigint, a bigint, t bigint, sp bigint, ti bigint, tout bigint, tc bigint, tr bigint, e bigint, u bigint)),
h as (delete from till_holds d using s, k where d.id = s.id and d.broker = $2 and d.key_id = k.id
  returning d.id, d.key_id, d.activations, d.tokens, d.spend),
j as (select h.key_id, sum(h.activations) as ha, sum(h.tokens) as ht, sum(h.spend) as hs,
    sum(s.a) as ua, sum(s.t) as ut, sum(s.sp) as us, sum(s.ti) as ti, sum(s.tout) as tout, sum(s.tc) as tc, sum(s.tr) as tr,
    sum(s.e) as e, sum(s.u) as u
  from h join s on s.id = h.id group by h.key_id),
t as (update till_keys t set v = v + 1, held_activations = held_activations - j.ha, held_tokens = held_tokens - j.ht,
  held_spend = held_spend - j.hs,
  used_activations = used_activations + j.ua, used_tokens = used_tokens + j.ut, used_spend = used_spend + j.us,
  tok_input = tok_input + j.ti, tok_output = tok_output + j.tout, tok_cached = tok_cached + j.tc, tok_reasoning = tok_reasoning + j.tr,
  estimated_spend = estimated_spend + j.e, unpriced = unpriced + j.u
from j where t.id = j.key_id returning t.*)
select ${RETURN_AND_TELL}, (select json_agg(id) from h) as ended from t`;

/** One hold to end, as {@link END} reads it: what it used (all 0 for a release). */
interface Ending {
  id: number;
  a: number;
  t: number;
  sp: number;
  ti: number;
  tout: number;
  tc: number;
  tr: number;
  e: number;
  u: number;
}

/** A hold to take or resize, as {@link CHANGE_HOLDS} takes it. */
interface Change {
  /** The hold to grow or shrink; absent: a new hold. */
  hold?: LedgerHold;
  amounts: Amounts;
}

/** What became of a {@link Change}. */
type Changed =
  | { state: 'held'; id: number }
  | { state: 'refused'; refusal: HoldRefusal }
  | { state: 'busy' }
  | { state: 'rated'; retryAfter: number }
  | { state: 'gone' };

/** What a change asks for beyond what its hold held (all of it, for a new hold). */
function growthOf({ hold, amounts }: Change): Amounts {
  if (!hold) return amounts;
  const growth: Amounts = {};
  for (const meter of METERS) {
    const more = (amounts[meter] ?? 0) - (hold.amounts[meter] ?? 0);
    if (more > 0) growth[meter] = more;
  }
  return growth;
}

/** Most holds taken or ended in one statement. */
const BATCH = 500;

// Expired holds (their broker stopped renewing them) count as spent, at what they held. Their keys
// are locked first, in id order (see END).
const RECLAIM = `with k as (select id from till_keys where id in (select key_id from till_holds where expires_at < now()) order by id for update),
h as (delete from till_holds d using k where d.key_id = k.id and d.expires_at < now() returning d.key_id, d.activations, d.tokens, d.spend),
s as (select key_id, sum(activations) as a, sum(tokens) as t, sum(spend) as s from h group by key_id),
t as (update till_keys k set held_activations = held_activations - s.a, held_tokens = held_tokens - s.t, held_spend = held_spend - s.s,
  used_activations = used_activations + s.a, used_tokens = used_tokens + s.t, used_spend = used_spend + s.s, v = v + 1
  from s where k.id = s.key_id returning k.*),
-- The rate limit looks one minute back: older rows are nobody's (pruned here, in the same round trip).
r as (delete from till_rate where at < now() - interval '2 minutes')
select ${RETURN_AND_TELL} from t`;

// $1 a JSON array of audit records (audit.ts), $2 broker: one statement per batch.
const AUDIT = `insert into till_audit (at, broker, key_id, label, provider, method, path, model, status, latency_ms, denial, reason)
  select r.time::timestamptz, $2, r."keyId", r.label, r.provider, r.method, r.path, r.model, r.status, r."latencyMs", r.denial, r.reason
  from jsonb_to_recordset($1::jsonb) as r(time text, "keyId" text, label text, provider text, method text, path text, model text,
    status int, "latencyMs" real, denial text, reason text)`;

/** Audit records kept for the database while it is away; older ones are only in each broker's own audit file. */
const AUDIT_BACKLOG = 50_000;

const RENEW = `update till_holds set expires_at = now() + $2 * interval '1 millisecond' where broker = $1`;

type Row = Record<string, unknown>;

const num = (v: unknown): number => (v === null || v === undefined ? 0 : Number(v));

/** What a key holds, from a hold statement's `ha`, `ht`, `hs` (its held columns after the change). */
function heldOf(row: Row): Amounts {
  return { activations: num(row.ha), tokens: num(row.ht), spend: num(row.hs) };
}

/** The three meters of amounts as whole numbers (a meter not asked for is 0). */
function meters(amounts: Amounts): [number, number, number] {
  return [Math.ceil(amounts.activations ?? 0), Math.ceil(amounts.tokens ?? 0), Math.ceil(amounts.spend ?? 0)];
}

/** A key's whole row as the record the broker works with, and what it holds. */
function recordOf(row: Row): { key: KeyRecord; held: Amounts } {
  const key = { ...(row.record as object), policy: row.policy, used: {} } as KeyRecord;
  return { key, held: countersInto(key, row) };
}

/**
 * A row's counters written into `key` in place (used, tokens by kind, estimated spend, unpriced,
 * revocation), as a settlement or a notification brings them; returns what the key holds.
 */
function countersInto(key: KeyRecord, row: Row): Amounts {
  const held: Amounts = {};
  const used: Amounts = {};
  for (const meter of METERS) {
    const u = num(row[`used_${meter}`]);
    if (u !== 0) used[meter] = u;
    const h = num(row[`held_${meter}`]);
    if (h !== 0) held[meter] = h;
  }
  key.used = used;
  const tokens: TokenCounts = {
    input: num(row.tok_input),
    output: num(row.tok_output),
    cached: num(row.tok_cached),
    reasoning: num(row.tok_reasoning),
  };
  if (tokens.input + tokens.output + tokens.cached + tokens.reasoning > 0) key.tokens = tokens;
  else delete key.tokens;
  if (num(row.estimated_spend) > 0) key.estimatedSpend = num(row.estimated_spend);
  else delete key.estimatedSpend;
  if (num(row.unpriced) > 0) key.unpriced = num(row.unpriced);
  else delete key.unpriced;
  if (row.revoked_at !== null && row.revoked_at !== undefined) key.revokedAt = num(row.revoked_at);
  else delete key.revokedAt;
  return held;
}

/** The columns of a key that do not change with use (the record without policy, counters and state). */
function storedPart(key: KeyRecord): object {
  const { policy: _policy, used: _used, tokens: _tokens, estimatedSpend: _e, unpriced: _u, revokedAt: _r, ...stored } = key;
  return stored;
}

function limitColumns(policy: Policy): [number | null, number | null, number | null, number | null, number | null] {
  const limits = limitsOf(policy);
  return [limits.activations ?? null, limits.tokens ?? null, limits.spend ?? null, policy.concurrency ?? null, policy.rpm ?? null];
}

/** `url` without its password (and without query parameters, which may carry one). */
export function withoutPassword(url: string): string {
  try {
    const u = new URL(url);
    u.password = '';
    u.search = '';
    return u.toString();
  } catch {
    return 'postgres://(unreadable URL)';
  }
}

/** The team ledger over one PostgreSQL database. See the guarantees at the top of this file. */
export class PostgresLedger extends KnownKeys implements KeyLedger {
  readonly shared = true;
  /** The row version (`v`) of each key as last kept. */
  private readonly versions = new Map<string, number>();
  private readonly listeners = new Set<(key: KeyRecord) => void>();
  private listener: Client | undefined;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Settlements and releases the database was away for, retried in order by {@link maintain}. */
  private unsettled: { keyId: string; ending: Ending }[] = [];
  /** New holds, growths and shrinks, and settlements and releases, sent a batch per key per statement (keyBatches.ts). */
  private readonly changes = new KeyBatches<Change, Changed>((key, asked) => this.changeHolds(key, asked), BATCH);
  private readonly endings = new KeyBatches<Ending, boolean>((key, endings) => this.endHolds(key, endings), BATCH);
  /** Lookups of unknown keys on their way ({@link find}), and ids found missing, until when. */
  private readonly finding = new Map<string, Promise<KeyRecord | undefined>>();
  private readonly missing = new Map<string, number>();
  /** Audit records not yet written, and whether a write is on its way. */
  private auditBacklog: object[] = [];
  private auditing = false;
  readonly brokerId: string;
  readonly holdTtlMs: number;
  /** The database, as it may be shown: its URL without the password. */
  readonly name: string;

  private constructor(
    private readonly pool: Pool,
    private readonly url: string,
    options: PostgresLedgerOptions,
  ) {
    super();
    this.brokerId = options.brokerId ?? `broker-${randomBytes(6).toString('hex')}`;
    this.holdTtlMs = options.holdTtlMs ?? 15_000;
    this.name = withoutPassword(url);
  }

  /** Connects, creates the tables when they are missing, and loads the keys. */
  static async open(url: string, options: PostgresLedgerOptions = {}): Promise<PostgresLedger> {
    const pool = new (pg().Pool)({ connectionString: url, max: options.poolSize ?? 8, connectionTimeoutMillis: 5_000 });
    // An idle connection the server dropped is replaced at the next query; the pool must not crash the broker.
    pool.on('error', () => undefined);
    const ledger = new PostgresLedger(pool, url, options);
    try {
      // One broker creates the tables at a time (an advisory lock held for the transaction).
      const client = await pool.connect();
      try {
        await client.query('begin');
        await client.query('select pg_advisory_xact_lock(7419)');
        await client.query(SCHEMA);
        await client.query(CHANGE_HOLDS_FUNCTION);
        await client.query('commit');
      } catch (err) {
        await client.query('rollback').catch(() => undefined);
        throw err;
      } finally {
        client.release();
      }
      await ledger.reload();
      await ledger.listen();
    } catch (err) {
      await pool.end().catch(() => undefined);
      throw new LedgerUnavailableError(err);
    }
    // At least every second: expired holds of a dead broker are reclaimed within a second of their expiry.
    ledger.timer = setInterval(() => void ledger.maintain(), Math.max(50, Math.min(1_000, Math.floor(ledger.holdTtlMs / 3))));
    ledger.timer.unref();
    return ledger;
  }

  /**
   * A key not seen yet, read from the database: issued through another broker a moment ago, its
   * notification still on its way. Ids found missing are not asked again for a second, so a
   * client presenting made-up keys costs the database one query per id per second at most.
   */
  find(id: string): Promise<KeyRecord | undefined> {
    const known = this.keysById.get(id);
    if (known) return Promise.resolve(known);
    const missingUntil = this.missing.get(id);
    if (missingUntil !== undefined && missingUntil > Date.now()) return Promise.resolve(undefined);
    let pending = this.finding.get(id);
    if (!pending) {
      pending = this.refresh(id)
        .then((key) => {
          if (!key) {
            if (this.missing.size >= 10_000) this.missing.clear();
            this.missing.set(id, Date.now() + 1_000);
          }
          return key;
        })
        .finally(() => this.finding.delete(id));
      this.finding.set(id, pending);
    }
    return pending;
  }

  /** Calls `listener` with a key another broker (or this one) changed: revoked, extended, issued. */
  onKeyChanged(listener: (key: KeyRecord) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async addKey(key: KeyRecord): Promise<void> {
    const rows = await this.query(
      `insert into till_keys (id, record, policy, lim_activations, lim_tokens, lim_spend, lim_concurrency, lim_rpm)
       values ($1, $2, $3, $4, $5, $6, $7, $8)
       returning ${KEY_COLUMNS}`,
      [key.id, storedPart(key), key.policy, ...limitColumns(key.policy)],
    );
    this.take(rows[0]!);
    await this.notify(key.id);
  }

  async updatePolicy(id: string, policy: Policy): Promise<void> {
    const rows = await this.query(
      `update till_keys set policy = $2, lim_activations = $3, lim_tokens = $4, lim_spend = $5, lim_concurrency = $6, lim_rpm = $7, v = v + 1
       where id = $1 returning ${KEY_COLUMNS}`,
      [id, policy, ...limitColumns(policy)],
    );
    if (!rows[0]) throw new Error(`unknown key ${id}`);
    this.take(rows[0]);
    await this.notify(id);
  }

  /** Revokes a key on every broker. False when it was already revoked or is unknown. */
  async revoke(id: string, at = Date.now()): Promise<boolean> {
    const rows = await this.query(
      `update till_keys set revoked_at = $2, v = v + 1 where id = $1 and revoked_at is null returning ${KEY_COLUMNS}`,
      [id, at],
    );
    if (!rows[0]) return false;
    this.take(rows[0]);
    await this.notify(id);
    return true;
  }

  /** Every statement commits before it answers: nothing waits for a later write. */
  whenDurable(then: () => void): void {
    then();
  }

  /**
   * Holds `amounts` against the key's limits. Returns the hold, or why not. Holds asked for while
   * this broker's statement for the same key is on its way go together in the next one, in order
   * (keyBatches.ts, {@link CHANGE_HOLDS_FUNCTION}).
   */
  async hold(keyId: string, amounts: Amounts): Promise<HoldAnswer> {
    const changed = await this.changes.add(keyId, { amounts });
    if (changed.state === 'held') return { id: changed.id, keyId, amounts: { ...amounts } };
    if (changed.state === 'refused') return changed.refusal;
    if (changed.state === 'busy') return { concurrency: this.keysById.get(keyId)?.policy.concurrency ?? 0 };
    if (changed.state === 'rated') return { rpm: this.keysById.get(keyId)?.policy.rpm ?? 0, retryAfter: changed.retryAfter };
    throw new Error(`a new hold on key ${keyId} was reported gone`);
  }

  /**
   * Holds `amounts` instead, with the key's other changes of the moment in one statement: a growth
   * is refused (nothing changes) when the key cannot cover it. Undefined when done, or when the
   * hold is no longer open (reclaimed).
   */
  async resize(hold: LedgerHold, amounts: Amounts): Promise<HoldRefusal | undefined> {
    const changed = await this.changes.add(hold.keyId, { hold, amounts });
    if (changed.state === 'held') hold.amounts = { ...amounts };
    return changed.state === 'refused' ? changed.refusal : undefined;
  }

  /** Takes and resizes a batch of one key's holds in one statement ({@link CHANGE_HOLDS_FUNCTION}). */
  private async changeHolds(keyId: string, asked: Change[]): Promise<Changed[]> {
    const items = asked.map(({ hold, amounts }) => [hold?.id ?? null, ...meters(amounts)]);
    const rows = await this.query(CHANGE_HOLDS, [keyId, JSON.stringify(items), this.brokerId, this.holdTtlMs], 'till_change_holds');
    if (rows[0]) this.heldByKey.set(keyId, heldOf(rows[0]));
    const byPlace = new Map(rows.map((row) => [num(row.n), row]));
    // What each refused change asked for beyond what it held, for the refusal's figures (one read for
    // all). A change with no row was refused too: the key is gone (and the read says so).
    const isRefused = (i: number) => (byPlace.get(i + 1)?.state ?? 'refused') === 'refused';
    const refused = asked.filter((_, i) => isRefused(i));
    const refusals = refused.length > 0 ? await this.refusals(keyId, refused.map(growthOf)) : [];
    let next = 0;
    return asked.map((_, i): Changed => {
      const row = byPlace.get(i + 1);
      if (row?.state === 'held') return { state: 'held', id: Number(row.hold_id) };
      if (row?.state === 'gone') return { state: 'gone' };
      if (row?.state === 'busy') return { state: 'busy' };
      if (row?.state === 'rated') return { state: 'rated', retryAfter: num(row.retry_s) };
      return { state: 'refused', refusal: refusals[next++]! };
    });
  }

  /**
   * Settles a hold: it becomes spending of `actual`. False when the hold was no longer open (its
   * broker was taken for dead and it was reclaimed, counted at what it held): nothing is added.
   * Never throws: with the database away it waits in order and is retried (see {@link end}).
   */
  settle(hold: LedgerHold, actual: Amounts = hold.amounts, details?: SettleDetails): Promise<boolean> {
    const t = details?.tokens;
    const [a, tokens, sp] = meters(actual);
    return this.end(hold.keyId, {
      id: hold.id,
      a,
      t: tokens,
      sp,
      ti: t?.input ?? 0,
      tout: t?.output ?? 0,
      tc: t?.cached ?? 0,
      tr: t?.reasoning ?? 0,
      e: details?.estimated ? sp : 0,
      u: details?.unpriced ? 1 : 0,
    });
  }

  /** Releases a hold (the request never reached the upstream). False when it was no longer open. */
  release(hold: LedgerHold): Promise<boolean> {
    return this.end(hold.keyId, { id: hold.id, a: 0, t: 0, sp: 0, ti: 0, tout: 0, tc: 0, tr: 0, e: 0, u: 0 });
  }

  /**
   * Ends a hold (settles or releases it), with the others of its key that end meanwhile in one
   * statement. With the database away, it is queued and retried: meanwhile the hold stays in the
   * database, renewed, counting as held (never less than spent).
   */
  private end(keyId: string, ending: Ending): Promise<boolean> {
    if (this.unsettled.length > 0) {
      this.unsettled.push({ keyId, ending });
      return Promise.resolve(false);
    }
    return this.endings.add(keyId, ending);
  }

  /** Ends a batch of one key's holds; whether each was still open. Never throws: a batch the database missed waits. */
  private async endHolds(keyId: string, endings: Ending[]): Promise<boolean[]> {
    try {
      const ended = await this.endNow(keyId, endings);
      return endings.map((e) => ended.has(e.id));
    } catch {
      for (const ending of endings) this.unsettled.push({ keyId, ending });
      return endings.map(() => false);
    }
  }

  /** Ends `endings` (of one key) in one statement; the ids of the holds that were still open. */
  private async endNow(keyId: string, endings: Ending[]): Promise<Set<number>> {
    const rows = await this.query(END, [JSON.stringify(endings), this.brokerId, keyId], 'till_end');
    for (const row of rows) this.take(row);
    return new Set(((rows[0]?.ended as number[] | null) ?? []).map(Number));
  }

  /**
   * Copies audit records (audit.ts's `AuditRecord`s; the ledger sits below the audit log, so it
   * takes them as plain objects) to `till_audit` (one statement per batch). With the database away they
   * wait, up to {@link AUDIT_BACKLOG}, and are written when it returns; each broker's audit file
   * keeps them all regardless.
   */
  recordAudit(records: readonly object[]): void {
    for (const r of records) this.auditBacklog.push(r);
    // The oldest go first past the backlog's bound: they stay in each broker's audit file.
    const over = this.auditBacklog.length - AUDIT_BACKLOG;
    if (over > 0) this.auditBacklog.splice(0, over);
    void this.writeAudit();
  }

  private async writeAudit(): Promise<void> {
    if (this.auditing || this.closed) return;
    this.auditing = true;
    try {
      while (this.auditBacklog.length > 0) {
        const batch = this.auditBacklog.slice(0, 1_000);
        await this.query(AUDIT, [JSON.stringify(batch), this.brokerId], 'till_audit');
        this.auditBacklog.splice(0, batch.length);
      }
    } catch {
      // The database is away: retried at the next maintenance.
    } finally {
      this.auditing = false;
    }
  }

  /** Holds whose settlement waits for the database. */
  get waiting(): number {
    return this.unsettled.length;
  }

  /** Renews this broker's holds, retries waiting settlements, reclaims expired holds (every third of the expiry). */
  async maintain(): Promise<void> {
    if (this.closed) return;
    try {
      await this.query(RENEW, [this.brokerId, this.holdTtlMs], 'till_renew');
      // In order, a batch of one key at a time (the first waiting one's).
      while (this.unsettled.length > 0) {
        const keyId = this.unsettled[0]!.keyId;
        const batch = this.unsettled.filter((u) => u.keyId === keyId).slice(0, BATCH);
        await this.endNow(
          keyId,
          batch.map((u) => u.ending),
        );
        this.unsettled = this.unsettled.filter((u) => !batch.includes(u));
      }
      if (this.auditBacklog.length > 0) void this.writeAudit();
      // Their counters, told to every broker in the same statement.
      for (const row of await this.query(RECLAIM, [], 'till_reclaim')) this.take(row);
    } catch {
      // The database is away: holds cannot be renewed, requests are refused; retried at the next tick.
    }
  }

  /** Stops renewing this broker's holds (any still open expire and are reclaimed by another) and disconnects. */
  async close(): Promise<void> {
    // A last try for waiting settlements: else their holds are counted at what they held.
    await this.endings.idle();
    if (this.unsettled.length > 0) await this.maintain();
    await this.writeAudit();
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    await this.listener?.end().catch(() => undefined);
    await this.pool.end().catch(() => undefined);
  }

  // -------------------------------------------------------------------------------------------

  /** Runs one statement; `name` makes it a prepared one (parsed and planned once per connection: the hot ones). */
  private async query(text: string, values: unknown[], name?: string): Promise<Row[]> {
    try {
      return (await this.pool.query({ text, values, name })).rows as Row[];
    } catch (err) {
      throw new LedgerUnavailableError(err);
    }
  }

  /** Why each of `asked` did not fit the key (one read of its row for all). */
  private async refusals(keyId: string, asked: Amounts[]): Promise<HoldRefusal[]> {
    const rows = await this.query(`select ${KEY_COLUMNS}, lim_activations, lim_tokens, lim_spend from till_keys where id = $1`, [keyId]);
    const row = rows[0];
    if (!row) throw new Error(`unknown key ${keyId}`);
    const { key, held } = this.take(row)!;
    return asked.map((amounts) => {
      const over = overLimit(key, held, amounts);
      if (over) return over;
      // It fitted a moment later (another request settled): say what was short when it was refused.
      const meter = METERS.find((m) => (amounts[m] ?? 0) > 0) ?? 'activations';
      return { meter, limit: num(row[`lim_${meter}`]), used: num(row[`used_${meter}`]), reserved: held[meter] ?? 0 };
    });
  }

  /**
   * Keeps a key's row (or counters) when it is newer than what this broker has seen: statements'
   * results and other brokers' notifications can arrive out of order.
   */
  private take(row: Row): { key: KeyRecord; held: Amounts } | undefined {
    const id = String(row.id);
    const known = this.keysById.get(id);
    const version = num(row.v);
    if (known && (this.versions.get(id) ?? -1) > version) return { key: known, held: this.reserved(id) };
    if (!known && row.record === undefined) {
      // Counters of a key this broker has not seen yet: read it whole.
      void this.refresh(id).catch(() => undefined);
      return undefined;
    }
    this.versions.set(id, version);
    // Counters only (a settlement's result, a notification): written into the record the broker holds.
    if (known && row.record === undefined) {
      const held = countersInto(known, row);
      this.heldByKey.set(id, held);
      return { key: known, held };
    }
    const taken = recordOf(row);
    // Keep the object the broker holds (its requests refer to it): update it in place.
    if (known) {
      for (const field of Object.keys(known) as (keyof KeyRecord)[]) if (!(field in taken.key)) delete known[field];
      Object.assign(known, taken.key);
    } else this.keysById.set(taken.key.id, taken.key);
    this.heldByKey.set(taken.key.id, taken.held);
    return taken;
  }

  /** Reads every key; `tell`: after the notifications were away, announce what changed meanwhile. */
  private async reload(tell = false): Promise<void> {
    for (const row of await this.query(`select ${KEY_COLUMNS} from till_keys`, [])) {
      const before = this.keysById.get(String(row.id));
      const revokedBefore = before?.revokedAt;
      const policyBefore = JSON.stringify(before?.policy);
      const key = this.take(row)?.key;
      if (!tell || !key) continue;
      if (!before || key.revokedAt !== revokedBefore || JSON.stringify(key.policy) !== policyBefore)
        for (const listener of this.listeners) listener(key);
    }
  }

  private async refresh(id: string): Promise<KeyRecord | undefined> {
    const rows = await this.query(`select ${KEY_COLUMNS} from till_keys where id = $1`, [id]);
    if (!rows[0]) return undefined;
    return this.take(rows[0])?.key;
  }

  private async notify(id: string): Promise<void> {
    await this.query(`select pg_notify('till_keys', $1)`, [id]);
  }

  /** One connection that hears about changed keys; reconnected when it drops, with a full reload. */
  private async listen(): Promise<void> {
    const client = new (pg().Client)({ connectionString: this.url });
    client.on('error', () => undefined);
    client.on('notification', (message) => {
      if (!message.payload) return;
      if (message.channel === 'till_use') return this.heardUse(message.payload);
      void this.refresh(message.payload).then(
        (key) => {
          if (key) for (const listener of this.listeners) listener(key);
        },
        () => undefined,
      );
    });
    try {
      await client.connect();
      // Closed while this connection was being made (a reconnection after an outage): it must
      // not outlive the ledger, or it keeps the process from exiting.
      if (this.closed) throw new Error('the ledger is closed');
      await client.query('listen till_keys; listen till_use');
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
    this.listener = client;
    // Only a connection that listens is followed: one lost later is made again, with a reload.
    client.on('end', () => {
      if (this.closed) return;
      this.listener = undefined;
      const retry = () => {
        if (this.closed) return;
        this.listen()
          .then(() => this.reload(true))
          .catch(() => setTimeout(retry, 500).unref());
      };
      setTimeout(retry, 200).unref();
    });
  }

  /** Another broker (or this one) settled or released a hold: the key's counters, as JSON. */
  private heardUse(payload: string): void {
    try {
      this.take(JSON.parse(payload) as Row);
    } catch {
      // Not ours to read: a notification on the channel from something else.
    }
  }
}
