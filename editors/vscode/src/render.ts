// What the extension itself renders: the fallback heatmap table, the page around a heatmap,
// the status bar text and the model/cache summary. Pure: no `vscode` import.

/** The parts of a `logit-lens/run/v1` report (docs/json-schema.md) that are rendered here. */
export interface RunReport {
  schema: string;
  model: ModelInfo;
  lens: string;
  top_k: number;
  tokens: { index: number; id: number; text: string; start: number; end: number }[];
  layers: number[];
  positions: {
    position: number;
    token_id: number;
    next_token_id: number | null;
    final_top1: { id: number; text: string; prob: number; logit: number };
    decided_at: number | null;
    cells: {
      layer: number;
      top: { id: number; text: string; prob: number; logit: number }[];
      entropy: number;
      kl_to_final: number;
      next: { id: number; rank: number; prob: number } | null;
      final_top1_rank: number;
    }[];
  }[];
}

export interface ModelInfo {
  name: string;
  architecture: string;
  n_layers: number;
  hidden_size: number;
  vocab_size: number;
  context_length: number;
  precision: string;
}

export interface CacheStats {
  entries: number;
  bytes: number;
  budgetBytes: number;
  hits: number;
  misses: number;
  tokensReused: number;
  tokensComputed: number;
}

export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);
}

/** Token text made visible: a leading space as `·`, newlines and tabs as escapes. */
export function showToken(text: string): string {
  return text.replace(/ /g, '·').replace(/\n/g, '\\n').replace(/\t/g, '\\t').replace(/\r/g, '\\r');
}

/** A probability as a background colour: white (0) to a saturated blue (1). */
export function probColor(p: number): string {
  const x = Math.min(1, Math.max(0, Number.isFinite(p) ? p : 0));
  const lightness = Math.round(97 - 55 * x);
  return `hsl(215, 70%, ${lightness}%)`;
}

/**
 * The heatmap as a plain HTML table from a run/v1 report: one row per layer (the last on top),
 * one column per analysed position, each cell the top-1 next-token prediction, its background
 * its probability. Used when the daemon has no `lens/heatmap`.
 */
export function reportToHtmlTable(report: RunReport): string {
  const head = report.positions
    .map((p) => `<th title="position ${p.position}">${escapeHtml(showToken(report.tokens[p.position]?.text ?? '?'))}</th>`)
    .join('');
  const rows: string[] = [];
  for (let li = report.layers.length - 1; li >= 0; li--) {
    const layer = report.layers[li];
    const cells = report.positions
      .map((p) => {
        const cell = p.cells[li];
        const top = cell?.top[0];
        if (!top) return '<td></td>';
        const hit = p.next_token_id !== null && top.id === p.next_token_id;
        const dark = top.prob > 0.6;
        const style = `background:${probColor(top.prob)};${dark ? 'color:#fff;' : 'color:#000;'}`;
        const title = `layer ${layer}, position ${p.position}: ${showToken(top.text)} ${top.prob.toFixed(3)}`;
        return `<td style="${style}" title="${escapeHtml(title)}">${escapeHtml(showToken(top.text))}${hit ? ' *' : ''}</td>`;
      })
      .join('');
    rows.push(`<tr><th>L${layer}</th>${cells}</tr>`);
  }
  return (
    `<table class="lens-heatmap"><caption>${escapeHtml(report.model.name)} · ${escapeHtml(report.lens)} lens · ` +
    `${report.tokens.length} tokens · top-1 per layer (* = the token written next)</caption>` +
    `<thead><tr><th></th>${head}</tr></thead><tbody>${rows.join('')}</tbody></table>`
  );
}

/** Whether `html` is a whole document rather than a fragment. */
export function isFullPage(html: string): boolean {
  return /^\s*(<!doctype|<html)/i.test(html);
}

