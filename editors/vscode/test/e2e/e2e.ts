// End-to-end test in real VS Code: code-server 4.100.3 (VS Code 1.100.3) in headless Chromium,
// driven by playwright-core. Installs the built .vsix, opens a ~260-token text file, hovers a
// word and checks the per-layer table against the CLI's report for the same text, types,
// hovers again (and measures the time from the end of typing to the new hover: in the page,
// from the last key's release to the end of the first frame rendered with the new hover, so
// the harness's DevTools round trips and polling are not counted; from the last key's press,
// and the harness's own view, are reported beside it), runs the heatmap command, opens the
// model info from the status bar.
// Saves screenshots.
//
// Environment:
//   LOGIT_LENS_BIN          the logit-lens binary (required)
//   LOGIT_LENS_CODE_SERVER  code-server's folder (default ~/.cache/logit-lens/test-deps/code-server,
//                           installed by scripts/deps/vscode.sh)
//   LOGIT_LENS_CHROMIUM     Chromium (default /usr/bin/chromium)
//   LOGIT_LENS_VSIX         the extension (default dist/logit-lens.vsix)
//   LOGIT_LENS_E2E_OUT      where screenshots and result.json go (default out/e2e)
//   LOGIT_LENS_E2E_MODEL    a GGUF file to choose with "Logit Lens: Pick the model" (the
//                           Rust test passes the default model's)
//   LOGIT_LENS_LOG_FILE     the daemon's log (passed on to it); at `lens_server=debug` the result
//                           also says where the typing rounds' time went (typingBreakdownMs)
// Prints one JSON line (`{"ok":true,…}`) last; exits 1 on any failed check.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { chromium, type Browser, type Page, type Frame } from 'playwright-core';
import type { RunReport } from '../../src/render';

const HERE = path.resolve(__dirname, '../../..'); // editors/vscode (the bundle is in out/test/e2e)
const BIN = process.env.LOGIT_LENS_BIN ?? '';
const CODE_SERVER = process.env.LOGIT_LENS_CODE_SERVER ?? path.join(os.homedir(), '.cache/logit-lens/test-deps/code-server');
const CHROMIUM = process.env.LOGIT_LENS_CHROMIUM ?? '/usr/bin/chromium';
const VSIX = process.env.LOGIT_LENS_VSIX ?? path.join(HERE, 'dist/logit-lens.vsix');
const OUT = process.env.LOGIT_LENS_E2E_OUT ?? path.join(HERE, 'out/e2e');
const DOC = path.join(HERE, 'test/e2e/notes.txt');
const MODEL = process.env.LOGIT_LENS_E2E_MODEL ?? ''; // a GGUF file to pick with the model picker
const HOVER_WORD = 'Paris'; // the last word of the document
// The issue asks for 20 keystrokes (rounds of typing a word and hovering).
const ROUNDS = 20;

const env: NodeJS.ProcessEnv = { ...process.env, NO_COLOR: '1' };
delete env.LOGIT_LENS_MODEL;

