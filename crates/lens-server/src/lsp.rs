//! The LSP door (stdio), on tower-lsp: document sync (incremental), hover, opt-in inlay
//! hints, and the `lens/*` methods as custom requests.
//!
//! Responsiveness: every model call runs on a blocking thread; `$/cancelRequest` is handled
//! by tower-lsp (the request's future is dropped and answered -32800). After each edit the
//! hovers most likely asked for next are prepared at once (`LensLsp::prepare`: the token the
//! edit wrote, then the one last hovered), so the hover that follows a keystroke is usually a
//! cache lookup. A hover runs at once (no settling delay); an edit that arrives meanwhile stops
//! its work and it is answered -32801 ContentModified. Inlay hints first wait until their
//! document has been quiet for [`SETTLE`] (editors ask for them after every change).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use lens_core::Stop;
use serde::Deserialize;
use serde_json::Value;
use tower_lsp::jsonrpc::Result as LspResult;
use tower_lsp::lsp_types::*;
use tower_lsp::{Client, LanguageServer, LspService};

use crate::engine::{HoverOptions, HoverOut};
use crate::framing::{self, FrameError};
use crate::rpc::Envelope;
use crate::text::{self, Encoding};
use crate::{rpc, Engine, Limits, RpcError};

/// How long a document must be unchanged before inlay hints run the model.
pub const SETTLE: Duration = Duration::from_millis(20);

/// Changes closer together than this are one edit: the previous version of a document
/// (`lens/diff` with `uri`, the hover's "before the last edit") is its text before the first of
/// them, so typing a word compares with the text before the word, not before its last letter.
pub const EDIT_GROUP: Duration = Duration::from_secs(1);

/// `lens/diff` of a document (`uri`) compares at most this many tokens after its edit.
pub const DIFF_AFTER_EDIT: usize = 32;

/// Hovers older than this are not prepared again after edits.
const PREPARE_WITHIN: Duration = Duration::from_secs(60);

/// `initializationOptions` and `settings.logitLens`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    pub top_k: usize,
    pub layer_stride: usize,
    pub context_tokens: usize,
    pub inlay_hints: bool,
    /// Hovers show each layer's prediction before the last edit beside the current one.
    pub compare: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            top_k: 5,
            layer_stride: 1,
            context_tokens: 1024,
            inlay_hints: false,
            compare: true,
        }
    }
}

impl Config {
    fn from_json(v: &Value) -> Result<Config, String> {
        let c: Config = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        if !(1..=100).contains(&c.top_k) || c.layer_stride == 0 || c.context_tokens == 0 {
            return Err("topK must be 1..=100, layerStride and contextTokens at least 1".into());
        }
        Ok(c)
    }

    fn hover(&self) -> HoverOptions {
        HoverOptions {
            top_k: self.top_k,
            layer_stride: self.layer_stride,
            context_tokens: self.context_tokens,
            compare: self.compare,
        }
    }
}

#[derive(Clone)]
struct Doc {
    text: Arc<str>,
    /// The text before the last edit ([`EDIT_GROUP`]); `None` until the first edit.
    previous: Option<Arc<str>>,
    /// Bumped on every change (the client's `version` is not trusted to be monotonic).
    generation: u64,
    changed: Instant,
}

/// Hovers being prepared after an edit (see [`LensLsp::prepare`]).
struct Prepared {
    uri: Url,
    generation: u64,
    /// Byte ranges in that generation of the document, in the order they are prepared: the
    /// text the edit wrote and the token the last hover showed (see [`LensLsp::prepare`]).
    ranges: Vec<(usize, usize)>,
    /// The range being prepared now (an index into `ranges`).
    current: usize,
    stop: Stop,
}

impl Prepared {
    /// Whether the hover at `byte` is the one being prepared now (a request for a later
    /// guess does not wait for the earlier ones: it stops them and computes its own).
    fn preparing_now(&self, byte: usize) -> bool {
        self.ranges
            .get(self.current)
            .is_some_and(|r| (r.0..r.1.max(r.0 + 1)).contains(&byte))
    }
}

