// Opens a lens-plot HTML page in Debian's headless Chromium (driven by playwright-core, see
// scripts/deps/chromium.sh), exercises it like a user and prints what it saw as one JSON object.
// Usage: node drive.mjs PAGE.html SCREENSHOT.png [COLUMN]
// (COLUMN: the column to pin, default 2; LOGIT_LENS_BROWSER_DEPS: node_modules' folder)
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [page_, shot, column] = process.argv.slice(2);
if (!page_ || !shot) {
  console.error('usage: node drive.mjs PAGE.html SCREENSHOT.png');
  process.exit(2);
}
const deps = process.env.LOGIT_LENS_BROWSER_DEPS || join(homedir(), '.cache/logit-lens/test-deps/browser');
const require = createRequire(join(deps, 'package.json'));
const { chromium } = require('playwright-core');

const browser = await chromium.launch({
  executablePath: process.env.LOGIT_LENS_CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = { consoleErrors: [], requests: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') out.consoleErrors.push(`${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => out.consoleErrors.push(`pageerror: ${e.message}`));
  page.on('request', (r) => { if (!r.url().startsWith('file:')) out.requests.push(r.url()); });
  await page.goto(pathToFileURL(resolve(page_)).href);
  await page.waitForSelector('#heatmap td.cell');

  out.cells = await page.locator('#heatmap td.cell').count();
  out.rows = await page.locator('#heatmap tr.layer-row').count();
  out.columns = await page.locator('#heatmap td.input').count();
  out.rowLabels = await page.locator('#heatmap tr.layer-row th').allTextContents();
  out.inputs = await page.locator('#heatmap td.input').evaluateAll((tds) => tds.map((td) => td.firstChild.textContent));
  out.hits = await page.locator('#heatmap td.cell.hit').count();

  // Hover the top-left cell (the last layer at the first position).
  const cell = page.locator('#heatmap tr.layer-row').first().locator('td.cell').first();
  out.hoveredCellText = await cell.textContent();
  await cell.hover();
  await page.waitForSelector('#tooltip:not([hidden])');
  out.tooltip = {
    title: await page.locator('#tooltip h2').textContent(),
    rows: await page.locator('#tooltip table.topk tr').evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent))),
    nextRank: await page.locator('#tooltip .next-rank').textContent(),
  };

  // Switch the metric: the cells must change colour.
  const colors = () => page.locator('#heatmap td.cell').evaluateAll((tds) => tds.map((td) => getComputedStyle(td).backgroundColor));
  const legend = () => page.locator('#legend').innerText();
  out.metricBefore = await page.locator('#metric').inputValue();
  const before = await colors();
  const legendBefore = await legend();
  await page.selectOption('#metric', 'rank');
  const after = await colors();
  out.metricAfter = await page.locator('#metric').inputValue();
  out.recoloured = before.filter((c, i) => c !== after[i]).length;
  out.distinctColors = new Set(after).size;
  out.legendChanged = legendBefore !== (await legend());
  out.subtitle = await page.locator('#subtitle').textContent();

  // Click a column's input token: its trajectory chart appears.
  await page.mouse.move(5, 5);
  const col = Math.min(column === undefined ? 2 : Number(column), out.columns - 1);
  await page.locator('#heatmap td.input').nth(col).click();
  await page.waitForSelector('#trajectory:not([hidden]) svg');
  out.trajectory = {
    title: await page.locator('#trajectory h2').textContent(),
    lines: await page.locator('#trajectory polyline.track').count(),
    points: await page.locator('#trajectory circle.point').count(),
    legend: await page.locator('#trajectory .legend-row span').allTextContents(),
    pinned: await page.locator('#heatmap td.pinned').count(),
  };
  // Hover again so that the screenshot shows a tooltip too.
  await page.locator('#heatmap tr.layer-row').nth(1).locator('td.cell').nth(col).hover();
  await page.waitForSelector('#tooltip:not([hidden])');
  await page.screenshot({ path: shot, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
