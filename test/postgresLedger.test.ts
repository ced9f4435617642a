/**
 * The team ledger against a real PostgreSQL server (a throw-away cluster, test/support/postgres.ts):
 * three ledgers, as three brokers would open them, on one database.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LedgerUnavailableError, PostgresLedger } from '../src/core/ledger/postgres';
import { isHeld, isRefusal, type KeyRecord, type LedgerHold } from '../src/core/ledger/ledger';
import { startPostgres, type TestPostgres } from './support/postgres';

let db: TestPostgres;
beforeAll(async () => {
  db = await startPostgres();
}, 60_000);
afterAll(() => db?.destroy());

let n = 0;
function keyRecord(policy: KeyRecord['policy']): KeyRecord {
  n++;
  return {
    id: `k${n}x${Date.now().toString(36)}`,
    hash: 'f'.repeat(64),
    label: `test key ${n}`,
    provider: 'openai',
    credential: 'openai',
    createdAt: Date.now(),
    policy,
    used: {},
  };
}

async function brokers(count: number, holdTtlMs?: number): Promise<PostgresLedger[]> {
  return Promise.all(Array.from({ length: count }, () => PostgresLedger.open(db.url, { holdTtlMs })));
}

describe('the team ledger on PostgreSQL', () => {
  it('lets exactly 100 of 900 parallel holds from three brokers take a key with 100 activations', async () => {
    const [a, b, c] = await brokers(3);
    const key = keyRecord({ maxActivations: 100 });
    await a!.addKey(key);
    const results = await Promise.all(
      [a!, b!, c!].flatMap((ledger) => Array.from({ length: 300 }, () => ledger.hold(key.id, { activations: 1 }))),
    );
    const held = results.filter((r) => !isRefusal(r)) as LedgerHold[];
    expect(held).toHaveLength(100);
    const refused = results.find(isRefusal);
    expect(refused).toMatchObject({ meter: 'activations', limit: 100 });
    // Settling from the broker that took each hold: 100 used, nothing held.
    const owner = (h: LedgerHold) => [a!, b!, c!][results.indexOf(h) < 300 ? 0 : results.indexOf(h) < 600 ? 1 : 2]!;
    await Promise.all(held.map((h) => owner(h).settle(h)));
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${key.id}'`)).toBe('100|0');
    await Promise.all([a!, b!, c!].map((l) => l.close()));
  });

  it('never lets parallel spend holds and growths from three brokers cross $1', async () => {
    const ledgers = await brokers(3);
    const key = keyRecord({ maxSpendUsd: 1 });
    await ledgers[0]!.addKey(key);
    // 600 holds of 10,000 micro-dollars ($0.01), each then trying to grow to $0.03.
    const holds = await Promise.all(
      ledgers.flatMap((ledger) =>
        Array.from({ length: 200 }, async () => {
          const hold = await ledger.hold(key.id, { activations: 1, spend: 10_000 });
          if (!isHeld(hold)) return 0;
          const grown = await ledger.resize(hold, { activations: 1, spend: 30_000 });
          await ledger.settle(hold);
          return grown ? 10_000 : 30_000;
        }),
      ),
    );
    const billed = holds.reduce<number>((s, v) => s + v, 0);
    expect(billed).toBeLessThanOrEqual(1_000_000);
    // Nothing that fits was refused: the key is spent to within one growth.
    expect(billed).toBeGreaterThan(1_000_000 - 30_000);
    expect(Number(db.psql(`select used_spend from till_keys where id = '${key.id}'`))).toBe(billed);
    await Promise.all(ledgers.map((l) => l.close()));
  });

  it("reclaims a dead broker's holds after their expiry as spent, and refuses its late settlements", async () => {
    const [dead] = await brokers(1, 400);
    const [alive] = await brokers(1, 400);
    const key = keyRecord({ maxActivations: 3 });
    await alive!.addKey(key);
    const lost = await dead!.hold(key.id, { activations: 1 });
    const kept = await alive!.hold(key.id, { activations: 1 });
    expect(isRefusal(lost) || isRefusal(kept)).toBe(false);
    // The dead broker stops renewing (as kill -9 would stop it); the live one goes on.
    await dead!.close();
    await new Promise((r) => setTimeout(r, 1_200));
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${key.id}'`)).toBe('1|1');
    // The live broker's hold was renewed, not reclaimed: it settles normally.
    expect(await alive!.settle(kept as LedgerHold)).toBe(true);
    // A late settlement of the reclaimed hold (its broker came back) is refused: never counted twice.
    const [back] = await brokers(1, 400);
    const late = await back!.settle({ ...(lost as LedgerHold) });
    expect(late).toBe(false);
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${key.id}'`)).toBe('2|0');
    await Promise.all([alive!, back!].map((l) => l.close()));
  });

  it('tells every broker about a revocation within a second', async () => {
    const [a, b] = await brokers(2);
    const key = keyRecord({});
    await a!.addKey(key);
    await new Promise((r) => setTimeout(r, 100));
    expect(b!.get(key.id)?.revokedAt).toBeUndefined();
    const heard = new Promise<number>((resolve) => b!.onKeyChanged((k) => k.id === key.id && k.revokedAt && resolve(Date.now())));
    const at = Date.now();
    expect(await a!.revoke(key.id)).toBe(true);
    expect((await heard) - at).toBeLessThan(1_000);
    expect(b!.get(key.id)?.revokedAt).toBeDefined();
    // A revoked key takes no hold, on any broker.
    expect(isRefusal(await b!.hold(key.id, { activations: 1 }))).toBe(true);
    await Promise.all([a!, b!].map((l) => l.close()));
  });

  it('fails closed with a clear error while the database is down, and recovers by itself', async () => {
    const [ledger] = await brokers(1);
    const key = keyRecord({ maxActivations: 10 });
    await ledger!.addKey(key);
    const before = await ledger!.hold(key.id, { activations: 1 });
    const during = await ledger!.hold(key.id, { activations: 1 });
    await ledger!.settle(before as LedgerHold);
    db.stop();
    try {
      await expect(ledger!.hold(key.id, { activations: 1 })).rejects.toThrow(LedgerUnavailableError);
      await expect(ledger!.hold(key.id, { activations: 1 })).rejects.toThrow(/team ledger \(PostgreSQL\) is unavailable/);
      // A request that ends during the outage: its settlement waits, it is not lost.
      expect(await ledger!.settle(during as LedgerHold)).toBe(false);
      expect(ledger!.waiting).toBe(1);
    } finally {
      db.start();
    }
    // Acknowledged before the outage: still there; the waiting settlement lands by itself.
    await ledger!.maintain();
    expect(ledger!.waiting).toBe(0);
    expect(db.psql(`select used_activations, held_activations from till_keys where id = '${key.id}'`)).toBe('2|0');
    const after = await ledger!.hold(key.id, { activations: 1 });
    expect(isRefusal(after)).toBe(false);
    await ledger!.close();
  });

  it('stores no till key and no credential, only hashes, policies and counters', async () => {
    const [ledger] = await brokers(1);
    const key = keyRecord({ maxTokens: 1000 });
    await ledger!.addKey(key);
    const row = db.psql(`select record::text from till_keys where id = '${key.id}'`);
    expect(JSON.parse(row)).toMatchObject({ id: key.id, hash: key.hash, label: key.label, credential: 'openai' });
    await ledger!.close();
  });

  it('finds a key another broker issued before its notification arrives, and says so once for a key that does not exist', async () => {
    const [a, b] = await brokers(2);
    const key = keyRecord({ maxActivations: 1 });
    // Written straight to the table, as another broker's insert whose notification is still on its way.
    db.psql(
      `insert into till_keys (id, record, policy, lim_activations) values ('${key.id}', '${JSON.stringify({ ...key, policy: undefined, used: undefined })}', '{"maxActivations":1}', 1)`,
    );
    expect(b!.get(key.id)).toBeUndefined();
    expect(await b!.find(key.id)).toMatchObject({ id: key.id, label: key.label, policy: { maxActivations: 1 } });
    expect(b!.get(key.id)?.id).toBe(key.id);
    expect(await b!.find('k_doesnotexist')).toBeUndefined();
    await Promise.all([a!.close(), b!.close()]);
  });

  it('takes holds asked together in order, each against what the ones before it left, as one statement per hold would', async () => {
    const [a] = await brokers(1);
    const key = keyRecord({ maxSpendUsd: 1 });
    await a!.addKey(key);
    // Asked in one turn, so they travel in one batch: $0.60 fits, the next $0.60 does not, $0.30 still does.
    const results = await Promise.all([600_000, 600_000, 300_000, 200_000].map((spend) => a!.hold(key.id, { activations: 1, spend })));
    expect(results.map((r) => (isRefusal(r) ? 'refused' : 'held'))).toEqual(['held', 'refused', 'held', 'refused']);
    expect(results[1]).toMatchObject({ meter: 'spend', limit: 1_000_000 });
    expect(
      db.psql(
        `select held_activations, held_spend, count(h.id) from till_keys k left join till_holds h on h.key_id = k.id where k.id = '${key.id}' group by k.id`,
      ),
    ).toBe('2|900000|2');
    // Ended together too: one settled at what it used, one released.
    const [first, , third] = results as LedgerHold[];
    expect(await Promise.all([a!.settle(first!, { activations: 1, spend: 250_000 }), a!.release(third!)])).toEqual([true, true]);
    expect(db.psql(`select used_activations, used_spend, held_activations, held_spend from till_keys where id = '${key.id}'`)).toBe(
      '1|250000|0|0',
    );
    await a!.close();
  });

  it('grows and ends the same holds at once without a deadlock: every settlement lands at once, nothing waits', async () => {
    const [a] = await brokers(1);
    const key = keyRecord({ maxSpendUsd: 100 });
    await a!.addKey(key);
    const holds = (await Promise.all(Array.from({ length: 200 }, () => a!.hold(key.id, { activations: 1, spend: 1_000 })))) as LedgerHold[];
    expect(holds.every((h) => !isRefusal(h))).toBe(true);
    // Each stream's last growth still on its way when it ends (a cut while growing), in waves.
    const results = await Promise.all(
      holds.map(async (h, i) => {
        if (i % 2) await new Promise((r) => setTimeout(r, i % 7));
        const [grown, settled] = await Promise.all([
          a!.resize(h, { activations: 1, spend: 5_000 }),
          a!.settle(h, { activations: 1, spend: 800 }),
        ]);
        return { grown, settled };
      }),
    );
    expect(results.every((r) => r.settled)).toBe(true);
    expect(a!.waiting).toBe(0);
    expect(db.psql(`select used_activations, held_activations, held_spend from till_keys where id = '${key.id}'`)).toBe('200|0|0');
    await a!.close();
  });
});
