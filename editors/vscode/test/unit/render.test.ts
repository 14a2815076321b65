import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { catalogueItems, escapeHtml, formatBytes, heatmapPage, infoDetail, probColor, reportToHtmlTable, showToken, statusText, type RunReport } from '../../src/render';

// The fixture is a real report from `logit-lens run --format json` (see test/fixtures/PROVENANCE.md).
const report = JSON.parse(readFileSync(join(__dirname, '../../../test/fixtures/run-v1.json'), 'utf8')) as RunReport;

/** The table as rows of cell texts, parsed back from the HTML with regexes. */
function cells(html: string): string[][] {
  return [...html.matchAll(/<tr>(.*?)<\/tr>/g)].map((m) => [...(m[1] ?? '').matchAll(/<t[hd][^>]*>(.*?)<\/t[hd]>/g)].map((c) => c[1] ?? ''));
}

test('fallback table from a run/v1 report: layers last first, top-1 per cell, * on the written token', () => {
  const html = reportToHtmlTable(report);
  assert.deepEqual(cells(html), [
    ['', 'The', '·cat', '·sat', '·on', '·the'],
    ['L30', '-', '&#39;s', '·on *', '·a', '·cat'],
    ['L15', '·the', ',', ',', '·and', '·'],
    ['L0', 'The', '·cat', '·sat', '·on', '·the'],
  ]);
  assert.match(html, /<caption>Smollm2 135M 8k Lc100K Mix1 Ep2 · norm lens · 5 tokens/);
  // " a" at L30, position 3 has p = 0.752: a dark cell with white text and its probability in the title.
  assert.match(html, /<td style="background:hsl\(215, 70%, 56%\);color:#fff;" title="layer 30, position 3: ·a 0.752">·a<\/td>/);
});

test('token text that is HTML is escaped', () => {
  const r: RunReport = structuredClone(report);
  const top = r.positions[0]?.cells[0]?.top[0];
  assert.ok(top);
  top.text = '<script>';
  const html = reportToHtmlTable(r);
  assert.ok(!html.includes('<script>'));
  assert.match(html, /&lt;script&gt;/);
});

test('escape and show', () => {
  assert.equal(escapeHtml(`<a href="x">&'`), '&lt;a href=&quot;x&quot;&gt;&amp;&#39;');
  assert.equal(showToken(' a\nb\t'), '·a\\nb\\t');
});

test('colours run from light to dark', () => {
  assert.equal(probColor(0), 'hsl(215, 70%, 97%)');
  assert.equal(probColor(1), 'hsl(215, 70%, 42%)');
  assert.equal(probColor(7), probColor(1));
  assert.equal(probColor(Number.NaN), probColor(0));
});

test('page around a fragment has a CSP and no scripts; a whole document passes through', () => {
  const page = heatmapPage('<svg></svg>', 'T <1>');
  assert.match(page, /Content-Security-Policy" content="default-src 'none'/);
  assert.match(page, /<title>T &lt;1&gt;<\/title>/);
  assert.ok(page.includes('<svg></svg>'));
  assert.equal(heatmapPage('<!DOCTYPE html><html></html>', 'x'), '<!DOCTYPE html><html></html>');
  assert.equal(
    heatmapPage('<!DOCTYPE html><html><body class="b"><p>x</p></body></html>', 'T <1>'),
    '<!DOCTYPE html><html><body class="b"><h3 style="font-family: sans-serif">T &lt;1&gt;</h3><p>x</p></body></html>',
  );
});

test('status text', () => {
  const check = (s: Parameters<typeof statusText>[0], expect: string) => assert.equal(statusText(s), expect);
  check({ state: 'starting' }, '$(telescope) Logit Lens · starting');
  check({ model: 'Smollm2 135M', state: 'ready', latencyMs: 41.6 }, '$(telescope) Smollm2 135M · ready · 42 ms');
  check({ model: 'Smollm2 135M 8k Lc100K Mix1 Ep2', state: 'ready', enabled: false }, '$(telescope) Smollm2 135M 8k Lc100K Mix1… · ready · off here');
  check({ state: 'no server', latencyMs: Number.NaN }, '$(telescope) Logit Lens · no server');
});

test('bytes', () => {
  assert.equal(formatBytes(0), '0 B');
  assert.equal(formatBytes(1023), '1023 B');
  assert.equal(formatBytes(1536), '1.5 KiB');
  assert.equal(formatBytes(256 * 1024 * 1024), '256.0 MiB');
  assert.equal(formatBytes(-1), '?');
});

test('model info and cache statistics', () => {
  assert.equal(
    infoDetail(report.model, { entries: 2, bytes: 3 * 1024 * 1024, budgetBytes: 256 * 1024 * 1024, hits: 3, misses: 1, tokensReused: 500, tokensComputed: 20 }),
    [
      'Model: Smollm2 135M 8k Lc100K Mix1 Ep2 (llama)',
      'Layers: 30 · hidden size 576 · vocabulary 49152 · context 8192',
      'Precision: f32 (dequantized from q4_1/q8_0)',
      'Cache: 2 entries · 3.0 MiB of 256.0 MiB',
      'Lookups: 3 hits, 1 misses (75% hits)',
      'Tokens: 500 reused, 20 computed',
    ].join('\n'),
  );
  assert.equal(infoDetail(report.model).split('\n').length, 3);
});

test('the model chooser lists `logit-lens models --format json`', () => {
  const json = JSON.stringify({
    models: [
      { name: 'smollm2-135m', default: true, architecture: 'llama', size: 98362432, licence: 'Apache-2.0', cached: { path: '/c/s.gguf', size: 98362432, verified: true } },
      { name: 'gemma3-270m', default: false, architecture: 'gemma3', size: 253113024, licence: 'Gemma terms of use', cached: null },
    ],
  });
  assert.deepEqual(catalogueItems(json), [
    { label: 'smollm2-135m', description: `llama · ${formatBytes(98362432)} · default`, detail: 'Apache-2.0 · cached' },
    { label: 'gemma3-270m', description: `gemma3 · ${formatBytes(253113024)}`, detail: 'Gemma terms of use · fetched from PyPI on first use' },
  ]);
  assert.throws(() => catalogueItems('{}'), /no `models` list/);
});