const t0 = performance.now();
function log(msg: string): void {
  process.stderr.write(`[e2e ${((performance.now() - t0) / 1000).toFixed(1)}s] ${msg}\n`);
}
function check(cond: unknown, msg: string): asserts cond {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

/** The CLI's report for one position of a text: the independent reference. */
function cliPosition(text: string, offset: number, topK: number): { report: RunReport; pos: number } {
  const tokens = JSON.parse(execFileSync(BIN, ['run', '--format', 'json', '--position', '0', '--top-k', '1', '--layers', '30', '-'], { env, input: text, encoding: 'utf8' })) as RunReport;
  const bytes = Buffer.byteLength(text.slice(0, offset));
  const tok = tokens.tokens.find((t) => t.start <= bytes && bytes < t.end);
  check(tok, `a token at offset ${offset}`);
  const report = JSON.parse(execFileSync(BIN, ['run', '--format', 'json', '--position', String(tok.index), '--top-k', String(topK), '-'], { env, input: text, encoding: 'utf8' })) as RunReport;
  return { report, pos: tok.index };
}

/** A token as the rendered hover shows it: crates/lens-server/src/hover.rs `escape` (whitespace
 * as visible symbols), less the backslashes before markdown punctuation, which the markdown
 * renderer drops. */
function hoverToken(text: string): string {
  if (text === '') return '∅';
  let out = '';
  for (const c of text) {
    const ws = ({ ' ': '␣', '\n': '↵', '\r': '␍', '\t': '⇥' } as Record<string, string>)[c];
    out += ws ?? (/\p{Cc}/u.test(c) ? `\\u{${(c.codePointAt(0) ?? 0).toString(16)}}` : c);
  }
  return out;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => (a && typeof a === 'object' ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

interface HoverTable {
  heading: string;
  rows: string[][];
  text: string;
}

/** Screen coordinates of the middle of the last occurrence of `word` in the editor; while the
 * line is being re-rendered, looked for again at each animation frame, for up to `timeoutMs`. */
async function wordBox(page: Page, word: string, timeoutMs = 3000): Promise<{ x: number; y: number }> {
  const box = await findWord(page, word, timeoutMs);
  if (box) return box;
  const lines = await page.evaluate(() => [...document.querySelectorAll('.monaco-editor .view-lines .view-line')].map((l) => l.innerHTML).slice(-4));
  throw new Error(`check failed: the word ${word} on screen within ${timeoutMs} ms; last lines: ${JSON.stringify(lines)}`);
}

async function findWord(page: Page, word: string, timeoutMs: number): Promise<{ x: number; y: number } | undefined> {
  return page.evaluate(async ({ w, timeoutMs }) => {
    const find = (): { x: number; y: number } | undefined => {
      const lines = [...document.querySelectorAll('.monaco-editor .view-lines .view-line')];
      let best: { x: number; y: number } | undefined;
      let bestTop = -Infinity;
      for (const line of lines) {
        // The line's text may be split over several spans (decorations): map offsets to nodes.
        const nodes: { node: Node; start: number }[] = [];
        let all = '';
        const walker = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
          nodes.push({ node: n, start: all.length });
          all += n.textContent ?? '';
        }
        const i = all.replace(/\u00a0/g, ' ').lastIndexOf(w);
        if (i < 0) continue;
        const at = (off: number): [Node, number] => {
          const e = [...nodes].reverse().find((x) => x.start <= off) ?? nodes[0];
          return [e?.node ?? line, off - (e?.start ?? 0)];
        };
        const r = document.createRange();
        r.setStart(...at(i));
        r.setEnd(...at(i + w.length - 1));
        const rect = r.getBoundingClientRect();
        if (rect.top > bestTop) {
          bestTop = rect.top;
          // the middle of the word (its last letter excluded: the end node may be another span)
          best = { x: rect.left + rect.width / 2, y: rect.top + rect.height / 2 };
        }
      }
      return best;
    };
    const until = Date.now() + timeoutMs;
    for (;;) {
      const box = find();
      if (box || Date.now() > until) return box;
      await new Promise((resolve) => requestAnimationFrame(resolve));
    }
  }, { w: word, timeoutMs });
}

async function readHover(page: Page, timeoutMs: number, differentFrom?: string): Promise<HoverTable> {
  const hover = page.locator('.monaco-editor .monaco-hover:visible').filter({ has: page.locator('table') }).filter({ hasText: 'layer' });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if ((await hover.count()) > 0) {
      const got = await hover.first().evaluate((el) => ({
        heading: (el.querySelector('h1,h2,h3,h4,p,strong') as HTMLElement | null)?.innerText ?? '',
        rows: [...el.querySelectorAll('tr')].map((tr) => [...tr.querySelectorAll('th,td')].map((c) => (c as HTMLElement).innerText.trim())),
        text: (el as HTMLElement).innerText,
      }));
      if (differentFrom === undefined || got.text !== differentFrom) return got;
    }
    if (Date.now() > deadline) throw new Error(`no ${differentFrom === undefined ? '' : 'new '}Logit Lens hover (a table with "layer") within ${timeoutMs} ms`);
    await page.waitForTimeout(5);
  }
}

/**
 * The page's own clock, read where the events happen: the last key press, key release and
 * mouse move (seen in the capture phase, before the editor handles them). Installed once; the watch below
 * measures from these times, so the harness's round trips and polling are not in the figures.
 */
async function installEventClock(page: Page): Promise<void> {
  await page.evaluate(() => {
    const w = window as unknown as { __lensEvents?: Record<string, number>; __lensWall?: Record<string, number> };
    w.__lensEvents = {};
    const at = w.__lensEvents;
    w.__lensWall = {};
    const wall = w.__lensWall;
    for (const event of ['keydown', 'keyup', 'mousemove']) {
      window.addEventListener(event, () => ((at[event] = window.performance.now()), (wall[event] = Date.now())), true);
    }
  });
}

/**
 * Arms a watch in the page for the next Logit Lens hover (a visible hover with a table and
 * "layer", other than `differentFrom`). It looks at the start of every animation frame, before
 * the frame's layout and paint, and resolves with the time when the first frame that has the
 * hover has been rendered. (In functions run in the page, `window.performance` is spelled out:
 * the bundler would turn a bare `performance` into Node's.)
 */
async function armHoverWatch(page: Page, differentFrom?: string): Promise<void> {
  await page.evaluate((prev) => {
    const w = window as unknown as { __lensHover?: Promise<number> };
    w.__lensHover = new Promise((resolve, reject) => {
      const found = (): boolean => {
        for (const el of document.querySelectorAll<HTMLElement>('.monaco-editor .monaco-hover')) {
          if (!el.querySelector('table')) continue;
          const r = el.getBoundingClientRect();
          if (r.width === 0 || r.height === 0 || !el.checkVisibility({ visibilityProperty: true })) continue;
          const text = el.innerText;
          if (!/layer/i.test(text) || (prev !== null && text === prev)) continue;
          return true;
        }
        return false;
      };
      const until = window.performance.now() + 30000;
      const frame = (): void => {
        const now = window.performance.now();
        if (found()) {
          // This frame paints it: the clock stops in the first task after the frame's
          // rendering (style, layout, paint), posted from here.
          const done = new MessageChannel();
          done.port1.onmessage = () => {
            const wall = (window as unknown as { __lensWall?: Record<string, number> }).__lensWall;
            if (wall) wall.painted = Date.now();
            resolve(window.performance.now());
          };
          done.port2.postMessage(null);
        } else if (now > until) reject(new Error('no Logit Lens hover within 30 s'));
        else requestAnimationFrame(frame);
      };
      requestAnimationFrame(frame);
    });
  }, differentFrom ?? null);
}

/** Waits for the armed watch; returns the page's times of the last key press, key release and
 * mouse move, and of the painted hover. */
async function hoverWatched(page: Page): Promise<{ keydown: number; keyup: number; mousemove: number; painted: number }> {
  return page.evaluate(async () => {
    const w = window as unknown as { __lensHover?: Promise<number>; __lensEvents?: Record<string, number> };
    const painted = await w.__lensHover;
    const at = w.__lensEvents;
    if (painted === undefined || at === undefined) throw new Error('the hover watch or the event clock is not installed');
    return { keydown: at.keydown ?? NaN, keyup: at.keyup ?? NaN, mousemove: at.mousemove ?? NaN, painted };
  });
}

/** One typing round's wall-clock times in the page (ms since the epoch). */
type RoundWall = { keydown: number; keyup: number; mousemove: number; painted: number };

/**
 * Where a typing round's time goes, from the page's wall clock and the daemon's log
 * (LOGIT_LENS_LOG_FILE at `lens_server=debug`; same machine, same clock): the last key press
 * to the edit reaching the daemon (the time `since_edit_ms` counts from), the edit to the
 * hover request arriving (the editor; the harness's move of the mouse is in it, and given
 * apart), the request to the daemon's answer (waiting for the hover prepared after the edit:
 * its forward and lens are given apart), and the answer to the painted hover (the editor).
 * Medians over the rounds found in the log.
 */
function typingBreakdown(logFile: string, rounds: RoundWall[]): Record<string, number> {
  type Line = { at: number; kv: Record<string, number> };
  const logLines = readFileSync(logFile, 'utf8').split('\n');
  const lines = (what: RegExp): Line[] =>
    logLines
      .filter((l) => what.test(l))
      .map((l) => ({
        at: Date.parse(l.split(/\s/, 1)[0] ?? ''),
        kv: Object.fromEntries([...l.matchAll(/(\w+)=([\d.]+)/g)].map((m) => [m[1], Number(m[2])])),
      }));
  const hovers = lines(/ hover at \d+:\d+ since_edit_ms=/);
  const work = lines(/ hover work /);
  const phases: Record<string, number[]> = {};
  const add = (k: string, v: number | undefined): void => {
    if (v !== undefined && Number.isFinite(v)) (phases[k] ??= []).push(v);
  };
  for (const r of rounds) {
    const h = hovers.filter((l) => l.at > r.keydown && l.at <= r.painted).pop();
    const total = h?.kv.total_ms;
    const sinceEdit = h?.kv.since_edit_ms;
    if (h === undefined || total === undefined || sinceEdit === undefined) continue;
    const arrived = h.at - total;
    const edit = arrived - sinceEdit;
    add('keyToEdit', edit - r.keydown);
    add('editToRequest', arrived - edit);
    add('keyupToMouse', r.mousemove - r.keyup);
    add('mouseToRequest', arrived - r.mousemove);
    add('requestToAnswer', total);
    add('answerToPainted', r.painted - h.at);
    const w = work.filter((l) => l.at > edit && l.at <= h.at + 1).pop();
    add('daemonForward', w?.kv.forward_ms);
    add('daemonLens', w?.kv.lens_ms);
  }
  const median = (xs: number[]): number => Math.round([...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN);
  return { rounds: phases.keyToEdit?.length ?? 0, ...Object.fromEntries(Object.entries(phases).map(([k, v]) => [k, median(v)])) };
}

/** Checks a hover against the CLI's report for the position under the mouse. */
function checkHover(h: HoverTable, ref: { report: RunReport; pos: number }, what: string): void {
  const { report, pos } = ref;
  const p = report.positions.find((q) => q.position === pos);
  check(p, `${what}: the reference has position ${pos}`);
  const header = h.rows[0] ?? [];
  check(header.join('|').includes('layer') && header.join('|').includes('top predictions'), `${what}: table header ${JSON.stringify(header)}`);
  const body = h.rows.slice(1);
  check(body.length === report.model.n_layers + 1, `${what}: ${report.model.n_layers + 1} layer rows, got ${body.length}`);
  check(new RegExp(`\\b${report.model.n_layers}\\b`).test(body[0]?.[0] ?? ''), `${what}: the last layer first, got ${JSON.stringify(body[0])}`);
  check(/\b0\b/.test(body[body.length - 1]?.[0] ?? ''), `${what}: layer 0 last, got ${JSON.stringify(body[body.length - 1])}`);
  const token = report.tokens[pos];
  check(token && h.text.includes(token.text.trim()), `${what}: the hover names the token ${JSON.stringify(token?.text)}`);
  // The last layer's and layer 0's predictions: every one of the CLI's top-k, as many, in the
  // row's `token p · token p · …` (tokens have no spaces: a space is shown as ␣).
  for (const [row, cell, layer] of [[body[0], p.cells[p.cells.length - 1], 'last layer'], [body[body.length - 1], p.cells[0], 'layer 0']] as const) {
    const want = (cell?.top ?? []).map((t) => hoverToken(t.text));
    check(want.length === report.top_k && want.length > 0, `${what}: the CLI's top-${report.top_k} for the ${layer}, got ${want.length}`);
    const shown = (row?.[1] ?? '').split(' · ').map((s) => s.slice(0, s.lastIndexOf(' ')));
    check(shown.length === want.length, `${what}: ${want.length} predictions in the ${layer}'s hover row ${JSON.stringify(row)}`);
    check(JSON.stringify([...shown].sort()) === JSON.stringify([...want].sort()), `${what}: the CLI's ${JSON.stringify(want)} in the ${layer}'s hover row ${JSON.stringify(row)}`);
  }
}

async function waitForFrameText(page: Page, needle: RegExp, timeoutMs: number): Promise<Frame> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    // Webviews are iframes in iframes; the workbench itself (the main frame) does not count.
    for (const f of page.frames()) {
      if (f === page.mainFrame() || !f.url().includes('webview')) continue;
      const text = await f.evaluate(() => document.body?.innerText ?? '').catch(() => '');
      if (needle.test(text)) return f;
    }
    if (Date.now() > deadline) throw new Error(`no webview frame with ${needle}`);
    await page.waitForTimeout(200);
  }
}