pub struct LensLsp {
    client: Client,
    engine: Arc<Engine>,
    docs: DashMap<Url, Doc>,
    /// Per document, the byte range of the token its last hover showed (moved along by edits)
    /// and when it was shown.
    hovered: DashMap<Url, ((usize, usize), Instant)>,
    /// Per document, when a hover on it was last answered (noted before the model's turn
    /// passes on, so that guesses waiting for the turn see it).
    answered: Arc<DashMap<Url, Instant>>,
    preparing: Arc<Mutex<Option<Prepared>>>,
    /// The hovers being answered, per document: an edit stops them (their answer would be
    /// ContentModified anyway).
    answering: Mutex<Vec<(Url, Stop)>>,
    encoding: RwLock<Encoding>,
    config: RwLock<Config>,
}

/// Build the LSP service (for `tower_lsp::Server`).
pub fn service(engine: Arc<Engine>) -> (LspService<LensLsp>, tower_lsp::ClientSocket) {
    let mut b = LspService::build(|client| LensLsp {
        client,
        engine,
        docs: DashMap::new(),
        hovered: DashMap::new(),
        answered: Arc::new(DashMap::new()),
        preparing: Arc::new(Mutex::new(None)),
        answering: Mutex::new(Vec::new()),
        encoding: RwLock::new(Encoding::Utf16),
        config: RwLock::new(Config::default()),
    });
    b = b
        .custom_method("lens/analyze", LensLsp::analyze)
        .custom_method("lens/position", LensLsp::position)
        .custom_method("lens/tokenize", LensLsp::tokenize)
        .custom_method("lens/heatmap", LensLsp::heatmap)
        .custom_method("lens/diff", LensLsp::diff)
        .custom_method("lens/modelInfo", LensLsp::model_info)
        .custom_method("lens/cacheStats", LensLsp::cache_stats);
    b.finish()
}

/// Serve LSP on stdin/stdout. Messages pass through a guard first: tower-lsp stops reading
/// its input after the first undecodable message, so malformed JSON (-32700), invalid UTF-8
/// (-32700) and broken envelopes (-32600) are answered here and never reach it. Broken
/// framing is answered -32700 and the guard resynchronises at the next `Content-Length:`; a
/// body over the size limit is answered -32600 and skipped unread; a request whose id is
/// already in flight is answered -32600. The editor's session survives all of them.
pub async fn serve_stdio(engine: Arc<Engine>, limits: Limits) {
    serve_guarded(engine, tokio::io::stdin(), tokio::io::stdout(), limits).await;
}

