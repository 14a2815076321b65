// The VS Code side of Logit Lens: a thin client of the `logit-lens serve --stdio` daemon.
// The daemon computes (hovers are its markdown); this file wires settings, the process,
// the status bar and the commands. What it renders itself lives in render.ts.
import * as vscode from 'vscode';
import { execFile } from 'node:child_process';
import { accessSync, constants, statSync } from 'node:fs';
import * as os from 'node:os';
import {
  CloseAction,
  DidChangeConfigurationNotification,
  DidCloseTextDocumentNotification,
  DidOpenTextDocumentNotification,
  ErrorAction,
  LanguageClient,
  type LanguageClientOptions,
  ResponseError,
  RevealOutputChannelOn,
  type ServerOptions,
  State,
} from 'vscode-languageclient/node';
import { assessServer, findServer, type ProbeResult } from './discovery';
import { catalogueItems, heatmapPage, infoDetail, isFullPage, reportToHtmlTable, statusText, type CacheStats, type DaemonState, type ModelInfo, type RunReport } from './render';
import { isLensEnabled, needsRestart, serverArgs, toServerOptions, validateSettings, type LensSettings } from './settings';

const MAX_RESTARTS = 3;
const RESTART_WINDOW_MS = 3 * 60 * 1000;
const METHOD_NOT_FOUND = -32601;

let lens: Lens | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  lens = new Lens();
  context.subscriptions.push(lens);
  await lens.start();
}

export async function deactivate(): Promise<void> {
  await lens?.stop();
}

