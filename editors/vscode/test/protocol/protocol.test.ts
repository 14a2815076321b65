// The daemon over its real stdio pipes, spoken to the way the extension speaks to it
// (vscode-languageserver-protocol's connection, which vscode-languageclient uses), checked
// against the CLI (`logit-lens run --format json`) on the default model.
//
// Needs LOGIT_LENS_BIN: the logit-lens binary (the Rust test passes CARGO_BIN_EXE_logit-lens).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import {
  createProtocolConnection,
  StreamMessageReader,
  StreamMessageWriter,
  InitializeRequest,
  InitializedNotification,
  DidOpenTextDocumentNotification,
  DidChangeTextDocumentNotification,
  DidChangeConfigurationNotification,
  HoverRequest,
  ShutdownRequest,
  ExitNotification,
  ResponseError,
  type ProtocolConnection,
  type Hover,
  type MarkupContent,
  type InitializeResult,
} from 'vscode-languageserver-protocol/node';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { RunReport } from '../../src/render';

type Cell = RunReport['positions'][number]['cells'][number];

const BIN = process.env.LOGIT_LENS_BIN;
const env: NodeJS.ProcessEnv = { ...process.env, NO_COLOR: '1' };
delete env.LOGIT_LENS_MODEL;

let child: ChildProcessWithoutNullStreams;
let conn: ProtocolConnection;
let init: InitializeResult;
let stderr = '';
const exited = new Promise<number | null>((resolve) => {
  before(async () => {
    assert.ok(BIN, 'set LOGIT_LENS_BIN to the logit-lens binary');
    child = spawn(BIN, ['serve', '--stdio'], { env });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (code) => resolve(code));
    conn = createProtocolConnection(new StreamMessageReader(child.stdout), new StreamMessageWriter(child.stdin));
    conn.listen();
    const died = new Promise<never>((_, reject) => child.on('exit', (code) => reject(new Error(`the daemon exited (${code}) before initialize answered:\n${stderr}`))));
    init = await Promise.race([died, conn.sendRequest(InitializeRequest.type, {
      processId: process.pid,
      rootUri: null,
      capabilities: {
        general: { positionEncodings: ['utf-16'] },
        textDocument: { hover: { contentFormat: ['markdown', 'plaintext'] }, synchronization: { dynamicRegistration: false } },
      },
      initializationOptions: { topK: 3, layerStride: 1, contextTokens: 1024, inlayHints: false },
    })]);
    await conn.sendNotification(InitializedNotification.type, {});
  });
});

after(async () => {
  if (!conn) return;
  await conn.sendRequest(ShutdownRequest.type);
  await conn.sendNotification(ExitNotification.type);
  // As vscode-languageclient does: after `exit`, the connection ends and stdin closes.
  conn.dispose();
  child.stdin.end();
  let timer: NodeJS.Timeout | undefined;
  const code = await Promise.race([exited, new Promise((r) => (timer = setTimeout(() => r('timeout'), 10000)))]);
  clearTimeout(timer);
  if (code === 'timeout') child.kill('SIGKILL');
  assert.equal(code, 0, `the daemon should exit 0 after shutdown+exit; stderr:\n${stderr}`);
  assert.ok(!stderr.includes('panicked'), stderr);
});

/** The CLI's report for a text: the independent reference. */
function cli(text: string, args: string[] = []): RunReport {
  assert.ok(BIN);
  return JSON.parse(execFileSync(BIN, ['run', '--format', 'json', ...args, '--', text], { env, encoding: 'utf8', maxBuffer: 64 << 20 })) as RunReport;
}

/** The position of the token that covers byte `offset` (ASCII texts only: bytes = UTF-16 units). */
function tokenAt(report: RunReport, offset: number): number {
  const t = report.tokens.find((t) => t.start <= offset && offset < t.end);
  assert.ok(t, `no token at ${offset}`);
  return t.index;
}