pub async fn serve_guarded<R, W>(engine: Arc<Engine>, input: R, output: W, limits: Limits)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use std::collections::HashSet;
    use tokio::io::{AsyncWriteExt, BufReader};
    let (service, socket) = service(engine);
    let (to_lsp, lsp_in) = tokio::io::duplex(1 << 20);
    let (lsp_out, from_lsp) = tokio::io::duplex(1 << 20);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    // Ids of the client's requests tower-lsp has not answered yet.
    let pending: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Everything written to stdout goes through one task, a whole frame at a time.
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(frame) = rx.recv().await {
            if output.write_all(&frame).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    });
    let tx_lsp = tx.clone();
    let answered = pending.clone();
    let relay = tokio::spawn(async move {
        let mut from_lsp = BufReader::new(from_lsp);
        while let Ok(Some(body)) = framing::read_message(&mut from_lsp, usize::MAX).await {
            if let Ok(Envelope {
                id: Some(id),
                method: None,
                ..
            }) = rpc::validate(&body)
            {
                if let Ok(mut p) = answered.lock() {
                    p.remove(&id.to_string());
                }
            }
            if tx_lsp.send(framing::frame_bytes(&body)).is_err() {
                break;
            }
        }
    });
    let tx_guard = tx.clone();
    let guard = tokio::spawn(async move {
        let mut input = BufReader::new(input);
        let mut to_lsp = to_lsp;
        let reply = |id: Value, e: RpcError| {
            let _ = tx_guard.send(rpc::frame(&rpc::response(id, Err(e))));
        };
        let mut broken = false;
        loop {
            let got = if broken {
                framing::resync(&mut input, limits.max_message).await
            } else {
                framing::read_message(&mut input, limits.max_message).await
            };
            broken = false;
            let body = match got {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(FrameError::Broken(e)) => {
                    tracing::error!("cannot read the LSP stream: {e}");
                    break;
                }
                Err(e @ FrameError::TooLarge { length, .. }) => {
                    tracing::warn!("skipping a message: {e}");
                    reply(Value::Null, RpcError::invalid_request(e.to_string()));
                    if framing::skip(&mut input, length).await.is_err() {
                        break;
                    }
                    continue;
                }
                Err(e @ FrameError::Malformed(_)) => {
                    tracing::warn!("broken framing: {e}");
                    reply(Value::Null, RpcError::parse(e.to_string()));
                    broken = true;
                    continue;
                }
            };
            let envelope = match rpc::validate(&body) {
                Ok(envelope) => envelope,
                Err((id, e)) => {
                    tracing::warn!("bad message: {e}");
                    if let Some(id) = id {
                        reply(id, e);
                    }
                    continue;
                }
            };
            if let (Some(id), Some(_)) = (&envelope.id, &envelope.method) {
                let fresh = pending.lock().is_ok_and(|mut p| p.insert(id.to_string()));
                if !fresh {
                    reply(
                        id.clone(),
                        RpcError::invalid_request("a request with this id is already in flight"),
                    );
                    continue;
                }
            }
            let exit = envelope.method.as_deref() == Some("exit");
            if to_lsp
                .write_all(&framing::frame_bytes(&body))
                .await
                .is_err()
                || exit
            {
                break;
            }
        }
        // Closing tower-lsp's input ends the session.
        let _ = to_lsp.shutdown().await;
    });
    drop(tx);
    tower_lsp::Server::new(lsp_in, lsp_out, socket)
        .serve(service)
        .await;
    guard.abort();
    let _ = relay.await;
    let _ = writer.await;
}

impl LensLsp {
    fn encoding(&self) -> Encoding {
        self.encoding.read().map(|e| *e).unwrap_or_default()
    }

    fn config(&self) -> Config {
        self.config.read().map(|c| *c).unwrap_or_default()
    }

    fn doc(&self, uri: &Url) -> Result<Doc, RpcError> {
        self.docs
            .get(uri)
            .map(|d| d.clone())
            .ok_or_else(|| RpcError::document_not_open(uri.as_str()))
    }

