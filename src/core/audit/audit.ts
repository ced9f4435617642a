/**
 * The audit log: one JSON line per request, no secrets, bounded in size.
 *
 * Lines are buffered and written every 100 ms (and at close), so a busy broker makes one
 * write for many requests; a crash loses at most the last 100 ms of lines. With a team ledger,
 * each batch is also copied to its database. The file rotates to `<name>.1` at `maxBytes`; two generations are kept.
 */
import { closeSync, fstatSync, renameSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Denial } from '../denial';
import type { DenialCode, RequestInfo } from '../events';
import { PendingBytes } from '../files/pendingBytes';
import { ensurePrivateFolder, openPrivateAppend } from '../files/privateFolder';

export interface AuditRecord {
  time: string;
  keyId?: string;
  label?: string;
  provider: string;
  method: string;
  path: string;
  model?: string;
  status: number;
  latencyMs: number;
  denial?: DenialCode;
  reason?: string;
}

// The current second as an ISO string up to its '.', formatted once per second: formatting a
// date on every request was a visible part of its cost.
let isoSecond = NaN;
let isoPrefix = '';

/** `new Date().toISOString()`, from a prefix cached for the current second. */
function isoNow(): string {
  const now = Date.now();
  const second = Math.floor(now / 1000);
  if (second !== isoSecond) {
    const iso = new Date(second * 1000).toISOString();
    isoPrefix = iso.slice(0, iso.length - 4);
    isoSecond = second;
  }
  const ms = now - second * 1000;
  return `${isoPrefix}${ms < 10 ? '00' : ms < 100 ? '0' : ''}${ms}Z`;
}

/** The audit record of a request that ended: served (with how it ended) or denied. */
export function auditRecord(info: RequestInfo, status: number, started: number, denial?: Denial, reason?: string): AuditRecord {
  // Field by field, in a fixed order (spreads would allocate on every request).
  const record: AuditRecord = {
    time: isoNow(),
    provider: info.provider,
    method: info.method,
    path: info.path,
    status,
    latencyMs: Math.round((performance.now() - started) * 10) / 10,
  };
  if (info.keyId) {
    record.keyId = info.keyId;
    record.label = info.label;
  }
  if (info.model !== undefined) record.model = info.model;
  if (denial) {
    record.denial = denial.code;
    record.reason = denial.message;
  } else if (reason) {
    record.reason = reason;
  }
  return record;
}

export interface AuditOptions {
  /** Size at which the file rotates. Default: 10 MiB. */
  maxBytes?: number;
  /** Also hands each batch of records to this (a team ledger's `till_audit`), when the file is written. */
  copyTo?: (records: AuditRecord[]) => void;
}

export class AuditLog {
  private fd: number;
  private size: number;
  /** Lines not yet written, as bytes (see {@link PendingBytes}). */
  private readonly pending = new PendingBytes();
  /** Their length in UTF-16 code units, which is what the rotation check has always counted. */
  private pendingChars = 0;
  private scheduled = false;
  private readonly maxBytes: number;
  private readonly copyTo: ((records: AuditRecord[]) => void) | undefined;
  /** Records for {@link AuditOptions.copyTo} since the last write. */
  private copies: AuditRecord[] = [];

  constructor(
    readonly file: string,
    options: AuditOptions = {},
  ) {
    this.maxBytes = options.maxBytes ?? 10 * 1024 * 1024;
    this.copyTo = options.copyTo;
    ensurePrivateFolder(dirname(file), 'the audit log folder');
    // Never through a link planted where the log goes: lines would be appended to its target.
    this.fd = openPrivateAppend(file);
    this.size = fstatSync(this.fd).size;
  }

  append(record: AuditRecord): void {
    const json = JSON.stringify(record);
    const { end } = this.pending.append(json, 0, 1);
    this.pending.bytes[end] = 0x0a;
    this.pendingChars += json.length + 1;
    if (this.copyTo) this.copies.push(record);
    if (!this.scheduled) {
      this.scheduled = true;
      setTimeout(() => this.flush(), 100).unref();
    }
  }

  flush(): void {
    this.scheduled = false;
    if (this.copies.length > 0) {
      const copies = this.copies;
      this.copies = [];
      this.copyTo!(copies);
    }
    if (this.pending.length === 0 || this.fd < 0) return;
    if (this.size + this.pendingChars > this.maxBytes && this.size > 0) this.rotate();
    this.size += this.pending.length;
    this.pending.writeTo(this.fd);
    this.pendingChars = 0;
  }

  private rotate(): void {
    closeSync(this.fd);
    // A rename replaces whatever is at `.1` (a link included) without following it.
    renameSync(this.file, `${this.file}.1`);
    this.fd = openPrivateAppend(this.file);
    this.size = 0;
  }

  close(): void {
    this.flush();
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}
