/**
 * The Usage view's page: plain DOM, no framework. Host messages only update the model (state.ts,
 * which also computes the figures); one repaint per animation frame draws it, so a burst of
 * requests costs one paint. A frame with nothing new but open streams' running usage
 * (`request.progress`) only rewrites those few texts when they are already on the page.
 * Everything is built with createElement/textContent (never innerHTML), and styles come from
 * media/usage.css (the CSP allows no inline style; bar widths are set through CSSOM, which it allows).
 */
import type { KeySummary } from '../core/events';
import type { TokenCounts } from '../core/ledger/ledger';
import { limitsOf, METERS, type Amounts, type Meter } from '../core/policy/policy';
import { formatAmount, formatSpent, formatUsd } from '../core/keys/present';
import type { RequestRecord } from '../core/events';
import morphdom from 'morphdom';
import type { HostMessage, PageCommand, PageMessage } from './messages';
import {
  addTokens,
  MINUTE,
  newModel,
  noTokens,
  receive,
  running,
  series,
  sortedKeys,
  SPAN,
  stats,
  type Running,
  type Series,
  type State,
  type Stats,
  type Stream,
} from './state';

/** What the page keeps across reloads (VS Code holds it while the view is hidden). */
interface PageState {
  showRevoked?: boolean;
}
const vscode = acquireVsCodeApi<PageState>();
const model = newModel(vscode.getState()?.showRevoked === true);
/** Rows in the requests table. */
const ROWS = 50;

const app = document.getElementById('app')!;
const announcer = document.getElementById('announce')!;

// ---- messages -------------------------------------------------------------------------------

function send(message: PageMessage): void {
  vscode.postMessage(message);
}

window.addEventListener('message', (ev) => {
  const msg = ev.data as HostMessage | null;
  if (typeof msg !== 'object' || msg === null || typeof msg.type !== 'string') return;
  const change = receive(model, msg, Date.now());
  if (change.announce !== undefined) announcer.textContent = change.announce;
  if (change.repaint === 'all') schedule();
  else if (change.repaint === 'live') scheduleLive();
});

// ---- scheduling -----------------------------------------------------------------------------

let frame = 0;
/** Something besides streams' running usage changed: the next frame draws everything. */
let dirty = false;
function schedule(): void {
  dirty = true;
  if (frame === 0) frame = requestAnimationFrame(paint);
}
/** Only streams' running usage changed. */
function scheduleLive(): void {
  if (frame === 0) frame = requestAnimationFrame(paint);
}
function paint(): void {
  frame = 0;
  if (dirty || !patchLive()) render();
  dirty = false;
}
// Time left and the charts' minutes move on their own.
setInterval(schedule, 15_000);

// ---- DOM helpers ----------------------------------------------------------------------------

type Child = Element | string | number | false | null | undefined;
type Attrs = Record<string, string | number | boolean | undefined | ((ev: Event) => void)>;

/**
 * Listeners by event of the elements on the page. A repaint builds a new tree and patches the
 * page to match it (morphdom), keeping the elements that stay (focus, hover, selection, an open
 * `<details>`); their listeners are moved over from the new tree with {@link keepListeners}.
 */
const listeners = new WeakMap<Element, Map<string, (ev: Event) => void>>();

function listen(el: Element, event: string, fn: (ev: Event) => void): void {
  let byEvent = listeners.get(el);
  if (!byEvent) listeners.set(el, (byEvent = new Map<string, (ev: Event) => void>()));
  if (!byEvent.has(event)) el.addEventListener(event, (ev) => listeners.get(el)?.get(event)?.(ev));
  byEvent.set(event, fn);
}

/** Before `from` is patched to look like `to`: its listeners become `to`'s, and so do its inline styles (set through CSSOM, as the CSP allows). */
function keepListeners(from: Element, to: Element): boolean {
  const wanted = listeners.get(to);
  const had = listeners.get(from);
  if (had) for (const event of had.keys()) if (!wanted?.has(event)) had.delete(event);
  if (wanted) for (const [event, fn] of wanted) listen(from, event, fn);
  if (from instanceof HTMLElement && to instanceof HTMLElement) {
    for (const name of [...from.style]) if (!to.style.getPropertyValue(name)) from.style.removeProperty(name);
    for (const name of [...to.style]) from.style.setProperty(name, to.style.getPropertyValue(name));
  }
  // The page's own state wins: a `<details>` the user just opened stays open (the model follows on `toggle`).
  if (from instanceof HTMLDetailsElement && to instanceof HTMLDetailsElement) to.open = from.open;
  // Always patched, never skipped as equal: a skipped element's children would keep their old
  // listeners, and comparing each subtree first costs more than morphdom's own walk.
  return true;
}