/** The webview frame whose text matches `needle`, or an error with the text of the first
 * notification matching `failure` (the command failed and said why). */
async function frameOrToast(page: Page, needle: RegExp, failure: RegExp, timeoutMs: number): Promise<Frame> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const frame = await waitForFrameText(page, needle, 0).catch(() => undefined);
    if (frame) return frame;
    const texts = await page.locator('.notifications-toasts .notification-toast').allInnerTexts();
    const failed = texts.find((t) => failure.test(t));
    if (failed) throw new Error(`the command failed: ${failed}`);
    if (Date.now() > deadline) throw new Error(`no webview frame with ${needle}; notifications ${JSON.stringify(texts)}`);
    await page.waitForTimeout(200);
  }
}

/** The daemons (`BIN serve --stdio`) in the session of code-server (which runs setsid). */
function daemonPids(session: number, withArg?: string): number[] {
  const pids: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (cmd[0] === BIN && cmd.includes('serve') && Number(fields[3]) === session && (withArg === undefined || cmd.includes(withArg))) pids.push(Number(d));
    } catch {
      // the process ended meanwhile
    }
  }
  return pids;
}

async function toast(page: Page, re: RegExp, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const texts = await page.locator('.notifications-toasts .notification-toast').allInnerTexts();
    const hit = texts.find((t) => re.test(t));
    if (hit) return hit;
    if (Date.now() > deadline) throw new Error(`no notification matching ${re}; shown: ${JSON.stringify(texts)}`);
    await page.waitForTimeout(100);
  }
}

