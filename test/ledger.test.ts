/**
 * The ledger on its own: the journal of till keys and their counters. It must replay to the
 * same state after a clean close, a crash (no close at all) and compaction, and it must refuse
 * a damaged file with a message a person can act on, without touching that file.
 */
import { existsSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import {
  isRefusal,
  keyState,
  Ledger,
  LedgerCorruptError,
  type KeyRecord,
  type LedgerHold,
  type HoldRefusal,
} from '../src/core/ledger/ledger';
import type { Policy } from '../src/core/policy/policy';
import { runTill, spawnServe, tempHome } from './support/till';

let nextId = 0;

function record(policy: Policy = { maxActivations: 10 }, label = 'test key'): KeyRecord {
  nextId++;
  return {
    id: `k${String(nextId).padStart(8, '0')}`,
    hash: 'ab'.repeat(32),
    label,
    provider: 'openai',
    credential: 'openai',
    createdAt: 1_700_000_000_000 + nextId,
    policy,
    used: {},
  };
}

function ledgerFile(): string {
  return join(tempHome(), 'ledger.jsonl');
}

function reserveOk(ledger: Ledger, keyId: string, n = 1): LedgerHold {
  const r = ledger.hold(keyId, { activations: n });
  if (isRefusal(r)) throw new Error(`expected a reservation, got a refusal: ${JSON.stringify(r)}`);
  return r;
}

function reserveRefused(ledger: Ledger, keyId: string, n = 1): HoldRefusal {
  const r = ledger.hold(keyId, { activations: n });
  if (!isRefusal(r)) throw new Error(`expected a refusal, got reservation ${r.id}`);
  return r;
}

function used(ledger: Ledger, keyId: string): number {
  return ledger.get(keyId)?.used.activations ?? 0;
}

/** A journal line as the ledger writes it: crc32 of the JSON in hex, a space, the JSON. */
function line(json: string): string {
  return `${crc32(json).toString(16).padStart(8, '0')} ${json}\n`;
}

/** Opening `file` must throw LedgerCorruptError naming the file and `line`, and leave the bytes as they were. */
function expectCorrupt(file: string, lineNo: number, detail: RegExp): LedgerCorruptError {
  const before = readFileSync(file);
  const mtime = statSync(file).mtimeMs;
  let caught: unknown;
  try {
    Ledger.open(file).close();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(LedgerCorruptError);
  const err = caught as LedgerCorruptError;
  expect(err.name).toBe('LedgerCorruptError');
  expect(err.file).toBe(file);
  expect(err.line).toBe(lineNo);
  expect(err.message).toContain(file);
  expect(err.message).toContain(`line ${lineNo}`);
  expect(err.message).toMatch(detail);
  expect(err.message).toMatch(/untouched/);
  expect(err.message).not.toContain('\n');
  // Byte for byte as it was, not rewritten, and no compaction left behind.
  expect(readFileSync(file).equals(before)).toBe(true);
  expect(statSync(file).mtimeMs).toBe(mtime);
  expect(existsSync(`${file}.tmp`)).toBe(false);
  return err;
}

/** A healthy ledger file with a header, two keys and some traffic; returns its path and text. */
function healthyLedger(): { file: string; text: string; lines: string[] } {
  const file = ledgerFile();
  const ledger = Ledger.open(file, { compactAfter: 1_000 });
  const a = record();
  const b = record();
  ledger.addKey(a);
  ledger.addKey(b);
  ledger.settle(reserveOk(ledger, a.id));
  ledger.release(reserveOk(ledger, b.id));
  ledger.revoke(b.id, 1_700_000_999_000);
  ledger.close();
  const text = readFileSync(file, 'utf8');
  return { file, text, lines: text.split('\n').slice(0, -1) };
}

describe('ledger: reservations', () => {
  it('issues, reserves, settles and releases, and replays to the same state after reopen', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 3 });
    const other = record({});
    ledger.addKey(key);
    ledger.addKey(other);
    expect(() => ledger.addKey({ ...key })).toThrow(/exists/);

    const r1 = reserveOk(ledger, key.id);
    const r2 = reserveOk(ledger, key.id);
    const r3 = reserveOk(ledger, key.id);
    expect(ledger.reserved(key.id)).toEqual({ activations: 3 });
    // Limit held by reservations: a fourth is refused, with used and held reported.
    expect(reserveRefused(ledger, key.id)).toEqual({ meter: 'activations', limit: 3, used: 0, reserved: 3 });

    ledger.settle(r1);
    ledger.settle(r1); // twice is a no-op
    ledger.release(r2);
    ledger.release(r2);
    ledger.settle(r2); // settling a released reservation is a no-op too
    expect(used(ledger, key.id)).toBe(1);
    expect(ledger.reserved(key.id)).toEqual({ activations: 1 });

    // The released activation is available again.
    const r4 = reserveOk(ledger, key.id);
    expect(reserveRefused(ledger, key.id)).toMatchObject({ used: 1, reserved: 2 });
    ledger.settle(r3);
    ledger.settle(r4, { activations: 1 });
    expect(used(ledger, key.id)).toBe(3);
    expect(ledger.reserved(key.id)).toEqual({ activations: 0 });
    expect(keyState(ledger.get(key.id)!)).toBe('exhausted');
    expect(reserveRefused(ledger, key.id)).toEqual({ meter: 'activations', limit: 3, used: 3, reserved: 0 });

    // A key without a limit never runs out.
    for (let i = 0; i < 20; i++) ledger.settle(reserveOk(ledger, other.id));
    expect(used(ledger, other.id)).toBe(20);
    expect(() => ledger.hold('nope', { activations: 1 })).toThrow(/unknown key/);
    ledger.close();

    const again = Ledger.open(file);
    expect(again.keys().map((k) => k.id)).toEqual([key.id, other.id]);
    expect(used(again, key.id)).toBe(3);
    expect(used(again, other.id)).toBe(20);
    expect(again.reserved(key.id)).toEqual({});
    expect(again.get(key.id)).toMatchObject({
      label: key.label,
      provider: 'openai',
      credential: 'openai',
      policy: { maxActivations: 3 },
      hash: key.hash,
    });
    expect(keyState(again.get(key.id)!)).toBe('exhausted');
    expect(isRefusal(again.hold(key.id, { activations: 1 }))).toBe(true);
    again.close();
  });

  it('replays settles and releases made after the last compaction, without a clean close', async () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 10 });
    ledger.addKey(key);
    for (let i = 0; i < 4; i++) ledger.settle(reserveOk(ledger, key.id));
    for (let i = 0; i < 3; i++) ledger.release(reserveOk(ledger, key.id));
    // Settles and releases reach the file by the end of the event-loop turn.
    await new Promise((r) => setImmediate(r));
    // No close(): the process "dies" here. Every change was already written.
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(4);
    expect(again.reserved(key.id)).toEqual({});
    again.close();
    ledger.close();
  });

  it('a crash before a settle reaches the file counts the reservation in full: never less than spent', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 10 });
    ledger.addKey(key);
    ledger.settle(reserveOk(ledger, key.id));
    ledger.release(reserveOk(ledger, key.id));
    // The process dies within the same turn: both entries were still deferred.
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(2);
    again.close();
    ledger.close();
  });

  it('counts reservations open at a crash as spent after reopen', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 5 });
    ledger.addKey(key);
    ledger.settle(reserveOk(ledger, key.id));
    ledger.release(reserveOk(ledger, key.id));
    reserveOk(ledger, key.id);
    reserveOk(ledger, key.id);
    // Crash: two requests in flight, never settled nor released.
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(3);
    expect(again.reserved(key.id)).toEqual({});
    // Exactly the two remaining activations are left.
    const a = reserveOk(again, key.id);
    const b = reserveOk(again, key.id);
    expect(reserveRefused(again, key.id)).toMatchObject({ used: 3, reserved: 2 });
    again.settle(a);
    again.settle(b);
    again.close();

    // And a second crash-free reopen does not count them twice.
    const third = Ledger.open(file);
    expect(used(third, key.id)).toBe(5);
    third.close();
    ledger.close();
  });

  it('keeps reservation ids apart from those of an earlier run', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 100 });
    ledger.addKey(key);
    const old = reserveOk(ledger, key.id);
    ledger.close();
    // The old run's reservation was counted as spent at reopen; settling a reservation of the
    // new run (possibly with the same id) must settle that one only, once.
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(1);
    const fresh = reserveOk(again, key.id);
    again.settle(old); // stale handle from the dead run
    again.settle(fresh);
    again.close();
    const third = Ledger.open(file);
    expect(used(third, key.id)).toBe(2);
    third.close();
  });
});

