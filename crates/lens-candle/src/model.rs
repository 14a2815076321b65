//! A decoder of the Llama family (Llama, Mistral, SmolLM, Qwen2, Qwen3), Gemma 3 and GPT-2
//! that captures its residual stream.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use lens_core::Stop;
use rayon::prelude::*;

use crate::kernels::Matrix;
use crate::Error;

/// The architectures (`general.architecture` / `model_type`) this forward pass implements.
pub(crate) const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"];

/// The norms' kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NormKind {
    /// `x / sqrt(mean(x²) + eps) · w`.
    Rms,
    /// `(x - mean) / sqrt(var + eps) · w + b` (GPT-2), two passes as torch computes it.
    Layer,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// SwiGLU (Llama).
    Silu,
    /// GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// A block's RoPE base and attention window (`None`: every earlier position).
type LayerKind = (f32, Option<usize>);

/// Sliding-window attention on all blocks but every `period`-th (Gemma 3: five local blocks,
/// then one global), the local ones with their own RoPE base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SlidingWindow {
    /// A position attends to itself and the `window - 1` before it.
    pub window: usize,
    pub rope_theta: f32,
    pub period: usize,
}

/// How q/k rows are laid out for rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeLayout {
    /// Rotate adjacent pairs (GGUF's permuted Llama weights; llama.cpp's "normal" rope).
    Interleaved,
    /// Rotate the two halves (HF weights; llama.cpp's "neox" rope).
    Halves,
    /// No rotary embedding: learned absolute positions added to the embeddings (GPT-2).
    Learned,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub architecture: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub context: usize,
    pub rope: RopeLayout,
    /// Embeddings are multiplied by this (Gemma: √hidden) before block 1; layer 0 is the
    /// scaled embedding.
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    pub sliding: Option<SlidingWindow>,
    pub norm: NormKind,
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Format(m));
        if self.n_layers == 0 || self.hidden == 0 || self.vocab == 0 || self.n_heads == 0 {
            return bad(format!("empty dimensions in {self:?}"));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads cannot share {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("odd head dimension {}", self.head_dim));
        }
        if self.sliding.is_some_and(|s| s.window == 0 || s.period == 0) {
            return bad(format!("empty sliding window in {self:?}"));
        }
        Ok(())
    }

    /// Block `i`'s RoPE base and attention window (`None`: every earlier position).
    fn layer_attention(&self, i: usize) -> LayerKind {
        match self.sliding {
            Some(s) if !(i + 1).is_multiple_of(s.period) => (s.rope_theta, Some(s.window)),
            _ => (self.rope_theta, None),
        }
    }
}

/// A forward pass of at most this many new tokens takes [`Model::forward_small`] (when every
/// weight has a small-batch matrix).
const SMALL_ROWS: usize = 8;

/// A linear map, quantized or dense, with an optional bias.
pub(crate) struct Linear {
    w: QMatMul,
    /// The same weights for the exact small-batch kernel (the one or two tokens of an edit).
    small: Option<Matrix>,
    /// Every product goes through `small` (panels, which beat candle's GEMM at every size):
    /// `w` then holds the blocks as read, not a dense copy.
    small_only: bool,
    bias: Option<Tensor>,
    /// The bias as plain values, for the small-batch forward pass.
    bias_v: Option<Vec<f32>>,
}

impl Linear {
    pub(crate) fn new(w: QMatMul, bias: Option<Tensor>) -> Self {
        let bias_v = bias
            .as_ref()
            .and_then(|b| b.to_dtype(DType::F32).ok()?.to_vec1::<f32>().ok());
        Linear {
            w,
            small: None,
            small_only: false,
            bias,
            bias_v,
        }
    }

    /// A dense f32 `[out, in]` map; the small-batch kernel reads the weights in place.
    pub(crate) fn dense(w: Tensor, bias: Option<Tensor>) -> Self {
        let small = Matrix::from_f32(&w);
        Linear::new(QMatMul::Tensor(w), bias).with_small(small)
    }

    /// `x · Wᵀ + b` for a few rows, without candle. `None` without a small-batch matrix.
    fn apply_small(&self, x: &[f32]) -> Option<Vec<f32>> {
        let mut y = self.small.as_ref()?.matmul_nt(x)?;
        self.add_bias(&mut y);
        Some(y)
    }