/** Resolves when code-server's output (`log()`, fed by the listeners added before this call) says
 * that it listens; rejects when it exits first or after `timeoutMs`. */
function listening(server: ChildProcess, log: () => string, timeoutMs: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onData = (): void => {
      if (log().includes('HTTP server listening')) done();
    };
    const onExit = (code: number | null): void => done(new Error(`code-server exited (${code}) before listening:\n${log()}`));
    const timer = setTimeout(() => done(new Error(`code-server did not listen within ${timeoutMs} ms:\n${log()}`)), timeoutMs);
    function done(err?: Error): void {
      clearTimeout(timer);
      server.stdout?.off('data', onData);
      server.stderr?.off('data', onData);
      server.off('exit', onExit);
      if (err) reject(err);
      else resolve();
    }
    server.stdout?.on('data', onData);
    server.stderr?.on('data', onData);
    server.once('exit', onExit);
    if (server.exitCode !== null) onExit(server.exitCode);
    else onData();
  });
}

async function command(page: Page, title: string): Promise<void> {
  await page.keyboard.press('F1');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 10000 });
  await input.fill(`>${title}`);
  await page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first().waitFor({ timeout: 10000 });
  await page.keyboard.press('Enter');
}

async function main(): Promise<void> {
  for (const [what, p] of [
    ['LOGIT_LENS_BIN (the logit-lens binary)', BIN],
    ['code-server (run scripts/deps/vscode.sh)', path.join(CODE_SERVER, 'out/node/entry.js')],
    ['Chromium (run scripts/deps/vscode.sh)', CHROMIUM],
    ['the .vsix (npm run package)', VSIX],
  ] as const) check(p !== '' && existsSync(p), `missing ${what}: ${p || '(unset)'}`);
  mkdirSync(OUT, { recursive: true });
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'logit-lens-e2e-'));
  const userData = path.join(tmp, 'user-data');
  const extDir = path.join(tmp, 'extensions');
  const ws = path.join(tmp, 'workspace');
  mkdirSync(path.join(userData, 'User'), { recursive: true });
  mkdirSync(ws, { recursive: true });
  const docText = readFileSync(DOC, 'utf8');
  writeFileSync(path.join(ws, 'notes.txt'), docText);
  const settings = {
      'logitLens.serverPath': BIN,
      'editor.hover.delay': 0,
      'editor.hover.sticky': true,
      'editor.minimap.enabled': false,
      'editor.wordWrap': 'on',
      'editor.fontSize': 13,
      'workbench.startupEditor': 'none',
      'workbench.tips.enabled': false,
      'workbench.enableExperiments': false,
      'security.workspace.trust.enabled': false,
      'telemetry.telemetryLevel': 'off',
      'update.mode': 'none',
      'extensions.autoCheckUpdates': false,
      'extensions.autoUpdate': false,
      'chat.disableAIFeatures': true,
      'chat.commandCenter.enabled': false,
      'files.autoSave': 'off',
      'window.dialogStyle': 'custom',
  };
  writeFileSync(path.join(userData, 'User/settings.json'), JSON.stringify(settings));
  const entry = path.join(CODE_SERVER, 'out/node/entry.js');
  const common = ['--user-data-dir', userData, '--extensions-dir', extDir];
  log('installing the .vsix');
  execFileSync(process.execPath, [entry, ...common, '--install-extension', VSIX], { env, stdio: ['ignore', 'pipe', 'inherit'] });

  const port = await freePort();
  let server: ChildProcess | undefined;
  let browser: Browser | undefined;
  let page: Page | undefined;
  let serverLog = '';
  const result: Record<string, unknown> = { ok: false };
  try {
    server = spawn(process.execPath, [entry, ...common, '--bind-addr', `127.0.0.1:${port}`, '--auth', 'none', '--disable-telemetry', '--disable-update-check', '--disable-workspace-trust', '--disable-getting-started-override', ws], {
      env: { ...env, PATH: `${path.dirname(process.execPath)}:/usr/bin:/bin` },
      detached: true, // its own process group, ended as a whole below
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    server.stdout?.on('data', (d: Buffer) => (serverLog += d.toString()));
    server.stderr?.on('data', (d: Buffer) => (serverLog += d.toString()));
    await listening(server, () => serverLog, 30000);
    log(`code-server on port ${port}`);

    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(ws)}`);
    await page.locator('.monaco-workbench').waitFor({ timeout: 60000 });
    log('workbench up');

    // Open the document.
    const quick = page.locator('.quick-input-widget input');
    // The first key presses may come before the workbench handles keys: press again until it shows.
    for (let i = 0; i < 5; i++) {
      await page.keyboard.press('Control+P');
      if (await quick.waitFor({ state: 'visible', timeout: 3000 }).then(() => true, () => false)) break;
    }
    await quick.waitFor({ state: 'visible', timeout: 1000 });
    await quick.fill('notes.txt');
    await page.locator('.quick-input-list .monaco-list-row', { hasText: 'notes.txt' }).first().waitFor({ timeout: 15000 });
    await page.keyboard.press('Enter');
    await page.locator('.monaco-editor .view-lines').first().waitFor({ timeout: 15000 });
    log('notes.txt open');

    // The daemon is up when the status bar says so (and names the model).
    const status = page.locator('.statusbar-item', { hasText: /· ready/ });
    await status.first().waitFor({ timeout: 60000 });
    await page.locator('.statusbar-item', { hasText: /Smollm2/i }).first().waitFor({ timeout: 30000 });
    result.status = (await status.first().innerText()).trim();
    log(`status bar: ${String(result.status)}`);

    // 1. Hover the last word.
    const ref1 = cliPosition(docText, docText.lastIndexOf(HOVER_WORD) + 2, 5);
    let box = await wordBox(page, HOVER_WORD);
    await page.mouse.move(box.x, box.y);
    const h1 = await readHover(page, 30000);
    checkHover(h1, ref1, 'first hover');
    await page.screenshot({ path: path.join(OUT, 'hover.png') });
    const hoverEl = page.locator('.monaco-editor .monaco-hover:visible').filter({ has: page.locator('table') }).first();
    const hb = await hoverEl.boundingBox();
    if (hb) await page.screenshot({ path: path.join(OUT, 'hover-crop.png'), clip: { x: Math.max(0, hb.x - 200), y: Math.max(0, hb.y - 10), width: Math.min(hb.width + 220, 1400), height: Math.min(hb.height + 60, 900 - Math.max(0, hb.y - 10)) } });
    result.hoverRows = h1.rows.length - 1;
    result.hoverToken = ref1.report.tokens[ref1.pos]?.text;
    log(`first hover: ${h1.rows.length - 1} rows; top row ${JSON.stringify(h1.rows[1])}`);

    // 2. Type before the last word (the context changes), hover it again: the table changes.
    // Each round types a few characters at the end of "is" (so "is" -> "is, " / … ) and measures
    // the time from the last keystroke to the new hover under the mouse.
    await installEventClock(page);
    const latencies: number[] = [];
    const harnessLatencies: number[] = [];
    const keydownLatencies: number[] = [];
    const roundTimes: Record<string, string>[] = [];
    const roundWalls: RoundWall[] = [];
    const mouseLatencies: number[] = [];
    let prev = h1;
    let text = docText;
    const insertions = [' in fact', ' still', ' surely', ' now', ' again'];
    for (let round = 0; round < ROUNDS; round++) {
      await page.mouse.move(5, 450); // away from the text: the hover closes
      await page.keyboard.press('Escape');
      // Put the cursor after "is", before " Paris" (Ctrl+End, then left past " Paris\n" wrap-safe).
      await page.keyboard.press('Control+End');
      await page.keyboard.press('ArrowUp');
      await page.keyboard.press('End');
      for (let i = 0; i < HOVER_WORD.length + 1; i++) await page.keyboard.press('ArrowLeft');
      const ins = insertions[round % insertions.length] ?? ' x';
      await page.keyboard.type(ins, { delay: 25 });
      const tTyped = performance.now();
      const at = text.lastIndexOf(` ${HOVER_WORD}`);
      text = text.slice(0, at) + ins + text.slice(at);
      box = await wordBox(page, HOVER_WORD);
      await armHoverWatch(page, prev.text);
      await page.mouse.move(box.x, box.y);
      const seen = await hoverWatched(page);
      const tHarness = performance.now();
      const h = await readHover(page, 5000, prev.text);
      latencies.push(seen.painted - seen.keyup);
      keydownLatencies.push(seen.painted - seen.keydown);
      // Wall-clock times of the round, to read beside the daemon's log (daemon.log).
      const wall = await page.evaluate(() => (window as unknown as { __lensWall?: Record<string, number> }).__lensWall ?? {});
      roundTimes.push(Object.fromEntries(Object.entries(wall).map(([k, v]) => [k, new Date(v).toISOString()])));
      roundWalls.push({ keydown: wall.keydown ?? NaN, keyup: wall.keyup ?? NaN, mousemove: wall.mousemove ?? NaN, painted: wall.painted ?? NaN });
      harnessLatencies.push(tHarness - tTyped);
      mouseLatencies.push(seen.painted - seen.mousemove);
      checkHover(h, cliPosition(text, text.lastIndexOf(HOVER_WORD) + 2, 5), `hover after typing ${JSON.stringify(ins)}`);
      check(h.text !== prev.text, 'the hover changed');
      if (round === 0) await page.screenshot({ path: path.join(OUT, 'hover-after-typing.png') });
      prev = h;
    }
    const sorted = [...latencies].sort((a, b) => a - b);
    result.typingToHoverMs = latencies.map((x) => Math.round(x));
    result.typingToHoverMedianMs = Math.round(sorted[Math.floor(sorted.length / 2)] ?? NaN);
    result.mouseToHoverMs = mouseLatencies.map((x) => Math.round(x));
    // Stricter: from the last key's press (the harness holds each key 25 ms).
    result.keydownToHoverMs = keydownLatencies.map((x) => Math.round(x));
    result.keydownToHoverMedianMs = Math.round([...keydownLatencies].sort((a, b) => a - b)[Math.floor(keydownLatencies.length / 2)] ?? NaN);
    result.roundTimes = roundTimes;
    // The same rounds as the harness sees them: from `keyboard.type` returning to the watch
    // answering over the DevTools protocol (its round trips are in it, the reading of the table not).
    result.harnessTypingToHoverMs = harnessLatencies.map((x) => Math.round(x));
    result.harnessTypingToHoverMedianMs = Math.round([...harnessLatencies].sort((a, b) => a - b)[Math.floor(harnessLatencies.length / 2)] ?? NaN);
    result.documentTokens = cliPosition(text, 0, 1).report.tokens.length;
    result.statusAfterTyping = (await page.locator('.statusbar-item', { hasText: /· ready/ }).first().innerText()).trim();
    // The editor's own share: the same hover again, answered from the daemon's hover cache
    // (about a millisecond), from the mouse move to the table on screen.
    const warm: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      await page.mouse.move(5, 450);
      await page.keyboard.press('Escape');
      // Closed, or the watch below would see the old hover at once.
      await page.locator('.monaco-editor .monaco-hover:visible').filter({ hasText: 'layer' }).first().waitFor({ state: 'hidden', timeout: 5000 });
      box = await wordBox(page, HOVER_WORD);
      await armHoverWatch(page);
      await page.mouse.move(box.x, box.y);
      const seen = await hoverWatched(page);
      const h = await readHover(page, 5000);
      warm.push(seen.painted - seen.mousemove);
      check(h.text === prev.text, 'the cached hover is the same table');
    }
    const warmSorted = [...warm].sort((a, b) => a - b);
    result.cachedHoverMs = warm.map((x) => Math.round(x));
    result.cachedHoverMedianMs = Math.round(warmSorted[Math.floor(warmSorted.length / 2)] ?? NaN);
    // Where the typing rounds' time went (the daemon's log is written as it goes).
    const logFile = process.env.LOGIT_LENS_LOG_FILE;
    if (logFile !== undefined && existsSync(logFile)) {
      result.typingBreakdownMs = typingBreakdown(logFile, roundWalls);
      log(`typing -> hover, where the time goes (medians, ms): ${JSON.stringify(result.typingBreakdownMs)}`);
    }
    log(`typing -> hover: ${JSON.stringify(result.typingToHoverMs)} ms (median ${String(result.typingToHoverMedianMs)}; from the key press ${JSON.stringify(result.keydownToHoverMs)}, median ${String(result.keydownToHoverMedianMs)}; as the harness sees it ${JSON.stringify(result.harnessTypingToHoverMs)}, median ${String(result.harnessTypingToHoverMedianMs)}; mouse on the word -> hover ${JSON.stringify(result.mouseToHoverMs)}; the same hover from the daemon's cache ${JSON.stringify(result.cachedHoverMs)}, median ${String(result.cachedHoverMedianMs)}), ${String(result.documentTokens)} tokens; status ${String(result.statusAfterTyping)}`);

    // 3. Toggle the lens off for this document (no hover, the status says so), then on again.
    await page.mouse.move(5, 450);
    await page.keyboard.press('Escape');
    await command(page, 'Logit Lens: Toggle the lens for this document');
    await page.locator('.statusbar-item', { hasText: /off here/ }).first().waitFor({ timeout: 10000 });
    box = await wordBox(page, HOVER_WORD);
    await page.mouse.move(box.x, box.y);
    // An absence has no event to wait for: no lens hover within 2 s (only readHover's timeout
    // counts as none; any other error fails the test).
    const off = await readHover(page, 2000).then(
      () => 'a hover',
      (err: unknown) => {
        if (err instanceof Error && err.message.startsWith('no Logit Lens hover')) return 'none';
        throw err;
      },
    );
    check(off === 'none', 'no lens hover on a document toggled off');
    await page.mouse.move(5, 450);
    await page.keyboard.press('Escape');
    await command(page, 'Logit Lens: Toggle the lens for this document');
    await page.locator('.statusbar-item', { hasText: /· ready/ }).filter({ hasNotText: /off here/ }).first().waitFor({ timeout: 10000 });
    await page.mouse.move(box.x, box.y);
    checkHover(await readHover(page, 30000), cliPosition(text, text.lastIndexOf(HOVER_WORD) + 2, 5), 'hover after toggling back on');
    log('toggle off and on');

    // 4. The heatmap of the whole document.
    await page.mouse.move(5, 450);
    await page.keyboard.press('Escape');
    await command(page, 'Logit Lens: Show heatmap of the selection or document');
    const frame = await waitForFrameText(page, /Paris/, 120000);
    const heat = await frame.evaluate(() => {
      // The daemon's page (lens/heatmap) embeds its data and draws a cell per token and layer.
      const data = document.getElementById('lens-data');
      const grid = data ? (JSON.parse(data.textContent ?? '{}') as { columns?: unknown[]; layers?: unknown[] }) : {};
      return {
        daemonPage: data !== null,
        columns: grid.columns?.length ?? 0,
        layers: grid.layers?.length ?? 0,
        cells: document.querySelectorAll('table#heatmap td.cell').length,
        text: document.body.innerText,
      };
    });
    check(heat.text.includes('Logit Lens: notes.txt'), `the heatmap panel's heading, in ${JSON.stringify(heat.text.slice(0, 200))}`);
    check(heat.daemonPage, "the heatmap is the daemon's page (lens/heatmap), not the fallback table");
    check(heat.columns === result.documentTokens, `the heatmap has a column per token of the document (${String(result.documentTokens)}), got ${heat.columns}`);
    check(heat.layers === ref1.report.model.n_layers + 1, `the heatmap has every layer, got ${heat.layers}`);
    check(heat.cells === heat.columns * heat.layers, `the page drew a cell per token and layer (${heat.columns * heat.layers}), got ${heat.cells}`);
    check(/France/.test(heat.text) && /Jupiter/.test(heat.text), 'the heatmap shows the document tokens');
    // Painted: its fonts loaded and a frame rendered since the cells were drawn.
    await frame.evaluate(async () => {
      await document.fonts.ready;
      await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    });
    await page.screenshot({ path: path.join(OUT, 'heatmap.png') });
    result.heatmap = `lens/heatmap: ${heat.columns} tokens x ${heat.layers} layers`;
    log(`heatmap: ${String(result.heatmap)}`);

    // 4b. An edit, then the diff lens against the version before it (the daemon keeps it): the
    // page shows both versions' tokens, the inserted word marked among the after version's.
    await page.mouse.move(5, 450);
    await page.keyboard.press('Escape');
    box = await wordBox(page, HOVER_WORD);
    await page.mouse.click(box.x, box.y); // the editor, not the heatmap beside it, has the focus
    await page.keyboard.press('Control+End');
    await page.keyboard.press('ArrowUp');
    await page.keyboard.press('End');
    for (let i = 0; i < HOVER_WORD.length + 1; i++) await page.keyboard.press('ArrowLeft');
    const inserted = ' indeed';
    await page.keyboard.type(inserted, { delay: 25 });
    const before = text;
    const at = text.lastIndexOf(` ${HOVER_WORD}`);
    text = text.slice(0, at) + inserted + text.slice(at);
    await command(page, 'Logit Lens: Compare with the previous version');
    const diffFrame = await frameOrToast(page, /Diff lens/, /compare failed|open a document/, 120000);
    const diffView = await diffFrame.evaluate(() => ({
      heading: document.body.innerText.slice(0, 300),
      before: document.getElementById('before')?.innerText ?? '',
      after: document.getElementById('after')?.innerText ?? '',
      changed: [...document.querySelectorAll('#after mark')].map((m) => m.textContent ?? '').join(''),
      cells: document.querySelectorAll('#figure svg g.cell').length,
    }));
    const count = (s: string, w: string) => s.split(w).length - 1;
    check(diffView.heading.includes('before the last edit → now'), `the diff panel's heading, in ${JSON.stringify(diffView.heading)}`);
    check(/Jupiter/.test(diffView.before) && /Jupiter/.test(diffView.after), `both versions' tokens are in the diff view: ${JSON.stringify(diffView.before.slice(-120))} / ${JSON.stringify(diffView.after.slice(-120))}`);
    check(count(diffView.after, 'indeed') === count(text, 'indeed') && count(diffView.before, 'indeed') === count(before, 'indeed'), `the after version has the inserted word, the before version not: ${JSON.stringify(diffView.before.slice(-80))} / ${JSON.stringify(diffView.after.slice(-80))}`);
    check(diffView.changed.includes('indeed'), `the inserted word is marked as changed, marks ${JSON.stringify(diffView.changed)}`);
    check(diffView.cells > 0, 'the diff heatmap has cells');
    await page.screenshot({ path: path.join(OUT, 'diff.png') });
    result.diff = `lens/diff: ${diffView.cells} cells; marked ${JSON.stringify(diffView.changed)}`;
    log(`diff: ${String(result.diff)}`);

    // 5. The status bar item opens the model info and cache statistics.
    await page.locator('.statusbar-item', { hasText: /· ready/ }).first().click();
    const dialog = page.locator('.monaco-dialog-box');
    await dialog.waitFor({ timeout: 15000 });
    const info = await dialog.innerText();
    check(/Smollm2/i.test(info) && /Layers: 30/.test(info) && /Cache: \d+ entries/.test(info) && /Lookups: \d+ hits/.test(info), `model info and cache statistics in the dialog:\n${info}`);
    await page.screenshot({ path: path.join(OUT, 'model-info.png') });
    await page.keyboard.press('Escape');
    result.info = info.split('\n').filter((l) => l.trim() !== '');

    // 6. The daemon crashes (killed by its id): the extension says so, restarts it, hovers work.
    const daemons = daemonPids(server.pid ?? -1);
    check(daemons.length === 1, `one daemon process in code-server's session, found ${JSON.stringify(daemons)}`);
    process.kill(daemons[0] ?? -1, 'SIGKILL');
    await toast(page, /daemon stopped; restarting it \(1 of 3\)/, 20000);
    await page.locator('.statusbar-item', { hasText: /· ready/ }).first().waitFor({ timeout: 60000 });
    check(daemonPids(server.pid ?? -1).length === 1, 'a new daemon runs');
    box = await wordBox(page, HOVER_WORD);
    await page.mouse.move(5, 450);
    await page.mouse.move(box.x, box.y);
    checkHover(await readHover(page, 30000), cliPosition(text, text.lastIndexOf(HOVER_WORD) + 2, 5), 'hover after the restart');
    await page.screenshot({ path: path.join(OUT, 'restarted.png') });
    log('daemon killed, restarted, hovers again');

    // 7. Pick the model (the default model's GGUF, through VS Code's own open dialog): the
    // daemon restarts with --model.
    if (MODEL) {
      await page.mouse.move(5, 450);
      await page.keyboard.press('Escape');
      await command(page, 'Logit Lens: Pick the model');
      const pathBox = page.locator('.quick-input-widget input');
      await pathBox.waitFor({ state: 'visible', timeout: 15000 });
      // The dialog (VS Code's simple file dialog) reads its start folder, then lists its entries
      // and, in the same step, writes the folder's path into the box: typing before that would
      // be overwritten. So: a path in the box and the folder's entries (at least "..") listed.
      const entries = page.locator('.quick-input-list .monaco-list-row');
      const ready = Date.now() + 15000;
      while (!(await pathBox.inputValue()).startsWith('/') || (await entries.count()) === 0) {
        check(Date.now() < ready, `the open dialog shows its start folder and its entries (box: ${JSON.stringify(await pathBox.inputValue())})`);
        await page.waitForTimeout(50);
      }
      // `fill` sets the value and fires its input event; nothing rewrites it now (the dialog holds
      // Enter back while it reads the model's folder).
      await pathBox.fill(MODEL);
      check((await pathBox.inputValue()) === MODEL, `the open dialog holds the model path, not ${await pathBox.inputValue()}`);
      await page.keyboard.press('Enter');
      const until = Date.now() + 60000;
      let enterAgain = Date.now() + 5000;
      while (daemonPids(server.pid ?? -1, MODEL).length !== 1) {
        check(Date.now() < until, `a daemon started with --model ${MODEL}`);
        // The dialog may still be reading the model's folder when Enter arrives and drop it:
        // while it stays open with our path, press Enter again (a condition, not a delay).
        if (Date.now() > enterAgain && (await pathBox.isVisible()) && (await pathBox.inputValue()) === MODEL) {
          await page.keyboard.press('Enter');
          enterAgain = Date.now() + 5000;
        }
        await page.waitForTimeout(200);
      }
      await page.locator('.statusbar-item', { hasText: /Smollm2.*· ready/i }).first().waitFor({ timeout: 60000 });
      log('model picked: the daemon runs with --model');
      result.pickedModel = MODEL;
    }

    // 8. A wrong server path: a clear error with the fix, and the status says so.
    // Edited the way a user does: the settings JSON in the editor, saved.
    await page.mouse.move(5, 450);
    await page.keyboard.press('Escape');
    await command(page, 'Preferences: Open User Settings (JSON)');
    await page.locator('.monaco-editor .view-lines', { hasText: 'logitLens.serverPath' }).first().waitFor({ timeout: 15000 });
    await page.keyboard.press('Control+A');
    await page.keyboard.insertText(JSON.stringify({ ...settings, 'logitLens.serverPath': '/nonexistent/logit-lens' }, null, 1));
    await page.keyboard.press('Control+S');
    await toast(page, /not an executable file.*Set logitLens\.serverPath/s, 30000);
    await page.locator('.statusbar-item', { hasText: /no server/ }).first().waitFor({ timeout: 10000 });
    await page.screenshot({ path: path.join(OUT, 'no-server.png') });
    log('wrong serverPath reported');
    result.ok = true;
  } catch (err) {
    result.error = err instanceof Error ? err.message : String(err);
    if (page) await page.screenshot({ path: path.join(OUT, 'failure.png') }).catch(() => undefined);
    process.stderr.write(`code-server log:\n${serverLog.slice(-4000)}\n`);
  } finally {
    await browser?.close().catch(() => undefined);
    if (server?.pid) {
      try {
        process.kill(-server.pid, 'SIGTERM');
      } catch {
        // already gone
      }
    }
    result.seconds = Math.round((performance.now() - t0) / 100) / 10;
    writeFileSync(path.join(OUT, 'result.json'), JSON.stringify(result, null, 2));
    rmSync(tmp, { recursive: true, force: true });
  }
  console.log(JSON.stringify(result));
  process.exit(result.ok ? 0 : 1);
}

main().catch((err: unknown) => {
  console.log(JSON.stringify({ ok: false, error: err instanceof Error ? err.message : String(err) }));
  process.exit(1);
});
