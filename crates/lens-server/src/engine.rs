//! The model side of the server: one backend, one activation cache, one hover cache, and the
//! synchronous operations both doors call (on blocking threads).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use lens_core::{
    math, Alignment, Answer, Backend, HiddenStates, IndexSpec, Lens, LensKind, Part, Query, Site,
    SiteLogits, Stop, Token,
};
use serde::{Deserialize, Serialize};

use crate::cache::{ActivationCache, CacheStats};
use crate::hover;
use crate::wire::{self, Report};
use crate::{RpcError, Turns};

/// Hover results kept (rendered markdown per tokens × position × options).
const HOVER_CACHE_ENTRIES: usize = 512;

/// `layers`: a `--layers` spec string or a list of layer numbers (negative from the end).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LayersParam {
    Spec(String),
    List(Vec<i64>),
}

/// What every lens request may say about the lens: `layers`, `topK`, `lens`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct LensParams {
    #[serde(default)]
    pub layers: Option<LayersParam>,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// `"norm"` (default), `"raw"`, or `"tuned"` (the lens the daemon was started with,
    /// `serve --tuned-lens PATH`: no method takes a path).
    #[serde(default, deserialize_with = "lens_kind")]
    pub lens: Option<LensKind>,
}

fn lens_kind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<LensKind>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

impl LensParams {
    /// The [`Query`] these params ask for, at `positions` (all when `None`).
    pub fn query(&self, positions: Option<&[i64]>) -> Result<Query, RpcError> {
        let layers = match &self.layers {
            None => IndexSpec::default(),
            Some(LayersParam::Spec(s)) => s.parse().map_err(RpcError::invalid_params)?,
            Some(LayersParam::List(v)) => IndexSpec::list(v.clone())
                .map_err(|e| RpcError::invalid_params(format!("layers: {e}")))?,
        };
        let positions = match positions {
            None => IndexSpec::default(),
            Some(p) => IndexSpec::list(p.to_vec())
                .map_err(|e| RpcError::invalid_params(format!("positions: {e}")))?,
        };
        let top_k = match self.top_k {
            None => Query::default().top_k,
            Some(k) if (1..=Query::MAX_TOP_K as i64).contains(&k) => k as usize,
            Some(k) => {
                return Err(RpcError::invalid_params(format!(
                    "topK must be 1..={}, got {k}",
                    Query::MAX_TOP_K
                )))
            }
        };
        Ok(Query {
            layers,
            positions,
            kind: self.lens.unwrap_or_default(),
            tuned: None,
            top_k,
        })
    }
}

/// `lens/analyze` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalyzeParams {
    pub text: String,
    /// Positions to analyse (negative = from the end); all when absent.
    #[serde(default)]
    pub positions: Option<Vec<i64>>,
    #[serde(flatten)]
    pub lens: LensParams,
}

/// `lens/position` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PositionParams {
    pub text: String,
    pub position: i64,
    #[serde(flatten)]
    pub lens: LensParams,
}

/// `lens/generate` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GenerateParams {
    pub text: String,
    /// Tokens to write at most (1..=[`GenerateParams::MAX_TOKENS`], default 32).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: i64,
    /// 0 (default): greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    /// Wrap the text in the model's chat template as one user turn.
    #[serde(default)]
    pub chat: bool,
    /// Layers shown per step (a spec such as `"-4.."` or a list), all by default.
    #[serde(default)]
    pub layers: Option<LayersParam>,
}

impl GenerateParams {
    pub const MAX_TOKENS: i64 = 4096;
}

fn default_max_tokens() -> i64 {
    32
}

fn one() -> f32 {
    1.0
}

/// How `lens/generate` ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateOut {
    pub prompt_tokens: usize,
    pub generated: usize,
    /// The generated tokens' text.
    pub text: String,
    /// `"length"`, `"stop"` or `"context"`.
    pub finish: &'static str,
}

/// `lens/heatmap` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeatmapParams {
    pub text: String,
    /// `"svg"` or `"html"`.
    pub format: String,
    /// `prob` (default), `next-prob`, `entropy`, `kl` or `rank`.
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(flatten)]
    pub lens: LensParams,
}

