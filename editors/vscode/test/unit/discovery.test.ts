import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assessServer, findServer, parseVersion, type DiscoveryEnv, type ProbeResult } from '../../src/discovery';

/** A fake file system: the set of executable files. */
function env(executables: string[], over: Partial<DiscoveryEnv> = {}): DiscoveryEnv {
  const exe = new Set(executables);
  return { pathEnv: '/usr/local/bin:/usr/bin', platform: 'linux', workspaceFolders: ['/ws'], isExecutable: (p) => exe.has(p), home: '/home/u', ...over };
}

function check(setting: string, e: DiscoveryEnv, expect: string) {
  const found = findServer(setting, e);
  const got = found.kind === 'found' ? `${found.source} ${found.path}` : `missing: ${found.message} | ${found.fix} | ${found.searched.join(',')}`;
  assert.equal(got, expect);
}

test('the setting wins over PATH', () => check('/opt/ll', env(['/opt/ll', '/usr/bin/logit-lens']), 'setting /opt/ll'));
test('a ~ in the setting is expanded', () => check('~/bin/ll', env(['/home/u/bin/ll']), 'setting /home/u/bin/ll'));
test('a wrong setting is reported, not silently replaced by PATH', () =>
  check(
    '/nope/logit-lens',
    env(['/usr/bin/logit-lens']),
    'missing: logitLens.serverPath is "/nope/logit-lens", which is not an executable file. | Set logitLens.serverPath to the logit-lens binary, or clear it to search PATH. Install with `cargo install --path crates/logit-lens`. | /nope/logit-lens',
  ));
test('first match on PATH', () => check('', env(['/usr/bin/logit-lens', '/usr/local/bin/logit-lens']), 'PATH /usr/local/bin/logit-lens'));
test('empty PATH entries are skipped', () => check('', env(['/usr/bin/logit-lens'], { pathEnv: '::/usr/bin' }), 'PATH /usr/bin/logit-lens'));
test('PATH before the workspace', () => check('', env(['/ws/target/release/logit-lens', '/usr/bin/logit-lens']), 'PATH /usr/bin/logit-lens'));
test('workspace release before debug', () =>
  check('', env(['/ws/target/debug/logit-lens', '/ws/target/release/logit-lens']), 'workspace /ws/target/release/logit-lens'));
test('workspace debug', () => check('', env(['/ws/target/debug/logit-lens']), 'workspace /ws/target/debug/logit-lens'));
test('second workspace folder', () =>
  check('', env(['/b/target/debug/logit-lens'], { workspaceFolders: ['/a', '/b'] }), 'workspace /b/target/debug/logit-lens'));
test('windows names and separators', () =>
  check('', env(['C:\\bin/logit-lens.exe'], { platform: 'win32', pathEnv: 'C:\\x;C:\\bin', workspaceFolders: [] }), 'PATH C:\\bin/logit-lens.exe'));
test('nowhere: says where it looked and how to fix it', () =>
  check(
    '',
    env([]),
    'missing: The logit-lens server was not found (not set in logitLens.serverPath, not on PATH, not built in the workspace). | Set logitLens.serverPath, or install with `cargo install --path crates/logit-lens`. | /usr/local/bin/logit-lens,/usr/bin/logit-lens,/ws/target/release/logit-lens,/ws/target/debug/logit-lens',
  ));

test('versions', () => {
  assert.deepEqual(parseVersion('logit-lens 0.1.0\n'), [0, 1, 0]);
  assert.deepEqual(parseVersion('logit-lens 12.3.45-dev'), [12, 3, 45]);
  assert.equal(parseVersion('ripgrep 14.1.0'), undefined);
  assert.equal(parseVersion(''), undefined);
});

const SERVE_HELP = 'Usage: logit-lens serve [OPTIONS]\n      --stdio  speak LSP on stdin/stdout\n';
function probe(version: string, help = SERVE_HELP, codes: [number | null, number | null] = [0, 0]): ProbeResult {
  return { version: { code: codes[0], stdout: version, stderr: codes[0] === null ? 'spawn EACCES' : '' }, serveHelp: { code: codes[1], stdout: help, stderr: '' } };
}
function checkAssess(p: ProbeResult, expect: string) {
  const a = assessServer('/b/logit-lens', p);
  assert.equal(a.ok ? `ok ${a.version}` : `${a.message} | ${a.fix}`, expect);
}
const FIX = 'Install a newer one with `cargo install --path crates/logit-lens`, or set logitLens.serverPath.';

test('a good server', () => checkAssess(probe('logit-lens 0.1.0\n'), 'ok 0.1.0'));
test('too old by version', () => checkAssess(probe('logit-lens 0.0.9\n'), `/b/logit-lens is version 0.0.9; this extension needs 0.1.0 or newer. | ${FIX}`));
test('too old: no serve command', () =>
  checkAssess(probe('logit-lens 0.1.0\n', "error: unrecognized subcommand 'serve'", [0, 2]), `/b/logit-lens (version 0.1.0) is too old: it has no \`serve --stdio\` daemon. | ${FIX}`));
test('not logit-lens', () => checkAssess(probe('python 3.11\n'), `/b/logit-lens is not logit-lens (--version printed "python 3.11"). | ${FIX}`));
test('cannot start', () => checkAssess(probe('', '', [null, null]), `/b/logit-lens --version could not be started: spawn EACCES | ${FIX}`));
test('fails', () => checkAssess(probe('', '', [101, 101]), `/b/logit-lens --version exited with status 101: | ${FIX}`));
