//! The model side of the server: one backend, one activation cache, one hover cache, and the
//! synchronous operations both doors call (on blocking threads).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use lens_core::{Backend, HiddenStates, Lens, LensKind, Site, SiteLogits, Stop, Token};
use serde::Deserialize;

use crate::cache::{ActivationCache, CacheStats, StateBytes};
use crate::hover;
use crate::layers::LayerSpec;
use crate::wire::{self, Report};
use crate::RpcError;

/// Hover results kept (rendered markdown per tokens × position × options).
const HOVER_CACHE_ENTRIES: usize = 512;

/// `layers`: a `--layers` spec string or a list of layer numbers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LayersParam {
    Spec(String),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LensParam {
    #[default]
    Norm,
    Raw,
}

impl From<LensParam> for LensKind {
    fn from(l: LensParam) -> Self {
        match l {
            LensParam::Norm => LensKind::Norm,
            LensParam::Raw => LensKind::Raw,
        }
    }
}

/// `lens/analyze` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnalyzeParams {
    pub text: String,
    #[serde(default)]
    pub layers: Option<LayersParam>,
    /// Positions to analyse (negative = from the end); all when absent.
    #[serde(default)]
    pub positions: Option<Vec<i64>>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub lens: Option<LensParam>,
}

/// `lens/position` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PositionParams {
    pub text: String,
    pub position: i64,
    #[serde(default)]
    pub layers: Option<LayersParam>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub lens: Option<LensParam>,
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
    #[serde(default)]
    pub layers: Option<LayersParam>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub lens: Option<LensParam>,
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
}