function markdown(h: Hover | null): string {
  assert.ok(h, 'a hover');
  const c = h.contents as MarkupContent;
  assert.equal(c.kind, 'markdown');
  return c.value;
}

/** The table rows of a hover: each a list of cells (header and separator dropped). Cells are
 * split at unescaped `|` only (the hover escapes a `|` in a token with a backslash). */
function rows(md: string): string[][] {
  const lines = md.split('\n').filter((l) => l.trim().startsWith('|'));
  assert.ok(lines.length >= 3, `a markdown table with at least one row in:\n${md}`);
  assert.match(lines[0] ?? '', /\|\s*layer\s*\|\s*top predictions\s*\|\s*p\(written\)\s*\|\s*rank\(written\)\s*\|/);
  const body = lines.slice(2).map((l) => l.trim().replace(/^\||(?<!\\)\|$/g, '').split(/(?<!\\)\|/).map((c) => c.trim()));
  // After an edit that moved the token, two more: what the layer said before it, and the KL.
  const width = /before edit/.test(lines[0] ?? '') ? 6 : 4;
  for (const r of body) assert.equal(r.length, width, `${width} cells in the row ${JSON.stringify(r)}`);
  return body;
}

/** A token as the hover writes it (crates/lens-server/src/hover.rs `escape`): whitespace as
 * visible symbols, markdown punctuation backslash-escaped. */
function mdToken(text: string): string {
  if (text === '') return '∅';
  let out = '';
  for (const c of text) {
    const ws = ({ ' ': '␣', '\n': '↵', '\r': '␍', '\t': '⇥' } as Record<string, string>)[c];
    if (ws !== undefined) out += ws;
    else if ('\\`*_[]<>|~&'.includes(c)) out += `\\${c}`;
    else if (/\p{Cc}/u.test(c)) out += `\\u{${(c.codePointAt(0) ?? 0).toString(16)}}`;
    else out += c;
  }
  return out;
}

/** The predictions in a hover row's "top predictions" cell: `token prob · token prob · …`
 * (tokens have no spaces: a space is written `␣`). */
function predictions(cell: string): { token: string; prob: number }[] {
  return cell.split(' · ').map((p) => {
    const at = p.lastIndexOf(' ');
    return { token: p.slice(0, at), prob: Number(p.slice(at + 1)) };
  });
}

/** A hover row lists exactly the CLI's top-k of that cell (k of them), most probable first. */
function assertTop(row: string[] | undefined, cell: Cell | undefined, k: number, what: string): void {
  assert.ok(row, `${what}: a hover row`);
  assert.ok(cell, `${what}: a cell in the CLI report`);
  assert.equal(cell.top.length, k, `${what}: the CLI's top-${k}`);
  const got = predictions(row[1] ?? '');
  assert.equal(got.length, k, `${what}: ${k} predictions in the hover row ${JSON.stringify(row)}`);
  assert.deepEqual(got.map((p) => p.token).sort(), cell.top.map((t) => mdToken(t.text)).sort(), `${what}: the CLI's predictions in the hover row ${JSON.stringify(row)}`);
  got.forEach((p, i) => {
    assert.ok(Number.isFinite(p.prob) && p.prob >= 0 && p.prob <= 1, `${what}: a probability in ${JSON.stringify(row)}`);
    if (i > 0) assert.ok(p.prob <= (got[i - 1]?.prob ?? NaN), `${what}: most probable first in ${JSON.stringify(row)}`);
  });
}

const URI = 'file:///tmp/logit-lens-protocol/notes.txt';
const TEXT1 = 'We train GPT-3, an autoregressive language model with 175 billion parameters';
const TEXT2 = 'We train GPT-3, an enormous language model with 175 billion parameters';
const HOVER_AT = 20; // the "u" of " aut…" in TEXT1, the "n" of " enormous" in TEXT2

