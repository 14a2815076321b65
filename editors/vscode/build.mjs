// Bundles the extension (dist/extension.js) or, with the argument `tests`, the tests
// (out/test/**.js), with esbuild. TypeScript is checked separately by `npm run typecheck`.
import * as esbuild from 'esbuild';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const common = { bundle: true, platform: 'node', target: 'node20', format: 'cjs', sourcemap: 'inline', logLevel: 'warning' };

if (process.argv[2] === 'tests') {
  const entryPoints = [];
  for (const dir of ['test/unit', 'test/protocol', 'test/e2e']) {
    for (const f of readdirSync(dir)) if (f.endsWith('.ts')) entryPoints.push(join(dir, f));
  }
  // playwright-core stays external: it is a large package that resolves its own files.
  await esbuild.build({ ...common, entryPoints, outdir: 'out', outbase: '.', external: ['vscode', 'playwright-core'] });
} else {
  await esbuild.build({ ...common, entryPoints: ['src/extension.ts'], outfile: 'dist/extension.js', external: ['vscode'], sourcemap: false, minify: true });
}