/** A whole webview page around a heatmap fragment (SVG or HTML), with a strict CSP. */
export function heatmapPage(fragment: string, title: string): string {
  if (isFullPage(fragment)) {
    // A whole page (the daemon's interactive heatmap): keep it, with the title on top.
    const heading = `<h3 style="font-family: sans-serif">${escapeHtml(title)}</h3>`;
    return /<body[^>]*>/i.test(fragment) ? fragment.replace(/<body[^>]*>/i, (m) => m + heading) : fragment;
  }
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline';">
<title>${escapeHtml(title)}</title>
<style>
body { font-family: var(--vscode-font-family, sans-serif); font-size: 12px; }
table.lens-heatmap { border-collapse: collapse; font-family: var(--vscode-editor-font-family, monospace); }
table.lens-heatmap td, table.lens-heatmap th { border: 1px solid #8884; padding: 1px 4px; white-space: pre; }
table.lens-heatmap caption { text-align: left; padding: 4px 0; }
</style></head>
<body><h3>${escapeHtml(title)}</h3>
${fragment}
</body></html>`;
}

export type DaemonState = 'starting' | 'ready' | 'restarting' | 'stopped' | 'crashed' | 'no server';

/** The status bar text, e.g. `$(telescope) SmolLM2 135M · ready · 42 ms`. */
export function statusText(s: { model?: string; state: DaemonState; latencyMs?: number; enabled?: boolean }): string {
  const parts = [`$(telescope) ${s.model ? shortModel(s.model) : 'Logit Lens'}`, s.state];
  if (s.latencyMs !== undefined && Number.isFinite(s.latencyMs)) parts.push(`${Math.round(s.latencyMs)} ms`);
  if (s.enabled === false) parts.push('off here');
  return parts.join(' · ');
}

/** A model name short enough for the status bar. */
export function shortModel(name: string): string {
  return name.length > 28 ? `${name.slice(0, 27).trimEnd()}…` : name;
}

export function formatBytes(n: number): string {
  if (!Number.isFinite(n) || n < 0) return '?';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${units[u]}`;
}

/** The model info and cache statistics, as lines for a message's detail. */
export function infoDetail(info: ModelInfo, stats?: CacheStats): string {
  const lines = [
    `Model: ${info.name} (${info.architecture})`,
    `Layers: ${info.n_layers} · hidden size ${info.hidden_size} · vocabulary ${info.vocab_size} · context ${info.context_length}`,
    `Precision: ${info.precision}`,
  ];
  if (stats) {
    const lookups = stats.hits + stats.misses;
    const rate = lookups > 0 ? ` (${Math.round((100 * stats.hits) / lookups)}% hits)` : '';
    lines.push(
      `Cache: ${stats.entries} entries · ${formatBytes(stats.bytes)} of ${formatBytes(stats.budgetBytes)}`,
      `Lookups: ${stats.hits} hits, ${stats.misses} misses${rate}`,
      `Tokens: ${stats.tokensReused} reused, ${stats.tokensComputed} computed`,
    );
  }
  return lines.join('\n');
}

/** One model of `logit-lens models --format json`, as the model chooser lists it. */
export interface CatalogueItem {
  label: string;
  description: string;
  detail: string;
}

/**
 * The catalogue `logit-lens models --format json` prints, as quick-pick items: the name, its
 * architecture and size, and whether it is cached (else it is fetched on first use).
 */
export function catalogueItems(json: string): CatalogueItem[] {
  const parsed = JSON.parse(json) as { models?: unknown };
  if (!Array.isArray(parsed.models)) throw new Error('`logit-lens models --format json` printed no `models` list');
  return parsed.models.map((m: { name?: unknown; architecture?: unknown; size?: unknown; licence?: unknown; default?: unknown; cached?: unknown }) => {
    if (typeof m.name !== 'string') throw new Error('a model without a name in `logit-lens models`');
    const size = typeof m.size === 'number' ? formatBytes(m.size) : '?';
    const cached = m.cached ? 'cached' : 'fetched from PyPI on first use';
    return {
      label: m.name,
      description: `${String(m.architecture)} · ${size}${m.default === true ? ' · default' : ''}`,
      detail: `${String(m.licence)} · ${cached}`,
    };
  });
}