test('initialize: capabilities', () => {
  const caps = init.capabilities;
  assert.ok(caps.hoverProvider, 'hoverProvider');
  // docs/protocol.md: `experimental.logitLens.methods` lists the lens/* methods, heatmap included.
  const methods = (caps.experimental as { logitLens?: { methods?: string[] } } | undefined)?.logitLens?.methods;
  assert.deepEqual([...(methods ?? [])].sort(), ['lens/analyze', 'lens/cacheStats', 'lens/diff', 'lens/heatmap', 'lens/modelInfo', 'lens/position', 'lens/tokenize']);
  const sync = caps.textDocumentSync;
  const change = typeof sync === 'number' ? sync : sync?.change;
  assert.equal(change, 2, 'incremental sync');
  assert.equal(caps.positionEncoding ?? 'utf-16', 'utf-16');
});

test('hover: per-layer table with the real model tokens, last layer first', async () => {
  await conn.sendNotification(DidOpenTextDocumentNotification.type, { textDocument: { uri: URI, languageId: 'plaintext', version: 1, text: TEXT1 } });
  const ref = cli(TEXT1, ['--top-k', '3']);
  const pos = tokenAt(ref, HOVER_AT);
  const p = ref.positions[pos];
  assert.ok(p);
  const hover = await conn.sendRequest(HoverRequest.type, { textDocument: { uri: URI }, position: { line: 0, character: HOVER_AT } });
  const md = markdown(hover);
  const token = ref.tokens[pos];
  assert.ok(token);
  assert.deepEqual(hover?.range, { start: { line: 0, character: token.start }, end: { line: 0, character: token.end } }, 'the hover range is the token');
  assert.ok(md.startsWith(`**${mdToken(token.text)}**`), `the heading names the token ${JSON.stringify(token.text)}:\n${md}`);
  const r = rows(md);
  assert.equal(r.length, ref.model.n_layers + 1, 'one row per layer (stride 1)');
  assert.match(r[0]?.[0] ?? '', new RegExp(`\\b${ref.model.n_layers}\\b`), 'last layer first');
  assert.match(r[r.length - 1]?.[0] ?? '', /\b0\b/, 'embeddings last');
  // The top predictions of the last and the first layer, as the CLI computes them.
  assert.equal(p.cells.length, ref.model.n_layers + 1, 'the CLI has every layer');
  assertTop(r[0], p.cells[p.cells.length - 1], 3, 'last layer');
  assertTop(r[r.length - 1], p.cells[0], 3, 'layer 0');
  // The deciding layer (the CLI's decided_at; with every layer shown there always is one) and
  // only it is marked.
  assert.equal(typeof p.decided_at, 'number', 'the CLI reports the deciding layer');
  const marked = r.filter((row) => (row[0] ?? '').includes('◀ decided')).map((row) => Number(/\d+/.exec(row[0] ?? '')?.[0]));
  assert.deepEqual(marked, [p.decided_at], `the deciding layer is marked in:\n${md}`);
});

test('typing changes the hover (incremental sync)', async () => {
  // Replace "autoregressive" (bytes 19..33) by "enormous".
  const t0 = performance.now();
  await conn.sendNotification(DidChangeTextDocumentNotification.type, {
    textDocument: { uri: URI, version: 2 },
    contentChanges: [{ range: { start: { line: 0, character: 19 }, end: { line: 0, character: 33 } }, text: 'enormous' }],
  });
  const hover = await conn.sendRequest(HoverRequest.type, { textDocument: { uri: URI }, position: { line: 0, character: HOVER_AT } });
  const ms = performance.now() - t0;
  const md = markdown(hover);
  const ref = cli(TEXT2, ['--top-k', '3']);
  const pos = tokenAt(ref, HOVER_AT);
  const p = ref.positions[pos];
  const token = ref.tokens[pos];
  assert.ok(p && token);
  assert.ok(md.startsWith(`**${mdToken(token.text)}**`), `the new token ${JSON.stringify(token.text)} in:\n${md}`);
  const r = rows(md);
  assert.equal(r.length, ref.model.n_layers + 1, 'one row per layer');
  assertTop(r[0], p.cells[p.cells.length - 1], 3, 'last layer after the change');
  console.log(JSON.stringify({ metric: 'protocol_change_to_hover_ms', value: Math.round(ms) }));
});

