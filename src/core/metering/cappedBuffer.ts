/**
 * The bytes of one event (or JSON value) whose end has not arrived yet, copied out of the chunks
 * it spans and capped: an event larger than the cap is dropped whole (skipped for metering, never
 * buffered past the cap), so a stream costs at most the cap in memory whatever it sends.
 */
export class CappedBuffer {
  private parts: Buffer[] = [];
  private size = 0;
  private oversized = false;

  constructor(private readonly max: number) {}

  /** Bytes held now: never more than the cap. */
  get length(): number {
    return this.size;
  }

  /** Keeps a copy of `part` (the caller's chunk is not ours to hold), unless the whole is over the cap. */
  keep(part: Buffer): void {
    if (this.oversized || part.length === 0) return;
    if (this.size + part.length > this.max) {
      this.oversized = true;
      this.parts = [];
      this.size = 0;
      return;
    }
    this.parts.push(Buffer.from(part));
    this.size += part.length;
  }

  /** The bytes kept plus `last`, or undefined when the whole is over the cap; starts afresh. */
  take(last: Buffer): Buffer | undefined {
    const over = this.oversized || this.size + last.length > this.max;
    const whole = over ? undefined : this.parts.length === 0 ? last : Buffer.concat([...this.parts, last]);
    this.parts = [];
    this.size = 0;
    this.oversized = false;
    return whole;
  }
}