    /// [`Linear::apply_small`] of several maps on the same input, in one parallel section
    /// when the kernels allow it.
    fn apply_small_many<const N: usize>(maps: [&Linear; N], x: &[f32]) -> Option<[Vec<f32>; N]> {
        let mats: Vec<&Matrix> = maps
            .iter()
            .map(|l| l.small.as_ref())
            .collect::<Option<_>>()?;
        let ys = match crate::kernels::matmul_nt_many(&mats, x) {
            Some(ys) => ys,
            None => mats.iter().map(|m| m.matmul_nt(x)).collect::<Option<_>>()?,
        };
        let mut ys: [Vec<f32>; N] = ys.try_into().ok()?;
        for (y, l) in ys.iter_mut().zip(maps) {
            l.add_bias(y);
        }
        Some(ys)
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias_v {
            for row in y.chunks_mut(b.len()) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
    }

    /// Bytes of the weights as the forward multiplies them (for balancing pipeline stages).
    fn bytes(&self) -> usize {
        let w = match &self.w {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        };
        w + self.bias.as_ref().map_or(0, |b| b.elem_count() * 4)
    }

    pub(crate) fn with_small(mut self, small: Option<Matrix>) -> Self {
        self.small = small;
        self
    }

    /// Every product through the small-batch matrix (`w` need not be dense).
    pub(crate) fn small_only(mut self) -> Self {
        self.small_only = self.small.is_some();
        self
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The f32 path's batches go through the small-batch kernel too where it beats candle's
        // GEMM (panels: see `kernels`): the same dequantized weights, sums in another order.
        let dense = matches!(self.w, QMatMul::Tensor(_));
        let kernel = match &self.small {
            Some(m)
                if (self.small_only || (dense && m.fast_for_batches()))
                    && x.dims().last() == Some(&m.k)
                    && x.dtype() == DType::F32
                    && x.device().is_cpu() =>
            {
                self.apply_small(&x.flatten_all()?.to_vec1::<f32>()?)
                    .map(|y| (y, m.n))
            }
            _ => None,
        };
        if let Some((y, n)) = kernel {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return Tensor::from_vec(y, dims, x.device());
        }
        if self.small_only {
            return Err(candle_core::Error::Msg(format!(
                "the exact kernel cannot multiply a {:?} {:?} input",
                x.dtype(),
                x.dims()
            )));
        }
        let y = self.w.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

pub(crate) struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    /// `None`: a plain MLP, `down(act(up(x)))` (GPT-2).
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
    /// LayerNorm biases (GPT-2).
    pub attn_norm_bias: Option<Tensor>,
    pub ffn_norm_bias: Option<Tensor>,
    /// Gemma: RMSNorm of each query and key head before RoPE (`[head_dim]`).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Gemma: RMSNorm of the attention and MLP outputs before they join the residual stream.
    pub post_attn_norm: Option<Tensor>,
    pub post_ffn_norm: Option<Tensor>,
}

impl Block {
    /// Bytes of the block's weights (its linear maps; the norms are negligible).
    pub(crate) fn bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
            .into_iter()
            .chain(&self.gate)
            .map(Linear::bytes)
            .sum()
    }

    fn small_ready(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
            .into_iter()
            .chain(&self.gate)
            .all(|l| l.small.is_some())
    }
}

/// A block's norm weights as plain values, for the small-batch forward pass.
struct Norms {
    attn: Vec<f32>,
    ffn: Vec<f32>,
    attn_b: Option<Vec<f32>>,
    ffn_b: Option<Vec<f32>>,
    q: Option<Vec<f32>>,
    k: Option<Vec<f32>>,
    post_attn: Option<Vec<f32>>,
    post_ffn: Option<Vec<f32>>,
}

/// Token embeddings `[vocab, hidden]`.
pub(crate) enum Embeddings {
    /// Dequantized (`[0, hidden]` on a pipeline stage that does not start at block 0).
    Dense(Tensor),
    /// The file's blocks, each looked-up row dequantized by candle (the same values): where
    /// nothing else needs the dense matrix, which is Gemma 3's 671 MB.
    Quantized(Arc<QTensor>),
}

impl From<Tensor> for Embeddings {
    fn from(t: Tensor) -> Self {
        Embeddings::Dense(t)
    }
}

impl Embeddings {
    /// The rows of `ids`, `[t, hidden]` f32.
    fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor, Error> {
        match self {
            Embeddings::Dense(e) => Ok(e.index_select(&Tensor::new(ids, device)?, 0)?),
            Embeddings::Quantized(q) => {
                let (vocab, hidden) = q.shape().dims2()?;
                let data = q.data()?;
                let row = data.len() / vocab.max(1);
                // Word-aligned (candle reads the bytes as blocks of f16 and f32 fields), and
                // lent, not given: candle's `from_data` keeps a slice of what it is handed
                // past the call, which an owned buffer would not outlive.
                let mut words = vec![0u32; (ids.len() * row).div_ceil(4)];
                let raw =
                    &mut pulp::bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..ids.len() * row];
                for (&id, out) in ids.iter().zip(raw.chunks_exact_mut(row.max(1))) {
                    let id = id as usize;
                    out.copy_from_slice(data.get(id * row..(id + 1) * row).ok_or_else(|| {
                        Error::Format(format!(
                            "token id {id} is outside the vocabulary of {vocab}"
                        ))
                    })?);
                }
                let storage = QStorage::from_data(Cow::Borrowed(raw), device, q.dtype())?;
                Ok(QTensor::new(storage, (ids.len(), hidden))?.dequantize(device)?)
            }
        }
    }

