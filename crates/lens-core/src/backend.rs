use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::engine_check::EngineLogits;
use crate::generate::Generator;
use crate::lens::{host_lens, LensRequest};
use crate::{HiddenStates, PositionView};

/// What a backend knows about the model it has loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// A human-readable name (file stem or `general.name`).
    pub name: String,
    /// Architecture family as the model file names it (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// Number of transformer blocks `N`; the lens has `N + 1` layers (0 = embeddings).
    pub n_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Maximum number of tokens the model accepts.
    pub context_length: usize,
    /// Free-form description of the weights' precision as loaded (`f32`, `q4_1/q8_0`, ...).
    pub precision: String,
}

/// One token of a tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    /// The token decoded on its own (may contain U+FFFD for a partial UTF-8 sequence).
    pub text: String,
    /// Byte range in the prompt this token covers.
    pub start: usize,
    pub end: usize,
}

/// Which readout the lens applies to a hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LensKind {
    /// `unembed(final_norm(h))`: the standard logit lens; at the last layer it is the model output.
    #[default]
    Norm,
    /// `h · W_Uᵀ` with no final norm.
    Raw,
    /// The tuned lens: `unembed(final_norm(h + W_l·h + b_l))` with a learned translator per
    /// layer ([`crate::Translators`], carried beside the kind by [`crate::Query`] and
    /// [`crate::Lens`]). lens-core translates the rows on the host; a backend's
    /// [`Backend::readout`] asked for `Tuned` is the norm readout of rows already translated.
    Tuned,
}

impl LensKind {
    /// The readouts a backend implements itself (`Tuned` is `Norm` on translated rows).
    pub const ALL: [LensKind; 2] = [LensKind::Norm, LensKind::Raw];

    pub fn as_str(self) -> &'static str {
        match self {
            LensKind::Norm => "norm",
            LensKind::Raw => "raw",
            LensKind::Tuned => "tuned",
        }
    }

    /// Whether the readout applies the final norm (every kind but `Raw`).
    pub fn applies_norm(self) -> bool {
        self != LensKind::Raw
    }

    /// Whether the last layer's readout is the model's output (no translator, final norm).
    pub fn last_layer_is_output(self) -> bool {
        self != LensKind::Raw
    }
}

impl fmt::Display for LensKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LensKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [LensKind::Norm, LensKind::Raw, LensKind::Tuned]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown lens `{s}`: use norm, raw or tuned"))
    }
}

/// The lens readout's frozen parameters as plain numbers (for training a tuned lens in front
/// of it, and for recognising the model a tuned lens belongs to).
#[derive(Debug, Clone, PartialEq)]
pub struct ReadoutWeights {
    pub norm: FinalNorm,
    /// The final norm's scale, `hidden` (Gemma's `1 + w` already added).
    pub norm_weight: Vec<f32>,
    /// The final norm's shift (LayerNorm), `hidden`.
    pub norm_bias: Option<Vec<f32>>,
    /// `W_U`, `vocab × hidden`, row-major, dequantized.
    pub unembedding: Vec<f32>,
}

/// The final norm's formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FinalNorm {
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms { eps: f64 },
    /// `(x − mean) / sqrt(var + eps) · w + b`.
    Layer { eps: f64 },
}

/// What a forward pass captures besides the residual stream at block boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptureOptions {
    /// Also capture the residual stream after each block's attention (before its MLP).
    pub mid_block: bool,
}

/// Errors a backend reports. The lens math itself cannot fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens, more than the model's context of {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("position {position} is outside the prompt of {len} tokens")]
    PositionOutOfRange { position: usize, len: usize },
    #[error("layer {layer} is outside the model's layers 0..={max}")]
    LayerOutOfRange { layer: usize, max: usize },
    /// A layer selection that does not fit the model (see [`crate::IndexSpec`]).
    #[error("{0}")]
    Layers(String),
    /// A position selection that does not fit the prompt (see [`crate::IndexSpec`]).
    #[error("{0}")]
    Positions(String),
    #[error("the hidden states do not match the model: {0}")]
    Shape(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Backend(String),
    #[error("stopped before it finished")]
    Stopped,
    /// A loader cannot do what was asked (a source, device or precision it does not offer).
    #[error("{0}")]
    Unsupported(String),
    /// Loading a model failed (the backend's own error, as text).
    #[error("{0}")]
    Load(String),
    /// A NaN or an infinity where a number must be: in the residual stream (`residual`: the
    /// first layer at that position where it went non-finite, so the block that made it), or
    /// only in the lens's logits (the final norm or the unembedding).
    #[error("{}", non_finite(*layer, *position, *residual))]
    NonFinite {
        layer: usize,
        position: usize,
        residual: bool,
    },
}

fn non_finite(layer: usize, position: usize, residual: bool) -> String {
    if residual {
        let made_by = match layer {
            0 => "the embedding".to_string(),
            l => format!("block {l}"),
        };
        format!(
            "the residual stream is not finite (NaN or infinity) at layer {layer}, position \
             {position}: {made_by} produced it (are the model's weights corrupt?)"
        )
    } else {
        format!(
            "the lens's logits are not finite (NaN or infinity) at layer {layer}, position \
             {position}, while the residual stream there is finite: the final norm or the \
             unembedding holds a non-finite value"
        )
    }
}

/// A request to give up on work that is no longer wanted (a cancelled request, a hover for a
/// text that has since changed). Whoever started the work keeps a clone and calls
/// [`Stop::stop`]; backends look at it between their steps (layers, blocks of the vocabulary)
/// and return [`Error::Stopped`]. A default `Stop` can never be stopped.
#[derive(Debug, Clone, Default)]
pub struct Stop(Option<Arc<AtomicBool>>);

