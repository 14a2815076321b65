import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULTS, isLensEnabled, needsRestart, serverArgs, toServerOptions, validateSettings } from '../../src/settings';

function check(raw: Record<string, unknown>, expect: { settings?: Partial<typeof DEFAULTS>; problems?: RegExp[] }) {
  const { settings, problems } = validateSettings(raw);
  assert.deepEqual(settings, { ...DEFAULTS, ...expect.settings });
  const want = expect.problems ?? [];
  assert.equal(problems.length, want.length, `problems: ${JSON.stringify(problems)}`);
  want.forEach((re, i) => assert.match(problems[i] ?? '', re));
}

test('defaults when nothing is set', () => check({}, {}));
test('valid values are taken', () =>
  check(
    { serverPath: ' /opt/ll/logit-lens ', model: '/m/x.gguf', topK: 10, layerStride: 3, contextTokens: 512, enabledLanguages: ['rust', 'markdown', 'rust'], inlayHints: true, compare: false },
    { settings: { serverPath: '/opt/ll/logit-lens', model: '/m/x.gguf', topK: 10, layerStride: 3, contextTokens: 512, enabledLanguages: ['rust', 'markdown'], inlayHints: true, compare: false } },
  ));
test('range ends are valid', () => check({ topK: 100, layerStride: 64, contextTokens: 16 }, { settings: { topK: 100, layerStride: 64, contextTokens: 16 } }));
test('topK 0 is out of range', () => check({ topK: 0 }, { problems: [/logitLens.topK must be an integer from 1 to 100, not 0; using 5/] }));
test('topK 101 is out of range', () => check({ topK: 101 }, { problems: [/topK .* not 101/] }));
test('fractional stride', () => check({ layerStride: 1.5 }, { problems: [/layerStride must be an integer from 1 to 64, not 1.5; using 1/] }));
test('context as a string', () => check({ contextTokens: '1024' }, { problems: [/contextTokens .* not "1024"; using 1024/] }));
test('languages not a list', () => check({ enabledLanguages: 'plaintext' }, { problems: [/enabledLanguages must be a list/] }));
test('empty language id', () => check({ enabledLanguages: ['rust', ' '] }, { problems: [/enabledLanguages/] }));
test('several problems at once', () =>
  check({ inlayHints: 'yes', serverPath: 3, topK: -1, compare: 1 }, { problems: [/serverPath must be a string/, /topK/, /inlayHints must be true or false/, /compare must be true or false/] }));

test('server options carry only what the daemon reads', () => {
  assert.deepEqual(toServerOptions({ ...DEFAULTS, model: '/x', topK: 7 }), { topK: 7, layerStride: 1, contextTokens: 1024, inlayHints: false, compare: true });
});

test('server args', () => {
  assert.deepEqual(serverArgs(DEFAULTS), ['serve', '--stdio']);
  assert.deepEqual(serverArgs({ ...DEFAULTS, model: '/m/a b.gguf' }), ['serve', '--stdio', '--model', '/m/a b.gguf']);
  assert.deepEqual(serverArgs({ ...DEFAULTS, tunedLens: '/l/lens.safetensors' }), ['serve', '--stdio', '--tuned-lens', '/l/lens.safetensors']);
  assert.ok(needsRestart(DEFAULTS, { ...DEFAULTS, tunedLens: '/l/x' }));
});

test('which documents get the lens', () => {
  const cases: [string, string[], boolean | undefined, boolean][] = [
    ['plaintext', DEFAULTS.enabledLanguages, undefined, true],
    ['markdown', DEFAULTS.enabledLanguages, undefined, true],
    ['rust', DEFAULTS.enabledLanguages, undefined, false],
    ['rust', ['*'], undefined, true],
    ['rust', DEFAULTS.enabledLanguages, true, true],
    ['plaintext', DEFAULTS.enabledLanguages, false, false],
    ['plaintext', [], undefined, false],
  ];
  for (const [lang, list, override, want] of cases) assert.equal(isLensEnabled(lang, list, override), want, `${lang} ${JSON.stringify(list)} ${override}`);
});

test('what restarts the daemon', () => {
  const cases: [Partial<typeof DEFAULTS>, boolean][] = [
    [{}, false],
    [{ topK: 9 }, false],
    [{ layerStride: 2, contextTokens: 64, enabledLanguages: ['*'] }, false],
    [{ model: '/m.gguf' }, true],
    [{ serverPath: '/bin/ll' }, true],
    [{ inlayHints: true }, true],
    [{ compare: false }, false],
  ];
  for (const [change, want] of cases) assert.equal(needsRestart(DEFAULTS, { ...DEFAULTS, ...change }), want, JSON.stringify(change));
});