test('typing near the end of a ~260-token document, then hovering: the daemon-side latency', async () => {
  const doc = readFileSync(join(__dirname, '../../../test/e2e/notes.txt'), 'utf8');
  const uri = 'file:///tmp/logit-lens-protocol/long.txt';
  await conn.sendNotification(DidOpenTextDocumentNotification.type, { textDocument: { uri, languageId: 'plaintext', version: 1, text: doc } });
  const lines = doc.split('\n');
  const line = lines.length - 2; // "The capital of France is Paris"
  const lineText = lines[line] ?? '';
  let col = lineText.lastIndexOf(' Paris');
  const hoverAt = () => ({ textDocument: { uri }, position: { line, character: col + 3 } });
  assert.equal(rows(markdown(await conn.sendRequest(HoverRequest.type, hoverAt()))).length, 31);
  const ms: number[] = [];
  for (let version = 2; version < 7; version++) {
    const t0 = performance.now();
    for (const ch of ' now') {
      // one change per keystroke, as an editor sends them
      await conn.sendNotification(DidChangeTextDocumentNotification.type, {
        textDocument: { uri, version },
        contentChanges: [{ range: { start: { line, character: col }, end: { line, character: col } }, text: ch }],
      });
      col += 1;
    }
    const md = markdown(await conn.sendRequest(HoverRequest.type, hoverAt()));
    ms.push(performance.now() - t0);
    assert.match(md, /Paris/);
    assert.equal(rows(md).length, 31);
  }
  const sorted = [...ms].sort((a, b) => a - b);
  console.log(JSON.stringify({ metric: 'protocol_typing_to_hover_ms_260_tokens', values: ms.map(Math.round), median: Math.round(sorted[2] ?? NaN) }));
});

test('settings change: layerStride 10 keeps layers 30, 20, 10, 0', async () => {
  await conn.sendNotification(DidChangeConfigurationNotification.type, { settings: { logitLens: { topK: 2, layerStride: 10, contextTokens: 1024, inlayHints: false } } });
  const md = markdown(await conn.sendRequest(HoverRequest.type, { textDocument: { uri: URI }, position: { line: 0, character: HOVER_AT } }));
  const r = rows(md);
  const layers = r.map((row) => Number(/\d+/.exec(row[0] ?? '')?.[0]));
  assert.deepEqual(layers, [30, 20, 10, 0]);
  for (const row of r) assert.equal(predictions(row[1] ?? '').length, 2, `topK 2 in ${JSON.stringify(row)}`);
});

test('lens/modelInfo is the report model', async () => {
  const info = await conn.sendRequest('lens/modelInfo', {});
  assert.deepEqual(info, cli('Hi').model);
});

test('lens/analyze is identical to the CLI report', async () => {
  const got = await conn.sendRequest('lens/analyze', { text: TEXT1, topK: 3, layers: '0..30:10', positions: [3, 8] });
  const want = cli(TEXT1, ['--top-k', '3', '--layers', '0..30:10']);
  want.positions = want.positions.filter((p) => p.position === 3 || p.position === 8);
  assert.deepEqual(want.positions.map((p) => p.position), [3, 8], 'the CLI report has positions 3 and 8');
  assert.deepEqual(want.positions.map((p) => p.cells.map((c) => c.layer)), [[0, 10, 20, 30], [0, 10, 20, 30]], 'layers 0..30:10 in the CLI report');
  assertClose(got, want, '$');
});

/**
 * Deep equality, numbers within 1e-4 (relative, or absolute below 1e-6): the daemon may reuse
 * cached hidden states of a shared prefix, which can move the last bits of a float. Integers
 * (ids, ranks, layers) must match exactly.
 */