describe('ledger: compaction', () => {
  it('keeps every key, counter and revocation while the file stays small', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file, { compactAfter: 7 });
    const keys = [record({ maxActivations: 1_000 }), record({ maxActivations: 1_000 }), record({})];
    for (const k of keys) ledger.addKey(k);
    const expected = new Map<string, number>(keys.map((k) => [k.id, 0]));
    let maxSize = 0;
    for (let i = 0; i < 600; i++) {
      const k = keys[i % keys.length]!;
      const r = reserveOk(ledger, k.id);
      if (i % 5 === 0) {
        ledger.release(r);
      } else {
        ledger.settle(r);
        expected.set(k.id, expected.get(k.id)! + 1);
      }
      maxSize = Math.max(maxSize, statSync(file).size);
      // After every step the file alone holds the state: reopen a copy and compare.
      if (i % 37 === 0) {
        const copy = join(tempHome(), 'ledger.jsonl');
        ledger.flush();
        writeFileSync(copy, readFileSync(file));
        const replayed = Ledger.open(copy);
        for (const key of keys) expect(used(replayed, key.id), `step ${i} key ${key.id}`).toBe(expected.get(key.id));
        replayed.close();
      }
    }
    ledger.revoke(keys[1]!.id, 1_700_000_123_000);
    for (const k of keys) expect(used(ledger, k.id)).toBe(expected.get(k.id));
    ledger.close();

    // 600 reservations and their ends would be ~1,200 lines; compaction keeps it to a handful.
    const lines = readFileSync(file, 'utf8').split('\n').length - 1;
    expect(lines).toBeLessThanOrEqual(4 + 7);
    expect(maxSize).toBeLessThan(8 * 1024);
    expect(existsSync(`${file}.tmp`)).toBe(false);

    const again = Ledger.open(file, { compactAfter: 7 });
    for (const k of keys) expect(used(again, k.id), k.id).toBe(expected.get(k.id));
    expect(again.get(keys[1]!.id)?.revokedAt).toBe(1_700_000_123_000);
    expect(keyState(again.get(keys[1]!.id)!)).toBe('revoked');
    expect(again.get(keys[0]!.id)?.revokedAt).toBeUndefined();
    again.close();
  });

  it('keeps reservations open across a compaction, and counts them as spent after a crash', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file, { compactAfter: 3 });
    const key = record({ maxActivations: 50 });
    ledger.addKey(key);
    // Every 3rd write compacts, whichever write it is: a reserve, a settle or a release.
    const open: LedgerHold[] = [];
    for (let i = 0; i < 12; i++) open.push(reserveOk(ledger, key.id));
    for (let i = 0; i < 4; i++) ledger.settle(open.shift()!);
    for (let i = 0; i < 3; i++) ledger.release(open.shift()!);
    expect(used(ledger, key.id)).toBe(4);
    expect(ledger.reserved(key.id)).toEqual({ activations: 5 });
    // Crash with 5 reservations in flight (once the settles and releases are written): 4 settled + 5 possibly spent.
    ledger.flush();
    const again = Ledger.open(file, { compactAfter: 3 });
    expect(used(again, key.id)).toBe(9);
    expect(again.reserved(key.id)).toEqual({});
    again.close();
    ledger.close();
  });

  it('keeps in the file a reservation whose own entry triggered the compaction', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file, { compactAfter: 2 });
    const key = record({ maxActivations: 5 });
    ledger.addKey(key); // entry 1
    reserveOk(ledger, key.id); // entry 2: compacts
    // Crash with that request in flight: it may have reached the upstream, so it is spent.
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(1);
    again.close();
    ledger.close();
  });

  it('keeps in the file a settle whose own entry triggered the compaction', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file, { compactAfter: 3 });
    const key = record({ maxActivations: 5 });
    ledger.addKey(key); // entry 1
    const r = reserveOk(ledger, key.id); // entry 2
    ledger.settle(r); // entry 3: compacts
    ledger.close();
    const again = Ledger.open(file);
    expect(used(again, key.id)).toBe(1);
    again.close();
  });

  it('compacts at open, so a reopened ledger starts from a short file', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const key = record({ maxActivations: 500 });
    ledger.addKey(key);
    for (let i = 0; i < 200; i++) ledger.settle(reserveOk(ledger, key.id));
    ledger.close();
    expect(readFileSync(file, 'utf8').split('\n').length - 1).toBe(2 + 400);
    Ledger.open(file).close();
    const text = readFileSync(file, 'utf8');
    expect(text.split('\n').length - 1).toBe(2);
    expect(text.startsWith(line('{"t":"head","v":1}'))).toBe(true);
  });
});

