/**
 * A TOML file edited line by line: statements are kept as written (comments, order, formatting),
 * only the keys Till sets change. Enough TOML to find tables and keys, not a full parser.
 */

/** One statement of a TOML file: a table header, a key (with its continuation lines), or other (blank, comment). */
interface Statement {
  kind: 'header' | 'key' | 'other';
  lines: string[];
  /** Table name for headers, dotted key for keys; quotes and spaces around dots removed. */
  name?: string;
}

export interface Section {
  /** Undefined for the top level (before the first header). */
  table?: string;
  header?: Statement;
  body: Statement[];
}

const BARE_OR_QUOTED = String.raw`(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')`;
const KEY_RE = new RegExp(String.raw`^\s*(${BARE_OR_QUOTED}(?:\s*\.\s*${BARE_OR_QUOTED})*)\s*=`);
const HEADER_RE = new RegExp(String.raw`^\s*\[(\[?)\s*(${BARE_OR_QUOTED}(?:\s*\.\s*${BARE_OR_QUOTED})*)\s*\]\1\s*(?:#.*)?$`);

function normalizeName(dotted: string): string {
  const parts: string[] = [];
  const re = new RegExp(BARE_OR_QUOTED, 'g');
  for (const m of dotted.matchAll(re)) {
    const p = m[0];
    parts.push(p.startsWith('"') ? (JSON.parse(p) as string) : p.startsWith("'") ? p.slice(1, -1) : p);
  }
  return parts.join('.');
}

/** Scanner state carried across lines: open multi-line string, bracket/brace depth. */
interface ScanState {
  string?: '"""' | "'''";
  depth: number;
}

/** Advances the state over one line (strings, comments, brackets). */
function scanLine(line: string, state: ScanState): void {
  let i = 0;
  while (i < line.length) {
    if (state.string) {
      const end = line.indexOf(state.string, i);
      if (state.string === '"""') {
        // Skip escaped characters inside basic multi-line strings.
        let j = i;
        let found = -1;
        while (j < line.length) {
          if (line[j] === '\\') j += 2;
          else if (line.startsWith('"""', j)) {
            found = j;
            break;
          } else j++;
        }
        if (found < 0) return;
        i = found + 3;
        while (line[i] === '"') i++; // up to two quotes may close with the delimiter
      } else {
        if (end < 0) return;
        i = end + 3;
        while (line[i] === "'") i++;
      }
      state.string = undefined;
      continue;
    }
    const c = line[i]!;
    if (c === '#') return;
    if (line.startsWith('"""', i) || line.startsWith("'''", i)) {
      state.string = line.startsWith('"""', i) ? '"""' : "'''";
      i += 3;
      continue;
    }
    if (c === '"') {
      i++;
      while (i < line.length && line[i] !== '"') i += line[i] === '\\' ? 2 : 1;
      i++;
      continue;
    }
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      i = end < 0 ? line.length : end + 1;
      continue;
    }
    if (c === '[' || c === '{') state.depth++;
    else if ((c === ']' || c === '}') && state.depth > 0) state.depth--;
    i++;
  }
}

/** Splits a TOML text into sections of statements; multi-line values stay with their key. */
export function parseSections(text: string): Section[] {
  const lines = text.replace(/\r\n/g, '\n').split('\n');
  if (lines.at(-1) === '') lines.pop();
  const sections: Section[] = [{ body: [] }];
  const state: ScanState = { depth: 0 };
  let current: Statement | undefined;
  for (const line of lines) {
    if (current && (state.string || state.depth > 0)) {
      current.lines.push(line);
      scanLine(line, state);
      continue;
    }
    const header = HEADER_RE.exec(line);
    if (header) {
      const stmt: Statement = { kind: 'header', lines: [line], name: normalizeName(header[2]!) };
      sections.push({ table: stmt.name, header: stmt, body: [] });
      current = stmt;
      continue;
    }
    const key = KEY_RE.exec(line);
    current = key ? { kind: 'key', lines: [line], name: normalizeName(key[1]!) } : { kind: 'other', lines: [line] };
    sections.at(-1)!.body.push(current);
    scanLine(line, state);
  }
  return sections;
}

export function render(sections: Section[]): string {
  const out: string[] = [];
  for (const s of sections) {
    if (s.header) out.push(...s.header.lines);
    for (const st of s.body) out.push(...st.lines);
  }
  return out.join('\n') + '\n';
}

export function trimTrailingBlank(body: Statement[]): void {
  while (body.length > 0 && body.at(-1)!.kind === 'other' && body.at(-1)!.lines.join('').trim() === '') body.pop();
}

/** Sets `key = value` in a section: replaces the key's statement if present, else appends. */
export function setIn(section: Section, key: string, value: string): void {
  const line = `${key} = ${value}`;
  const at = section.body.findIndex((st) => st.kind === 'key' && st.name === key);
  if (at >= 0) {
    section.body[at] = { kind: 'key', lines: [line], name: key };
    section.body = section.body.filter((st, i) => i <= at || !(st.kind === 'key' && st.name === key));
    return;
  }
  trimTrailingBlank(section.body);
  section.body.push({ kind: 'key', lines: [line], name: key });
  section.body.push({ kind: 'other', lines: [''] });
}

/** Sets `table.key = value`: in `[table]` if the file has it, as a dotted key if the top level uses `table.`, else in a new table at the end. */
export function setTableKey(sections: Section[], table: string, key: string, value: string): void {
  const existing = sections.find((s) => s.table === table && s.header && !s.header.lines[0]!.trim().startsWith('[['));
  if (existing) return setIn(existing, key, value);
  const top = sections[0]!;
  if (top.body.some((st) => st.kind === 'key' && st.name!.startsWith(`${table}.`))) return setIn(top, `${table}.${key}`, value);
  const header = `[${table}]`;
  const last = sections.at(-1)!;
  trimTrailingBlank(last.body);
  if (sections.length > 1 || last.body.length > 0) last.body.push({ kind: 'other', lines: [''] });
  sections.push({
    table,
    header: { kind: 'header', lines: [header], name: table },
    body: [{ kind: 'key', lines: [`${key} = ${value}`], name: key }],
  });
}

/** TOML basic string (JSON's escapes are valid TOML for these values). */
export function tomlString(value: string): string {
  return JSON.stringify(value);
}