function assertClose(got: unknown, want: unknown, at: string): void {
  if (typeof want === 'number' && typeof got === 'number') {
    if (Number.isInteger(want) && Number.isInteger(got) && Math.abs(want) > 1) assert.equal(got, want, at);
    else assert.ok(Math.abs(got - want) <= Math.max(1e-6, 1e-4 * Math.abs(want)), `${at}: ${got} vs ${want}`);
    return;
  }
  if (Array.isArray(want)) {
    assert.ok(Array.isArray(got), `${at}: an array`);
    assert.equal(got.length, want.length, `${at}: length`);
    want.forEach((w, i) => assertClose(got[i], w, `${at}[${i}]`));
    return;
  }
  if (want && typeof want === 'object') {
    assert.ok(got && typeof got === 'object', `${at}: an object`);
    assert.deepEqual(Object.keys(got).sort(), Object.keys(want).sort(), `${at}: keys`);
    for (const [k, w] of Object.entries(want)) assertClose((got as Record<string, unknown>)[k], w, `${at}.${k}`);
    return;
  }
  assert.equal(got, want, at);
}

test('lens/cacheStats counts', async () => {
  const s = await conn.sendRequest<Record<string, number>>('lens/cacheStats', {});
  for (const k of ['entries', 'bytes', 'budgetBytes', 'hits', 'misses', 'tokensReused', 'tokensComputed']) assert.equal(typeof s[k], 'number', k);
  assert.ok((s.tokensComputed ?? 0) > 0);
});

/** A token as lens-plot shows it (crates/lens-plot/src/text.rs `visible`). */
function plotToken(text: string): string {
  if (text === '') return '∅';
  let out = '';
  for (const c of text) {
    const ws = ({ ' ': '·', '\n': '↵', '\t': '⇥', '\r': '␍', '\u00a0': '⍽' } as Record<string, string>)[c];
    if (ws !== undefined) out += ws;
    else if (/\p{Cc}/u.test(c)) out += `\\u{${(c.codePointAt(0) ?? 0).toString(16)}}`;
    else out += c;
  }
  return out;
}

/** XML text as lens-plot escapes it (crates/lens-plot/src/text.rs `xml`). */
function xml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c] ?? c);
}

