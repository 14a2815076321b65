//! The model side of the server: one backend, one activation cache, one hover cache, and the
//! synchronous operations both doors call (on blocking threads).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use lens_core::{Backend, HiddenStates, Lens, LensKind, PositionView, Site, Token};
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
        HoverOptions { top_k: 5, layer_stride: 1, context_tokens: 1024 }
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

pub struct Engine {
    backend: Arc<dyn Backend>,
    cache: ActivationCache,
    hovers: DashMap<HoverKey, (u64, Arc<String>)>,
    hover_clock: AtomicU64,
}

fn top_k(k: Option<i64>) -> Result<usize, RpcError> {
    match k {
        None => Ok(5),
        Some(k @ 1..=100) => Ok(k as usize),
        Some(k) => Err(RpcError::invalid_params(format!("topK must be 1..=100, got {k}"))),
    }
}

impl Engine {
    pub fn new(backend: Arc<dyn Backend>, budget_bytes: usize, state_bytes: StateBytes) -> Self {
        Engine {
            backend,
            cache: ActivationCache::new(budget_bytes, state_bytes),
            hovers: DashMap::new(),
            hover_clock: AtomicU64::new(0),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Hidden states of `ids`, cached.
    pub fn states(&self, ids: &[u32]) -> Result<Arc<HiddenStates>, RpcError> {
        self.cache.get(&*self.backend, ids).map_err(|e| RpcError::from(&*e))
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
            Some(LayersParam::Spec(s)) => s.parse::<LayerSpec>().map_err(RpcError::invalid_params)?,
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
                        return Err(RpcError::out_of_range(format!("position {p} is outside the text of {n} tokens")));
                    }
                    out.push(idx as usize);
                }
                out.sort_unstable();
                out.dedup();
                Some(out)
            }
        };
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let states = self.states(&ids)?;
        let lens_view = Lens::new(&*self.backend, &states, lens, top_k);
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let views = match positions {
            None => lens_view.grid(&sites)?,
            Some(ps) => lens_view.positions(&ps, &sites)?,
        };
        Ok(wire::build(&*self.backend, &tokens, &views, lens, top_k, &layers))
    }

    /// `lens/analyze`: the same report as `logit-lens run --format json`.
    pub fn analyze(&self, p: &AnalyzeParams) -> Result<Report, RpcError> {
        let k = top_k(p.top_k)?;
        self.report(&p.text, p.layers.as_ref(), p.positions.as_deref(), k, p.lens.unwrap_or_default().into())
    }

    /// `lens/position`: the report with one position.
    pub fn position(&self, p: &PositionParams) -> Result<Report, RpcError> {
        let k = top_k(p.top_k)?;
        self.report(&p.text, p.layers.as_ref(), Some(&[p.position]), k, p.lens.unwrap_or_default().into())
    }

    /// The hover at byte `byte` of a document: the token there, with the text before it
    /// (at most `context_tokens` tokens, oldest dropped) as context. `None` for an empty
    /// document.
    pub fn hover(&self, text: &str, byte: usize, options: &HoverOptions) -> Result<Option<HoverOut>, RpcError> {
        if text.is_empty() {
            return Ok(None);
        }
        let tokens = self.tokenize(text)?;
        // The last token starting at or before the byte (tokens that split one character
        // share its range; the later one completes it).
        let Some(t) = tokens.iter().rposition(|tok| tok.start <= byte).or((!tokens.is_empty()).then_some(0)) else {
            return Ok(None);
        };
        let window = options.context_tokens.clamp(1, self.backend.info().context_length.max(1));
        let first = (t + 1).saturating_sub(window);
        let ids: Arc<[u32]> = tokens[first..=t].iter().map(|tok| tok.id).collect();
        let key = HoverKey { ids: ids.clone(), options: *options };
        let (start, end) = (tokens[t].start, tokens[t].end);
        let stamp = self.hover_clock.fetch_add(1, Ordering::Relaxed);
        if let Some(mut hit) = self.hovers.get_mut(&key) {
            hit.0 = stamp;
            return Ok(Some(HoverOut { markdown: String::clone(&hit.1), start, end }));
        }
        let states = self.states(&ids)?;
        let pos = ids.len() - 1;
        let views = self.hover_views(&states, pos, options)?;
        let markdown = hover::markdown(&*self.backend, &tokens[first..=t], t, &views);
        self.remember_hover(key, stamp, Arc::new(markdown.clone()));
        Ok(Some(HoverOut { markdown, start, end }))
    }

    /// The lens at the hovered position (its top predictions) and at the one before it (the
    /// probability and rank of the token written at the hovered position).
    fn hover_views(&self, states: &HiddenStates, pos: usize, options: &HoverOptions) -> Result<Vec<PositionView>, RpcError> {
        let n = states.n_layers();
        let layers = LayerSpec::Range { start: None, end: None, step: options.layer_stride.max(1) }
            .resolve(n)
            .map_err(RpcError::invalid_params)?;
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let lens = Lens::new(&*self.backend, states, LensKind::Norm, options.top_k.clamp(1, 100));
        let positions: Vec<usize> = if pos == 0 { vec![0] } else { vec![pos - 1, pos] };
        Ok(lens.positions(&positions, &sites)?)
    }

    fn remember_hover(&self, key: HoverKey, stamp: u64, markdown: Arc<String>) {
        if self.hovers.len() >= HOVER_CACHE_ENTRIES {
            let oldest = self.hovers.iter().min_by_key(|e| e.value().0).map(|e| e.key().clone());
            if let Some(k) = oldest {
                self.hovers.remove(&k);
            }
        }
        self.hovers.insert(key, (stamp, markdown));
    }

    /// Inlay hints: the model's next-token prediction after the last token of each line in
    /// `lines` (byte ranges of line ends). Returns (byte offset of the line end, token text).
    /// The context is the document's first `context_tokens` tokens.
    pub fn line_end_predictions(&self, text: &str, line_ends: &[usize], context_tokens: usize) -> Result<Vec<(usize, String)>, RpcError> {
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
        let states = self.states(&ids)?;
        let last = Site::Layer(states.n_layers());
        let lens = Lens::new(&*self.backend, &states, LensKind::Norm, 1);
        let positions: Vec<usize> = wanted.iter().map(|w| w.1).collect();
        let views = lens.positions(&positions, &[last])?;
        Ok(wanted.iter().zip(views).map(|((end, _), v)| (*end, self.backend.decode(v.final_top1.id))).collect())
    }
}