impl Stop {
    /// A stop that [`Stop::stop`] can raise.
    pub fn new() -> Stop {
        Stop(Some(Arc::new(AtomicBool::new(false))))
    }

    /// A stop that is never raised.
    pub fn never() -> Stop {
        Stop(None)
    }

    pub fn stop(&self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Whether `self` and `other` are clones of one stop.
    pub fn same(&self, other: &Stop) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// `Err(Error::Stopped)` once stopped.
    pub fn check(&self) -> Result<(), Error> {
        match self.is_stopped() {
            true => Err(Error::Stopped),
            false => Ok(()),
        }
    }
}

/// A model runtime that the lens can look into.
///
/// The trait is object-safe and synchronous: callers that must stay responsive (the daemon)
/// run it on a blocking thread. Implementations live in their own crates (`lens-candle`, ...);
/// adding one never touches this crate.
pub trait Backend: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// Tokenize `text` exactly as the model's own tokenizer does (no special tokens added
    /// unless the model's configuration says so), with byte offsets into `text`.
    fn tokenize(&self, text: &str) -> Result<Vec<Token>, Error>;

    /// The text of a single token id, decoded on its own.
    fn decode(&self, id: u32) -> String;

    /// Run `tokens` through the model and capture the residual stream at every layer
    /// boundary: layer 0 = embeddings, layer i = after block i.
    fn forward(&self, tokens: &[u32], options: CaptureOptions) -> Result<HiddenStates, Error>;

    /// Like [`Backend::forward`], but may reuse the work done for `prefix` (another prompt's
    /// states, typically cached) on the tokens both prompts share, running only the rest.
    /// The result must equal a fresh forward up to floating-point reassociation (when `tokens`
    /// is a prefix of `prefix`'s, that is `prefix`'s first positions: attention is causal).
    /// The default ignores `prefix`.
    fn forward_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, Error> {
        let _ = prefix;
        self.forward(tokens, options)
    }

    /// Apply the lens readout to `rows` (row-major, `rows.len() / hidden_size` rows of
    /// `hidden_size`) and return the logits, row-major, `vocab_size` per row.
    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, Error>;

    /// [`Backend::forward`] (no `prefix`) or [`Backend::forward_reusing`] that returns
    /// [`Error::Stopped`] soon after `stop` is raised. The default looks at `stop` only before
    /// it starts; a backend that can stop between layers overrides it.
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, Error> {
        stop.check()?;
        match prefix {
            Some(prefix) => self.forward_reusing(prefix, tokens, options),
            None => self.forward(tokens, options),
        }
    }

    /// [`Backend::readout`] that returns [`Error::Stopped`] soon after `stop` is raised. The
    /// default looks at `stop` only before it starts.
    fn readout_until(&self, rows: &[f32], lens: LensKind, stop: &Stop) -> Result<Vec<f32>, Error> {
        stop.check()?;
        self.readout(rows, lens)
    }

    /// Read the lens at the cells `request` asks for and reduce each to a [`crate::Cell`]:
    /// readout, log-softmax, top-k (ties to the lower id), entropy, KL to the model output,
    /// ranks. The default is the host implementation ([`host_lens`]): rows go through
    /// [`Backend::readout_until`] in bounded batches and are reduced by [`crate::math`]. A
    /// backend that keeps its states on a device overrides it to reduce there and return only
    /// the small results; the conformance suite holds an override to the host math. The
    /// request has been validated ([`crate::Lens`] checks positions and sites first).
    fn lens(&self, request: &LensRequest<'_>, stop: &Stop) -> Result<Vec<PositionView>, Error> {
        host_lens(self, request, stop)
    }

    /// Bytes the backend's own per-prompt state attached to `states` holds (its KV cache),
    /// for the daemon's cache budget. The default: none.
    fn state_bytes(&self, states: &HiddenStates) -> usize {
        let _ = states;
        0
    }

    /// Generation, where the backend can write ([`crate::host_generate`] is the loop on its
    /// own forward and readout). The default: it cannot.
    fn generator(&self) -> Option<&dyn Generator> {
        None
    }

    /// The readout's weights as plain numbers, where the backend can hand them out (the tuned
    /// lens trains on them and checks a lens file against their hash). The default: it cannot.
    fn readout_weights(&self) -> Option<Result<ReadoutWeights, Error>> {
        None
    }

    /// The final logits at every position of `tokens` as the engine the backend wraps computes
    /// them itself, independently of the capture forward, with the bound a correct capture
    /// stays within: what the capture's last layer is checked against
    /// ([`crate::engine_check`]). `None` (the default) when the capture is the engine's own
    /// forward pass.
    fn engine_logits(&self, tokens: &[u32]) -> Option<Result<EngineLogits, Error>> {
        let _ = tokens;
        None
    }
}

/// Run `f` on a thread of rayon's global pool (the one candle's kernels and the lens share)
/// and wait for it; inside the pool, just run it. Model work opens many parallel sections (a
/// one-token forward pass of Gemma 3 about 70, one per projection); from a thread outside the
/// pool each one is handed over and waited for, with two thread switches, and the caller's
/// serial parts compete with the pool's idle workers for the cores. Measured from outside,
/// alternating, on a one-token edit after 256 tokens: Gemma 3 8.8-10.8 ms inside against
/// 10.9-13.4 outside, SmolLM2 11.4-13.9 against 11.6-13.9 (medians of 200). The daemon runs
/// every request's model work in it; the candle backend runs its forward passes in it, for
/// every other caller.
pub fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| f())
}