// lens/heatmap is served on this door (crates/lens-server/src/lsp.rs registers it as a custom
// method, answered by rpc::call like the socket door): an answer of -32601 fails here.
test('lens/heatmap: the SVG and the HTML page of the CLI report', async () => {
  const ref = cli(TEXT1, ['--top-k', '3', '--layers', '0..30:10']);
  const n = ref.tokens.length;
  assert.ok(n > 0, 'the CLI report has tokens');
  assert.deepEqual(ref.positions.map((p) => p.position), [...Array(n).keys()], 'the CLI report has every position');
  const layers = [0, 10, 20, 30];
  for (const p of ref.positions) assert.deepEqual(p.cells.map((c) => c.layer), layers, `position ${p.position}: layers 0..30:10`);
  const title = `Logit lens · ${ref.model.name}`;

  // SVG: one cell per token and layer, each with a <title> naming its layer and top-1.
  const svg = await conn.sendRequest<{ format: string; content: string }>('lens/heatmap', { text: TEXT1, format: 'svg', layers: '0..30:10' });
  assert.equal(svg.format, 'svg');
  assert.ok(svg.content.startsWith('<svg xmlns="http://www.w3.org/2000/svg"'), svg.content.slice(0, 200));
  assert.ok(svg.content.trimEnd().endsWith('</svg>'), svg.content.slice(-200));
  assert.ok(svg.content.includes(`>${xml(title)}</text>`), `the title ${title}`);
  const titles = [...svg.content.matchAll(/<title>layer (\d+): (.*?) p=(\d+\.\d{3}); /g)].map((m) => ({ layer: Number(m[1]), top1: m[2] ?? '', p: Number(m[3]) }));
  assert.equal(titles.length, n * layers.length, 'a cell per token and layer');
  for (const [li, layer] of layers.entries()) {
    // Panels of columns are stacked; within the SVG, one layer's cells come in position order.
    const cells = titles.filter((t) => t.layer === layer);
    assert.equal(cells.length, n, `layer ${layer}: a cell per token`);
    cells.forEach((c, pos) => {
      const want = ref.positions[pos]?.cells[li]?.top[0];
      assert.ok(want, `the CLI's top-1 at position ${pos}, layer ${layer}`);
      assert.equal(c.top1, xml(plotToken(want.text)), `position ${pos}, layer ${layer}: top-1`);
      assert.ok(Math.abs(c.p - want.prob) <= 1e-3, `position ${pos}, layer ${layer}: p=${c.p} vs ${want.prob}`);
    });
  }

  // HTML: a self-contained page whose data (JSON in #lens-data) is the report's grid.
  const html = await conn.sendRequest<{ format: string; content: string }>('lens/heatmap', { text: TEXT1, format: 'html', layers: '0..30:10', topK: 3 });
  assert.equal(html.format, 'html');
  assert.ok(html.content.startsWith('<!DOCTYPE html>'), html.content.slice(0, 200));
  assert.ok(html.content.trimEnd().endsWith('</html>'), html.content.slice(-200));
  assert.ok(html.content.includes(`<title>${xml(title)}</title>`), `the title ${title}`);
  assert.ok(!/<(script|link|img)[^>]+(src|href)=/i.test(html.content), 'nothing loaded from elsewhere');
  const json = /<script type="application\/json" id="lens-data">([\s\S]*?)<\/script>/.exec(html.content)?.[1];
  assert.ok(json, 'the page embeds its data');
  const data = JSON.parse(json) as { model: string; layers: number[]; columns: { position: number; input: string; cells: ({ top: [string, number][] } | null)[] }[] };
  assert.equal(data.model, ref.model.name);
  assert.deepEqual(data.layers, layers);
  assert.equal(data.columns.length, n, 'a column per token');
  data.columns.forEach((col, pos) => {
    const token = ref.tokens[pos];
    assert.ok(token);
    assert.equal(col.position, pos);
    assert.equal(col.input, plotToken(token.text), `column ${pos}: the input token`);
    assert.equal(col.cells.length, layers.length, `column ${pos}: a cell per layer`);
    col.cells.forEach((cell, li) => {
      const want = ref.positions[pos]?.cells[li]?.top ?? [];
      assert.equal(want.length, 3, `the CLI's top-3 at position ${pos}, layer ${layers[li]}`);
      assert.ok(cell, `column ${pos}, layer ${layers[li]}: a cell`);
      assert.equal(cell.top.length, 3, `column ${pos}, layer ${layers[li]}: topK 3`);
      assert.equal(cell.top[0]?.[0], plotToken(want[0]?.text ?? ''), `column ${pos}, layer ${layers[li]}: top-1`);
      // Six significant digits in the page; the last bits of a float may move (see assertClose).
      const [got, p] = [cell.top[0]?.[1] ?? NaN, want[0]?.prob ?? NaN];
      assert.ok(Math.abs(got - p) <= Math.max(1e-6, 2e-4 * p), `column ${pos}, layer ${layers[li]}: top-1 probability ${got} vs ${p}`);
    });
  });
});

test('errors keep the daemon serving', async () => {
  const code = async (method: string, params: object) => {
    try {
      await conn.sendRequest(method, params);
      return 'ok';
    } catch (err) {
      assert.ok(err instanceof ResponseError, String(err));
      return `${err.code} ${(err.data as { kind?: string } | undefined)?.kind ?? ''}`.trim();
    }
  };
  assert.equal(await code('lens/analyze', { text: '' }), '-32010 empty_text');
  assert.equal(await code('lens/analyze', { text: 'x', topK: 0 }), '-32602');
  assert.equal(await code('lens/nope', {}), '-32601');
  assert.equal(await code('textDocument/hover', { textDocument: { uri: 'file:///not/open.txt' }, position: { line: 0, character: 0 } }), '-32012 document_not_open');
  assert.equal(await code('lens/tokenize', { text: 'Hello' }), 'ok');
});