describe('ledger: revocation', () => {
  it('survives reopen, after a clean close and after a crash, and the first revocation time wins', () => {
    const file = ledgerFile();
    const ledger = Ledger.open(file);
    const a = record();
    const b = record();
    ledger.addKey(a);
    ledger.addKey(b);
    expect(ledger.revoke(a.id, 1_700_000_500_000)).toBe(true);
    expect(ledger.revoke(a.id, 1_700_000_600_000)).toBe(false);
    expect(ledger.revoke('unknown')).toBe(false);
    ledger.close();

    const second = Ledger.open(file);
    expect(second.get(a.id)?.revokedAt).toBe(1_700_000_500_000);
    expect(keyState(second.get(a.id)!)).toBe('revoked');
    expect(keyState(second.get(b.id)!)).toBe('active');
    expect(second.revoke(b.id, 1_700_000_700_000)).toBe(true);
    // Crash right after the revocation was acknowledged.
    const third = Ledger.open(file);
    expect(third.get(b.id)?.revokedAt).toBe(1_700_000_700_000);
    expect(third.get(a.id)?.revokedAt).toBe(1_700_000_500_000);
    third.close();
    second.close();
  });
});

describe('ledger: damaged files', () => {
  it('refuses a flipped byte (checksum mismatch) and names the line', () => {
    const { file, lines } = healthyLedger();
    expect(lines.length).toBeGreaterThanOrEqual(5);
    const bytes = readFileSync(file);
    // Flip one bit in the middle of the JSON of line 3.
    const offset =
      lines.slice(0, 2).reduce((n, l) => n + Buffer.byteLength(l) + 1, 0) + 9 + Math.floor(Buffer.byteLength(lines[2]!) / 2) - 4;
    expect(bytes[offset]).not.toBe(0x0a);
    bytes[offset] = bytes[offset]! ^ 0x01;
    writeFileSync(file, bytes);
    expectCorrupt(file, 3, /checksum mismatch/);
  });

  it('refuses a flipped byte in the checksum itself', () => {
    const { file, lines } = healthyLedger();
    const bytes = readFileSync(file);
    const offset = Buffer.byteLength(lines[0]!) + 1 + Buffer.byteLength(lines[1]!) + 1 + 2;
    bytes[offset] = bytes[offset] === 0x30 ? 0x31 : 0x30;
    writeFileSync(file, bytes);
    expectCorrupt(file, 3, /checksum mismatch/);
  });

  it('refuses a last line cut short', () => {
    const { file, text, lines } = healthyLedger();
    writeFileSync(file, text.slice(0, text.length - 10));
    expectCorrupt(file, lines.length, /cut short/);
  });

  it('refuses a last line that lost only its newline', () => {
    const { file, text, lines } = healthyLedger();
    writeFileSync(file, text.slice(0, -1));
    expectCorrupt(file, lines.length, /cut short/);
  });

  it('refuses an empty file', () => {
    const file = ledgerFile();
    writeFileSync(file, '');
    expectCorrupt(file, 1, /empty/);
  });

  it('refuses a file that is not a ledger', () => {
    const file = ledgerFile();
    writeFileSync(file, '# my notes\nnot a ledger at all\n');
    expectCorrupt(file, 1, /checksum mismatch/);
  });

  it('refuses a journal whose header is missing', () => {
    const { file, lines } = healthyLedger();
    // Well-formed, checksummed lines, but the header is gone: not something Till wrote.
    writeFileSync(file, lines.slice(1).join('\n') + '\n');
    expectCorrupt(file, 1, /no header/);
  });

  it('refuses an unknown ledger version', () => {
    const file = ledgerFile();
    writeFileSync(file, line('{"t":"head","v":2}'));
    expectCorrupt(file, 1, /version 2/);
  });

  it('refuses garbage JSON under a valid checksum', () => {
    const { file, lines } = healthyLedger();
    const damaged = [...lines.slice(0, 3), line('{"t":"key","key":{').slice(0, -1), ...lines.slice(3)];
    writeFileSync(file, damaged.join('\n') + '\n');
    expectCorrupt(file, 4, /not JSON/);
  });

  it('refuses a blank line in the middle', () => {
    const { file, lines } = healthyLedger();
    writeFileSync(file, [...lines.slice(0, 2), '', ...lines.slice(2)].join('\n') + '\n');
    expectCorrupt(file, 3, /checksum mismatch/);
  });

  it('opens the healthy file it damaged copies of', () => {
    const { file } = healthyLedger();
    const ledger = Ledger.open(file);
    expect(ledger.keys()).toHaveLength(2);
    ledger.close();
  });
});

