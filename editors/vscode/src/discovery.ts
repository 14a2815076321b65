// Finding the `logit-lens` binary and judging whether it can serve. Pure: the file system and
// the process runner are passed in, so that tests can give a fake PATH and layout.
import * as path from 'node:path';

export const BINARY = 'logit-lens';
/** The oldest daemon this extension speaks to (`logit-lens --version`). */
export const MIN_SERVER_VERSION = '0.1.0';
export const INSTALL_HINT = 'cargo install --path crates/logit-lens';

export interface DiscoveryEnv {
  /** The PATH variable. */
  pathEnv: string;
  platform: string;
  /** Workspace folders (file system paths), searched for target/release and target/debug. */
  workspaceFolders: readonly string[];
  /** Whether `p` is an existing executable file. */
  isExecutable(p: string): boolean;
  /** The home directory, to expand a leading `~` in the setting. */
  home?: string;
}

export type Found =
  | { kind: 'found'; path: string; source: 'setting' | 'PATH' | 'workspace' }
  | { kind: 'missing'; message: string; fix: string; searched: string[] };

function exeName(platform: string): string {
  return platform === 'win32' ? `${BINARY}.exe` : BINARY;
}

/** The server: the setting first, then PATH, then a workspace build (release before debug). */
export function findServer(setting: string, env: DiscoveryEnv): Found {
  const searched: string[] = [];
  if (setting.trim() !== '') {
    let p = setting.trim();
    if (env.home && (p === '~' || p.startsWith('~/'))) p = path.join(env.home, p.slice(1));
    if (env.isExecutable(p)) return { kind: 'found', path: p, source: 'setting' };
    return {
      kind: 'missing',
      message: `logitLens.serverPath is "${setting}", which is not an executable file.`,
      fix: `Set logitLens.serverPath to the logit-lens binary, or clear it to search PATH. Install with \`${INSTALL_HINT}\`.`,
      searched: [p],
    };
  }
  const exe = exeName(env.platform);
  const sep = env.platform === 'win32' ? ';' : ':';
  for (const dir of env.pathEnv.split(sep)) {
    if (dir === '') continue;
    const p = path.join(dir, exe);
    searched.push(p);
    if (env.isExecutable(p)) return { kind: 'found', path: p, source: 'PATH' };
  }
  for (const folder of env.workspaceFolders) {
    for (const profile of ['release', 'debug']) {
      const p = path.join(folder, 'target', profile, exe);
      searched.push(p);
      if (env.isExecutable(p)) return { kind: 'found', path: p, source: 'workspace' };
    }
  }
  return {
    kind: 'missing',
    message: 'The logit-lens server was not found (not set in logitLens.serverPath, not on PATH, not built in the workspace).',
    fix: `Set logitLens.serverPath, or install with \`${INSTALL_HINT}\`.`,
    searched,
  };
}

/** `logit-lens 1.2.3` -> [1, 2, 3]. */
export function parseVersion(output: string): [number, number, number] | undefined {
  const m = /^logit-lens\s+v?(\d+)\.(\d+)\.(\d+)/m.exec(output.trim());
  if (!m) return undefined;
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

export function compareVersions(a: readonly number[], b: readonly number[]): number {
  for (let i = 0; i < 3; i++) {
    const d = (a[i] ?? 0) - (b[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

export interface ProbeResult {
  /** The exit code and output of `logit-lens --version` (code null: it could not run). */
  version: { code: number | null; stdout: string; stderr: string };
  /** The same for `logit-lens serve --help`. */
  serveHelp: { code: number | null; stdout: string; stderr: string };
}

export type Assessment =
  | { ok: true; version: string }
  | { ok: false; message: string; fix: string };

/** Judges a found binary from its `--version` and `serve --help`. */
export function assessServer(binary: string, probe: ProbeResult): Assessment {
  const fix = `Install a newer one with \`${INSTALL_HINT}\`, or set logitLens.serverPath.`;
  if (probe.version.code !== 0) {
    const why = probe.version.code === null ? 'could not be started' : `exited with status ${probe.version.code}`;
    return { ok: false, message: `${binary} --version ${why}: ${firstLine(probe.version.stderr)}`.trim(), fix };
  }
  const v = parseVersion(probe.version.stdout);
  if (!v) return { ok: false, message: `${binary} is not logit-lens (--version printed "${firstLine(probe.version.stdout)}").`, fix };
  const min = parseVersion(`logit-lens ${MIN_SERVER_VERSION}`) ?? [0, 0, 0];
  const version = v.join('.');
  if (compareVersions(v, min) < 0) {
    return { ok: false, message: `${binary} is version ${version}; this extension needs ${MIN_SERVER_VERSION} or newer.`, fix };
  }
  if (probe.serveHelp.code !== 0 || !probe.serveHelp.stdout.includes('--stdio')) {
    return { ok: false, message: `${binary} (version ${version}) is too old: it has no \`serve --stdio\` daemon.`, fix };
  }
  return { ok: true, version };
}

function firstLine(s: string): string {
  return s.trim().split('\n')[0] ?? '';
}