impl Default for HoverOptions {
    fn default() -> Self {
        HoverOptions {
            top_k: 5,
            layer_stride: 1,
            context_tokens: 1024,
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

pub struct Engine {
    backend: Arc<dyn Backend>,
    cache: ActivationCache,
    hovers: DashMap<HoverKey, (u64, Arc<String>)>,
    hover_clock: AtomicU64,
    previous: DashMap<PreviousKey, (u64, Arc<PreviousRows>)>,
}

fn top_k(k: Option<i64>) -> Result<usize, RpcError> {
    match k {
        None => Ok(5),
        Some(k @ 1..=100) => Ok(k as usize),
        Some(k) => Err(RpcError::invalid_params(format!(
            "topK must be 1..=100, got {k}"
        ))),
    }
}

impl Engine {
    pub fn new(backend: Arc<dyn Backend>, budget_bytes: usize, state_bytes: StateBytes) -> Self {
        Engine {
            backend,
            cache: ActivationCache::new(budget_bytes, state_bytes),
            hovers: DashMap::new(),
            hover_clock: AtomicU64::new(0),
            previous: DashMap::new(),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
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

    pub fn tokenize(&self, text: &str) -> Result<Vec<Token>, RpcError> {
        Ok(self.backend.tokenize(text)?)
    }

    /// Tokenize a prompt for analysis: non-empty and within the model's context.
    fn prompt(&self, text: &str) -> Result<Vec<Token>, RpcError> {
        if text.is_empty() {
            return Err(RpcError::empty_text());
        }
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

    fn layers(&self, layers: Option<&LayersParam>) -> Result<Vec<usize>, RpcError> {
        let n = self.backend.info().n_layers;
        let spec = match layers {
            None => LayerSpec::default(),
            Some(LayersParam::Spec(s)) => {
                s.parse::<LayerSpec>().map_err(RpcError::invalid_params)?
            }
            Some(LayersParam::List(v)) => {
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                if v.is_empty() {
                    return Err(RpcError::invalid_params("layers is an empty list"));
                }
                LayerSpec::List(v)
            }
        };
        spec.resolve(n).map_err(RpcError::invalid_params)
    }

    fn report(
        &self,
        text: &str,
        layers: Option<&LayersParam>,
        positions: Option<&[i64]>,
        top_k: usize,
        lens: LensKind,
        stop: &Stop,
    ) -> Result<Report, RpcError> {
        let tokens = self.prompt(text)?;
        let layers = self.layers(layers)?;
        let n = tokens.len() as i64;
        let positions = match positions {
            None => None,
            Some(ps) => {
                let mut out = Vec::with_capacity(ps.len());
                for &p in ps {
                    let idx = if p < 0 { n + p } else { p };
                    if idx < 0 || idx >= n {
                        return Err(RpcError::out_of_range(format!(
                            "position {p} is outside the text of {n} tokens"
                        )));
                    }
                    out.push(idx as usize);
                }
                out.sort_unstable();
                out.dedup();
                Some(out)
            }
        };
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let states = self.states(&ids, stop)?;
        let lens_view = Lens::new(&*self.backend, &states, lens, top_k).with_stop(stop.clone());
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let views = match positions {
            None => lens_view.grid(&sites)?,
            Some(ps) => lens_view.positions(&ps, &sites)?,
        };
        Ok(wire::build(
            &*self.backend,
            &tokens,
            &views,
            lens,
            top_k,
            &layers,
        ))
    }

    /// `lens/analyze`: the same report as `logit-lens run --format json`.
    pub fn analyze(&self, p: &AnalyzeParams, stop: &Stop) -> Result<Report, RpcError> {
        let k = top_k(p.top_k)?;
        self.report(
            &p.text,
            p.layers.as_ref(),
            p.positions.as_deref(),
            k,
            p.lens.unwrap_or_default().into(),
            stop,
        )
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
            Some(m) => lens_plot::Metric::ALL
                .into_iter()
                .find(|x| x.as_str() == m)
                .ok_or_else(|| {
                    RpcError::invalid_params(format!(
                        "metric must be one of prob, next-prob, entropy, kl, rank, not {m:?}"
                    ))
                })?,
        };
        let k = top_k(p.top_k)?;
        let kind: LensKind = p.lens.unwrap_or_default().into();
        let tokens = self.prompt(&p.text)?;
        let layers = self.layers(p.layers.as_ref())?;
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let states = self.states(&ids, stop)?;
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let views = Lens::new(&*self.backend, &states, kind, k)
            .with_stop(stop.clone())
            .grid(&sites)?;
        let tracks = if html {
            lens_plot::tracks(&*self.backend, &states, kind, &views, &layers)
                .map_err(|e| RpcError::model(e.to_string()))?
        } else {
            Vec::new()
        };
        let decode = |id: u32| self.backend.decode(id);
        let model = self.backend.info().name.clone();
        let plot = lens_plot::Plot {
            views: &views,
            tokens: &tokens,
            layers: &layers,
            decode: &decode,
            model: &model,
            lens: kind,
            tracks: &tracks,
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

    /// `lens/position`: the report with one position.
    pub fn position(&self, p: &PositionParams, stop: &Stop) -> Result<Report, RpcError> {
        let k = top_k(p.top_k)?;
        self.report(
            &p.text,
            p.layers.as_ref(),
            Some(&[p.position]),
            k,
            p.lens.unwrap_or_default().into(),
            stop,
        )
    }

    /// The hover at byte `byte` of a document: the token there, with the text before it
    /// (at most `context_tokens` tokens, oldest dropped) as context. `None` for an empty
    /// document.
    pub fn hover(
        &self,
        text: &str,
        byte: usize,
        options: &HoverOptions,
        stop: &Stop,
    ) -> Result<Option<HoverOut>, RpcError> {
        if text.is_empty() {
            return Ok(None);
        }
        let tokens = self.tokenize(text)?;
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
        let key = HoverKey {
            ids: ids.clone(),
            options: *options,
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
        let layers = LayerSpec::Range {
            start: None,
            end: None,
            step: options.layer_stride.max(1),
        }
        .resolve(n)
        .map_err(RpcError::invalid_params)?;
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let lens = Lens::new(
            &*self.backend,
            &states,
            LensKind::Norm,
            options.top_k.clamp(1, 100),
        )
        .with_stop(stop.clone());
        let cached = match pos {
            0 => None,
            _ => self.cached_previous(&ids[..pos], &layers, stamp),
        };
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
        let written = prev.map(|prev| {
            let id = ids[pos];
            (0..layers.len())
                .map(|i| prev.prob_and_rank(i, id))
                .collect::<Vec<_>>()
        });
        tracing::debug!(
            forward_ms = (t1 - t0).as_secs_f64() * 1e3,
            lens_ms = t1.elapsed().as_secs_f64() * 1e3,
            "hover work"
        );
        let markdown = hover::markdown(
            &*self.backend,
            &tokens[first..=t],
            t,
            &here,
            written.as_deref(),
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
        let tokens = self.tokenize(text)?;
        let window = context_tokens.clamp(1, self.backend.info().context_length.max(1));
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
