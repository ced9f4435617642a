/**
 * The ledger: till keys, their counters and state, kept durable across crashes.
 *
 * One append-only journal file of checksummed JSON lines, replayed at open and compacted
 * into a fresh file by atomic rename. Every change is written (one `write(2)`) before it is
 * acknowledged, so `kill -9` at any moment loses nothing acknowledged: the OS already holds
 * the bytes. A hold that was open when the process died may have reached the
 * upstream, so at the next open it counts as spent at the amounts it last held: after a crash a
 * key can lose what a request never used, but it can never serve more than its limit.
 *
 * A hold can change while its request runs (see {@link Ledger.adjust}): it grows as a stream
 * produces output, and every growth is written before the request may use it, so the amounts a
 * crash counts as spent always cover what the upstream could bill; it shrinks when the upstream
 * reports what it bills, written with the next write (a lost shrink only over-counts).
 */
import { closeSync, fsyncSync, openSync } from 'node:fs';
import { dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import { PendingBytes } from '../files/pendingBytes';
import { ensurePrivateFolder, openPrivateAppend, readPrivateFile, writePrivateFile } from '../files/privateFolder';
import { KnownKeys } from './knownKeys';
import { overLimit, type HoldRefusal, type KeyLedger, type KeyRecord, type LedgerHold, type SettleDetails } from './keyLedger';

export type { HoldRefusal, KeyRecord, LedgerHold, SettleDetails, TokenCounts } from './keyLedger';
export { isHeld, isRefusal } from './keyLedger';
import { hasLimits, limitsOf, type Amounts, type Meter, type Policy } from '../policy/policy';

/** Derived, never stored: what a person would call the key's state. */
export type KeyState = 'active' | 'exhausted' | 'expired' | 'revoked';

export function keyState(key: KeyRecord, now = Date.now()): KeyState {
  if (key.revokedAt !== undefined) return 'revoked';
  if (key.policy.expiresAt !== undefined && now >= key.policy.expiresAt) return 'expired';
  if (!hasLimits(key.policy)) return 'active';
  const limits = limitsOf(key.policy);
  for (const meter of Object.keys(limits) as Meter[]) {
    if ((key.used[meter] ?? 0) >= limits[meter]!) return 'exhausted';
  }
  return 'active';
}

/** Thrown when the ledger file cannot be trusted. The file is left as it is. */
export class LedgerCorruptError extends Error {
  constructor(
    readonly file: string,
    readonly line: number,
    detail: string,
  ) {
    super(
      `the ledger ${file} is damaged at line ${line} (${detail}). Till left it untouched: restore it from a backup, or move it aside to start with no keys`,
    );
    this.name = 'LedgerCorruptError';
  }
}

type Entry =
  | { t: 'head'; v: 1 }
  | { t: 'key'; key: KeyRecord }
  | { t: 'res'; r: number; k: string; a: Amounts }
  | { t: 'set'; r: number; u: Amounts; d?: SettleDetails }
  | { t: 'adj'; r: number; a: Amounts }
  | { t: 'pol'; k: string; p: Policy }
  | { t: 'rel'; r: number }
  | { t: 'rev'; k: string; at: number };

function encode(entry: Entry): string {
  const json = JSON.stringify(entry);
  return `${crc32(json).toString(16).padStart(8, '0')} ${json}\n`;
}

// Keys of the number-only objects in holds and settlements (amounts, token counts).
const NUMBER_FIELDS = new Set(['activations', 'tokens', 'spend', 'input', 'output', 'cached', 'reasoning']);

/** A flat object of numbers as JSON.stringify writes it; undefined for anything else. */
function numbersJson(o: object): string | undefined {
  if (Object.getPrototypeOf(o) !== Object.prototype) return undefined;
  let out = '';
  for (const field of Object.keys(o)) {
    const v = (o as Record<string, unknown>)[field];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !NUMBER_FIELDS.has(field)) return undefined;
    out += `${out ? ',' : '{'}"${field}":${Number.isFinite(v) ? v : 'null'}`;
  }
  return out ? `${out}}` : '{}';
}

/** Settlement details as JSON.stringify writes them; undefined for anything unexpected. */
function detailsJson(d: SettleDetails): string | undefined {
  if (Object.getPrototypeOf(d) !== Object.prototype) return undefined;
  let out = '';
  for (const field of Object.keys(d)) {
    const v = (d as Record<string, unknown>)[field];
    let text: string | undefined;
    if (v === undefined) continue;
    if (field === 'tokens' && typeof v === 'object' && v !== null) text = numbersJson(v);
    else if ((field === 'estimated' || field === 'unpriced') && typeof v === 'boolean') text = String(v);
    if (text === undefined) return undefined;
    out += `${out ? ',' : '{'}"${field}":${text}`;
  }
  return out ? `${out}}` : '{}';
}

