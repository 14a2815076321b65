// Settings of the extension: defaults, validation and what is sent to the daemon.
// Pure: no `vscode` import, so that `node --test` can exercise it.

export interface LensSettings {
  serverPath: string;
  model: string;
  /** A tuned lens file (or tuned-lens package folder) that hovers read through; empty: the norm lens. */
  tunedLens: string;
  topK: number;
  layerStride: number;
  contextTokens: number;
  enabledLanguages: string[];
  inlayHints: boolean;
  compare: boolean;
}

/** What the daemon accepts as `initializationOptions` and `settings.logitLens`. */
export interface ServerOptionsWire {
  topK: number;
  layerStride: number;
  contextTokens: number;
  inlayHints: boolean;
  compare: boolean;
}

export const DEFAULTS: LensSettings = {
  serverPath: '',
  model: '',
  tunedLens: '',
  topK: 5,
  layerStride: 1,
  contextTokens: 1024,
  enabledLanguages: ['plaintext', 'markdown'],
  inlayHints: false,
  compare: true,
};

/** Ranges, the same as in package.json's `contributes.configuration`. */
export const RANGES = {
  topK: [1, 100],
  layerStride: [1, 64],
  contextTokens: [16, 32768],
} as const satisfies Record<string, readonly [number, number]>;

export interface Validated {
  settings: LensSettings;
  /** One line per rejected value, naming the setting, what was wrong and what is used instead. */
  problems: string[];
}

/**
 * Validates the raw `logitLens.*` values (as read from the configuration, any JSON): each
 * invalid value is replaced by its default and reported.
 */
export function validateSettings(raw: Record<string, unknown>): Validated {
  const problems: string[] = [];
  const settings: LensSettings = { ...DEFAULTS, enabledLanguages: [...DEFAULTS.enabledLanguages] };

  for (const key of ['serverPath', 'model', 'tunedLens'] as const) {
    const v = raw[key];
    if (v === undefined || v === null) continue;
    if (typeof v === 'string') settings[key] = v.trim();
    else problems.push(`logitLens.${key} must be a string; using "${DEFAULTS[key]}"`);
  }

  for (const key of ['topK', 'layerStride', 'contextTokens'] as const) {
    const v = raw[key];
    if (v === undefined || v === null) continue;
    const [lo, hi] = RANGES[key];
    if (typeof v === 'number' && Number.isInteger(v) && v >= lo && v <= hi) settings[key] = v;
    else problems.push(`logitLens.${key} must be an integer from ${lo} to ${hi}, not ${JSON.stringify(v)}; using ${DEFAULTS[key]}`);
  }

  const langs = raw.enabledLanguages;
  if (langs !== undefined && langs !== null) {
    if (Array.isArray(langs) && langs.every((l) => typeof l === 'string' && l.trim() !== '')) {
      settings.enabledLanguages = [...new Set(langs.map((l: string) => l.trim()))];
    } else {
      problems.push(`logitLens.enabledLanguages must be a list of language ids (or ["*"]); using ${JSON.stringify(DEFAULTS.enabledLanguages)}`);
    }
  }

  for (const key of ['inlayHints', 'compare'] as const) {
    const v = raw[key];
    if (v === undefined || v === null) continue;
    if (typeof v === 'boolean') settings[key] = v;
    else problems.push(`logitLens.${key} must be true or false; using ${DEFAULTS[key]}`);
  }

  return { settings, problems };
}

export function toServerOptions(s: LensSettings): ServerOptionsWire {
  return { topK: s.topK, layerStride: s.layerStride, contextTokens: s.contextTokens, inlayHints: s.inlayHints, compare: s.compare };
}

/** The daemon's command line arguments for these settings. */
export function serverArgs(s: LensSettings): string[] {
  const args = s.model ? ['serve', '--stdio', '--model', s.model] : ['serve', '--stdio'];
  return s.tunedLens ? [...args, '--tuned-lens', s.tunedLens] : args;
}

/**
 * Whether the lens runs on a document: a per-document override (the toggle command) wins,
 * then the language list (`*` = all).
 */
export function isLensEnabled(languageId: string, enabledLanguages: readonly string[], override?: boolean): boolean {
  if (override !== undefined) return override;
  return enabledLanguages.includes('*') || enabledLanguages.includes(languageId);
}

/**
 * Settings whose change needs a new daemon process (the others are sent to the running one):
 * the binary, the model, the tuned lens, and inlay hints (the daemon declares that capability at initialize).
 */
export const RESTART_KEYS = ['serverPath', 'model', 'tunedLens', 'inlayHints'] as const;

/** Whether going from `before` to `after` needs a new daemon process. */
export function needsRestart(before: LensSettings, after: LensSettings): boolean {
  return RESTART_KEYS.some((k) => before[k] !== after[k]);
}
