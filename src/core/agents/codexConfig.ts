/** Codex's config.toml for a run through Till. */
import { parseSections, render, setIn, setTableKey, tomlString, trimTrailingBlank } from './toml';

/**
 * The user's Codex config.toml with Till layered on: `model_provider = "till"` (also in every
 * profile that names a provider), a `[model_providers.till]` pointing at the broker, analytics and
 * plugins off. Everything else the user set stays. Any existing `till` provider is replaced.
 */
export function codexConfig(userToml: string, baseUrl: string): string {
  let sections = parseSections(userToml);
  const isTill = (name: string | undefined) => name === 'model_providers.till' || Boolean(name?.startsWith('model_providers.till.'));
  // Drop the user's own "till" provider, however written.
  sections = sections.filter((s) => !isTill(s.table));
  for (const s of sections) {
    s.body = s.body.filter((st) => {
      if (st.kind !== 'key') return true;
      const full = s.table ? `${s.table}.${st.name}` : st.name!;
      return !isTill(full) && full !== 'model_providers.till';
    });
  }
  const top = sections[0]!;
  const provider = `model_provider = ${tomlString('till')}`;
  if (top.body.some((st) => st.kind === 'key' && st.name === 'model_provider')) setIn(top, 'model_provider', tomlString('till'));
  else {
    // Top-level keys stay before the first table header: after the leading comment block, if any.
    const firstKey = top.body.findIndex((st) => st.kind === 'key');
    const insertAt = firstKey >= 0 ? firstKey : top.body.length;
    top.body.splice(insertAt, 0, { kind: 'key', lines: [provider], name: 'model_provider' });
    if (insertAt === top.body.length - 1 && sections.length > 1) top.body.push({ kind: 'other', lines: [''] });
  }
  // A profile that names its own provider would go around the broker.
  for (const s of sections) {
    if (!s.table?.startsWith('profiles.')) continue;
    for (const st of s.body) if (st.kind === 'key' && st.name === 'model_provider') st.lines = [provider];
  }
  for (const st of top.body) {
    if (st.kind === 'key' && /^profiles\.[^]+\.model_provider$/.test(st.name!))
      st.lines = [`${st.lines[0]!.split('=')[0]!.trimEnd()} = ${tomlString('till')}`];
  }
  setTableKey(sections, 'analytics', 'enabled', 'false');
  setTableKey(sections, 'features', 'plugins', 'false');
  const last = sections.at(-1)!;
  trimTrailingBlank(last.body);
  last.body.push({ kind: 'other', lines: [''] });
  sections.push({
    table: 'model_providers.till',
    header: { kind: 'header', lines: ['[model_providers.till]'], name: 'model_providers.till' },
    body: [
      `name = ${tomlString('Till')}`,
      `base_url = ${tomlString(baseUrl)}`,
      `env_key = ${tomlString('OPENAI_API_KEY')}`,
      `wire_api = ${tomlString('responses')}`,
      'supports_websockets = true',
    ].map((line) => ({ kind: 'key' as const, lines: [line] })),
  });
  return render(sections);
}