    /// Bytes as held.
    fn bytes(&self) -> usize {
        match self {
            Embeddings::Dense(e) => e.elem_count() * e.dtype().size_in_bytes(),
            Embeddings::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}

pub(crate) struct Model {
    pub cfg: Config,
    pub embed: Embeddings,
    /// The blocks this model runs: `first_block..first_block + blocks.len()` of the
    /// `cfg.n_layers` (all of them unless [`Model::keep_blocks`] made it a pipeline stage).
    pub blocks: Vec<Block>,
    first_block: usize,
    pub final_norm: Tensor,
    pub final_norm_bias: Option<Tensor>,
    /// Learned absolute position embeddings `[positions, hidden]` (GPT-2).
    pub positions: Option<Tensor>,
    /// The unembedding `W_U`, `[vocab, hidden]`.
    pub unembed: QMatMul,
    /// `W_Uᵀ`, `[hidden, vocab]` contiguous, made by the first readout of 128 rows or more
    /// that goes through candle with a dense unembedding (Gemma 3's is 671 MB; with Q8_0
    /// panels it is never made).
    unembed_t: std::sync::OnceLock<Tensor>,
    /// The unembedding for the small-batch kernel (readouts of fewer than 128 rows, or every
    /// readout when [`Matrix::fast_for_batches`]).
    pub unembed_small: Option<Matrix>,
    /// Per block, when every weight has a small-batch matrix: the norms as plain values.
    small_norms: Option<Vec<Norms>>,
    pub device: Device,
}

/// Keys and values of every block for the tokens of a prompt, per position (shared, like the
/// hidden states, between a prompt and its extensions): `positions[p]` holds, for each block,
/// the keys then the values of its KV heads (`[layer][k | v][kv_head][head_dim]`, after RoPE).
pub(crate) struct KvCache {
    pub tokens: Vec<u32>,
    pub positions: Vec<Arc<[f32]>>,
}

impl KvCache {
    pub(crate) fn bytes(&self) -> usize {
        self.positions.iter().map(|p| p.len() * 4).sum()
    }

    /// The first `keep` positions.
    pub(crate) fn prefix(&self, keep: usize) -> KvCache {
        KvCache {
            tokens: self.tokens[..keep].to_vec(),
            positions: self.positions[..keep].to_vec(),
        }
    }
}

/// What one forward pass produced for its new positions.
pub(crate) struct Capture {
    /// Per new position: `[layer][hidden]` for layers `0..=N`.
    pub resid: Vec<Arc<[f32]>>,
    /// Per new position: `[block - 1][hidden]`.
    pub mid: Option<Vec<Arc<[f32]>>>,
    /// Per new position, see [`KvCache`].
    pub kv: Vec<Arc<[f32]>>,
}

/// What a forward pass starts from.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    /// Token ids, embedded (a whole model, or the first stage of a pipeline).
    Tokens(&'a [u32]),
    /// Residual rows `[t][hidden]` from the previous stage of a pipeline.
    Rows(&'a [f32]),
}

impl Input<'_> {
    /// The number of new positions.
    pub(crate) fn len(&self, hidden: usize) -> usize {
        match self {
            Input::Tokens(ids) => ids.len(),
            Input::Rows(rows) => rows.len() / hidden.max(1),
        }
    }
}

/// Per-position rows of `layers` (each `[t, width]`, in order).
fn per_position(layers: &[Vec<f32>], t: usize) -> Vec<Arc<[f32]>> {
    (0..t)
        .map(|p| {
            let mut row = Vec::with_capacity(layers.iter().map(Vec::len).sum::<usize>() / t.max(1));
            for l in layers {
                let w = l.len() / t;
                row.extend_from_slice(&l[p * w..(p + 1) * w]);
            }
            Arc::from(row)
        })
        .collect()
}

impl Model {
    pub(crate) fn new(
        cfg: Config,
        embed: impl Into<Embeddings>,
        blocks: Vec<Block>,
        final_norm: Tensor,
        unembed: QMatMul,
        device: Device,
    ) -> Result<Self, Error> {
        // Dense weights are read in place by the small-batch kernel (no copy).
        let unembed_small = match &unembed {
            QMatMul::Tensor(w) => Matrix::from_f32(w),
            _ => None,
        };
        let values =
            |t: &Tensor| -> Option<Vec<f32>> { t.to_dtype(DType::F32).ok()?.to_vec1().ok() };
        let optional = |t: &Option<Tensor>| -> Option<Option<Vec<f32>>> {
            match t {
                Some(t) => values(t).map(Some),
                None => Some(None),
            }
        };
        let norms = |b: &Block| -> Option<Norms> {
            Some(Norms {
                attn: values(&b.attn_norm)?,
                ffn: values(&b.ffn_norm)?,
                attn_b: optional(&b.attn_norm_bias)?,
                ffn_b: optional(&b.ffn_norm_bias)?,
                q: optional(&b.q_norm)?,
                k: optional(&b.k_norm)?,
                post_attn: optional(&b.post_attn_norm)?,
                post_ffn: optional(&b.post_ffn_norm)?,
            })
        };
        let small_norms = match device.is_cpu() && blocks.iter().all(Block::small_ready) {
            true => blocks.iter().map(norms).collect(),
            false => None,
        };
        Ok(Model {
            cfg,
            embed: embed.into(),
            blocks,
            first_block: 0,
            final_norm,
            final_norm_bias: None,
            positions: None,
            unembed,
            unembed_t: std::sync::OnceLock::new(),
            unembed_small,
            small_norms,
            device,
        })
    }

    /// LayerNorm's final bias and learned position embeddings (GPT-2).
    pub(crate) fn with_gpt2_parts(mut self, final_norm_bias: Tensor, positions: Tensor) -> Self {
        self.final_norm_bias = Some(final_norm_bias);
        self.positions = Some(positions);
        self
    }

    /// The model's norm (RMSNorm or LayerNorm) of each row of `x`.
    fn norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor, Error> {
        let eps = self.cfg.rms_eps;
        Ok(match self.cfg.norm {
            NormKind::Rms => candle_nn::ops::rms_norm(x, w, eps as f32)?,
            NormKind::Layer => {
                let mean = x.mean_keepdim(candle_core::D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
                let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
                match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        })
    }

    /// The embeddings of `ids` at positions `start..`: `[t, hidden]`, scaled (Gemma) or with
    /// the learned positions added (GPT-2).
    fn embed(&self, ids: &[u32], start: usize) -> Result<Tensor, Error> {
        let t = ids.len();
        let mut x = self.embed.rows(ids, &self.device)?;
        if let Some(scale) = self.cfg.embed_scale {
            x = (x * f64::from(scale))?;
        }
        if let Some(pos) = &self.positions {
            let n = pos.dim(0)?;
            if start + t > n {
                return Err(Error::Format(format!(
                    "position {} is beyond the model's {n} learned positions",
                    start + t - 1
                )));
            }
            x = (x + pos.narrow(0, start, t)?)?;
        }
        Ok(x)
    }

    /// Use `m` (e.g. the file's Q8_0 blocks: a quarter of the bytes to stream) for small
    /// readouts.
    pub(crate) fn with_small_unembed(mut self, m: Option<Matrix>) -> Self {
        if m.is_some() {
            self.unembed_small = m;
        }
        self
    }

    /// Run `tokens[start..]` after a cached prefix of `start` tokens, capturing the residual
    /// stream of the new positions.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        prefix: Option<&KvCache>,
        mid_block: bool,
        stop: &Stop,
    ) -> Result<Capture, Error> {
        let start = prefix.map_or(0, |p| p.tokens.len());
        let past = prefix.map_or(&[][..], |p| &p.positions[..]);
        self.forward_from(Input::Tokens(&tokens[start..]), past, mid_block, stop)
    }

    /// Run this model's blocks on `input` (the new positions, after the `past` positions whose
    /// keys and values of these blocks are cached), capturing the residual stream: per new
    /// position, the input row then the row after each block. The one forward pass of a whole
    /// model (tokens in, every block) and of a pipeline stage (rows in, its blocks).
    pub(crate) fn forward_from(
        &self,
        input: Input<'_>,
        past: &[Arc<[f32]>],
        mid_block: bool,
        stop: &Stop,
    ) -> Result<Capture, Error> {
        let t = input.len(self.cfg.hidden);
        let _span = tracing::debug_span!("forward", tokens = t).entered();
        if let Input::Rows(rows) = input {
            if rows.len() != t * self.cfg.hidden || t == 0 {
                return Err(Error::Format(format!(
                    "{} values are not whole rows of {}",
                    rows.len(),
                    self.cfg.hidden
                )));
            }
        }
        if t <= SMALL_ROWS {
            if let Some(norms) = &self.small_norms {
                return self.forward_small(input, past, norms, mid_block, stop);
            }
        }
        self.forward_candle(input, past, mid_block, stop)
    }

    /// The new positions' first residual rows: the embeddings of token ids (the first stage),
    /// or the rows a previous stage computed, `[t, hidden]`.
    fn input_tensor(&self, input: Input<'_>, start: usize) -> Result<Tensor, Error> {
        match input {
            Input::Tokens(ids) => self.embed(ids, start),
            Input::Rows(rows) => {
                let t = input.len(self.cfg.hidden);
                Ok(Tensor::from_slice(
                    rows,
                    (t, self.cfg.hidden),
                    &self.device,
                )?)
            }
        }
    }

    /// Keep only blocks `range` (a pipeline stage): the others are dropped, and so are the
    /// embeddings unless the range starts at block 0. The final norm and the unembedding stay
    /// (every stage reads the lens of its own layers).
    pub(crate) fn keep_blocks(&mut self, range: std::ops::Range<usize>) -> Result<(), Error> {
        if range.is_empty() || range.end > self.blocks.len() || self.first_block != 0 {
            return Err(Error::Format(format!(
                "blocks {range:?} are not a range of the model's {}",
                self.blocks.len()
            )));
        }
        self.blocks.truncate(range.end);
        self.blocks.drain(..range.start);
        if let Some(n) = &mut self.small_norms {
            n.truncate(range.end);
            n.drain(..range.start);
        }
        if range.start > 0 {
            self.embed = Tensor::zeros((0, self.cfg.hidden), DType::F32, &self.device)?.into();
            self.positions = None;
        }
        self.first_block = range.start;
        Ok(())
    }

    /// Bytes of the embeddings as held.
    pub(crate) fn embed_bytes(&self) -> usize {
        self.embed.bytes()
    }

    /// The forward pass on candle's tensors (prompts, and edits far from the end).
    fn forward_candle(
        &self,
        input: Input<'_>,
        past: &[Arc<[f32]>],
        mid_block: bool,
        stop: &Stop,
    ) -> Result<Capture, Error> {
        let start = past.len();
        let cfg = &self.cfg;
        let t = input.len(cfg.hidden);
        let mut x = self.input_tensor(input, start)?; // [t, hidden]
        let (first, n_blocks) = (self.first_block, self.blocks.len());

        let mut layers: Vec<Vec<f32>> = Vec::with_capacity(n_blocks + 1);
        let mut mids: Vec<Vec<f32>> = Vec::new();
        let mut kvs: Vec<Vec<f32>> = Vec::with_capacity(2 * n_blocks);
        layers.push(x.flatten_all()?.to_vec1::<f32>()?);

        let rep = cfg.n_heads / cfg.n_kv_heads;
        // RoPE tables and masks per kind of block (global, and sliding-window if any).
        let mut kinds: Vec<(LayerKind, (Tensor, Tensor), Option<Tensor>)> = Vec::new();
        for i in first..first + n_blocks {
            let kind = cfg.layer_attention(i);
            if kinds.iter().all(|(k, ..)| *k != kind) {
                let (theta, window) = kind;
                kinds.push((
                    kind,
                    self.rope_tables(theta, start, t)?,
                    causal_mask(start, t, rep, window, &self.device)?,
                ));
            }
        }
        let (nkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
        // `i` indexes this model's blocks (and its KV rows); the config speaks of `first + i`.
        for (i, b) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", i = first + i).entered();
            if stop.is_stopped() {
                return Err(Error::Stopped);
            }
            let cached = match start {
                0 => None,
                _ => Some((
                    self.past_tensor(past, i, 0)?,
                    self.past_tensor(past, i, nkv * hd)?,
                )),
            };
            let kind = cfg.layer_attention(first + i);
            let Some((_, (cos, sin), mask)) = kinds.iter().find(|(k, ..)| *k == kind) else {
                return Err(Error::Format(format!(
                    "no RoPE table for block {}",
                    first + i
                )));
            };
            let eps = cfg.rms_eps as f32;
            let h = self.norm(&x, &b.attn_norm, b.attn_norm_bias.as_ref())?;
            let (mut att, k, v) = self.attention(
                b,
                &h,
                cos,
                sin,
                mask.as_ref(),
                cached.as_ref().map(|(k, v)| (k, v)),
            )?;
            if let Some(w) = &b.post_attn_norm {
                att = candle_nn::ops::rms_norm(&att, w, eps)?;
            }
            // New keys and values, position-major: [t, nkv * hd].
            for kv in [k, v] {
                kvs.push(
                    kv.squeeze(0)?
                        .transpose(0, 1)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            x = (x + att)?;
            if mid_block {
                mids.push(x.flatten_all()?.to_vec1::<f32>()?);
            }
            let h = self.norm(&x, &b.ffn_norm, b.ffn_norm_bias.as_ref())?;
            let act = |y: Tensor| match cfg.activation {
                Activation::Silu => candle_nn::ops::silu(&y),
                Activation::GeluTanh => y.gelu(),
            };
            let inner = match &b.gate {
                Some(gate) => (act(gate.forward(&h)?)? * b.up.forward(&h)?)?,
                None => act(b.up.forward(&h)?)?,
            };
            let mut mlp = b.down.forward(&inner)?;
            if let Some(w) = &b.post_ffn_norm {
                mlp = candle_nn::ops::rms_norm(&mlp, w, eps)?;
            }
            x = (x + mlp)?;
            layers.push(x.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Capture {
            resid: per_position(&layers, t),
            mid: mid_block.then(|| per_position(&mids, t)),
            kv: per_position(&kvs, t),
        })
    }

    /// The cached keys (`offset` 0) or values (`offset` = kv width) of block `layer` as a tensor
    /// `[1, kv_heads, positions, head_dim]`.
    fn past_tensor(
        &self,
        past: &[Arc<[f32]>],
        layer: usize,
        offset: usize,
    ) -> Result<Tensor, Error> {
        let (nkv, hd) = (self.cfg.n_kv_heads, self.cfg.head_dim);
        let base = layer * 2 * nkv * hd + offset;
        let mut data = Vec::with_capacity(nkv * past.len() * hd);
        for h in 0..nkv {
            for p in past {
                let at = base + h * hd;
                data.extend_from_slice(p.get(at..at + hd).ok_or_else(|| {
                    Error::Format("a cached key/value row is shorter than the model's".into())
                })?);
            }
        }
        Ok(Tensor::from_vec(
            data,
            (1, nkv, past.len(), hd),
            &self.device,
        )?)
    }

    /// The forward pass for a few new tokens, on plain slices and the small-batch kernels: the
    /// same arithmetic as [`Model::forward_candle`] (in f32, up to the order of sums), without
    /// the per-operation overhead and copies of the tensor path, and attending straight to the
    /// cached keys and values of each position.
    fn forward_small(
        &self,
        input: Input<'_>,
        past: &[Arc<[f32]>],
        norms: &[Norms],
        mid_block: bool,
        stop: &Stop,
    ) -> Result<Capture, Error> {
        let cfg = &self.cfg;
        let (hidden, nh, nkv, hd) = (cfg.hidden, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (start, t) = (past.len(), input.len(hidden));
        let kvw = nkv * hd;
        let eps = cfg.rms_eps as f32;
        let mut x = match input {
            Input::Tokens(ids) => self.embed(ids, start)?.flatten_all()?.to_vec1::<f32>()?,
            Input::Rows(rows) => rows.to_vec(),
        };
        let (first, n_blocks) = (self.first_block, self.blocks.len());

        let per = (n_blocks + 1) * hidden;
        let mut resid: Vec<Vec<f32>> = (0..t).map(|_| Vec::with_capacity(per)).collect();
        let mut mids: Vec<Vec<f32>> = match mid_block {
            true => (0..t)
                .map(|_| Vec::with_capacity(n_blocks * hidden))
                .collect(),
            false => Vec::new(),
        };
        let mut kv: Vec<Vec<f32>> = (0..t)
            .map(|_| Vec::with_capacity(n_blocks * 2 * kvw))
            .collect();
        let push = |rows: &mut [Vec<f32>], x: &[f32]| {
            for (r, xr) in rows.iter_mut().zip(x.chunks(hidden)) {
                r.extend_from_slice(xr);
            }
        };
        push(&mut resid, &x);

        let global = self.rope_values(cfg.rope_theta, start, t);
        let local = cfg
            .sliding
            .map(|s| self.rope_values(s.rope_theta, start, t));
        let half = hd / 2;
        let missing = || Error::Format("a weight has no small-batch kernel".into());
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let rep = nh / nkv;
        for (i, (b, n)) in self.blocks.iter().zip(norms).enumerate() {
            if stop.is_stopped() {
                return Err(Error::Stopped);
            }
            let h = self.norm_rows(&x, &n.attn, n.attn_b.as_deref());
            let [mut q, mut k, v] =
                Linear::apply_small_many([&b.q, &b.k, &b.v], &h).ok_or_else(missing)?;
            if let Some(w) = &n.q {
                q = rms_norm_rows(&q, w, hd, eps);
            }
            if let Some(w) = &n.k {
                k = rms_norm_rows(&k, w, hd, eps);
            }
            let (theta, window) = cfg.layer_attention(first + i);
            let (cos, sin) = match &local {
                Some(l) if theta != cfg.rope_theta || window.is_some() => l,
                _ => &global,
            };
            // The first key position each new position sees.
            let first = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for p in 0..t {
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for head in q[p * nh * hd..(p + 1) * nh * hd].chunks_mut(hd) {
                    rope(head, c, s, self.cfg.rope);
                }
                for head in k[p * kvw..(p + 1) * kvw].chunks_mut(hd) {
                    rope(head, c, s, self.cfg.rope);
                }
                kv[p].extend_from_slice(&k[p * kvw..(p + 1) * kvw]);
                kv[p].extend_from_slice(&v[p * kvw..(p + 1) * kvw]);
            }
            // Attention of each new position over the cached positions and the new ones up to
            // itself.
            let base = i * 2 * kvw;
            let key = |j: usize, g: usize| -> &[f32] {
                let row: &[f32] = if j < start { &past[j] } else { &kv[j - start] };
                &row[base + g * hd..base + (g + 1) * hd]
            };
            let value = |j: usize, g: usize| -> &[f32] {
                let row: &[f32] = if j < start { &past[j] } else { &kv[j - start] };
                &row[base + kvw + g * hd..base + kvw + (g + 1) * hd]
            };
            let mut att = vec![0f32; t * nh * hd];
            att.par_chunks_mut(hd).enumerate().for_each(|(at, out)| {
                let (p, head) = (at / nh, at % nh);
                let g = head / rep;
                let qh = &q[at * hd..(at + 1) * hd];
                let from = first(start + p);
                let mut scores: Vec<f32> = (from..start + p + 1)
                    .map(|j| dot(qh, key(j, g)) * scale)
                    .collect();
                softmax_in_place(&mut scores);
                for (j, &w) in (from..).zip(&scores) {
                    for (o, v) in out.iter_mut().zip(value(j, g)) {
                        *o += w * v;
                    }
                }
            });
            let mut o = b.o.apply_small(&att).ok_or_else(missing)?;
            if let Some(w) = &n.post_attn {
                o = rms_norm_rows(&o, w, hidden, eps);
            }
            add_in_place(&mut x, &o);
            if mid_block {
                push(&mut mids, &x);
            }
            let h = self.norm_rows(&x, &n.ffn, n.ffn_b.as_deref());
            let f = |g: f32| match cfg.activation {
                Activation::Silu => g / (1.0 + (-g).exp()),
                Activation::GeluTanh => gelu(g),
            };
            let act: Vec<f32> = match &b.gate {
                Some(gate) => {
                    let [gate, up] =
                        Linear::apply_small_many([gate, &b.up], &h).ok_or_else(missing)?;
                    gate.iter().zip(&up).map(|(&g, &u)| f(g) * u).collect()
                }
                None => {
                    let mut up = b.up.apply_small(&h).ok_or_else(missing)?;
                    up.iter_mut().for_each(|u| *u = f(*u));
                    up
                }
            };
            let mut down = b.down.apply_small(&act).ok_or_else(missing)?;
            if let Some(w) = &n.post_ffn {
                down = rms_norm_rows(&down, w, hidden, eps);
            }
            add_in_place(&mut x, &down);
            push(&mut resid, &x);
        }
        let arcs = |v: Vec<Vec<f32>>| v.into_iter().map(Arc::from).collect::<Vec<_>>();
        Ok(Capture {
            resid: arcs(resid),
            mid: mid_block.then(|| arcs(mids)),
            kv: arcs(kv),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        b: &Block,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor), Error> {
        let cfg = &self.cfg;
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let q =
            b.q.forward(h)?
                .reshape((1, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let k =
            b.k.forward(h)?
                .reshape((1, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let v =
            b.v.forward(h)?
                .reshape((1, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let eps = cfg.rms_eps as f32;
        let q = match &b.q_norm {
            Some(w) => candle_nn::ops::rms_norm(&q, w, eps)?,
            None => q,
        };
        let k = match &b.k_norm {
            Some(w) => candle_nn::ops::rms_norm(&k, w, eps)?,
            None => k,
        };
        let (q, k) = match cfg.rope {
            RopeLayout::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            RopeLayout::Halves => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
            RopeLayout::Learned => (q, k),
        };
        let (k_all, v_all) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k.clone(), v.clone()),
        };
        // Group the query heads that share a KV head: [1, nkv, rep * t, hd].
        let rep = nh / nkv;
        let qg = q.reshape((1, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (qg.matmul(&k_all.t()?)? * scale)?; // [1, nkv, rep*t, s]
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v_all)?; // [1, nkv, rep*t, hd]
        let out = out
            .reshape((1, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((t, nh * hd))?;
        Ok((b.o.forward(&out)?, k, v))
    }

    /// cos/sin for positions `start..start + t` (`[t][head_dim / 2]`), in f32 as HF
    /// transformers computes them.
    fn rope_values(&self, theta: f32, start: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / self.cfg.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    fn rope_tables(&self, theta: f32, start: usize, t: usize) -> Result<(Tensor, Tensor), Error> {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = self.rope_values(theta, start, t);
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// The readout's weights as plain values: the final norm and `W_U` dequantized.
    pub(crate) fn readout_weights(&self) -> Result<lens_core::ReadoutWeights, Error> {
        let values = |t: &Tensor| -> Result<Vec<f32>, Error> {
            Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        };
        let unembedding = match &self.unembed {
            QMatMul::QTensor(q) => values(&q.dequantize(&self.device)?)?,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => values(t)?,
        };
        let eps = self.cfg.rms_eps;
        Ok(lens_core::ReadoutWeights {
            norm: match self.cfg.norm {
                NormKind::Rms => lens_core::FinalNorm::Rms { eps },
                NormKind::Layer => lens_core::FinalNorm::Layer { eps },
            },
            norm_weight: values(&self.final_norm)?,
            norm_bias: self.final_norm_bias.as_ref().map(values).transpose()?,
            unembedding,
        })
    }

    /// `unembed(final_norm(rows))` or `rows · W_Uᵀ`.
    pub(crate) fn readout(&self, rows: &[f32], norm: bool, stop: &Stop) -> Result<Vec<f32>, Error> {
        let hidden = self.cfg.hidden;
        let n = rows.len() / hidden;
        if n == 0 {
            return Ok(Vec::new());
        }
        let x = Tensor::from_slice(rows, (n, hidden), &self.device)?;
        let x = if norm {
            self.norm(&x, &self.final_norm, self.final_norm_bias.as_ref())?
        } else {
            x
        };
        // The small-batch kernels below 128 rows; panels (AVX-512) at every size.
        let small = self
            .unembed_small
            .as_ref()
            .filter(|m| n < 128 || m.fast_for_batches());
        if let Some(m) = small {
            if let Some(y) = rows_of(&x).and_then(|rows| m.matmul_nt_until(&rows, stop)) {
                return match stop.is_stopped() {
                    true => Err(Error::Stopped),
                    false => Ok(y),
                };
            }
        }
        let logits = match &self.unembed {
            // Dense: multiply by the pre-transposed copy `[hidden, vocab]`, which the gemm
            // kernels stream through faster for large batches (measured: 4.4 s instead of
            // 4.9 s for the full lens of 256 tokens); small batches are faster on the view.
            QMatMul::Tensor(w) if n >= 128 => {
                let wt = match self.unembed_t.get() {
                    Some(wt) => wt,
                    None => {
                        let wt = w.t()?.contiguous()?;
                        self.unembed_t.get_or_init(|| wt)
                    }
                };
                x.matmul(wt)?
            }
            // Kept as blocks only for panels, which took every readout above.
            QMatMul::QTensor(_) => {
                return Err(Error::Format(format!(
                    "the unembedding's kernel cannot read out {n} rows of {hidden}"
                )))
            }
            _ => self.unembed.forward(&x)?,
        };
        Ok(logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }
}

impl Model {
    /// [`Model::norm`] on plain rows, for the small-batch forward pass.
    fn norm_rows(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let (hidden, eps) = (self.cfg.hidden, self.cfg.rms_eps as f32);
        match self.cfg.norm {
            NormKind::Rms => rms_norm_rows(x, w, hidden, eps),
            NormKind::Layer => {
                let mut out = Vec::with_capacity(x.len());
                for row in x.chunks(hidden) {
                    let mean = row.iter().sum::<f32>() / hidden as f32;
                    let var =
                        row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / hidden as f32;
                    let sd = (var + eps).sqrt();
                    out.extend(
                        row.iter()
                            .zip(w)
                            .enumerate()
                            .map(|(i, (v, w))| (v - mean) / sd * w + b.map_or(0.0, |b| b[i])),
                    );
                }
                out
            }
        }
    }
}

/// candle's `rms_norm` on each row of `x`: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm_rows(x: &[f32], w: &[f32], hidden: usize, eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / hidden as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| v / m * w));
    }
    out
}

/// GELU with the tanh approximation, as candle's `gelu` computes it in f32.
fn gelu(v: f32) -> f32 {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    0.5 * v * (1.0 + (SQRT_TWO_OVER_PI * v * (1.0 + 0.044_715 * v * v)).tanh())
}

/// Rotary embedding of one head in place, as candle's `rope_i` (adjacent pairs) or `rope`
/// (halves) does it.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = match layout {
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            RopeLayout::Halves => (i, i + half),
            RopeLayout::Learned => return,
        };
        let (u, v) = (x[a], x[b]);
        x[a] = u * cos[i] - v * sin[i];
        x[b] = u * sin[i] + v * cos[i];
    }
}

/// `Σ a·b` over eight independent lanes (vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// candle's `softmax_last_dim` on one row.
fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn rows_of(x: &Tensor) -> Option<Vec<f32>> {
    x.flatten_all().ok()?.to_vec1::<f32>().ok()
}

/// Additive mask for `t` new queries after `start` cached positions, repeated for the `rep`
/// query heads grouped on each KV head: `[rep * t, start + t]`; with a `window`, a query also
/// sees no key `window` or more positions before it. `None` when nothing is masked.
fn causal_mask(
    start: usize,
    t: usize,
    rep: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>, Error> {
    let window = window.filter(|&w| w < start + t);
    if t == 1 && window.is_none() {
        return Ok(None);
    }
    let s = start + t;
    let mut m = Vec::with_capacity(rep * t * s);
    for _ in 0..rep {
        for i in 0..t {
            let q = start + i;
            m.extend((0..s).map(|j| {
                if j <= q && window.is_none_or(|w| q - j < w) {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (rep * t, s), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny Gemma-shaped model with random weights: `n_layers` blocks, all sliding-window
    /// (window `window`) unless `period` makes some global.
    fn tiny(n_layers: usize, window: usize, period: usize) -> Model {
        let dev = Device::Cpu;
        let (hidden, nh, nkv, hd, ffn, vocab) = (16, 2, 1, 8, 32, 50);
        let cfg = Config {
            architecture: "gemma3".into(),
            n_layers,
            hidden,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            vocab,
            rms_eps: 1e-6,
            rope_theta: 1_000_000.0,
            context: 64,
            rope: RopeLayout::Halves,
            embed_scale: Some((hidden as f32).sqrt()),
            activation: Activation::GeluTanh,
            sliding: Some(SlidingWindow {
                window,
                rope_theta: 10_000.0,
                period,
            }),
            norm: NormKind::Rms,
        };
        let rand = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &dev).expect("randn");
        let norm = |n: usize| (rand(&[n]) + 1.0).expect("norm");
        let lin = |out: usize, inp: usize| Linear::dense(rand(&[out, inp]), None);
        let blocks = (0..n_layers)
            .map(|_| Block {
                attn_norm: norm(hidden),
                q: lin(nh * hd, hidden),
                k: lin(nkv * hd, hidden),
                v: lin(nkv * hd, hidden),
                o: lin(hidden, nh * hd),
                ffn_norm: norm(hidden),
                gate: Some(lin(ffn, hidden)),
                attn_norm_bias: None,
                ffn_norm_bias: None,
                up: lin(ffn, hidden),
                down: lin(hidden, ffn),
                q_norm: Some(norm(hd)),
                k_norm: Some(norm(hd)),
                post_attn_norm: Some(norm(hidden)),
                post_ffn_norm: Some(norm(hidden)),
            })
            .collect();
        let embed = rand(&[vocab, hidden]);
        Model::new(
            cfg,
            embed.clone(),
            blocks,
            norm(hidden),
            QMatMul::Tensor(embed),
            dev,
        )
        .expect("model")
    }

    /// Layer `layer`'s row at `position` of a capture.
    fn row(c: &Capture, position: usize, layer: usize, hidden: usize) -> Vec<f32> {
        c.resid[position][layer * hidden..(layer + 1) * hidden].to_vec()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// One sliding-window block: a position's output depends on the `window` tokens up to it
    /// and on nothing before them, on the tensor path and on the small-batch path alike.
    #[test]
    fn a_sliding_window_block_sees_only_its_window() {
        let m = tiny(1, 2, 100);
        let never = Stop::never();
        let ids = [3u32, 7, 11, 13, 17, 19, 23, 29, 31, 37];
        let mut other = ids;
        other[0] = 5;
        let a = m.forward(&ids, None, false, &never).expect("forward");
        let b = m.forward(&other, None, false, &never).expect("forward");
        assert!(ids.len() > SMALL_ROWS, "the tensor path");
        // Position 1 sees token 0; positions 2.. do not.
        assert!(max_diff(&row(&a, 1, 1, 16), &row(&b, 1, 1, 16)) > 1e-3);
        for p in 2..ids.len() {
            assert_eq!(row(&a, p, 1, 16), row(&b, p, 1, 16), "position {p}");
        }
        // The small-batch path, appending after a cached prefix, gives the same rows.
        for keep in [4, ids.len() - 1] {
            let prefix = KvCache {
                tokens: ids[..keep].to_vec(),
                positions: a.kv[..keep].to_vec(),
            };
            assert!(ids.len() - keep <= SMALL_ROWS);
            let c = m
                .forward(&ids, Some(&prefix), false, &never)
                .expect("forward_small");
            for p in keep..ids.len() {
                let d = max_diff(&row(&c, p - keep, 1, 16), &row(&a, p, 1, 16));
                assert!(d < 1e-5, "keep {keep}, position {p}: {d}");
            }
        }
    }

    /// Blocks 1 and 3 of four slide (window 2), blocks 2 and 4 are global: the tensor path
    /// and the small-batch path agree; token 0 reaches the last position only through the
    /// global blocks, so it does.
    #[test]
    fn sliding_and_global_blocks_on_both_paths() {
        let m = tiny(4, 2, 2);
        assert_eq!(m.cfg.layer_attention(0), (10_000.0, Some(2)));
        assert_eq!(m.cfg.layer_attention(1), (1_000_000.0, None));
        let never = Stop::never();
        let ids = [3u32, 7, 11, 13, 17, 19, 23, 29, 31, 37];
        let full = m.forward(&ids, None, false, &never).expect("forward");
        let prefix = KvCache {
            tokens: ids[..6].to_vec(),
            positions: full.kv[..6].to_vec(),
        };
        let tail = m
            .forward(&ids, Some(&prefix), false, &never)
            .expect("forward_small");
        for p in 6..ids.len() {
            for l in 0..=4 {
                let d = max_diff(&row(&tail, p - 6, l, 16), &row(&full, p, l, 16));
                assert!(d < 1e-4, "position {p} layer {l}: {d}");
            }
        }
        let mut other = ids;
        other[0] = 5;
        let b = m.forward(&other, None, false, &never).expect("forward");
        let last = ids.len() - 1;
        assert!(max_diff(&row(&full, last, 4, 16), &row(&b, last, 4, 16)) > 1e-4);
    }

    /// A map kept only as its blocks and their kernel's copy (no dense f32 copy) multiplies any
    /// number of rows through the kernel, like the dense map up to the order of sums, and says
    /// so (no panic, no quantized fallback) when it cannot.
    #[test]
    fn a_linear_without_a_dense_copy_multiplies_through_its_kernel() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (n, k) = (40, 64);
        let w = Tensor::randn(0f32, 0.5, (n, k), &dev).expect("randn");
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
        let small = Matrix::from_q4_1(n, k, &q.data().expect("raw")).expect("matrix");
        let dense = Linear::dense(q.dequantize(&dev).expect("dequantize"), None);
        let only = Linear::new(QMatMul::QTensor(Arc::new(q)), None)
            .with_small(Some(small))
            .small_only();
        for t in [1, 3, 20, 130] {
            let x = Tensor::randn(0f32, 1.0, (1, t, k), &dev).expect("randn");
            let got = only.forward(&x).expect("forward");
            let want = dense.forward(&x).expect("forward");
            assert_eq!(got.dims(), [1, t, n]);
            let diff = (got - want)
                .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                .expect("diff");
            assert!(diff < 1e-4, "{t} rows: {diff}");
        }
        let wrong = Tensor::randn(0f32, 1.0, (1, 2, k + 1), &dev).expect("randn");
        assert!(only.forward(&wrong).is_err());
    }

    /// Embeddings looked up from the file's blocks are candle's dequantized rows, bit for bit,
    /// for every block type a GGUF embedding has here; an id outside the vocabulary is an
    /// error.
    #[test]
    fn quantized_embeddings_are_the_dequantized_rows() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let (vocab, hidden) = (50, 256);
        let e = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev).expect("randn");
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_1,
            GgmlDType::Q6K,
            GgmlDType::F32,
        ] {
            let q = Arc::new(QTensor::quantize(&e, dtype).expect("quantize"));
            let dense = Embeddings::Dense(q.dequantize(&dev).expect("dequantize"));
            let rows = Embeddings::Quantized(q);
            let ids = [0, 49, 7, 7, 23];
            let values = |e: &Embeddings| {
                e.rows(&ids, &dev)
                    .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                    .expect("rows")
            };
            let (got, want) = (values(&rows), values(&dense));
            assert_eq!(got.len(), ids.len() * hidden);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}");
            assert!(rows.rows(&[3, 50], &dev).is_err(), "{dtype:?}");
            assert!(rows.bytes() < hidden * vocab * 4 || dtype == GgmlDType::F32);
        }
    }

    #[test]
    fn masks() {
        let dev = Device::Cpu;
        let mask = |start, t, window| {
            causal_mask(start, t, 1, window, &dev)
                .expect("mask")
                .map(|m| m.to_vec2::<f32>().expect("values"))
        };
        let seen = |m: Vec<Vec<f32>>| -> Vec<Vec<usize>> {
            m.iter()
                .map(|r| (0..r.len()).filter(|&j| r[j] == 0.0).collect())
                .collect()
        };
        assert_eq!(mask(0, 1, None), None);
        assert_eq!(mask(3, 1, Some(8)), None, "the window holds every position");
        assert_eq!(
            mask(2, 1, Some(2)).map(seen),
            Some(vec![vec![1, 2]]),
            "one query after a cache"
        );
        assert_eq!(
            mask(0, 4, Some(2)).map(seen),
            Some(vec![vec![0], vec![0, 1], vec![1, 2], vec![2, 3]])
        );
        assert_eq!(
            mask(1, 2, None).map(seen),
            Some(vec![vec![0, 1], vec![0, 1, 2]])
        );
    }
}