    async fn custom(&self, method: &str, params: Value) -> LspResult<Value> {
        rpc::call(self.engine.clone(), method, params, 0)
            .await
            .map_err(|e| e.to_lsp())
    }
    async fn analyze(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/analyze", params).await
    }
    async fn position(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/position", params).await
    }
    async fn tokenize(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/tokenize", params).await
    }
    async fn heatmap(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/heatmap", params).await
    }
    /// `lens/diff`: two texts, as on the socket, or `uri`: that document against its previous
    /// version (the text before the last edit).
    async fn diff(&self, mut params: Value) -> LspResult<Value> {
        if let Some(uri) = params.get("uri").cloned() {
            let uri: Url = serde_json::from_value(uri)
                .map_err(|e| RpcError::invalid_params(format!("uri: {e}")).to_lsp())?;
            let doc = self.doc(&uri).map_err(|e| e.to_lsp())?;
            let previous = doc.previous.ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "{uri} has no previous version yet: it has not been edited since it was opened"
                ))
                .to_lsp()
            })?;
            // Unless asked otherwise, the positions around the edit: the two tokens before
            // it, the changed span and what follows, at most DIFF_AFTER_EDIT tokens after it.
            let window = match params.get("positions") {
                Some(p) if !p.is_null() => None,
                _ => Some(
                    self.engine
                        .diff_window(&previous, &doc.text, DIFF_AFTER_EDIT)
                        .map_err(|e| e.to_lsp())?,
                ),
            };
            if let Some(o) = params.as_object_mut() {
                o.remove("uri");
                o.insert("before".into(), Value::from(&*previous));
                o.insert("after".into(), Value::from(&*doc.text));
                if let Some(w) = window {
                    o.insert("positions".into(), Value::from(w));
                }
            }
        }
        self.custom("lens/diff", params).await
    }
    async fn model_info(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/modelInfo", params).await
    }
    async fn cache_stats(&self, params: Value) -> LspResult<Value> {
        self.custom("lens/cacheStats", params).await
    }

    /// Wait until the document has been quiet for [`SETTLE`]; fail if it changed after the
    /// request arrived.
    async fn settle(&self, uri: &Url, generation: u64) -> Result<Doc, RpcError> {
        loop {
            let doc = self.doc(uri)?;
            if doc.generation != generation {
                return Err(RpcError::content_modified());
            }
            let quiet = doc.changed.elapsed();
            if quiet >= SETTLE {
                return Ok(doc);
            }
            tokio::time::sleep(SETTLE - quiet).await;
        }
    }

    async fn hover_impl(&self, params: HoverParams) -> Result<Option<Hover>, RpcError> {
        let uri = params.text_document_position_params.text_document.uri;
        let pos = params.text_document_position_params.position;
        let enc = self.encoding();
        let doc = self.doc(&uri)?;
        let arrived = Instant::now();
        let since_edit = arrived - doc.changed;
        let byte = text::offset(&doc.text, pos.line, pos.character, enc).ok_or_else(|| {
            RpcError::out_of_range(format!(
                "position {}:{} is outside the document",
                pos.line, pos.character
            ))
        })?;
        // Speculative work never delays a real request: unless it is preparing this very
        // hover, it stops (within a layer) and gives up its turn.
        self.stop_preparing(|p| {
            p.uri != uri || p.generation != doc.generation || !p.preparing_now(byte)
        });
        let engine = self.engine.clone();
        let turns = engine.turns().clone();
        let options = self.config().hover();
        let t = doc.text.clone();
        let previous = doc.previous.clone();
        let stop = Stop::new();
        if let Ok(mut a) = self.answering.lock() {
            a.push((uri.clone(), stop.clone()));
        }
        let (answered, answered_uri) = (self.answered.clone(), uri.clone());
        let out = turns
            .compute_until(stop.clone(), move |stop| {
                let waited = arrived.elapsed();
                let out = engine.hover(&t, byte, &options, previous.as_deref(), stop);
                if let Ok(Some(_)) = &out {
                    answered.insert(answered_uri, Instant::now());
                }
                (waited, out)
            })
            .await;
        if let Ok(mut a) = self.answering.lock() {
            a.retain(|(_, s)| !s.same(&stop));
        }
        if self.doc(&uri)?.generation != doc.generation {
            return Err(RpcError::content_modified());
        }
        let (waited, out) = out?;
        let out: Option<HoverOut> = out?;
        if let Some(h) = &out {
            self.hovered
                .insert(uri.clone(), ((h.start, h.end), Instant::now()));
        }
        tracing::debug!(
            since_edit_ms = since_edit.as_secs_f64() * 1e3,
            turn_wait_ms = waited.as_secs_f64() * 1e3,
            total_ms = arrived.elapsed().as_secs_f64() * 1e3,
            "hover at {}:{}",
            pos.line,
            pos.character
        );
        Ok(out.map(|h| {
            let text = &*doc.text;
            let end = text::ceil_boundary(text, h.end);
            Hover {
                contents: HoverContents::Markup(MarkupContent {
                    kind: MarkupKind::Markdown,
                    value: h.markdown,
                }),
                range: Some(Range {
                    start: lsp_pos(text, h.start, enc),
                    end: lsp_pos(text, end, enc),
                }),
            }
        }))
    }

    /// Stop the hover being prepared if `which` says so.
    fn stop_preparing(&self, which: impl FnOnce(&Prepared) -> bool) {
        if let Ok(mut p) = self.preparing.lock() {
            if p.as_ref().is_some_and(which) {
                if let Some(p) = p.take() {
                    p.stop.stop();
                }
            }
        }
    }

    /// After an edit, prepare the hovers the editor is most likely to ask for next, while
    /// the user is still lifting the finger: the token the edit just wrote (while typing, the
    /// hover asked for is on the character just typed) and the token the user last looked at
    /// in this document (moved along with the edit), if that is another one; the latter first
    /// when it comes after the edit (the mouse rests on it, and its forward pass covers the
    /// edit's tokens). Each lands in the hover cache, so the request that follows is a lookup.
    /// The work is speculative, so anything newer stops it: a further edit, or a hover on
    /// another token than the one being prepared now (which a request then waits for). It
    /// starts at once, with no settling delay: a keystroke stops stale work within a layer.
    fn prepare(&self, uri: &Url, doc: &Doc, edit: Option<(usize, usize)>) {
        self.stop_preparing(|_| true);
        let mut ranges = Vec::new();
        if let Some((a, b)) = edit {
            ranges.push((a, b));
        }
        if let Some(h) = self
            .hovered
            .get(uri)
            .filter(|h| h.1.elapsed() < PREPARE_WITHIN)
            .map(|h| h.0)
        {
            if !ranges.iter().any(|r| r.0 < h.1 && h.0 < r.1.max(r.0 + 1)) {
                // A hovered token after the edit goes first: the mouse is still on it (an
                // editor asks again when it moves), and its forward pass runs through the
                // edit's tokens, so the edit's own hover then costs only its readout.
                match edit {
                    Some((_, b)) if h.0 >= b => ranges.insert(0, h),
                    _ => ranges.push(h),
                }
            }
        }
        if ranges.is_empty() {
            return;
        }
        let stop = Stop::new();
        if let Ok(mut p) = self.preparing.lock() {
            *p = Some(Prepared {
                uri: uri.clone(),
                generation: doc.generation,
                ranges: ranges.clone(),
                current: 0,
                stop: stop.clone(),
            });
        }
        let engine = self.engine.clone();
        let turns = engine.turns().clone();
        let options = self.config().hover();
        let text = doc.text.clone();
        let previous = doc.previous.clone();
        let edited = doc.changed;
        let preparing = self.preparing.clone();
        let (answered_at, uri) = (self.answered.clone(), uri.clone());
        tokio::spawn(async move {
            // Once the editor has asked for a hover since the edit (while typing, at once), its
            // answer is what it shows: the guesses would only hold the model's turn when the
            // next keystroke arrives. Checked again when the turn comes.
            let answered = move || answered_at.get(&uri).is_some_and(|at| *at > edited);
            for (i, range) in ranges.into_iter().enumerate() {
                if answered() {
                    tracing::debug!("a hover was answered since the edit: no more guesses");
                    break;
                }
                match preparing.lock() {
                    Ok(mut p) => match p.as_mut().filter(|p| p.stop.same(&stop)) {
                        Some(p) => p.current = i,
                        None => return,
                    },
                    Err(_) => return,
                }
                // The byte whose token to prepare: the last one the edit wrote (or, for a
                // deletion, the one before it); the start of the hovered token.
                let byte = match edit == Some(range) {
                    true if range.1 > range.0 => range.1 - 1,
                    true => range.0.saturating_sub(1),
                    false => range.0,
                };
                let engine = engine.clone();
                let text = text.clone();
                let previous = previous.clone();
                let answered = answered.clone();
                let out = turns
                    .compute_until(stop.clone(), move |stop| {
                        let started = edited.elapsed();
                        let out = (!answered()).then(|| {
                            engine.hover(&text, byte, &options, previous.as_deref(), stop)
                        });
                        (started, out)
                    })
                    .await;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                let done = ms(edited.elapsed());
                match out {
                    Ok((_, None)) => {
                        tracing::debug!("a hover was answered since the edit: no more guesses");
                        break;
                    }
                    Ok((started, Some(Ok(_)))) => tracing::debug!(
                        started_ms = ms(started),
                        done_ms = done,
                        "prepared the hover at byte {byte} after an edit"
                    ),
                    Ok((started, Some(Err(e)))) => {
                        tracing::debug!(
                            started_ms = ms(started),
                            done_ms = done,
                            "preparing the hover at byte {byte}: {}",
                            e.message
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("preparing a hover: {}", e.message);
                        return;
                    }
                }
            }
            // Then the rest of the document (after an edit in the middle, the hovers above
            // computed only up to their tokens), still speculative: the next edit or a
            // request elsewhere stops it.
            if edit.is_none() {
                return;
            }
            // From here on no real request waits for it: it prepares no hover, so any hover
            // stops it (see `hover_impl`).
            match preparing.lock() {
                Ok(mut p) => match p.as_mut().filter(|p| p.stop.same(&stop)) {
                    Some(p) => p.ranges.clear(),
                    None => return,
                },
                Err(_) => return,
            }
            let context_tokens = options.context_tokens;
            let out = turns
                .compute_until(stop, move |stop| engine.warm(&text, context_tokens, stop))
                .await;
            let done = edited.elapsed().as_secs_f64() * 1e3;
            match out {
                Ok(Ok(ran)) => tracing::debug!(ran, done_ms = done, "finished the document"),
                Ok(Err(e)) => {
                    tracing::debug!(done_ms = done, "finishing the document: {}", e.message)
                }
                Err(e) => tracing::debug!("finishing the document: {}", e.message),
            }
        });
    }

    async fn inlay_impl(
        &self,
        params: InlayHintParams,
    ) -> Result<Option<Vec<InlayHint>>, RpcError> {
        let config = self.config();
        if !config.inlay_hints {
            return Ok(None);
        }
        let uri = params.text_document.uri;
        let doc = self.doc(&uri)?;
        let doc = self.settle(&uri, doc.generation).await?;
        let enc = self.encoding();
        let text = doc.text.clone();
        // Line ends (byte offsets) of the requested lines.
        let mut ends = Vec::new();
        let mut start = 0;
        for (line, l) in text.split('\n').enumerate() {
            let line = line as u32;
            let end = start + l.trim_end_matches('\r').len();
            if line >= params.range.start.line
                && line <= params.range.end.line
                && !l.trim().is_empty()
            {
                ends.push(end);
            }
            start += l.len() + 1;
        }
        let engine = self.engine.clone();
        let turns = engine.turns().clone();
        let context = config.context_tokens;
        let t = text.clone();
        let hints = turns
            .compute(move |stop| engine.line_end_predictions(&t, &ends, context, stop))
            .await??;
        if self.doc(&uri)?.generation != doc.generation {
            return Err(RpcError::content_modified());
        }
        Ok(Some(
            hints
                .into_iter()
                .map(|(end, token)| InlayHint {
                    position: lsp_pos(&text, end, enc),
                    label: InlayHintLabel::String(format!("→ {}", token.replace('\n', "↵"))),
                    kind: None,
                    text_edits: None,
                    tooltip: Some(InlayHintTooltip::String(
                        "logit lens: the model's next-token prediction".into(),
                    )),
                    padding_left: Some(true),
                    padding_right: None,
                    data: None,
                })
                .collect(),
        ))
    }
}

