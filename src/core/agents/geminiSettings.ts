/** Gemini CLI's settings file for a run through Till. */

/**
 * Gemini CLI's system settings for a run through Till: the machine's own (`systemJson`, JSON
 * with comments allowed; unreadable ones are left out) with API-key auth chosen, since with
 * `GOOGLE_GEMINI_BASE_URL` set and no auth chosen Gemini CLI picks a "gateway" auth it then
 * refuses, and a Google login would go around the broker; and usage statistics off, which Gemini
 * CLI otherwise sends to play.googleapis.com.
 */
export function geminiSettings(systemJson: string): string {
  let settings: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(stripJsonComments(systemJson || '{}'));
    if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) settings = parsed as Record<string, unknown>;
  } catch {
    // An unreadable file is one Gemini CLI cannot use either.
  }
  const section = (parent: Record<string, unknown>, name: string): Record<string, unknown> => {
    const value = parent[name];
    if (value !== null && typeof value === 'object' && !Array.isArray(value)) return value as Record<string, unknown>;
    return (parent[name] = {});
  };
  const auth = section(section(settings, 'security'), 'auth');
  auth.selectedType = 'gemini-api-key';
  delete auth.useExternal;
  section(settings, 'privacy').usageStatisticsEnabled = false;
  return JSON.stringify(settings, null, 2) + '\n';
}

/** JSON with `//` and `/* *\/` comments, as Gemini CLI reads its settings, made plain JSON. */
function stripJsonComments(text: string): string {
  return text.replace(/("(?:[^"\\]|\\.)*")|\/\/[^\n]*|\/\*[\s\S]*?\*\//g, (_match, string: string | undefined) => string ?? '');
}