/** An HTML element with attributes (`onclick` and the like become listeners) and children. */
function h(tag: string, attrs: Attrs = {}, ...children: Child[]): HTMLElement {
  return fill(document.createElement(tag), attrs, children);
}

/** The same for SVG. */
function s(tag: string, attrs: Attrs = {}, ...children: Child[]): Element {
  return fill(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function fill<E extends Element>(el: E, attrs: Attrs, children: Child[]): E {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (typeof value === 'function') listen(el, name.slice(2), value);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  for (const c of children) if (c !== false && c !== null && c !== undefined) el.append(typeof c === 'number' ? String(c) : c);
  return el;
}

// ---- formatting -----------------------------------------------------------------------------

const num = new Intl.NumberFormat();
const pad = (n: number) => String(n).padStart(2, '0');

function clock(at: number, seconds = true): string {
  const d = new Date(at);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ''}`;
}

function span(ms: number): string {
  const m = Math.round(ms / MINUTE);
  if (m < 1) return 'less than a minute';
  if (m < 60) return `${m} min`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return m % 60 === 0 || hours >= 10 ? `${hours} h` : `${hours} h ${m % 60} min`;
  return `${Math.floor(hours / 24)} days`;
}

function latency(ms: number): string {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`;
}

function plural(n: number, word: string): string {
  return `${num.format(n)} ${word}${n === 1 ? '' : 's'}`;
}

const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 1 });

/** `950`, `82.1K`, `1.2M`: token counts that fit a narrow sidebar. */
function short(n: number): string {
  return n < 1000 ? num.format(Math.round(n)) : compact.format(n);
}

const ESTIMATED = 'Estimated from a cut stream: the upstream never reported usage, so the tokens were counted from the text streamed.';

/**
 * Dollars from micro-dollars, `~` in front when some of it was estimated. Under a hundredth of a
 * cent is `<$0.0001` (a short request can cost $0.000005, too long for a narrow column); tooltips
 * give the exact {@link formatUsd}.
 */
function usd(micros: number, estimated = false): string {
  return formatSpent(micros, { estimated });
}

const NBSP = '\u00a0';

/** Why a spend says "unknown". */
const UNPRICED = (n: number) =>
  `${plural(n, 'request')} went to a model without a price: ${n === 1 ? 'its' : 'their'} tokens are counted, ${n === 1 ? 'its' : 'their'} cost is unknown. Add the model's price to prices.json in Till's data folder.`;

/** `12.3K in · 2.1K out`, breaking only after a `·`. */
function inOut(t: TokenCounts): string {
  return `${short(t.input)}${NBSP}in${NBSP}· ${short(t.output)}${NBSP}out`;
}

/** Tokens by kind, for tooltips: `1,234 in (1,000 cached) · 340 out (120 reasoning)`. */
function tokenDetail(t: TokenCounts): string {
  const f = (n: number) => n.toLocaleString('en-US');
  return `${f(t.input)} in${t.cached ? ` (${f(t.cached)} cached)` : ''} · ${f(t.output)} out${t.reasoning ? ` (${f(t.reasoning)} reasoning)` : ''}`;
}

// ---- open streams ---------------------------------------------------------------------------

/** What one stream used so far, and holds. */
function streamLine(st: Stream): string {
  const used = st.usage.spend !== undefined ? usd(st.usage.spend) : plural(st.usage.tokens.input + st.usage.tokens.output, 'token');
  return `${used} so far${heldText(st.held)}`;
}

/** `, holding $0.12` / `, holding 2,048 tokens`: a budgeted stream's hold, which grows with it. */
function heldText(held: Amounts | undefined): string {
  if (held?.spend !== undefined) return `, holding ${usd(held.spend)}`;
  if (held?.tokens !== undefined) return `, holding ${short(held.tokens)} tokens`;
  return '';
}

