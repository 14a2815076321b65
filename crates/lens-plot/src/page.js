// The interactive heatmap: builds the table from the embedded JSON, colours it by the chosen
// metric, shows a cell's top-k on hover and pins a column's per-layer trajectory on click.
(() => {
  'use strict';
  const data = JSON.parse(document.getElementById('lens-data').textContent);
  const table = document.getElementById('heatmap');
  const tooltip = document.getElementById('tooltip');
  const legendEl = document.getElementById('legend');
  const trajectory = document.getElementById('trajectory');
  const select = document.getElementById('metric');
  const SVG = 'http://www.w3.org/2000/svg';
  const MISSING = '#d4d4d4';
  const TRACK_COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd'];
  let metric = data.metric;
  let pinned = null;

  const n = data.layers.length;
  const order = data.flip ? [...Array(n).keys()] : [...Array(n).keys()].reverse();
  const layerName = (l) => (l === 0 ? '0 (emb)' : String(l));
  const pct = (p) => (p >= 0.1 ? (100 * p).toFixed(1) : (100 * p).toPrecision(2)) + '%';
  const el = (tag, props = {}, text) => {
    const e = document.createElement(tag);
    Object.assign(e, props);
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function build() {
    const next = el('tr', { className: 'next-row' });
    next.append(el('th', { className: 'rowlabel' }, 'next'));
    data.columns.forEach((col, j) => {
      const td = el('td', { className: 'next', title: col.next ?? '' }, col.next ?? '');
      td.dataset.col = j;
      next.append(td);
    });
    table.append(next, gap());
    for (const li of order) {
      const tr = el('tr', { className: 'layer-row' });
      tr.dataset.layer = data.layers[li];
      tr.append(el('th', { className: 'rowlabel' }, layerName(data.layers[li])));
      data.columns.forEach((col, j) => {
        const c = col.cells[li];
        const td = el('td', { className: 'cell' });
        td.dataset.col = j;
        td.dataset.li = li;
        if (c) {
          td.textContent = c.top.length ? c.top[0][0] : '';
          if (c.hit) td.classList.add('hit');
        } else {
          td.classList.add('missing');
        }
        tr.append(td);
      });
      table.append(tr);
    }
    const input = el('tr', { className: 'input-row' });
    input.append(el('th', { className: 'rowlabel' }, 'input'));
    data.columns.forEach((col, j) => {
      const td = el('td', { className: 'input', title: `position ${col.position}` }, col.input);
      td.append(el('small', {}, String(col.position)));
      td.dataset.col = j;
      input.append(td);
    });
    table.append(gap(), input);
  }

  function gap() {
    const tr = el('tr', { className: 'gap' });
    tr.append(el('th'));
    tr.append(el('td', { colSpan: Math.max(1, data.columns.length) }));
    return tr;
  }

  function recolor() {
    const mi = data.metrics.indexOf(metric);
    for (const td of table.querySelectorAll('td.cell')) {
      const c = data.columns[+td.dataset.col].cells[+td.dataset.li];
      if (!c) continue;
      const idx = c.c[mi];
      if (idx === null || idx === undefined) {
        td.style.background = MISSING;
        td.style.color = '#222';
        td.dataset.color = '';
      } else {
        td.style.background = data.colormap[idx];
        td.style.color = data.text_on[idx];
        td.dataset.color = String(idx);
      }
    }
    document.getElementById('subtitle').textContent = data.scales[metric].subtitle;
    legend();
  }

  function legend() {
    const s = data.scales[metric];
    legendEl.replaceChildren();
    legendEl.append(el('div', { className: 'title' }, s.label));
    const bar = el('div', { className: 'bar' });
    const stops = [];
    for (let i = 0; i < data.colormap.length; i += 15) stops.push(data.colormap[i]);
    bar.style.background = `linear-gradient(to top, ${stops.join(', ')})`;
    for (const [t, label] of s.ticks) {
      const tick = el('div', { className: 'tick' }, label);
      tick.style.top = `${(1 - t) * 100}%`;
      bar.append(tick);
    }
    legendEl.append(bar);
    const key = (cls, text) => {
      const k = el('div', { className: 'key' });
      k.append(el('i', { className: cls }), document.createTextNode(text));
      return k;
    };
    legendEl.append(key('hit', 'top-1 = next token'), key('missing', 'no value'));
  }

  function showTooltip(td, ev) {
    const col = data.columns[+td.dataset.col];
    const li = +td.dataset.li;
    const c = col.cells[li];
    if (!c) return;
    tooltip.replaceChildren();
    tooltip.append(el('h2', {}, `layer ${layerName(data.layers[li])} · position ${col.position} «${col.input}»`));
    const t = el('table', { className: 'topk' });
    c.top.forEach(([tok, p], i) => {
      const tr = el('tr');
      if (col.next !== null && tok === col.next) tr.className = 'is-next';
      const bar = el('td', { className: 'bar' });
      const span = el('span');
      span.style.width = `${Math.max(1, p * 100)}%`;
      bar.append(span);
      tr.append(el('td', {}, String(i + 1)), el('td', {}, tok), bar, el('td', { className: 'p' }, pct(p)));
      t.append(tr);
    });
    tooltip.append(t);
    const stats = el('div', { className: 'stats' });
    if (c.next_rank !== null) {
      stats.append(el('div', { className: 'next-rank' }, `next «${col.next}»: rank ${c.next_rank}, p = ${pct(c.next_prob)}`));
    } else {
      stats.append(el('div', { className: 'next-rank' }, 'last position: no next token'));
    }
    stats.append(el('div', {}, `entropy ${c.entropy.toFixed(3)} nats · KL to output ${c.kl.toFixed(3)} nats`));
    stats.append(el('div', {}, `final top-1 «${col.final_top1}» is rank ${c.final_top1_rank} here`));
    tooltip.append(stats);
    tooltip.hidden = false;
    moveTooltip(ev);
  }

  function moveTooltip(ev) {
    const pad = 14;
    const r = tooltip.getBoundingClientRect();
    let x = ev.clientX + pad;
    let y = ev.clientY + pad;
    if (x + r.width > window.innerWidth) x = Math.max(0, ev.clientX - r.width - pad);
    if (y + r.height > window.innerHeight) y = Math.max(0, ev.clientY - r.height - pad);
    tooltip.style.left = `${x}px`;
    tooltip.style.top = `${y}px`;
  }

  function pin(j) {
    pinned = j;
    for (const e of table.querySelectorAll('.pinned')) e.classList.remove('pinned');
    for (const e of table.querySelectorAll(`td[data-col="${j}"]`)) e.classList.add('pinned');
    const col = data.columns[j];
    trajectory.replaceChildren();
    trajectory.hidden = false;
    trajectory.append(
      el('h2', {}, `Position ${col.position} «${col.input}»${col.next !== null ? ` → next «${col.next}»` : ''}: probability by layer`),
    );
    const W = 560, H = 230, L = 44, R = 16, T = 12, B = 34;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', W);
    svg.setAttribute('height', H);
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const x = (i) => L + (n <= 1 ? 0 : (i * (W - L - R)) / (n - 1));
    const y = (p) => T + (1 - p) * (H - T - B);
    const add = (tag, attrs, text) => {
      const e = document.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.append(e);
      return e;
    };
    for (const p of [0, 0.25, 0.5, 0.75, 1]) {
      add('line', { x1: L, x2: W - R, y1: y(p), y2: y(p), stroke: p === 0 ? '#555' : '#e3e3e3' });
      add('text', { x: L - 6, y: y(p) + 4, 'text-anchor': 'end' }, String(p));
    }
    const every = Math.max(1, Math.ceil(n / 16));
    data.layers.forEach((l, i) => {
      if (i % every === 0 || i === n - 1) add('text', { x: x(i), y: H - B + 15, 'text-anchor': 'middle' }, String(l));
    });
    add('text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle' }, 'layer');
    const legendRow = el('div', { className: 'legend-row' });
    col.tracks.forEach((track, k) => {
      const color = TRACK_COLORS[k % TRACK_COLORS.length];
      // Unknown values (null) break the line.
      let seg = [];
      const flush = () => {
        if (seg.length > 1) add('polyline', { class: 'track', points: seg.join(' '), fill: 'none', stroke: color, 'stroke-width': 2 });
        seg = [];
      };
      track.probs.forEach((p, i) => {
        if (p === null) return flush();
        seg.push(`${x(i).toFixed(1)},${y(p).toFixed(1)}`);
        add('circle', { class: 'point', cx: x(i), cy: y(p), r: 2.6, fill: color });
      });
      flush();
      const item = el('span');
      const sw = el('i');
      sw.style.background = color;
      item.append(sw, document.createTextNode(track.label));
      legendRow.append(item);
    });
    trajectory.append(svg, legendRow);
  }

  build();
  recolor();
  table.addEventListener('mouseover', (ev) => {
    const td = ev.target.closest('td.cell');
    if (td) showTooltip(td, ev);
  });
  table.addEventListener('mousemove', (ev) => {
    if (!tooltip.hidden) moveTooltip(ev);
  });
  table.addEventListener('mouseleave', () => {
    tooltip.hidden = true;
  });
  table.addEventListener('click', (ev) => {
    const td = ev.target.closest('td[data-col]');
    if (td) pin(+td.dataset.col);
  });
  select.addEventListener('change', () => {
    metric = select.value;
    recolor();
  });
  window.lensPlot = { data, pin, get pinned() { return pinned; } };
})();
