/**
 * A value now, or later. The local ledger answers at once (its checks must run with nothing
 * else in between, and a request should not wait a turn for them); the team ledger answers after
 * a round trip to its database. Code that works with either takes a `Maybe` and continues with
 * {@link andThen}, which stays synchronous when the value is.
 */
export type Maybe<T> = T | Promise<T>;

/** Runs `next` on the value: at once when it is here, when it arrives when it is a promise. */
export function andThen<T, U>(value: Maybe<T>, next: (value: T) => Maybe<U>): Maybe<U> {
  return value instanceof Promise ? value.then(next) : next(value);
}
