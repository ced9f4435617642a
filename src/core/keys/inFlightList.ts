/**
 * What the broker holds for each request in flight (how to end it), in a doubly linked list.
 *
 * Not a Set, on purpose. A long-lived Set that gains and loses an entry on every request keeps
 * rehashing into new backing tables, and an old table keeps a link to its successor (for live
 * iterators). With the request-ending closures in two such Sets, every finished request (its
 * buffers, headers and sockets' state) stayed reachable from dead tables in the old generation
 * until the next full collection: at concurrency 32 (`npm run bench`), young-generation
 * collections copied and promoted megabytes of finished requests, about 3.5 KB per request
 * (the pass-through proxy: 0.1 KB); with these lists, 0.5 KB. A list entry drops its value and
 * links when it is removed, so nothing finished stays reachable from it.
 */

/** An entry of an {@link InFlightList}: what {@link InFlightList.add} returns, to remove it later. */
export interface InFlightEntry<T> {
  value: T | undefined;
  prev: InFlightEntry<T> | undefined;
  next: InFlightEntry<T> | undefined;
}

/** A list of values (never `undefined`) with O(1) add and delete. */
export class InFlightList<T> {
  private head: InFlightEntry<T> | undefined;
  private tail: InFlightEntry<T> | undefined;
  private count = 0;

  /** How many entries the list holds. */
  get size(): number {
    return this.count;
  }

  /** Adds `value` at the end; returns its entry, for {@link delete}. */
  add(value: T): InFlightEntry<T> {
    const entry: InFlightEntry<T> = { value, prev: this.tail, next: undefined };
    if (this.tail) this.tail.next = entry;
    else this.head = entry;
    this.tail = entry;
    this.count++;
    return entry;
  }

  /** Removes an entry of this list. Removing it again does nothing. */
  delete(entry: InFlightEntry<T>): void {
    if (entry.value === undefined) return;
    if (entry.prev) entry.prev.next = entry.next;
    else this.head = entry.next;
    if (entry.next) entry.next.prev = entry.prev;
    else this.tail = entry.prev;
    entry.value = undefined;
    entry.prev = undefined;
    entry.next = undefined;
    this.count--;
  }

  /** The values, oldest first (as a Set would give them): a copy, so the list may change while the caller walks it. */
  values(): T[] {
    const out: T[] = [];
    for (let e = this.head; e; e = e.next) out.push(e.value!);
    return out;
  }
}