describe('till serve on a damaged ledger', () => {
  it('exits non-zero with a one-line error and leaves the file untouched', async () => {
    const home = tempHome();
    const file = join(home, 'ledger.jsonl');
    const { text } = healthyLedger();
    const bytes = Buffer.from(text, 'utf8');
    // Line 1 is the 28-byte header; byte 30 is in line 2's checksum.
    bytes[30] = bytes[30]! ^ 0x01;
    writeFileSync(file, bytes);
    const mtime = statSync(file).mtimeMs;

    const result = await runTill(['serve', '--port', '0'], { home });
    expect(result.code).not.toBe(0);
    expect(result.code).not.toBeNull();
    const stderr = result.stderr.trimEnd();
    expect(stderr.split('\n')).toHaveLength(1);
    expect(stderr).toMatch(/^till: the ledger .* is damaged at line 2 \(checksum mismatch\)/);
    expect(stderr).toContain(file);
    expect(result.stdout).not.toMatch(/listening/);
    expect(readFileSync(file).equals(bytes)).toBe(true);
    expect(statSync(file).mtimeMs).toBe(mtime);
    // Nothing was left behind that would make the next start think a broker runs.
    expect(readdirSync(home).sort()).toEqual(['ledger.jsonl']);
  });

  it('exits non-zero on a cut-short ledger, and starts once the file is moved aside', async () => {
    const home = tempHome();
    const file = join(home, 'ledger.jsonl');
    const { text } = healthyLedger();
    writeFileSync(file, text.slice(0, -3));
    const result = await runTill(['serve', '--port', '0'], { home });
    expect(result.code).toBe(1);
    expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(/cut short/);
    expect(readFileSync(file, 'utf8')).toBe(text.slice(0, -3));

    // As the message says: moved aside, the broker starts with no keys and leaves it alone.
    renameSync(file, `${file}.damaged`);
    const serve = await spawnServe(home);
    try {
      const ls = await runTill(['ls', '--json'], { home });
      expect(ls.code, ls.stderr).toBe(0);
      expect(JSON.parse(ls.stdout)).toEqual([]);
    } finally {
      await serve.stop('SIGTERM');
    }
    expect(readFileSync(`${file}.damaged`, 'utf8')).toBe(text.slice(0, -3));
    Ledger.open(file).close(); // the new one is healthy
  });
});