/** `streaming… $0.004 so far, holding $0.12`, `2 streams… $0.012 so far`, `streaming… 1.2K tokens so far`. */
function runningText(r: Running): string {
  const what = r.count === 1 ? 'streaming…' : `${num.format(r.count)} streams…`;
  return `${what} ${r.priced ? usd(r.spend) : `${short(r.tokens)} tokens`} so far${heldText(r.held)}`;
}

const RUNNING_TITLE =
  'What the open streams have used so far, counted from the text streamed; settled when they end. ' +
  'A stream on a limited key holds a slice of its answer ahead and grows it as it goes; when its key cannot cover the next slice, Till ends it.';

function runningTitle(r: Running): string {
  return [
    `${RUNNING_TITLE} ${plural(r.tokens, 'token')} so far.`,
    ...(r.count > 1 ? r.each.map((st, i) => `Stream ${i + 1}: ${streamLine(st)}.`) : []),
  ].join('\n');
}

/** A live line: a pulsing dot and a text that {@link patchLive} rewrites between full paints. */
function liveLine(id: string, r: Running, cls: string): HTMLElement {
  return h(
    'div',
    { class: `streaming ${cls}` },
    h('span', { class: 'pulse', 'aria-hidden': 'true' }),
    h('span', { 'data-live': id, title: runningTitle(r) }, runningText(r)),
  );
}

/**
 * Rewrites the running-usage texts in place; false when the page does not have exactly the
 * lines the streams need (a stream started or ended, or nothing is drawn yet): then a full paint.
 */
function patchLive(): boolean {
  if (!model.loaded) return false;
  const wanted = new Map<string, Running>();
  if (model.streams.size > 0) wanted.set('total', running(model));
  for (const st of model.streams.values()) {
    const id = `key:${st.keyId}`;
    // As card() draws them: a revoked key's card has no live line.
    if (!wanted.has(id) && (model.keys.get(st.keyId)?.state ?? 'revoked') !== 'revoked') wanted.set(id, running(model, st.keyId));
  }
  const found = [...app.querySelectorAll<HTMLElement>('[data-live]')];
  if (found.length !== wanted.size) return false;
  for (const el of found) if (!wanted.has(el.dataset.live ?? '')) return false;
  for (const el of found) {
    const r = wanted.get(el.dataset.live!)!;
    el.textContent = runningText(r);
    el.setAttribute('title', runningTitle(r));
  }
  return true;
}

// ---- rendering ------------------------------------------------------------------------------

function render(): void {
  const now = Date.now();
  const keys = sortedKeys(model, now);
  const st = stats(model, now);

  const children: Child[] = [header(keys.some((k) => k.state !== 'revoked'))];
  if (model.error) children.push(h('p', { class: 'banner error', role: 'alert' }, model.error));
  if (!model.loaded) {
    children.push(h('p', { class: 'loading' }, 'Loading usage…'));
  } else if (keys.length === 0 && model.records.length === 0) {
    children.push(emptyState());
  } else {
    children.push(
      totals(
        keys.map((k) => k.state),
        st,
      ),
      chart(st),
    );
    const live = keys.filter((k) => k.state !== 'revoked');
    const revoked = keys.filter((k) => k.state === 'revoked');
    children.push(
      h(
        'section',
        { class: 'section', 'aria-labelledby': 'keys-h' },
        h('h2', { id: 'keys-h' }, 'Keys', h('span', { class: 'count' }, live.length)),
        live.length > 0
          ? h('ul', { class: 'cards' }, ...live.map((k) => card(k.key, k.state, st, now)))
          : keys.length === 0
            ? emptyState()
            : h('p', { class: 'muted' }, 'No live keys.'),
        revoked.length > 0 &&
          revokedList(
            revoked.map((k) => k.key),
            st,
            now,
          ),
      ),
      requests(),
    );
  }
  const next = h('main', {}, ...children);
  morphdom(app, next, { childrenOnly: true, onBeforeElUpdated: keepListeners });
  app.removeAttribute('aria-busy');
  app.setAttribute('data-role', model.role);
}