// Key ids are base62; anything else goes through JSON.stringify.
const PLAIN_ID = /^[0-9A-Za-z]+$/;

/**
 * The JSON of the entries written on every request (holds, settlements, releases),
 * built from their known shape: the same text as JSON.stringify, which on a busy broker cost
 * several microseconds per entry (it looks up `toJSON` on every object and escapes strings
 * character by character). Undefined for any other entry, or one with unexpected contents.
 */
function hotEntryJson(entry: Entry): string | undefined {
  if (!Number.isSafeInteger((entry as { r?: unknown }).r)) return undefined;
  switch (entry.t) {
    case 'res': {
      const a = numbersJson(entry.a);
      return a !== undefined && PLAIN_ID.test(entry.k) ? `{"t":"res","r":${entry.r},"k":"${entry.k}","a":${a}}` : undefined;
    }
    case 'set': {
      const u = numbersJson(entry.u);
      if (u === undefined) return undefined;
      if (entry.d === undefined) return Object.keys(entry).length === 3 ? `{"t":"set","r":${entry.r},"u":${u}}` : undefined;
      const d = detailsJson(entry.d);
      return d !== undefined ? `{"t":"set","r":${entry.r},"u":${u},"d":${d}}` : undefined;
    }
    case 'rel':
      return `{"t":"rel","r":${entry.r}}`;
    case 'adj': {
      const a = numbersJson(entry.a);
      return a !== undefined ? `{"t":"adj","r":${entry.r},"a":${a}}` : undefined;
    }
    default:
      return undefined;
  }
}

const HEX = Buffer.from('0123456789abcdef', 'latin1');

/** Appends an entry as {@link encode} would write it, encoded once into `out`'s bytes. */
function encodeInto(out: PendingBytes, entry: Entry): void {
  // "<crc32 as 8 hex digits> <json>\n": room for the checksum and the space before, the newline after.
  const { start, end } = out.append(hotEntryJson(entry) ?? JSON.stringify(entry), 9, 1);
  const bytes = out.bytes;
  let crc = crc32(bytes.subarray(start, end));
  for (let i = start - 2; i >= start - 9; i--) {
    bytes[i] = HEX[crc & 15]!;
    crc >>>= 4;
  }
  bytes[start - 1] = 0x20;
  bytes[end] = 0x0a;
}

/** Adds a settled request's spending and details to its key. */
function addSettled(key: KeyRecord, used: Amounts, details: SettleDetails | undefined): void {
  add(key.used, used, 1);
  if (details?.tokens) {
    const t = (key.tokens ??= { input: 0, output: 0, cached: 0, reasoning: 0 });
    t.input += details.tokens.input;
    t.output += details.tokens.output;
    t.cached += details.tokens.cached;
    t.reasoning += details.tokens.reasoning;
  }
  if (details?.estimated && used.spend) key.estimatedSpend = (key.estimatedSpend ?? 0) + used.spend;
  if (details?.unpriced) key.unpriced = (key.unpriced ?? 0) + 1;
}

function add(target: Amounts, amounts: Amounts, sign: 1 | -1): void {
  for (const meter of Object.keys(amounts) as Meter[]) {
    target[meter] = (target[meter] ?? 0) + sign * amounts[meter]!;
  }
}

