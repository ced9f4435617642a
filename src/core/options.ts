/**
 * Options over defaults, where `undefined` means "not set" and never replaces a default.
 *
 * `{ ...defaults, ...options }` lets an option that is present but undefined (a setting not
 * given, `config.maxBodyBytes` when config.json has none) wipe its default out: that once
 * turned the broker's 32 MiB body limit into none and its port 8455 into a random one.
 */

/** Every default not overridden by a defined option. Later `layers` win over earlier ones; undefined never wins. */
export function withDefaults<O extends object, D extends { [K in keyof O]?: NonNullable<O[K]> }>(
  defaults: D,
  ...layers: (Partial<O> | undefined)[]
): O & D {
  const out: Record<string, unknown> = { ...defaults };
  for (const layer of layers) {
    if (!layer) continue;
    for (const name of Object.keys(layer)) {
      const value = (layer as Record<string, unknown>)[name];
      if (value !== undefined) out[name] = value;
    }
  }
  return out as O & D;
}
