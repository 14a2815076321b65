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

/** The table rows of a hover: each a list of cells (header and separator dropped). */
function rows(md: string): string[][] {
  const lines = md.split('\n').filter((l) => l.trim().startsWith('|'));
  assert.ok(lines.length >= 2, `a markdown table in:\n${md}`);
  assert.match(lines[0] ?? '', /\|\s*layer\s*\|\s*top predictions\s*\|\s*p\(written\)\s*\|\s*rank\(written\)\s*\|/);
  return lines.slice(2).map((l) => l.trim().replace(/^\||\|$/g, '').split('|').map((c) => c.trim()));
}

/** Markdown-escaped token text, unescaped enough to compare with the report's (no spaces). */
function visible(text: string): string {
  return text.trim();
}

const URI = 'file:///tmp/logit-lens-protocol/notes.txt';
const TEXT1 = 'We train GPT-3, an autoregressive language model with 175 billion parameters';
const TEXT2 = 'We train GPT-3, an enormous language model with 175 billion parameters';
const HOVER_AT = 20; // the "u" of " aut…" in TEXT1, the "n" of " enormous" in TEXT2

test('initialize: capabilities', () => {
  const caps = init.capabilities;
  assert.ok(caps.hoverProvider, 'hoverProvider');
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
  assert.ok(md.includes(visible(token.text)), `the heading names the token ${JSON.stringify(token.text)}:\n${md}`);
  const r = rows(md);
  assert.equal(r.length, ref.model.n_layers + 1, 'one row per layer (stride 1)');
  assert.match(r[0]?.[0] ?? '', new RegExp(`\\b${ref.model.n_layers}\\b`), 'last layer first');
  assert.match(r[r.length - 1]?.[0] ?? '', /\b0\b/, 'embeddings last');
  // The top predictions of the last and the first layer, as the CLI computes them.
  const last = p.cells[p.cells.length - 1];
  const first = p.cells[0];
  assert.ok(last && first);
  for (const [row, cell] of [[r[0], last], [r[r.length - 1], first]] as const) {
    for (const t of cell.top) if (visible(t.text) !== '') assert.ok(row?.[1]?.includes(visible(t.text)), `${JSON.stringify(t.text)} in ${JSON.stringify(row)}`);
  }
  assert.ok(md.includes('decided') || md.includes('**'), 'the deciding layer is marked');
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
  assert.ok(md.includes(visible(token.text)), `the new token ${JSON.stringify(token.text)} in:\n${md}`);
  const last = p.cells[p.cells.length - 1];
  assert.ok(last);
  const row = rows(md)[0];
  for (const t of last.top) if (visible(t.text) !== '') assert.ok(row?.[1]?.includes(visible(t.text)), `${JSON.stringify(t.text)} in ${JSON.stringify(row)}`);
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
  const layers = rows(md).map((r) => Number(/\d+/.exec(r[0] ?? '')?.[0]));
  assert.deepEqual(layers, [30, 20, 10, 0]);
});

test('lens/modelInfo is the report model', async () => {
  const info = await conn.sendRequest('lens/modelInfo', {});
  assert.deepEqual(info, cli('Hi').model);
});

test('lens/analyze is identical to the CLI report', async () => {
  const got = await conn.sendRequest('lens/analyze', { text: TEXT1, topK: 3, layers: '0..30:10', positions: [3, 8] });
  const want = cli(TEXT1, ['--top-k', '3', '--layers', '0..30:10']);
  want.positions = want.positions.filter((p) => p.position === 3 || p.position === 8);
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

test('lens/heatmap answers html, or is absent (-32601: the extension then draws a table from lens/analyze)', async () => {
  try {
    const r = await conn.sendRequest<{ format: string; content: string }>('lens/heatmap', { text: TEXT1, format: 'html' });
    assert.equal(r.format, 'html');
    assert.ok(r.content.length > 100);
  } catch (err) {
    assert.ok(err instanceof ResponseError, String(err));
    assert.equal(err.code, -32601);
  }
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