/// `lens/diff` params: two texts (on the LSP door, `uri` instead compares a document with its
/// previous version).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffParams {
    pub before: String,
    pub after: String,
    /// Positions of the after text to compare (negative = from the end); all when absent.
    #[serde(default)]
    pub positions: Option<Vec<i64>>,
    /// `"json"` (default: the `logit-lens/diff/v1` report), `"svg"` or `"html"`.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(flatten)]
    pub lens: LensParams,
}

/// What `lens/diff` answers: the report, or a rendered heatmap.
pub enum DiffOut {
    Report(Box<wire::DiffReport>),
    Page { format: String, content: String },
}

/// `lens/tokenize` params.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeParams {
    pub text: String,
}

/// What a hover shows (from the client's `initializationOptions`/settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HoverOptions {
    pub top_k: usize,
    pub layer_stride: usize,
    pub context_tokens: usize,
    /// Show, beside each layer, what it predicted at the same token before the last edit.
    pub compare: bool,
}

impl Default for HoverOptions {
    fn default() -> Self {
        HoverOptions {
            top_k: 5,
            layer_stride: 1,
            context_tokens: 1024,
            compare: true,
        }
    }
}

/// A rendered hover: markdown and the hovered token's byte range in the document.
#[derive(Debug, Clone, PartialEq)]
pub struct HoverOut {
    pub markdown: String,
    pub start: usize,
    pub end: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct HoverKey {
    ids: Arc<[u32]>,
    options: HoverOptions,
    /// The previous version's context of the same token, when the hover compares with it.
    before: Option<Arc<[u32]>>,
}

/// The hovered token in the document's previous version (before the last edit): where it was
/// and its context window there.
struct Before {
    ids: Arc<[u32]>,
    position: usize,
    part: Part,
}

/// Previous-position rows kept for hovers (each ~6 MB for the default model).
const PREVIOUS_ROWS_ENTRIES: usize = 4;

/// The lens logits at a hover's previous position, per shown layer, with each row's
/// log-sum-exp: the probability and rank of whatever token is written next is then a lookup.
/// Every hover keeps its own position's rows here, so the next hover (the same position after
/// the last token grew, or the next position after a new token) finds its previous position's
/// rows without a second readout.
type PreviousRows = SiteLogits;

/// (tokens up to the previous position, the layers shown).
type PreviousKey = (Arc<[u32]>, Vec<usize>);

/// The last hovers asked for, by their exact request: the same hover again (the editor asking
/// twice, the mouse coming back) is answered without tokenizing the document, which is most of
/// a cached hover's time (0.5 ms for 256 tokens).
const RECENT_HOVERS: usize = 8;

/// One of the [`RECENT_HOVERS`]: a hover's request, compared in full (no hash stands in for
/// the text), and its answer.
struct RecentHover {
    text: Box<str>,
    byte: usize,
    options: HoverOptions,
    previous: Option<Box<str>>,
    out: HoverOut,
}

pub struct Engine {
    backend: Arc<dyn Backend>,
    turns: Turns,
    cache: ActivationCache,
    hovers: DashMap<HoverKey, (u64, Arc<String>)>,
    /// Newest first.
    recent_hovers: std::sync::Mutex<std::collections::VecDeque<RecentHover>>,
    hover_clock: AtomicU64,
    previous: DashMap<PreviousKey, (u64, Arc<PreviousRows>)>,
    /// The most bytes of text one token stands for ([`longest_token`]).
    token_bytes: usize,
    /// The most bytes a prompt of the model's context can have (`token_bytes` times the
    /// context): longer texts are refused before they are tokenized.
    max_prompt_bytes: usize,
    /// The tuned lens's translators, when the daemon was given one.
    tuned: Option<Arc<lens_core::Translators>>,
}

/// The most bytes of text a token can stand for: the longest decoded token (at least 4, a
/// UTF-8 character split over byte tokens).
fn longest_token(backend: &dyn Backend) -> usize {
    let vocab = u32::try_from(backend.info().vocab_size).unwrap_or(u32::MAX);
    (0..vocab)
        .map(|id| backend.decode(id).len())
        .max()
        .unwrap_or(0)
        .max(4)
}

impl Engine {
    pub fn new(backend: Arc<dyn Backend>, budget_bytes: usize) -> Self {
        let token_bytes = longest_token(&*backend);
        Engine {
            turns: Turns::default(),
            cache: ActivationCache::new(budget_bytes),
            hovers: DashMap::new(),
            recent_hovers: Default::default(),
            hover_clock: AtomicU64::new(0),
            previous: DashMap::new(),
            token_bytes,
            max_prompt_bytes: token_bytes.saturating_mul(backend.info().context_length.max(1)),
            backend,
            tuned: None,
        }
    }