function header(anyLive: boolean): HTMLElement {
  const role = model.role;
  const text = !model.loaded
    ? 'Connecting…'
    : role === 'host'
      ? 'Broker running in this window'
      : role === 'attached'
        ? 'Broker running in another window'
        : 'Broker not running';
  return h(
    'header',
    { class: 'top' },
    h(
      'div',
      { class: `broker ${role}` },
      h('span', { class: 'dot', 'aria-hidden': 'true' }),
      h('span', { class: 'status-text', ...(model.placement ? { title: model.placement } : {}) }, text),
      model.brokerUrl && role !== 'down'
        ? h('span', { class: 'url', title: 'Broker address' }, model.brokerUrl.replace(/^https?:\/\//, ''))
        : null,
    ),
    h(
      'button',
      {
        class: 'button danger',
        type: 'button',
        'aria-label': 'Revoke all till keys',
        title: 'Revoke every till key (asks first)',
        disabled: !anyLive,
        onclick: () => send({ type: 'revokeAll' }),
      },
      'Revoke All',
    ),
  );
}

function emptyState(): HTMLElement {
  const command = (id: PageCommand) => () => send({ type: 'command', id });
  const card = (title: string, text: string, action: PageCommand, button: string, cli: string) =>
    h(
      'div',
      { class: 'empty' },
      h('div', { class: 'empty-icon', 'aria-hidden': 'true' }, keyIcon()),
      h('h2', {}, title),
      h('p', {}, text),
      h('button', { class: 'button primary', type: 'button', onclick: command(action) }, button),
      h('p', { class: 'muted small' }, 'From a terminal:', h('br'), h('code', {}, cli)),
    );
  // First run: nothing can be issued before a credential exists, so that is the one primary action.
  if (!model.hasCredential) {
    return card(
      'Add your first credential',
      'A credential is a real API key (OpenAI, Anthropic, Gemini, GitHub, …). Till keeps it in your OS keychain and gives agents scoped, limited, revocable till keys instead.',
      'till.addCredential',
      'Add Credential',
      'till credential add openai',
    );
  }
  return card(
    'No till keys yet',
    'A till key gives an agent scoped, limited, revocable access to one of your API keys. The real key stays in your OS keychain. New integrated terminals already get one.',
    'till.issueKey',
    'Issue a Till Key',
    'till issue openai --uses 50 --ttl 1h',
  );
}

function keyIcon(): Element {
  return s(
    'svg',
    { viewBox: '0 0 24 24', width: 32, height: 32 },
    s('circle', { cx: 8, cy: 12, r: 4.5, class: 'icon-stroke' }),
    s('path', { d: 'M12.5 12H21M18 12v3.5M21 12v2.5', class: 'icon-stroke' }),
  );
}

function totals(states: State[], st: Stats): HTMLElement {
  const active = states.filter((x) => x === 'active').length;
  const all = [...model.keys.values()];
  const activations = all.reduce((sum, k) => sum + (k.used.activations ?? 0), 0);
  const spendTotal = all.reduce((sum, k) => sum + (k.used.spend ?? 0), 0);
  const unpricedTotal = all.reduce((sum, k) => sum + k.spend.unpricedRequests, 0);
  const estimatedTotal = all.reduce((sum, k) => sum + k.estimatedSpend, 0);
  const tokensTotal = noTokens();
  for (const k of all) addTokens(tokensTotal, k.tokens);
  const today = st.tokensToday;
  const partial = st.todayPartial ? '+' : '';
  const last = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  const tile = (label: string, value: string, sub: string, title: string, cls = '') =>
    h(
      'div',
      { class: `tile ${cls}`, title },
      h('dt', {}, label),
      h('dd', {}, h('span', { class: 'value' }, value), h('span', { class: 'sub' }, sub)),
    );
  const live = running(model);

  const spendTitle = [
    `Spent today: ${formatSpent(st.spendToday, { unpriced: st.unpricedToday })}${partial ? ' or more' : ''}, from the requests this window has seen.`,
    `All keys, ever: ${formatSpent(spendTotal, { unpriced: unpricedTotal })}, from the ledger${estimatedTotal > 0 ? `, of which ${usd(estimatedTotal)} was estimated from cut streams (the upstream never reported their usage)` : ''}.`,
    unpricedTotal > 0 ? UNPRICED(unpricedTotal) : '',
    st.spendTodayEstimated ? ESTIMATED : '',
  ]
    .filter(Boolean)
    .join('\n');
  const spend = h(
    'div',
    { class: 'tile spend' },
    h('dt', {}, 'Spent today'),
    h(
      'dd',
      { title: spendTitle },
      h(
        'span',
        { class: st.spendTodayEstimated ? 'value est' : 'value' },
        formatSpent(st.spendToday, { estimated: st.spendTodayEstimated, unpriced: st.unpricedToday }) + partial,
      ),
      h(
        'span',
        { class: 'sub' },
        h(
          'span',
          { class: estimatedTotal > 0 ? 'est' : '' },
          formatSpent(spendTotal, { estimated: estimatedTotal > 0, unpriced: unpricedTotal }),
        ),
        ' total',
      ),
    ),
    live.count > 0 && h('dd', {}, liveLine('total', live, 'total')),
  );
  return h(
    'dl',
    { class: 'totals' },
    spend,
    tile(
      'Calls today',
      num.format(st.servedToday) + partial,
      `${num.format(last(st.total.served))} in ${SPAN} min`,
      `Requests the broker forwarded today (counted from the requests this window has seen). ${num.format(activations)} billable calls counted against keys, ever.`,
    ),
    tile(
      'Tokens today',
      short(today.input + today.output) + partial,
      inOut(today),
      `Tokens today: ${tokenDetail(today)}.\nAll keys, ever: ${tokenDetail(tokensTotal)}.`,
    ),
    tile(
      'Denials today',
      num.format(st.deniedToday) + partial,
      `${num.format(last(st.total.denied))} in ${SPAN} min`,
      'Requests the broker refused today',
      st.deniedToday > 0 ? 'alert' : '',
    ),
    tile('Active keys', num.format(active), `of ${num.format(states.length)}`, 'Keys that can still be used, of all keys in the ledger'),
  );
}

/** Bars per minute, served stacked under denied; `height` in viewBox units. */
function bars(series: Series, firstMinute: number, height: number, withTitles: boolean): { svg: Element; peak: number } {
  const step = 10;
  const width = SPAN * step;
  const peak = Math.max(0, ...series.served.map((v, i) => v + series.denied[i]!));
  const scale = Math.max(1, peak);
  const svg = s(
    'svg',
    { class: 'bars', viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none', 'aria-hidden': 'true' },
    s('rect', { class: 'baseline', x: 0, y: height - 1, width, height: 1 }),
  );
  for (let i = 0; i < SPAN; i++) {
    const served = series.served[i]!;
    const denied = series.denied[i]!;
    const x = i * step + 1;
    const g = s('g', {});
    const hs = (served / scale) * height;
    const hd = (denied / scale) * height;
    if (served > 0) g.append(s('rect', { class: 'served', x, y: height - hs, width: step - 2, height: hs }));
    if (denied > 0) g.append(s('rect', { class: 'denied', x, y: height - hs - hd, width: step - 2, height: hd }));
    if (withTitles) {
      // a full-height hit area so the tooltip shows over empty minutes too
      g.append(
        s(
          'rect',
          { class: 'hit', x: i * step, y: 0, width: step, height },
          s(
            'title',
            {},
            `${clock((firstMinute + i) * MINUTE, false)}: ${plural(served, 'call')}${denied ? `, ${num.format(denied)} denied` : ''}`,
          ),
        ),
      );
    }
    svg.append(g);
  }
  return { svg, peak };
}

function chart(st: Stats): HTMLElement {
  const { svg, peak } = bars(st.total, st.firstMinute, 60, true);
  const served = st.total.served.reduce((a, b) => a + b, 0);
  const denied = st.total.denied.reduce((a, b) => a + b, 0);
  return h(
    'section',
    { class: 'section chart', 'aria-labelledby': 'chart-h' },
    h(
      'div',
      { class: 'chart-head' },
      h('h2', { id: 'chart-h' }, 'Calls per minute'),
      h(
        'span',
        { class: 'legend' },
        h('span', { class: 'swatch served', 'aria-hidden': 'true' }),
        'served',
        h('span', { class: 'swatch denied', 'aria-hidden': 'true' }),
        'denied',
      ),
    ),
    h(
      'figure',
      {
        class: 'plot',
        role: 'img',
        'aria-label': `Last ${SPAN} minutes: ${plural(served, 'call')} served, ${num.format(denied)} denied, at most ${num.format(peak)} in one minute.`,
      },
      svg,
      h(
        'figcaption',
        { class: 'axis', 'aria-hidden': 'true' },
        h('span', {}, `${SPAN} min ago`),
        h('span', { class: 'peak' }, peak > 0 ? `peak ${num.format(peak)}/min` : 'no calls'),
        h('span', {}, 'now'),
      ),
    ),
  );
}

const METER_LABEL: Record<Meter, string> = { activations: 'Calls', tokens: 'Tokens', spend: 'Spend' };
const METER_SHORT: Record<Meter, (n: number) => string> = { activations: (n) => num.format(n), tokens: short, spend: (n) => usd(n) };

/**
 * One limit: spent, then held by requests in flight (lighter, striped), then what is left. A
 * request is refused when what it may use does not fit in what is left, so this is the why.
 */
function limitBar(k: KeySummary, meter: Meter, limit: number, state: State, live: Running | undefined): HTMLElement {
  const used = k.used[meter] ?? 0;
  // The key list comes with changes of its counters; an open stream's hold grows in between,
  // and its progress (`live`) says so sooner.
  const held = Math.max(k.reserved[meter] ?? 0, live?.held[meter] ?? 0);
  const left = k.remaining[meter] ?? Math.max(0, limit - used - held);
  const fmt = METER_SHORT[meter];
  const estimated = meter === 'spend' && k.estimatedSpend > 0;
  const fillEl = h('div', { class: 'fill' });
  const heldEl = h('div', { class: 'held' });
  const pct = (n: number) => `${Math.min(100, (Math.max(0, n) / Math.max(1, limit)) * 100)}%`;
  // CSSOM, not a style attribute: the CSP allows the first and blocks the second.
  fillEl.style.width = pct(used);
  heldEl.style.width = pct(Math.min(held, Math.max(0, limit - used)));
  const level = used >= limit ? 'full' : used / limit >= 0.8 ? 'near' : '';
  const full = (n: number) => formatAmount(meter, n);
  const text = `${METER_LABEL[meter]}: ${full(used)} of ${full(limit)} used, ${full(held)} held by requests in flight, ${full(left)} left`;
  const usable = state === 'active' || state === 'exhausted';
  const title = [
    `${text}.`,
    estimated
      ? `${formatUsd(k.estimatedSpend)} of the spend was estimated from cut streams (the upstream never reported their usage).`
      : '',
    usable ? 'A request is refused when what it may use does not fit in what is left; what is held comes back when its request ends.' : '',
  ]
    .filter(Boolean)
    .join('\n');
  return h(
    'div',
    { class: `limit ${level}`, title },
    h(
      'div',
      { class: 'limit-text' },
      h('span', { class: 'limit-name' }, METER_LABEL[meter]),
      h(
        'span',
        { class: 'limit-used' },
        h('strong', { class: estimated ? 'est' : '' }, `${estimated ? '~' : ''}${fmt(used)}`),
        ` / ${fmt(limit)}`,
      ),
      // Only a usable (or used-up) key has something left worth showing.
      usable &&
        h(
          'span',
          { class: 'limit-left' },
          held > 0 && h('span', { class: 'held-text' }, h('span', { class: 'held-swatch', 'aria-hidden': 'true' }), `${fmt(held)} held`),
          h('span', { class: left === 0 ? 'none' : '' }, `${fmt(left)} left`),
        ),
    ),
    h(
      'div',
      {
        class: `meter ${level}`,
        role: 'meter',
        'aria-label': `${METER_LABEL[meter]} used by ${k.label}`,
        'aria-valuemin': 0,
        'aria-valuemax': limit,
        'aria-valuenow': used,
        'aria-valuetext': text,
      },
      fillEl,
      heldEl,
    ),
  );
}

/**
 * What a key has used: dollars, tokens (cached and reasoning in the tooltip) and calls, the last
 * only when no Calls bar shows them. Undefined when there is nothing to add to the bars.
 */
function keyUsage(k: KeySummary, state: State, limits: Amounts): HTMLElement | undefined {
  const spend = k.used.spend ?? 0;
  const t = k.tokens;
  const estimated = k.estimatedSpend > 0;
  const unpriced = k.spend.unpricedRequests;
  // Dollars shown when there are some, when they are limited, or when they are unknown.
  const showSpend = spend > 0 || limits.spend !== undefined || unpriced > 0;
  const showTokens = t.input + t.output > 0;
  const showCalls = limits.activations === undefined;
  const unlimited = Object.keys(limits).length === 0;
  if (!showSpend && !showTokens && !showCalls) return undefined;
  const held = k.reserved.spend ?? 0;
  return h(
    'div',
    { class: 'key-usage' },
    showSpend &&
      h(
        'span',
        {
          class: estimated ? 'spent est' : unpriced > 0 ? 'spent unknown' : 'spent',
          title: [
            `${formatUsd(spend)} spent${held > 0 ? `, ${formatUsd(held)} held by requests in flight` : ''}${estimated ? `, of which ${formatUsd(k.estimatedSpend)} was estimated.\n${ESTIMATED}` : '.'}`,
            unpriced > 0 ? UNPRICED(unpriced) : '',
          ]
            .filter(Boolean)
            .join('\n'),
        },
        formatSpent(spend, { estimated, unpriced }),
      ),
    // One run of text, so a narrow card wraps it at a space with each "·" kept after its word.
    (showTokens || showCalls) &&
      h(
        'span',
        { class: 'detail' },
        showTokens && h('span', { title: `Tokens: ${tokenDetail(t)}` }, inOut(t)),
        showTokens && showCalls && `${NBSP}· `,
        showCalls && plural(k.used.activations ?? 0, 'call'),
      ),
    unlimited && state === 'active' && h('span', { class: 'no-limit' }, 'no limit'),
  );
}

function card(k: KeySummary, state: State, st: Stats, now: number): HTMLElement {
  const revoking = model.revoking.has(k.id);
  const keySeries = st.byKey.get(k.id) ?? series();
  const spark = bars(keySeries, st.firstMinute, 20, false);
  const recentCalls = keySeries.served.reduce((a, b) => a + b, 0);
  const limits = limitsOf(k.policy);
  const limited = METERS.filter((m) => limits[m] !== undefined);
  const live = state === 'revoked' ? undefined : running(model, k.id);

  const expires = k.policy.expiresAt;
  const time =
    state === 'revoked'
      ? `revoked${k.revokedAt ? ` ${clock(k.revokedAt, false)}` : ''}`
      : expires === undefined
        ? 'no expiry'
        : expires > now
          ? `${span(expires - now)} left`
          : `expired ${span(now - expires)} ago`;
  const facts: Child[] = [h('span', { title: expires ? `Expires ${new Date(expires).toLocaleString()}` : undefined }, time)];
  if (k.inFlight > 0) facts.push(h('span', { class: 'inflight' }, `${num.format(k.inFlight)} in flight`));

  return h(
    'li',
    // Its id keeps its element (and a focused Revoke button) when the cards above it change.
    { class: `card ${state}`, id: `key-${k.id}` },
    h('div', { class: 'card-head' }, h('span', { class: 'label', title: k.label }, k.label), h('span', { class: `badge ${state}` }, state)),
    h(
      'div',
      { class: 'meta' },
      h('span', { class: 'provider' }, k.provider),
      k.credential !== k.provider && h('span', { title: 'Credential' }, k.credential),
      h('span', { class: 'id', title: 'Key id' }, k.id),
    ),
    keyUsage(k, state, limits),
    limited.length > 0 && h('div', { class: 'limits' }, ...limited.map((m) => limitBar(k, m, limits[m]!, state, live))),
    live && live.count > 0 && liveLine(`key:${k.id}`, live, 'key'),
    state !== 'revoked' &&
      spark.peak > 0 &&
      h(
        'div',
        { class: 'spark', title: `Calls per minute, last ${SPAN} min` },
        spark.svg,
        h('span', {}, `${num.format(recentCalls)} / ${SPAN} min`),
      ),
    h(
      'div',
      { class: 'card-foot' },
      h('div', { class: 'facts' }, ...facts),
      state !== 'revoked' &&
        h(
          'button',
          {
            class: 'button secondary small',
            type: 'button',
            'aria-label': `Revoke till key ${k.label}`,
            disabled: revoking,
            onclick: () => {
              model.revoking.add(k.id);
              send({ type: 'revoke', id: k.id });
              schedule();
            },
          },
          revoking ? 'Revoking…' : 'Revoke',
        ),
    ),
  );
}

function revokedList(keys: KeySummary[], st: Stats, now: number): HTMLElement {
  return h(
    'details',
    {
      class: 'revoked-list',
      open: model.showRevoked,
      ontoggle: (ev) => {
        model.showRevoked = (ev.currentTarget as HTMLDetailsElement).open;
        vscode.setState({ showRevoked: model.showRevoked });
      },
    },
    h('summary', {}, `Revoked (${keys.length})`),
    h('ul', { class: 'cards' }, ...keys.map((k) => card(k, 'revoked', st, now))),
  );
}

function requests(): HTMLElement {
  // The dashboard (an editor tab) shows every request the page has; the sidebar the last few.
  const rows = (document.body.classList.contains('editor') ? model.records.slice() : model.records.slice(-ROWS)).reverse();
  const section = h(
    'section',
    { class: 'section', 'aria-labelledby': 'req-h' },
    h('h2', { id: 'req-h' }, 'Recent requests', h('span', { class: 'count' }, rows.length)),
  );
  if (rows.length === 0) {
    section.append(h('p', { class: 'muted' }, 'No requests yet. They show here as agents make them.'));
    return section;
  }
  section.append(
    h(
      'table',
      { class: 'requests' },
      h(
        'thead',
        {},
        h(
          'tr',
          {},
          h('th', { scope: 'col', class: 'time' }, 'Time'),
          h('th', { scope: 'col' }, 'Request'),
          h('th', { scope: 'col', class: 'num' }, 'Status'),
          h('th', { scope: 'col', class: 'num cost' }, 'Cost'),
        ),
      ),
      h('tbody', {}, ...rows.map(row)),
    ),
  );
  return section;
}

function row(r: RequestRecord): HTMLElement {
  const q = r.request;
  const denied = r.type === 'request.denied';
  const failed = !denied && (r.status >= 400 || r.aborted !== undefined);
  const detail = [q.model, q.label || (denied ? undefined : q.keyId)].filter(Boolean).join(' · ');
  return h(
    'tr',
    {
      class: denied ? 'denied' : failed ? 'failed' : '',
      title: denied ? `Denied: ${r.reason}` : r.aborted ? `Ended early: ${r.aborted}` : undefined,
    },
    h(
      'td',
      { class: 'time' },
      h('div', { class: 'line' }, clock(r.at)),
      !denied && h('div', { class: 'detail', title: 'Latency' }, latency(r.latencyMs)),
    ),
    h(
      'td',
      { class: 'req' },
      h(
        'div',
        { class: 'line', title: `${q.method} ${q.path}` },
        h('span', { class: 'method' }, q.method),
        ' ',
        h('span', { class: 'path' }, q.path),
      ),
      (detail || denied) &&
        h(
          'div',
          { class: 'detail' },
          denied ? h('span', { class: 'reason' }, r.code.replace(/_/g, ' ')) : null,
          denied && detail ? ' · ' : '',
          detail,
        ),
    ),
    h('td', { class: 'num status' }, String(r.status)),
    cost(r),
  );
}

/** A request's cost and tokens, when it was metered. */
function cost(r: RequestRecord): HTMLElement {
  const u = r.type === 'request.finished' ? r.usage : undefined;
  if (!u) return h('td', { class: 'num cost' }, h('span', { class: 'muted' }, '—'));
  const t = u.tokens;
  const priced = u.spend !== undefined;
  const title = [
    `Tokens: ${tokenDetail(t)}`,
    priced ? `Cost: ${formatUsd(u.spend!)}` : 'Cost: unknown (no price for this model)',
    u.estimated ? ESTIMATED : '',
  ]
    .filter(Boolean)
    .join('\n');
  return h(
    'td',
    { class: 'num cost', title },
    h(
      'div',
      { class: 'line' },
      priced ? h('span', { class: u.estimated ? 'est' : '' }, usd(u.spend!, u.estimated)) : h('span', { class: 'muted' }, '—'),
    ),
    h('div', { class: 'detail' }, `${short(t.input + t.output)} tok`),
  );
}

send({ type: 'ready' });