/** Makes a rename durable across a power cut (a no-op where folders cannot be opened: Windows). */
function syncFolder(folder: string): void {
  if (process.platform === 'win32') return;
  const fd = openSync(folder, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export interface LedgerOptions {
  /** Journal entries after which the file is rewritten compactly. Default: 50,000. */
  compactAfter?: number;
}

/** The durable store of keys and counters. Single writer: the broker process. */
export class Ledger extends KnownKeys implements KeyLedger {
  private readonly open = new Map<number, LedgerHold>();
  private nextHold = 1;
  /** Entries not yet written, in order (see {@link defer}). */
  private readonly deferred = new PendingBytes();
  private durable: (() => void)[] = [];
  private flushScheduled = false;
  private fd: number;
  private entries = 0;
  private readonly compactAfter: number;

  private constructor(
    readonly file: string,
    options: LedgerOptions,
  ) {
    super();
    this.compactAfter = options.compactAfter ?? 50_000;
    this.fd = -1;
  }

  /** Opens (or creates) the ledger at `file`. Throws {@link LedgerCorruptError} on damage. */
  static open(file: string, options: LedgerOptions = {}): Ledger {
    const ledger = new Ledger(file, options);
    ensurePrivateFolder(dirname(file), 'the ledger folder');
    const text = readPrivateFile(file);
    if (text !== undefined) ledger.replay(text);
    // Holds open at the last stop may have reached the upstream: count them as spent.
    for (const res of ledger.open.values()) {
      const key = ledger.keysById.get(res.keyId);
      if (key) add(key.used, res.amounts, 1);
    }
    ledger.open.clear();
    ledger.heldByKey.clear();
    ledger.compact();
    return ledger;
  }

  private replay(text: string): void {
    if (text.length > 0 && !text.endsWith('\n')) {
      throw new LedgerCorruptError(this.file, text.split('\n').length, 'the last record is cut short');
    }
    const lines = text.split('\n');
    lines.pop();
    if (lines.length === 0) throw new LedgerCorruptError(this.file, 1, 'the file is empty; a ledger always starts with a header');
    lines.forEach((line, i) => {
      const n = i + 1;
      const space = line.indexOf(' ');
      const json = line.slice(space + 1);
      if (space !== 8 || crc32(json).toString(16).padStart(8, '0') !== line.slice(0, 8)) {
        throw new LedgerCorruptError(this.file, n, 'checksum mismatch');
      }
      let entry: Entry;
      try {
        entry = JSON.parse(json) as Entry;
      } catch {
        throw new LedgerCorruptError(this.file, n, 'not JSON');
      }
      if (n === 1 && entry.t !== 'head') throw new LedgerCorruptError(this.file, n, 'no header: this is not a Till ledger');
      if (entry.t === 'head' && entry.v !== 1) throw new LedgerCorruptError(this.file, n, `unknown ledger version ${String(entry.v)}`);
      this.apply(entry);
    });
  }

  private apply(entry: Entry): void {
    switch (entry.t) {
      case 'head':
        return;
      case 'key':
        this.keysById.set(entry.key.id, entry.key);
        return;
      case 'pol': {
        const key = this.keysById.get(entry.k);
        if (key) key.policy = entry.p;
        return;
      }
      case 'rev': {
        const key = this.keysById.get(entry.k);
        if (key && key.revokedAt === undefined) key.revokedAt = entry.at;
        return;
      }
      case 'res': {
        const res = { id: entry.r, keyId: entry.k, amounts: entry.a };
        this.open.set(res.id, res);
        this.nextHold = Math.max(this.nextHold, res.id + 1);
        add(this.reservedFor(res.keyId), res.amounts, 1);
        return;
      }
      case 'adj': {
        const res = this.open.get(entry.r);
        if (!res) return;
        const reserved = this.reservedFor(res.keyId);
        add(reserved, res.amounts, -1);
        res.amounts = entry.a;
        add(reserved, res.amounts, 1);
        return;
      }
      case 'set':
      case 'rel': {
        const res = this.open.get(entry.r);
        if (!res) return;
        this.open.delete(entry.r);
        add(this.reservedFor(res.keyId), res.amounts, -1);
        const key = this.keysById.get(res.keyId);
        if (key && entry.t === 'set') addSettled(key, entry.u, entry.d);
        return;
      }
    }
  }

  private reservedFor(keyId: string): Amounts {
    let r = this.heldByKey.get(keyId);
    if (!r) this.heldByKey.set(keyId, (r = {}));
    return r;
  }

  /**
   * Writes an entry now, with any deferred ones before it (order is kept). Holds,
   * keys, revocations and policies are written before they are acknowledged.
   */
  private write(entry: Entry, sync = false): void {
    encodeInto(this.deferred, entry);
    this.deferred.writeTo(this.fd);
    if (sync) fsyncSync(this.fd);
    this.entries++;
  }

  /**
   * Defers an entry to the next write or the end of this event-loop turn: settlements and
   * releases only ever lower what a crash would count (an open hold counts as spent,
   * and it is the worst case), so a busy broker saves a write per request.
   */
  private defer(entry: Entry): void {
    encodeInto(this.deferred, entry);
    this.entries++;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Writes the deferred entries, then runs what waited for them. */
  flush(): void {
    this.flushScheduled = false;
    if (this.deferred.length > 0 && this.fd >= 0) this.deferred.writeTo(this.fd);
    const waiting = this.durable;
    this.durable = [];
    for (const run of waiting) run();
  }

  /**
   * Runs `then` once every hold taken so far is written (at once when it is). Group commit:
   * a busy broker writes the holds of many requests in one write before forwarding any.
   */
  whenDurable(then: () => void): void {
    if (this.deferred.length === 0) return then();
    this.durable.push(then);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /**
   * Compacts when the journal is long. Called by each change only once its in-memory state is
   * updated: compacting inside `write` would snapshot the state from before the entry just
   * written (a settle's spending, a new hold) and lose it from the file.
   */
  private compactIfDue(): void {
    if (this.entries >= this.compactAfter) this.compact();
  }

  /** Rewrites the journal as the current state, through a temporary file and an atomic rename. */
  compact(): void {
    // The snapshot holds everything deferred entries say (memory is already up to date).
    this.deferred.clear();
    let text = encode({ t: 'head', v: 1 });
    for (const key of this.keysById.values()) text += encode({ t: 'key', key });
    for (const res of this.open.values()) text += encode({ t: 'res', r: res.id, k: res.keyId, a: res.amounts });
    writePrivateFile(this.file, text);
    syncFolder(dirname(this.file));
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = openPrivateAppend(this.file);
    this.entries = 0;
  }

  /** Records a newly issued key (synced to disk: an issued key must survive a power cut too). */
  addKey(key: KeyRecord): void {
    if (this.keysById.has(key.id)) throw new Error(`key id ${key.id} exists`);
    this.keysById.set(key.id, key);
    this.write({ t: 'key', key }, true);
    this.compactIfDue();
  }

  /** Replaces a key's policy (to extend its limits). Synced: an extension is acknowledged. */
  updatePolicy(id: string, policy: Policy): void {
    const key = this.keysById.get(id);
    if (!key) throw new Error(`unknown key ${id}`);
    key.policy = policy;
    this.write({ t: 'pol', k: id, p: policy }, true);
    this.compactIfDue();
  }

  /** Revokes a key. Returns false when it was already revoked or is unknown. */
  revoke(id: string, at = Date.now()): boolean {
    const key = this.keysById.get(id);
    if (!key || key.revokedAt !== undefined) return false;
    key.revokedAt = at;
    this.write({ t: 'rev', k: id, at }, true);
    this.compactIfDue();
    return true;
  }

  /**
   * Atomically holds `amounts` against the key's limits. Returns the hold, or why not.
   * Synchronous on purpose: no other request can run between the check and the hold.
   */
  hold(keyId: string, amounts: Amounts, batch = false): LedgerHold | HoldRefusal {
    const key = this.keysById.get(keyId);
    if (!key) throw new Error(`unknown key ${keyId}`);
    const reserved = this.reservedFor(keyId);
    const refused = overLimit(key, reserved, amounts);
    if (refused) return refused;
    const res: LedgerHold = { id: this.nextHold++, keyId, amounts };
    // Batched: written with every other hold of this turn, in one write, before any of
    // them is acted on (the caller waits for {@link whenDurable}).
    if (batch) this.defer({ t: 'res', r: res.id, k: keyId, a: amounts });
    else this.write({ t: 'res', r: res.id, k: keyId, a: amounts });
    this.open.set(res.id, res);
    add(reserved, amounts, 1);
    this.compactIfDue();
    return res;
  }

  /**
   * Changes what an open hold holds to `amounts`, atomically against the key's limits: a growth
   * is refused (and nothing changes) when the key cannot cover it. A growth is written at once,
   * before the caller lets the request use it; a shrink with the next write. Returns the refusal,
   * or undefined when the hold now holds `amounts` (also when the hold is no longer open).
   */
  resize(res: LedgerHold, amounts: Amounts): HoldRefusal | undefined {
    if (!this.open.has(res.id)) return undefined;
    const key = this.keysById.get(res.keyId);
    const reserved = this.reservedFor(res.keyId);
    for (const meter of Object.keys(res.amounts) as Meter[])
      if (amounts[meter] === undefined && res.amounts[meter] !== undefined) throw new Error(`a hold cannot drop its ${meter}`);
    // Only growths are checked against the limits: a hold may always shrink.
    const growth: Amounts = {};
    for (const meter of Object.keys(amounts) as Meter[]) {
      const more = amounts[meter]! - (res.amounts[meter] ?? 0);
      if (more > 0) growth[meter] = more;
    }
    const grows = Object.keys(growth).length > 0;
    const refused = grows && key ? overLimit(key, reserved, growth) : undefined;
    if (refused) return refused;
    add(reserved, res.amounts, -1);
    res.amounts = { ...amounts };
    add(reserved, res.amounts, 1);
    const entry: Entry = { t: 'adj', r: res.id, a: res.amounts };
    if (grows) this.write(entry);
    else this.defer(entry);
    this.compactIfDue();
    return undefined;
  }

  /** Settles a hold: it becomes spending of `actual` (by default, what it holds now). */
  settle(res: LedgerHold, actual: Amounts = res.amounts, details?: SettleDetails): void {
    if (!this.open.delete(res.id)) return;
    this.defer(details ? { t: 'set', r: res.id, u: actual, d: details } : { t: 'set', r: res.id, u: actual });
    add(this.reservedFor(res.keyId), res.amounts, -1);
    const key = this.keysById.get(res.keyId);
    if (key) addSettled(key, actual, details);
    this.compactIfDue();
  }

  /** Releases a hold: the request never reached the upstream. */
  release(res: LedgerHold): void {
    if (!this.open.delete(res.id)) return;
    this.defer({ t: 'rel', r: res.id });
    add(this.reservedFor(res.keyId), res.amounts, -1);
    this.compactIfDue();
  }

  close(): void {
    this.flush();
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