    /// Serve `"lens": "tuned"` with these translators (checked against the model by whoever
    /// loaded them).
    pub fn with_tuned(mut self, tuned: Option<Arc<lens_core::Translators>>) -> Self {
        self.tuned = tuned;
        self
    }

    /// The query of `params` at `positions`, with the daemon's tuned lens.
    fn query_of(&self, params: &LensParams, positions: Option<&[i64]>) -> Result<Query, RpcError> {
        let mut query = params.query(positions)?;
        if query.kind == LensKind::Tuned && self.tuned.is_none() {
            return Err(RpcError::invalid_params(
                "lens \"tuned\": this daemon has no tuned lens (start it with serve --tuned-lens PATH)",
            ));
        }
        query.tuned = self.tuned.clone();
        Ok(query)
    }

    /// The most bytes a `lens/*` text may have.
    pub fn max_prompt_bytes(&self) -> usize {
        self.max_prompt_bytes
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The turns model work takes ([`Turns::compute`]).
    pub fn turns(&self) -> &Turns {
        &self.turns
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Hidden states of `ids`, cached.
    pub fn states(&self, ids: &[u32], stop: &Stop) -> Result<Arc<HiddenStates>, RpcError> {
        self.cache
            .get(&*self.backend, ids, stop)
            .map_err(|e| RpcError::from(&*e))
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, RpcError> {
        Ok(self.backend.tokenize(text)?)
    }

    /// `lens/tokenize`: any text a prompt could be (at most [`Engine::max_prompt_bytes`]).
    pub fn tokenize_text(&self, text: &str) -> Result<Vec<Token>, RpcError> {
        self.check_bytes(text)?;
        self.tokenize(text)
    }

    fn check_bytes(&self, text: &str) -> Result<(), RpcError> {
        if text.len() > self.max_prompt_bytes {
            return Err(RpcError::prompt_too_many_bytes(
                text.len(),
                self.max_prompt_bytes,
            ));
        }
        Ok(())
    }

    /// Tokenize the part of a document that can matter for a window of tokens ending at byte
    /// `end` (exclusive): the whole document when it is short enough, else the last
    /// [`Engine::max_prompt_bytes`] before `end` (from a line start when one is near), with
    /// byte offsets in the document's terms.
    fn tokenize_window(&self, text: &str, end: usize) -> Result<Vec<Token>, RpcError> {
        if text.len() <= self.max_prompt_bytes {
            return self.tokenize(text);
        }
        let mut hi = end.min(text.len());
        while !text.is_char_boundary(hi) {
            hi += 1;
        }
        let mut lo = hi.saturating_sub(self.max_prompt_bytes);
        while !text.is_char_boundary(lo) {
            lo += 1;
        }
        if let Some(nl) = text[lo..hi].find('\n') {
            if nl < 4096 {
                lo += nl + 1;
            }
        }
        let mut tokens = self.tokenize(&text[lo..hi])?;
        for t in &mut tokens {
            t.start += lo;
            t.end += lo;
        }
        Ok(tokens)
    }

    /// Tokenize a prompt for analysis: non-empty and within the model's context.
    fn prompt(&self, text: &str) -> Result<Vec<Token>, RpcError> {
        if text.is_empty() {
            return Err(RpcError::empty_text());
        }
        self.check_bytes(text)?;
        let tokens = self.tokenize(text)?;
        if tokens.is_empty() {
            return Err(RpcError::empty_text());
        }
        let context = self.backend.info().context_length;
        if tokens.len() > context {
            return Err(RpcError::prompt_too_long(tokens.len(), context));
        }
        Ok(tokens)
    }

    /// The states of `text` and the answer to `query`: the one query path of every `lens/*`
    /// method. Arguments that need no model are checked before tokenizing, positions right
    /// after.
    fn answer(
        &self,
        text: &str,
        query: &Query,
        stop: &Stop,
    ) -> Result<(Vec<Token>, Answer), RpcError> {
        query.layers_of(self.backend.info().n_layers)?;
        let tokens = self.prompt(text)?;
        query.positions_of(tokens.len())?;
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let states = self.states(&ids, stop)?;
        let answer = query.run(&*self.backend, &states, stop)?;
        Ok((tokens, answer))
    }

    /// `lens/analyze`: the same report as `logit-lens run --format json`.
    pub fn analyze(&self, p: &AnalyzeParams, stop: &Stop) -> Result<Report, RpcError> {
        let query = self.query_of(&p.lens, p.positions.as_deref())?;
        let (tokens, answer) = self.answer(&p.text, &query, stop)?;
        Ok(wire::build(&*self.backend, &tokens, &answer))
    }

    /// `lens/position`: the report with one position.
    pub fn position(&self, p: &PositionParams, stop: &Stop) -> Result<Report, RpcError> {
        let query = self.query_of(&p.lens, Some(&[p.position]))?;
        let (tokens, answer) = self.answer(&p.text, &query, stop)?;
        Ok(wire::build(&*self.backend, &tokens, &answer))
    }

    /// `lens/generate`: the model writes up to `maxTokens` tokens after the text; `on_step`
    /// gets each one with its lens at once (the door sends it as a notification). Stops
    /// within a token's work when `stop` is raised (the request is cancelled).
    pub fn generate(
        &self,
        p: &GenerateParams,
        stop: &Stop,
        on_step: &mut dyn FnMut(wire::GenerateStepJson),
    ) -> Result<GenerateOut, RpcError> {
        let generator = self.backend.generator().ok_or_else(|| {
            RpcError::from(lens_core::Error::Unsupported(
                "this daemon's backend cannot generate (start it with --backend candle or \
                 mistralrs)"
                    .into(),
            ))
        })?;
        if !(1..=GenerateParams::MAX_TOKENS).contains(&p.max_tokens) {
            return Err(RpcError::invalid_params(format!(
                "maxTokens must be 1..={}, got {}",
                GenerateParams::MAX_TOKENS,
                p.max_tokens
            )));
        }
        let sampling = lens_core::Sampling {
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed,
        };
        sampling
            .validate()
            .map_err(|e| RpcError::invalid_params(e.to_string()))?;
        let lens = LensParams {
            layers: p.layers.clone(),
            ..LensParams::default()
        };
        let layers = lens.query(None)?.layers_of(self.backend.info().n_layers)?;
        let prompt: Vec<u32> = match p.chat {
            true => {
                self.prompt(&p.text)?; // the same bounds on the text as every method
                generator.chat_prompt(&p.text)?
            }
            false => self.prompt(&p.text)?.iter().map(|t| t.id).collect(),
        };
        let stop_tokens = generator.stop_tokens();
        let max_tokens = p.max_tokens as usize;
        let request = lens_core::GenerateRequest {
            prompt: &prompt,
            max_tokens,
            sampling,
        };
        let mut text = String::new();
        let mut generated = 0;
        let finish = generator.generate(&request, stop, &mut |step| {
            let json = wire::generate_step(&*self.backend, &step, &layers)?
                .with_finish(max_tokens, &stop_tokens);
            text.push_str(&json.text);
            generated += 1;
            on_step(json);
            Ok(())
        })?;
        Ok(GenerateOut {
            prompt_tokens: prompt.len(),
            generated,
            text,
            finish: finish.as_str(),
        })
    }

    /// `lens/heatmap`: the same SVG or HTML page as `logit-lens plot` for the whole text.
    pub fn heatmap(&self, p: &HeatmapParams, stop: &Stop) -> Result<(String, String), RpcError> {
        let html = match p.format.as_str() {
            "html" => true,
            "svg" => false,
            other => {
                return Err(RpcError::invalid_params(format!(
                    "format must be \"svg\" or \"html\", not {other:?}"
                )))
            }
        };
        let metric = match p.metric.as_deref() {
            None => lens_plot::Metric::default(),
            Some(m) => m.parse().map_err(RpcError::invalid_params)?,
        };
        let query = self.query_of(&p.lens, None)?;
        let (tokens, answer) = self.answer(&p.text, &query, stop)?;
        let decode = |id: u32| self.backend.decode(id);
        let plot = lens_plot::Plot {
            answer: &answer,
            tokens: &tokens,
            decode: &decode,
            model: &self.backend.info().name,
        };
        let options = lens_plot::Options {
            metric,
            ..lens_plot::Options::default()
        };
        Ok(if html {
            ("html".into(), lens_plot::html(&plot, &options))
        } else {
            ("svg".into(), lens_plot::svg(&plot, &options))
        })
    }

    /// `lens/diff`: the diff lens of two texts (the after text's states reuse the before
    /// text's where they share a prefix, through the cache).
    pub fn diff(&self, p: &DiffParams, stop: &Stop) -> Result<DiffOut, RpcError> {
        let format = p.format.as_deref().unwrap_or("json");
        if !matches!(format, "json" | "svg" | "html") {
            return Err(RpcError::invalid_params(format!(
                "format must be \"json\", \"svg\" or \"html\", not {format:?}"
            )));
        }
        let query = self.query_of(&p.lens, p.positions.as_deref())?;
        query.layers_of(self.backend.info().n_layers)?;
        let before = self.prompt(&p.before)?;
        let after = self.prompt(&p.after)?;
        query.positions_of(after.len())?;
        let ids = |t: &[Token]| -> Vec<u32> { t.iter().map(|t| t.id).collect() };
        let states_before = self.states(&ids(&before), stop)?;
        let states_after = self.states(&ids(&after), stop)?;
        let diff = query.diff(&*self.backend, &states_before, &states_after, stop)?;
        if format == "json" {
            let report = wire::build_diff(&*self.backend, &before, &after, &diff);
            return Ok(DiffOut::Report(Box::new(report)));
        }
        let decode = |id: u32| self.backend.decode(id);
        let plot = lens_plot::DiffPlot {
            diff: &diff,
            before: &before,
            after: &after,
            decode: &decode,
            model: &self.backend.info().name,
        };
        let options = lens_plot::Options::default();
        let content = match format {
            "svg" => lens_plot::diff_svg(&plot, &options),
            _ => lens_plot::diff_html(&plot, &options),
        };
        Ok(DiffOut::Page {
            format: format.into(),
            content,
        })
    }

    /// The positions of `after` worth comparing with `before` after an edit: from two tokens
    /// before the first change to `tail` tokens after the changed span (all of it when the
    /// texts tokenize the same).
    pub fn diff_window(
        &self,
        before: &str,
        after: &str,
        tail: usize,
    ) -> Result<Vec<i64>, RpcError> {
        let ids = |text: &str| -> Result<Vec<u32>, RpcError> {
            Ok(self.tokenize_text(text)?.iter().map(|t| t.id).collect())
        };
        let (b, a) = (ids(before)?, ids(after)?);
        let al = Alignment::new(&b, &a);
        let from = al.prefix.saturating_sub(2);
        let to = (al.after_changed().end + tail).min(a.len());
        Ok((from..to).map(|p| p as i64).collect())
    }

    /// Where the hovered token (index `t` of `tokens`, the document's tokens) was in the
    /// previous version of the document, if it was there under another context: `None` in the
    /// shared prefix (the same states: nothing to compare), in an inserted span, and for
    /// documents longer than one window.
    fn before_of(
        &self,
        text: &str,
        previous: &str,
        tokens: &[Token],
        t: usize,
        window: usize,
    ) -> Result<Option<Before>, RpcError> {
        if text.len() > self.max_prompt_bytes || previous.len() > self.max_prompt_bytes {
            return Ok(None);
        }
        let before = self.tokenize(previous)?;
        let ids = |v: &[Token]| -> Vec<u32> { v.iter().map(|t| t.id).collect() };
        let alignment = Alignment::new(&ids(&before), &ids(tokens));
        let Some(pair) = alignment.before_of(t).filter(|p| p.part != Part::Prefix) else {
            return Ok(None);
        };
        let first = (pair.before + 1).saturating_sub(window);
        Ok(Some(Before {
            ids: before[first..=pair.before].iter().map(|t| t.id).collect(),
            position: pair.before,
            part: pair.part,
        }))
    }

    /// The lens rows of the previous version at the hovered token (kept from an earlier hover
    /// when there was one, as the typing case has), per layer compared with `here`:
    /// (before's top-1 id and probability, `KL(before ‖ now)`).
    fn compare(
        &self,
        before: &Before,
        layers: &[usize],
        here: &SiteLogits,
        stamp: u64,
        stop: &Stop,
    ) -> Result<Vec<hover::BeforeCell>, RpcError> {
        let rows = match self.cached_previous(&before.ids, layers, stamp) {
            Some(rows) => rows,
            None => {
                let states = self.states(&before.ids, stop)?;
                let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
                let lens =
                    Lens::new(&*self.backend, &states, LensKind::Norm, 1).with_stop(stop.clone());
                let (_, rows) = lens.position_with_logits(before.ids.len() - 1, &sites)?;
                let rows = Arc::new(rows);
                self.remember_previous((before.ids.clone(), layers.to_vec()), stamp, rows.clone());
                rows
            }
        };
        Ok((0..layers.len())
            .map(|i| {
                let (b, a) = (rows.row(i).unwrap_or(&[]), here.row(i).unwrap_or(&[]));
                let (bz, az) = (
                    rows.log_z.get(i).copied().unwrap_or(0.0),
                    here.log_z.get(i).copied().unwrap_or(0.0),
                );
                let top = math::top_k(b, 1)
                    .first()
                    .map_or((0, 0.0), |e| (e.id, math::exp(e.logit - bz)));
                hover::BeforeCell {
                    top1: top.0,
                    prob: top.1,
                    kl: math::kl_rows(b, bz, a, az),
                }
            })
            .collect())
    }

    /// Finish a document's states in the background after an edit has been answered near the
    /// cursor: the forward of all its tokens, so that a hover anywhere in it then reads cached
    /// states (a hover's tokens are a prefix of them, which costs no computation). Only when
    /// the whole document fits the hovers' `context_tokens` window (a longer one's hovers
    /// start at different tokens and share no single prefix). Returns whether it ran.
    pub fn warm(&self, text: &str, context_tokens: usize, stop: &Stop) -> Result<bool, RpcError> {
        if text.is_empty() || text.len() > self.max_prompt_bytes {
            return Ok(false);
        }
        let tokens = self.tokenize(text)?;
        let window = context_tokens.clamp(1, self.backend.info().context_length.max(1));
        if tokens.is_empty() || tokens.len() > window {
            return Ok(false);
        }
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        self.states(&ids, stop)?;
        Ok(true)
    }

    /// The hover at byte `byte` of a document: the token there, with the text before it
    /// (at most `context_tokens` tokens, oldest dropped) as context. `None` for an empty
    /// document.
    pub fn hover(
        &self,
        text: &str,
        byte: usize,
        options: &HoverOptions,
        previous: Option<&str>,
        stop: &Stop,
    ) -> Result<Option<HoverOut>, RpcError> {
        if text.is_empty() {
            return Ok(None);
        }
        let asked = |r: &RecentHover| {
            r.byte == byte
                && r.options == *options
                && *r.text == *text
                && r.previous.as_deref() == previous
        };
        if let Some(out) = self
            .recent_hovers
            .lock()
            .ok()
            .and_then(|recent| recent.iter().find(|r| asked(r)).map(|r| r.out.clone()))
        {
            return Ok(Some(out));
        }
        let out = self.hover_computed(text, byte, options, previous, stop)?;
        if let (Some(out), Ok(mut recent)) = (&out, self.recent_hovers.lock()) {
            recent.push_front(RecentHover {
                text: text.into(),
                byte,
                options: *options,
                previous: previous.map(Into::into),
                out: out.clone(),
            });
            recent.truncate(RECENT_HOVERS);
        }
        Ok(out)
    }

    /// [`Engine::hover`] through the hover cache (by token ids) or computed.
    fn hover_computed(
        &self,
        text: &str,
        byte: usize,
        options: &HoverOptions,
        previous: Option<&str>,
        stop: &Stop,
    ) -> Result<Option<HoverOut>, RpcError> {
        let t_start = std::time::Instant::now();
        // The hovered token ends within a token's bytes of `byte`.
        let tokens = self.tokenize_window(text, byte.saturating_add(self.token_bytes + 1))?;
        let tokenized = t_start.elapsed();
        // The last token starting at or before the byte (tokens that split one character
        // share its range; the later one completes it).
        let Some(t) = tokens
            .iter()
            .rposition(|tok| tok.start <= byte)
            .or((!tokens.is_empty()).then_some(0))
        else {
            return Ok(None);
        };
        let window = options
            .context_tokens
            .clamp(1, self.backend.info().context_length.max(1));
        let first = (t + 1).saturating_sub(window);
        let ids: Arc<[u32]> = tokens[first..=t].iter().map(|tok| tok.id).collect();
        let before = match previous {
            Some(previous) if options.compare => {
                self.before_of(text, previous, &tokens, t, window)?
            }
            _ => None,
        };
        let key = HoverKey {
            ids: ids.clone(),
            options: *options,
            before: before.as_ref().map(|b| b.ids.clone()),
        };
        let (start, end) = (tokens[t].start, tokens[t].end);
        let stamp = self.hover_clock.fetch_add(1, Ordering::Relaxed);
        if let Some(mut hit) = self.hovers.get_mut(&key) {
            hit.0 = stamp;
            return Ok(Some(HoverOut {
                markdown: String::clone(&hit.1),
                start,
                end,
            }));
        }
        let t0 = std::time::Instant::now();
        let states = self.states(&ids, stop)?;
        let t1 = std::time::Instant::now();
        let pos = ids.len() - 1;
        let n = states.n_layers();
        let layers = IndexSpec::Range {
            start: None,
            end: None,
            step: options.layer_stride.max(1),
        }
        .layers(n)
        .map_err(RpcError::invalid_params)?;
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let lens = Lens::new(
            &*self.backend,
            &states,
            // The daemon's tuned lens when it was given one (every hover alike, so the
            // caches of hovers and previous rows hold one lens's numbers).
            match self.tuned {
                Some(_) => LensKind::Tuned,
                None => LensKind::Norm,
            },
            options.top_k.clamp(1, 100),
        )
        .with_translators(self.tuned.as_deref())
        .with_stop(stop.clone());
        let cached = match pos {
            0 => None,
            _ => self.cached_previous(&ids[..pos], &layers, stamp),
        };
        let cached_prev = pos == 0 || cached.is_some();
        let missing = || RpcError::internal("the lens returned fewer positions");
        let (here, here_logits, prev) = match (pos, cached) {
            (0, _) => {
                let (view, logits) = lens.position_with_logits(pos, &sites)?;
                (view, logits, None)
            }
            (_, Some(prev)) => {
                let (view, logits) = lens.position_with_logits(pos, &sites)?;
                (view, logits, Some(prev))
            }
            // Both positions in one readout batch.
            (_, None) => {
                let mut both = lens.positions_with_logits(&[pos - 1, pos], &sites)?;
                let (view, logits) = both.pop().ok_or_else(missing)?;
                let (_, prev) = both.pop().ok_or_else(missing)?;
                let prev = Arc::new(prev);
                self.remember_previous((ids[..pos].into(), layers.clone()), stamp, prev.clone());
                (view, logits, Some(prev))
            }
        };
        let t_position = std::time::Instant::now();
        let written = prev.map(|prev| {
            let id = ids[pos];
            (0..layers.len())
                .map(|i| prev.prob_and_rank(i, id))
                .collect::<Vec<_>>()
        });
        let t_written = std::time::Instant::now();
        let compared = match &before {
            Some(b) => Some(hover::Compared {
                position: b.position,
                part: b.part,
                cells: self.compare(b, &layers, &here_logits, stamp, stop)?,
            }),
            None => None,
        };
        let t2 = std::time::Instant::now();
        let markdown = hover::markdown(
            &*self.backend,
            &tokens[first..=t],
            t,
            &here,
            written.as_deref(),
            compared.as_ref(),
        );
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            tokenize_ms = ms(tokenized),
            forward_ms = ms(t1 - t0),
            lens_ms = ms(t2 - t1),
            // Of which: the readout and reductions at the position (and the previous one
            // when it was not cached); the written token's probability and rank at the
            // previous position; the comparison with the text before the edit.
            position_ms = ms(t_position - t1),
            written_ms = ms(t_written - t_position),
            compare_ms = ms(t2 - t_written),
            markdown_ms = ms(t2.elapsed()),
            positions_read = if cached_prev { 1 } else { 2 },
            "hover work"
        );
        self.remember_previous((ids.clone(), layers), stamp, Arc::new(here_logits));
        self.remember_hover(key, stamp, Arc::new(markdown.clone()));
        Ok(Some(HoverOut {
            markdown,
            start,
            end,
        }))
    }

    /// The logits kept for the last position of `prefix` (and these layers), if any.
    fn cached_previous(
        &self,
        prefix: &[u32],
        layers: &[usize],
        stamp: u64,
    ) -> Option<Arc<PreviousRows>> {
        let key: PreviousKey = (prefix.into(), layers.to_vec());
        let mut hit = self.previous.get_mut(&key)?;
        hit.0 = stamp;
        Some(hit.1.clone())
    }

    fn remember_previous(&self, key: PreviousKey, stamp: u64, value: Arc<PreviousRows>) {
        if self.previous.len() >= PREVIOUS_ROWS_ENTRIES && !self.previous.contains_key(&key) {
            let oldest = self
                .previous
                .iter()
                .min_by_key(|e| e.value().0)
                .map(|e| e.key().clone());
            if let Some(k) = oldest {
                self.previous.remove(&k);
            }
        }
        self.previous.insert(key, (stamp, value));
    }

    fn remember_hover(&self, key: HoverKey, stamp: u64, markdown: Arc<String>) {
        if self.hovers.len() >= HOVER_CACHE_ENTRIES {
            let oldest = self
                .hovers
                .iter()
                .min_by_key(|e| e.value().0)
                .map(|e| e.key().clone());
            if let Some(k) = oldest {
                self.hovers.remove(&k);
            }
        }
        self.hovers.insert(key, (stamp, markdown));
    }

    /// Inlay hints: the model's next-token prediction after the last token of each line in
    /// `lines` (byte ranges of line ends). Returns (byte offset of the line end, token text).
    /// The context is the document's first `context_tokens` tokens.
    pub fn line_end_predictions(
        &self,
        text: &str,
        line_ends: &[usize],
        context_tokens: usize,
        stop: &Stop,
    ) -> Result<Vec<(usize, String)>, RpcError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let window = context_tokens.clamp(1, self.backend.info().context_length.max(1));
        let tokens = match text.len() > self.max_prompt_bytes {
            // Only the first `window` tokens are read: tokenize no more than they can span.
            true => {
                let mut cut = self.max_prompt_bytes.min(text.len());
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                self.tokenize(&text[..cut])?
            }
            false => self.tokenize(text)?,
        };
        let tokens = &tokens[..tokens.len().min(window)];
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for &end in line_ends {
            if let Some(t) = tokens.iter().rposition(|tok| tok.start < end) {
                if wanted.last().is_none_or(|w| w.1 != t) {
                    wanted.push((end, t));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u32> = tokens.iter().map(|tok| tok.id).collect();
        let states = self.states(&ids, stop)?;
        let last = Site::Layer(states.n_layers());
        let lens = Lens::new(&*self.backend, &states, LensKind::Norm, 1).with_stop(stop.clone());
        let positions: Vec<usize> = wanted.iter().map(|w| w.1).collect();
        let views = lens.positions(&positions, &[last])?;
        Ok(wanted
            .iter()
            .zip(views)
            .map(|((end, _), v)| (*end, self.backend.decode(v.final_top1.id)))
            .collect())
    }
}
