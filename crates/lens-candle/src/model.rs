//! A Llama-family decoder (Llama, Mistral, SmolLM, Qwen2) that captures its residual stream.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::Matrix;
use crate::Error;

/// How q/k rows are laid out for rotary embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeLayout {
    /// Rotate adjacent pairs (GGUF's permuted Llama weights; llama.cpp's "normal" rope).
    Interleaved,
    /// Rotate the two halves (HF weights; llama.cpp's "neox" rope).
    Halves,
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
        Ok(())
    }
}

/// Products of at most this many rows go through [`Matrix`] when a linear map has one.
const SMALL_ROWS: usize = 8;

/// A linear map, quantized or dense, with an optional bias.
pub(crate) struct Linear {
    w: QMatMul,
    /// The same weights for the exact small-batch kernel (the one or two tokens of an edit).
    small: Option<Matrix>,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(w: QMatMul, bias: Option<Tensor>) -> Self {
        Linear {
            w,
            small: None,
            bias,
        }
    }

    pub(crate) fn with_small(mut self, small: Option<Matrix>) -> Self {
        self.small = small;
        self
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match small_product(self.small.as_ref(), x)? {
            Some(y) => y,
            None => self.w.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x · Wᵀ` through the small-batch kernel, when `x` (`[t, k]`) has few rows.
fn small_product(m: Option<&Matrix>, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(m) = m else { return Ok(None) };
    let (t, k) = x.dims2()?;
    if t > SMALL_ROWS || k != m.k || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let rows = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(match m.matmul_nt(&rows) {
        Some(y) => Some(Tensor::from_vec(y, (t, m.n), x.device())?),
        None => None,
    })
}

pub(crate) struct Block {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

pub(crate) struct Model {
    pub cfg: Config,
    /// Token embeddings, dequantized: `[vocab, hidden]`.
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    /// The unembedding `W_U`, `[vocab, hidden]`.
    pub unembed: QMatMul,
    /// `W_Uᵀ`, `[hidden, vocab]` contiguous, when the unembedding is dense.
    pub unembed_t: Option<Tensor>,
    /// The unembedding for the small-batch kernel (readouts of fewer than 128 rows).
    pub unembed_small: Option<Matrix>,
    pub device: Device,
}

/// Keys and values of every block for the first `len` tokens of a prompt.
pub(crate) struct KvCache {
    pub tokens: Vec<u32>,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl KvCache {
    pub(crate) fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// What one forward pass produced.
pub(crate) struct Capture {
    /// `[layer][position][hidden]` for layers `0..=N`.
    pub resid: Vec<f32>,
    pub mid: Option<Vec<f32>>,
    pub cache: Arc<KvCache>,
}

impl Model {
    pub(crate) fn new(
        cfg: Config,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Tensor,
        unembed: QMatMul,
        device: Device,
    ) -> Result<Self, Error> {
        let unembed_t = match &unembed {
            QMatMul::Tensor(w) => Some(w.t()?.contiguous()?),
            _ => None,
        };
        // Dense weights are read in place by the small-batch kernel (no copy).
        let unembed_small = match &unembed {
            QMatMul::Tensor(w) => Matrix::from_f32(w),
            _ => None,
        };
        Ok(Model {
            cfg,
            embed,
            blocks,
            final_norm,
            unembed,
            unembed_t,
            unembed_small,
            device,
        })
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
    ) -> Result<Capture, Error> {
        let _span = tracing::debug_span!("forward", tokens = tokens.len()).entered();
        let start = prefix.map_or(0, |p| p.tokens.len());
        let new = &tokens[start..];
        let t = new.len();
        let cfg = &self.cfg;
        let ids = Tensor::new(new, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?; // [t, hidden]

        let mut layers: Vec<Vec<f32>> = Vec::with_capacity(cfg.n_layers + 1);
        let mut mids: Vec<Vec<f32>> = Vec::new();
        layers.push(x.flatten_all()?.to_vec1::<f32>()?);

        let (cos, sin) = self.rope_tables(start, t)?;
        let mask = causal_mask(start, t, cfg.n_heads / cfg.n_kv_heads, &self.device)?;
        let mut ks = Vec::with_capacity(cfg.n_layers);
        let mut vs = Vec::with_capacity(cfg.n_layers);
        for (i, b) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", i).entered();
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, cfg.rms_eps as f32)?;
            let (att, k, v) = self.attention(
                b,
                &h,
                &cos,
                &sin,
                mask.as_ref(),
                prefix.map(|p| (&p.k[i], &p.v[i])),
            )?;
            ks.push(k);
            vs.push(v);
            x = (x + att)?;
            if mid_block {
                mids.push(x.flatten_all()?.to_vec1::<f32>()?);
            }
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, cfg.rms_eps as f32)?;
            let mlp = b
                .down
                .forward(&(candle_nn::ops::silu(&b.gate.forward(&h)?)? * b.up.forward(&h)?)?)?;
            x = (x + mlp)?;
            layers.push(x.flatten_all()?.to_vec1::<f32>()?);
        }
        let cache = Arc::new(KvCache {
            tokens: tokens.to_vec(),
            k: ks,
            v: vs,
        });
        Ok(Capture {
            resid: layers.concat(),
            mid: mid_block.then(|| mids.concat()),
            cache,
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
        let (q, k) = match cfg.rope {
            RopeLayout::Interleaved => (
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            ),
            RopeLayout::Halves => (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            ),
        };
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let s = k.dim(2)?;
        // Group the query heads that share a KV head: [1, nkv, rep * t, hd].
        let rep = nh / nkv;
        let qg = q.reshape((1, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (qg.matmul(&k.t()?)? * scale)?; // [1, nkv, rep*t, s]
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [1, nkv, rep*t, hd]
        let out = out
            .reshape((1, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((t, nh * hd))?;
        debug_assert_eq!(s, k.dim(2)?);
        Ok((b.o.forward(&out)?, k, v))
    }

    /// cos/sin for positions `start..start + t`, computed in f32 as HF transformers does.
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor), Error> {
        let half = self.cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / self
                    .cfg
                    .rope_theta
                    .powf((2 * i) as f32 / self.cfg.head_dim as f32)
            })
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
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// `unembed(final_norm(rows))` or `rows · W_Uᵀ`.
    pub(crate) fn readout(&self, rows: &[f32], norm: bool) -> Result<Vec<f32>, Error> {
        let hidden = self.cfg.hidden;
        let n = rows.len() / hidden;
        if n == 0 {
            return Ok(Vec::new());
        }
        let x = Tensor::from_slice(rows, (n, hidden), &self.device)?;
        let x = if norm {
            candle_nn::ops::rms_norm(&x, &self.final_norm, self.cfg.rms_eps as f32)?
        } else {
            x
        };
        if n < 128 {
            if let Some(y) = self
                .unembed_small
                .as_ref()
                .and_then(|m| m.matmul_nt(&rows_of(&x)?))
            {
                return Ok(y);
            }
        }
        let logits = match &self.unembed {
            // Dense: multiply by the pre-transposed copy `[hidden, vocab]`, which the gemm
            // kernels stream through faster for large batches (measured: 4.4 s instead of
            // 4.9 s for the full lens of 256 tokens); small batches are faster on the view.
            QMatMul::Tensor(_) if n >= 128 => match &self.unembed_t {
                Some(wt) => x.matmul(wt)?,
                None => self.unembed.forward(&x)?,
            },
            _ => self.unembed.forward(&x)?,
        };
        Ok(logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }
}

fn rows_of(x: &Tensor) -> Option<Vec<f32>> {
    x.flatten_all().ok()?.to_vec1::<f32>().ok()
}

/// Additive mask for `t` new queries after `start` cached positions, repeated for the `rep`
/// query heads grouped on each KV head: `[rep * t, start + t]`. `None` for a single query.
fn causal_mask(
    start: usize,
    t: usize,
    rep: usize,
    device: &Device,
) -> Result<Option<Tensor>, Error> {
    if t == 1 {
        return Ok(None);
    }
    let s = start + t;
    let mut m = Vec::with_capacity(rep * t * s);
    for _ in 0..rep {
        for i in 0..t {
            m.extend((0..s).map(|j| {
                if j <= start + i {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (rep * t, s), device)?))
}