fn lsp_pos(text: &str, byte: usize, enc: Encoding) -> Position {
    let (line, character) = text::position(text, byte, enc);
    Position { line, character }
}

#[tower_lsp::async_trait]
impl LanguageServer for LensLsp {
    async fn initialize(&self, params: InitializeParams) -> LspResult<InitializeResult> {
        let offers_utf8 = params
            .capabilities
            .general
            .as_ref()
            .and_then(|g| g.position_encodings.as_ref())
            .is_some_and(|v| v.contains(&PositionEncodingKind::UTF8));
        let (enc, kind) = if offers_utf8 {
            (Encoding::Utf8, PositionEncodingKind::UTF8)
        } else {
            (Encoding::Utf16, PositionEncodingKind::UTF16)
        };
        if let Ok(mut e) = self.encoding.write() {
            *e = enc;
        }
        let mut config = Config::default();
        if let Some(opts) = params
            .initialization_options
            .as_ref()
            .filter(|v| !v.is_null())
        {
            config = Config::from_json(opts).map_err(|e| {
                RpcError::invalid_params(format!("initializationOptions: {e}")).to_lsp()
            })?;
        }
        if let Ok(mut c) = self.config.write() {
            *c = config;
        }
        let info = self.engine.backend().info();
        Ok(InitializeResult {
            capabilities: ServerCapabilities {
                position_encoding: Some(kind),
                text_document_sync: Some(TextDocumentSyncCapability::Kind(
                    TextDocumentSyncKind::INCREMENTAL,
                )),
                hover_provider: Some(HoverProviderCapability::Simple(true)),
                inlay_hint_provider: config.inlay_hints.then_some(OneOf::Left(true)),
                experimental: Some(serde_json::json!({ "logitLens": { "methods": rpc::METHODS } })),
                ..ServerCapabilities::default()
            },
            server_info: Some(ServerInfo {
                name: "logit-lens".into(),
                version: Some(format!(
                    "{} ({}, {})",
                    env!("CARGO_PKG_VERSION"),
                    info.name,
                    info.precision
                )),
            }),
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        tracing::info!("client initialized");
    }

    async fn shutdown(&self) -> LspResult<()> {
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let d = params.text_document;
        let generation = self.docs.get(&d.uri).map_or(0, |old| old.generation + 1);
        self.docs.insert(
            d.uri,
            Doc {
                text: d.text.into(),
                previous: None,
                generation,
                changed: Instant::now(),
            },
        );
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let enc = self.encoding();
        let Some(mut entry) = self.docs.get_mut(&params.text_document.uri) else {
            tracing::warn!(
                "didChange for a document that is not open: {}",
                params.text_document.uri
            );
            return;
        };
        let uri = params.text_document.uri;
        // The last hover's token (moved along below) and when it was shown.
        let mut hovered = self.hovered.get(&uri).map(|h| *h);
        let mut text = String::from(&*entry.text);
        // What the last change wrote, in the new text.
        let mut edit = None;
        for change in params.content_changes {
            match change.range {
                None => {
                    text = change.text;
                    hovered = None;
                    edit = None;
                }
                Some(r) => {
                    let a = text::offset_clamped(&text, r.start.line, r.start.character, enc);
                    let b = text::offset_clamped(&text, r.end.line, r.end.character, enc).max(a);
                    hovered = hovered
                        .and_then(|(h, at)| Some((text::moved(h, (a, b), change.text.len())?, at)));
                    edit = Some((a, a + change.text.len()));
                    text.replace_range(a..b, &change.text);
                }
            }
        }
        if entry.previous.is_none() || entry.changed.elapsed() >= EDIT_GROUP {
            entry.previous = Some(entry.text.clone());
        }
        entry.text = text.into();
        entry.generation += 1;
        entry.changed = Instant::now();
        let doc = entry.clone();
        drop(entry); // the map's shard is unlocked before anything else runs
        match hovered {
            Some(h) => {
                self.hovered.insert(uri.clone(), h);
            }
            None => {
                self.hovered.remove(&uri);
            }
        }
        // Hovers being answered for the old text are stale: stop their work.
        if let Ok(a) = self.answering.lock() {
            for (u, stop) in a.iter() {
                if *u == uri {
                    stop.stop();
                }
            }
        }
        self.prepare(&uri, &doc, edit);
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let uri = params.text_document.uri;
        self.stop_preparing(|p| p.uri == uri);
        self.hovered.remove(&uri);
        self.answered.remove(&uri);
        self.docs.remove(&uri);
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        let section = params
            .settings
            .get("logitLens")
            .cloned()
            .unwrap_or(params.settings);
        match Config::from_json(&section) {
            Ok(c) => {
                if let Ok(mut cur) = self.config.write() {
                    *cur = c;
                }
            }
            Err(e) => {
                self.client
                    .show_message(
                        MessageType::WARNING,
                        format!("logit-lens settings ignored: {e}"),
                    )
                    .await;
            }
        }
    }

    async fn hover(&self, params: HoverParams) -> LspResult<Option<Hover>> {
        self.hover_impl(params).await.map_err(|e| e.to_lsp())
    }

    async fn inlay_hint(&self, params: InlayHintParams) -> LspResult<Option<Vec<InlayHint>>> {
        self.inlay_impl(params).await.map_err(|e| e.to_lsp())
    }
}