class Lens implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private settings: LensSettings;
  private readonly output = vscode.window.createOutputChannel('Logit Lens', { log: true });
  private readonly status = vscode.window.createStatusBarItem('logitLens.status', vscode.StatusBarAlignment.Right, 100);
  private state: DaemonState = 'stopped';
  private model: string | undefined;
  private latencyMs: number | undefined;
  /** Per-document overrides from the toggle command (uri -> on/off). */
  private readonly overrides = new Map<string, boolean>();
  /** Documents the daemon has open (we sent didOpen). */
  private readonly synced = new Set<string>();
  private crashes: number[] = [];
  private readonly disposables: vscode.Disposable[] = [];

  constructor() {
    this.settings = this.readSettings();
    this.status.name = 'Logit Lens';
    this.status.command = 'logitLens.showInfo';
    this.status.show();
    this.render();
    const reg = (id: string, f: () => unknown) => this.disposables.push(vscode.commands.registerCommand(id, f));
    reg('logitLens.toggle', () => this.toggle());
    reg('logitLens.showHeatmap', () => this.showHeatmap());
    reg('logitLens.compareWithPrevious', () => this.compareWithPrevious());
    reg('logitLens.restart', () => this.restart());
    reg('logitLens.pickModel', () => this.pickModel());
    reg('logitLens.chooseModel', () => this.chooseModel());
    reg('logitLens.showInfo', () => this.showInfo());
    this.disposables.push(
      vscode.workspace.onDidChangeConfiguration((e) => this.onConfigChange(e)),
      vscode.window.onDidChangeActiveTextEditor(() => this.render()),
      vscode.workspace.onDidCloseTextDocument((d) => this.overrides.delete(d.uri.toString())),
    );
  }

  dispose(): void {
    for (const d of this.disposables) d.dispose();
    this.status.dispose();
    this.output.dispose();
  }

  private readSettings(): LensSettings {
    const cfg = vscode.workspace.getConfiguration('logitLens');
    const raw: Record<string, unknown> = {};
    for (const key of ['serverPath', 'model', 'topK', 'layerStride', 'contextTokens', 'enabledLanguages', 'inlayHints']) raw[key] = cfg.get(key);
    const { settings, problems } = validateSettings(raw);
    for (const p of problems) {
      this.output.info(`settings: ${p}`);
      void vscode.window.showWarningMessage(`Logit Lens: ${p}`);
    }
    return settings;
  }

  private setState(state: DaemonState): void {
    this.state = state;
    this.render();
  }

  private render(): void {
    const doc = vscode.window.activeTextEditor?.document;
    const enabled = doc ? this.enabledFor(doc) : undefined;
    this.status.text = statusText({ model: this.model, state: this.state, latencyMs: this.latencyMs, enabled });
    this.status.tooltip = 'Logit Lens: click for the model and cache statistics';
  }

  private enabledFor(doc: vscode.TextDocument): boolean {
    return isLensEnabled(doc.languageId, this.settings.enabledLanguages, this.overrides.get(doc.uri.toString()));
  }

  private findServer(): ReturnType<typeof findServer> {
    return findServer(this.settings.serverPath, {
      pathEnv: process.env.PATH ?? '',
      platform: process.platform,
      workspaceFolders: (vscode.workspace.workspaceFolders ?? []).filter((f) => f.uri.scheme === 'file').map((f) => f.uri.fsPath),
      isExecutable,
      home: os.homedir(),
    });
  }

  async start(): Promise<void> {
    if (this.client) return;
    this.setState('starting');
    const found = this.findServer();
    if (found.kind === 'missing') {
      this.output.info(`${found.message} Searched: ${found.searched.join(', ')}`);
      return this.noServer(found.message, found.fix);
    }
    const probe = await probeServer(found.path);
    const verdict = assessServer(found.path, probe);
    if (!verdict.ok) return this.noServer(verdict.message, verdict.fix);
    this.output.info(`using ${found.path} (from ${found.source}), version ${verdict.version}`);

    const serverOptions: ServerOptions = { command: found.path, args: serverArgs(this.settings), options: { env: { ...process.env, NO_COLOR: '1' } } };
    const clientOptions: LanguageClientOptions = {
      documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
      initializationOptions: toServerOptions(this.settings),
      outputChannel: this.output,
      revealOutputChannelOn: RevealOutputChannelOn.Never,
      errorHandler: {
        error: () => ({ action: ErrorAction.Continue }),
        closed: () => this.onClosed(),
      },
      middleware: {
        didOpen: async (doc, next) => {
          if (!this.enabledFor(doc)) return;
          this.synced.add(doc.uri.toString());
          await next(doc);
        },
        didChange: async (event, next) => {
          if (this.synced.has(event.document.uri.toString())) await next(event);
        },
        didClose: async (doc, next) => {
          if (this.synced.delete(doc.uri.toString())) await next(doc);
        },
        provideHover: async (doc, pos, token, next) => {
          if (!this.synced.has(doc.uri.toString())) return undefined;
          const t0 = performance.now();
          const hover = await next(doc, pos, token);
          if (hover) {
            this.latencyMs = performance.now() - t0;
            this.render();
          }
          return hover;
        },
        provideInlayHints: async (doc, range, token, next) => {
          if (!this.synced.has(doc.uri.toString())) return [];
          return next(doc, range, token);
        },
      },
    };
    const client = new LanguageClient('logitLens', 'Logit Lens', serverOptions, clientOptions);
    this.client = client;
    this.synced.clear();
    client.onDidChangeState((e) => {
      if (e.newState === State.Running) {
        this.setState('ready');
        void this.fetchModelName();
      } else if (e.newState === State.Starting) this.setState(this.state === 'crashed' ? 'restarting' : 'starting');
      else if (e.newState === State.Stopped && this.state !== 'crashed') this.setState('stopped');
    });
    try {
      await client.start();
    } catch (err) {
      this.client = undefined;
      this.setState('crashed');
      const msg = err instanceof Error ? err.message : String(err);
      void vscode.window.showErrorMessage(`Logit Lens: the daemon did not start: ${msg}`, 'Show Log').then((a) => a && this.output.show());
    }
  }

  private onClosed(): { action: CloseAction; message?: string } {
    this.synced.clear();
    const now = Date.now();
    this.crashes = this.crashes.filter((t) => now - t < RESTART_WINDOW_MS);
    this.crashes.push(now);
    this.state = 'crashed';
    this.render();
    if (this.crashes.length <= MAX_RESTARTS) {
      const message = `Logit Lens: the daemon stopped; restarting it (${this.crashes.length} of ${MAX_RESTARTS}).`;
      void vscode.window.showWarningMessage(message);
      return { action: CloseAction.Restart };
    }
    const message = `Logit Lens: the daemon crashed ${this.crashes.length} times in ${RESTART_WINDOW_MS / 60000} minutes and was not restarted. See the "Logit Lens" output, then run "Logit Lens: Restart the daemon".`;
    void vscode.window.showErrorMessage(message, 'Show Log', 'Restart').then((a) => {
      if (a === 'Show Log') this.output.show();
      if (a === 'Restart') void this.restart();
    });
    return { action: CloseAction.DoNotRestart };
  }

  private noServer(message: string, fix: string): void {
    this.setState('no server');
    this.output.info(`${message} ${fix}`);
    void vscode.window.showErrorMessage(`Logit Lens: ${message} ${fix}`, 'Open Settings', 'Copy Install Command').then((a) => {
      if (a === 'Open Settings') void vscode.commands.executeCommand('workbench.action.openSettings', 'logitLens.serverPath');
      if (a === 'Copy Install Command') void vscode.env.clipboard.writeText('cargo install --path crates/logit-lens');
    });
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.synced.clear();
    if (client) {
      try {
        await client.stop(5000);
      } catch (err) {
        this.output.info(`stop: ${String(err)}`);
      }
    }
    this.setState('stopped');
  }

  async restart(): Promise<void> {
    this.crashes = [];
    this.model = undefined;
    this.latencyMs = undefined;
    await this.stop();
    this.settings = this.readSettings();
    await this.start();
  }

  private async fetchModelName(): Promise<void> {
    try {
      const info = await this.request<ModelInfo>('lens/modelInfo', {});
      this.model = info.name;
      this.render();
    } catch (err) {
      this.output.info(`lens/modelInfo: ${String(err)}`);
    }
  }

  private async request<T>(method: string, params: object): Promise<T> {
    const client = this.client;
    if (!client || !client.isRunning()) throw new Error('the Logit Lens daemon is not running (see the status bar)');
    return client.sendRequest<T>(method, params);
  }

  private async onConfigChange(e: vscode.ConfigurationChangeEvent): Promise<void> {
    if (!e.affectsConfiguration('logitLens')) return;
    const before = this.settings;
    this.settings = this.readSettings();
    if (needsRestart(before, this.settings)) {
      this.output.info('serverPath, model or inlayHints changed: restarting the daemon');
      await this.restart();
      return;
    }
    if (this.client?.isRunning()) {
      await this.client.sendNotification(DidChangeConfigurationNotification.type, { settings: { logitLens: toServerOptions(this.settings) } });
    }
    await this.resync();
    this.render();
  }

  /** Opens or closes documents on the daemon so that it has exactly the enabled ones. */
  private async resync(): Promise<void> {
    const client = this.client;
    if (!client?.isRunning()) return;
    for (const doc of vscode.workspace.textDocuments) {
      if (doc.uri.scheme !== 'file' && doc.uri.scheme !== 'untitled') continue;
      const uri = doc.uri.toString();
      const want = this.enabledFor(doc);
      if (want && !this.synced.has(uri)) {
        this.synced.add(uri);
        await client.sendNotification(DidOpenTextDocumentNotification.type, {
          textDocument: { uri: client.code2ProtocolConverter.asUri(doc.uri), languageId: doc.languageId, version: doc.version, text: doc.getText() },
        });
      } else if (!want && this.synced.has(uri)) {
        this.synced.delete(uri);
        await client.sendNotification(DidCloseTextDocumentNotification.type, { textDocument: { uri: client.code2ProtocolConverter.asUri(doc.uri) } });
      }
    }
  }

  private async toggle(): Promise<void> {
    const doc = vscode.window.activeTextEditor?.document;
    if (!doc) {
      void vscode.window.showInformationMessage('Logit Lens: open a document to toggle the lens on it.');
      return;
    }
    const on = !this.enabledFor(doc);
    this.overrides.set(doc.uri.toString(), on);
    await this.resync();
    this.render();
    void vscode.window.showInformationMessage(`Logit Lens is ${on ? 'on' : 'off'} for ${vscode.workspace.asRelativePath(doc.uri)}.`);
  }

  private async showHeatmap(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      void vscode.window.showInformationMessage('Logit Lens: open a document (and select text) to see its heatmap.');
      return;
    }
    const text = editor.selection.isEmpty ? editor.document.getText() : editor.document.getText(editor.selection);
    if (text.trim() === '') {
      void vscode.window.showInformationMessage('Logit Lens: nothing to analyse (the selection or document is empty).');
      return;
    }
    const title = `Logit Lens: ${vscode.workspace.asRelativePath(editor.document.uri)}${editor.selection.isEmpty ? '' : ' (selection)'}`;
    try {
      const fragment = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Window, title: 'Logit Lens: heatmap' },
        () => this.heatmapFragment(text),
      );
      // The daemon's page (lens/heatmap) is interactive: its own inline script draws the cells,
      // hovers and trajectories, and loads nothing. The fallback table needs no script.
      const interactive = isFullPage(fragment);
      const panel = vscode.window.createWebviewPanel('logitLens.heatmap', title, vscode.ViewColumn.Beside, { enableScripts: interactive });
      panel.webview.html = heatmapPage(fragment, title);
    } catch (err) {
      void vscode.window.showErrorMessage(`Logit Lens: heatmap failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  /** The diff lens of the active document against its previous version (the daemon keeps the
   *  text before the last edit): which layers' predictions the edit changed. */
  private async compareWithPrevious(): Promise<void> {
    // From a webview (the heatmap beside it, say) there is no active editor: take the visible one.
    const editor = vscode.window.activeTextEditor ?? vscode.window.visibleTextEditors[0];
    if (!editor) {
      void vscode.window.showInformationMessage('Logit Lens: open a document and edit it to compare it with its previous version.');
      return;
    }
    const title = `Logit Lens: ${vscode.workspace.asRelativePath(editor.document.uri)} (before the last edit → now)`;
    try {
      const r = await vscode.window.withProgress(
        { location: vscode.ProgressLocation.Window, title: 'Logit Lens: diff' },
        () => this.request<{ format: string; content: string }>('lens/diff', { uri: editor.document.uri.toString(), format: 'html' }),
      );
      // The page has no script and forbids any (its CSP); scripts are enabled only so that the
      // webview frame gets a JavaScript context (the e2e test reads the page through it).
      const panel = vscode.window.createWebviewPanel('logitLens.diff', title, vscode.ViewColumn.Beside, { enableScripts: true });
      panel.webview.html = heatmapPage(r.content, title);
    } catch (err) {
      void vscode.window.showErrorMessage(`Logit Lens: compare failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  private async heatmapFragment(text: string): Promise<string> {
    try {
      const r = await this.request<{ format: string; content: string }>('lens/heatmap', { text, format: 'html' });
      this.output.info(`heatmap: lens/heatmap (${r.format})`);
      return r.content;
    } catch (err) {
      if (!(err instanceof ResponseError) || err.code !== METHOD_NOT_FOUND) throw err;
    }
    this.output.info('heatmap: the daemon has no lens/heatmap; building a table from lens/analyze');
    const report = await this.request<RunReport>('lens/analyze', { text, topK: 1 });
    return reportToHtmlTable(report);
  }

  private async pickModel(): Promise<void> {
    const picked = await vscode.window.showOpenDialog({
      canSelectFiles: true,
      canSelectFolders: true,
      canSelectMany: false,
      openLabel: 'Use this model',
      title: 'Logit Lens: a GGUF file, or a Hugging Face folder (config.json, *.safetensors, tokenizer.json)',
      filters: { 'GGUF models': ['gguf'], 'All files': ['*'] },
    });
    const uri = picked?.[0];
    if (!uri) return;
    // The configuration change restarts the daemon with --model.
    await vscode.workspace.getConfiguration('logitLens').update('model', uri.fsPath, vscode.ConfigurationTarget.Global);
  }

  /** A model of the binary's catalogue by name (`logit-lens models`), or the file dialog. */
  private async chooseModel(): Promise<void> {
    const found = this.findServer();
    if (found.kind === 'missing') return void vscode.window.showErrorMessage(`Logit Lens: ${found.message}`);
    const listed = await run(found.path, ['models', '--format', 'json']);
    let items;
    try {
      if (listed.code !== 0) throw new Error(listed.stderr.trim() || `exit code ${String(listed.code)}`);
      items = catalogueItems(listed.stdout);
    } catch (err) {
      return void vscode.window.showErrorMessage(`Logit Lens: cannot list the models: ${err instanceof Error ? err.message : String(err)}`);
    }
    const browse = { label: 'A GGUF file or model folder…', description: '', detail: 'Pick a local model with the file dialog' };
    const chosen = await vscode.window.showQuickPick([...items, browse], { title: 'Logit Lens: the model', placeHolder: 'A named model (fetched on first use) or a local file' });
    if (!chosen) return;
    if (chosen === browse) return this.pickModel();
    // The configuration change restarts the daemon with --model NAME.
    await vscode.workspace.getConfiguration('logitLens').update('model', chosen.label, vscode.ConfigurationTarget.Global);
  }

  private async showInfo(): Promise<void> {
    try {
      const info = await this.request<ModelInfo>('lens/modelInfo', {});
      let stats: CacheStats | undefined;
      try {
        stats = await this.request<CacheStats>('lens/cacheStats', {});
      } catch (err) {
        this.output.info(`lens/cacheStats: ${String(err)}`);
      }
      const latency = this.latencyMs === undefined ? '' : `\nLast lens latency: ${Math.round(this.latencyMs)} ms`;
      void vscode.window.showInformationMessage(`Logit Lens: ${info.name}`, { modal: true, detail: infoDetail(info, stats) + latency });
    } catch (err) {
      void vscode.window.showErrorMessage(`Logit Lens: ${err instanceof Error ? err.message : String(err)} (state: ${this.state})`, 'Restart').then((a) => a && this.restart());
    }
  }
}

function isExecutable(p: string): boolean {
  try {
    if (!statSync(p).isFile()) return false;
    accessSync(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function run(cmd: string, args: string[]): Promise<ProbeResult['version']> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 10000, env: { ...process.env, NO_COLOR: '1' } }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : null) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr || (err && code === null ? err.message : '')) });
    });
  });
}

async function probeServer(binary: string): Promise<ProbeResult> {
  const [version, serveHelp] = await Promise.all([run(binary, ['--version']), run(binary, ['serve', '--help'])]);
  return { version, serveHelp };
}
