//! Loading a Llama-family (Llama, Mistral, Qwen2, Qwen3) or Gemma 3 model from a GGUF file
//! (candle's reader).

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

use crate::hf::expect_dims;
use crate::kernels::{BlockKind, Matrix};
use crate::model::{
    Activation, Block, Config, Embeddings, Linear, Model, NormKind, RopeLayout, SlidingWindow,
};
use crate::tokenizer::ModelTokenizer;
use crate::{Error, Precision};

pub(crate) fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

pub(crate) struct Loaded {
    pub model: Model,
    pub tokenizer: ModelTokenizer,
    pub name: String,
    pub precision: String,
}

pub(crate) fn load(path: &Path, precision: Precision, device: &Device) -> Result<Loaded, Error> {
    let display = path.display().to_string();
    let io = |source| Error::Io {
        path: display.clone(),
        source,
    };
    // Every number of the header checked before candle allocates on its word.
    lens_gguf::check_file(path).map_err(|e| match e {
        e if e.is_truncated() => Error::Truncated {
            path: display.clone(),
            detail: e.to_string(),
        },
        e => Error::Format(format!("{display}: {e}")),
    })?;
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| match e {
        candle_core::Error::Io(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::Truncated {
                path: display.clone(),
                detail: "the header ends early".into(),
            }
        }
        e => Error::Format(format!("{display}: {e}")),
    })?;

    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::Format("the GGUF file has no general.architecture".into()))?;
    let gpt2 = arch == "gpt2";
    let rope = match arch.as_str() {
        "llama" | "mistral" => RopeLayout::Interleaved,
        // Gemma's q/k rows are not permuted (llama.cpp's NEOX rope).
        "qwen2" | "qwen3" | "gemma3" => RopeLayout::Halves,
        "gpt2" => RopeLayout::Learned,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let get = |key: &str| -> Result<&Value, Error> {
        md.get(&format!("{arch}.{key}"))
            .ok_or_else(|| Error::Format(format!("missing metadata `{arch}.{key}`")))
    };
    let get_usize = |key: &str| -> Result<usize, Error> {
        let v = get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map(|x| x as usize)
            .map_err(|_| Error::Format(format!("`{arch}.{key}` is not an integer")))
    };
    let get_f32 = |key: &str, default: f32| -> f32 {
        get(key)
            .ok()
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(default)
    };

    let hidden = get_usize("embedding_length")?;
    let n_heads = get_usize("attention.head_count")?;
    let n_kv_heads = get_usize("attention.head_count_kv").unwrap_or(n_heads);
    let embed_info = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::Format("missing tensor token_embd.weight".into()))?;
    let vocab = embed_info.shape.dims().first().copied().unwrap_or(0);
    let gemma = arch == "gemma3";
    // Per-head q/k norms: Gemma 3 and Qwen3.
    let qk_norms = gemma || arch == "qwen3";
    let cfg = Config {
        architecture: arch.clone(),
        n_layers: get_usize("block_count")?,
        hidden,
        n_heads,
        n_kv_heads,
        head_dim: get_usize("rope.dimension_count")
            .or_else(|_| get_usize("attention.key_length"))
            .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
        vocab,
        rms_eps: f64::from(match gpt2 {
            true => get_f32("attention.layer_norm_epsilon", 1e-5),
            false => get_f32("attention.layer_norm_rms_epsilon", 1e-5),
        }),
        rope_theta: get_f32("rope.freq_base", 10_000.0),
        context: get_usize("context_length").unwrap_or(2048),
        rope,
        // Gemma 3 (as llama.cpp and transformers define it): embeddings scaled by √hidden,
        // GELU, and five sliding-window blocks (RoPE base 10k) before each global one.
        embed_scale: gemma.then(|| (hidden as f32).sqrt()),
        activation: match gemma || gpt2 {
            true => Activation::GeluTanh,
            false => Activation::Silu,
        },
        norm: match gpt2 {
            true => NormKind::Layer,
            false => NormKind::Rms,
        },
        sliding: match gemma {
            true => Some(SlidingWindow {
                window: get_usize("attention.sliding_window")?,
                rope_theta: 10_000.0,
                period: 6,
            }),
            false => None,
        },
    };
    cfg.validate()?;
    if let Ok(v) = get("rope.scaling.type") {
        if v.to_string().map(|s| s != "none").unwrap_or(true) {
            return Err(Error::Unsupported("RoPE scaling is not implemented".into()));
        }
    }

    let tokenizer = ModelTokenizer::from_gguf(&content)?;
    if tokenizer.vocab_size() > vocab {
        return Err(Error::Format(format!(
            "the tokenizer has {} tokens but the embedding only {vocab}",
            tokenizer.vocab_size()
        )));
    }

    let mut r = TensorReader {
        content: &content,
        reader: &mut reader,
        device,
    };
    let dense = precision == Precision::F32;
    let embed_q = Arc::new(r.qtensor("token_embd.weight")?);
    // The unembedding is exact f32 on both paths: the lens reads out up to hundreds of rows at
    // a time, where f32 GEMM beats candle's row-by-row quantized kernel, and the readout then
    // adds no error of its own. In panels (see `kernels`) it takes every readout and needs no
    // dense copy; else a dense copy, which tied embeddings share.
    let panels = |m: &Option<Matrix>| m.as_ref().is_some_and(Matrix::fast_for_batches);
    // Looked up from the file's blocks where nothing needs the dense matrix (on the CPU).
    let rows = |q: &Arc<QTensor>| -> Result<Embeddings, Error> {
        Ok(match device.is_cpu() {
            true => Embeddings::Quantized(q.clone()),
            false => Embeddings::Dense(q.dequantize(device)?),
        })
    };
    let (unembed, unembed_small, embed) = match content.tensor_infos.contains_key("output.weight") {
        true => {
            let q = r.qtensor("output.weight")?;
            let small = small_matrix(&q);
            let unembed = match panels(&small) {
                true => QMatMul::QTensor(Arc::new(q)),
                false => matmul_from(Arc::new(q), true)?,
            };
            (unembed, small, rows(&embed_q)?)
        }
        false => {
            let small = small_matrix(&embed_q);
            match panels(&small) {
                true => (QMatMul::QTensor(embed_q.clone()), small, rows(&embed_q)?),
                false => {
                    let embed = embed_q.dequantize(device)?;
                    (
                        QMatMul::Tensor(embed.clone()),
                        small,
                        Embeddings::Dense(embed),
                    )
                }
            }
        }
    };
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let types = weight_types(&content);
    let precision = match precision {
        Precision::F32 => format!("f32 (dequantized from {types})"),
        // `CandleBackend::load` admits only f32 and fast.
        _ => format!("quantized matmuls ({types})"),
    };
    if gpt2 {
        let model = gpt2_blocks(cfg, &mut r, embed, unembed, dense, device)?;
        return Ok(Loaded {
            model: model.with_small_unembed(unembed_small),
            tokenizer,
            name,
            precision,
        });
    }
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("blk.{i}");
        // Gemma's and Qwen3's extra norms. Gemma's file stores `1 + w` (transformers'
        // `x * (1 + w)`), so every norm is a plain RMSNorm with the file's weights.
        let mut norm_if = |yes: bool, n: &str| -> Result<Option<Tensor>, Error> {
            match yes {
                true => r.dense(&format!("{p}.{n}.weight")).map(Some),
                false => Ok(None),
            }
        };
        let (q_norm, k_norm, post_attn_norm, post_ffn_norm) = (
            norm_if(qk_norms, "attn_q_norm")?,
            norm_if(qk_norms, "attn_k_norm")?,
            norm_if(gemma, "post_attention_norm")?,
            norm_if(gemma, "post_ffw_norm")?,
        );
        let lin = |r: &mut TensorReader<'_, _>, n: &str| r.linear(&format!("{p}.{n}"), dense);
        blocks.push(Block {
            attn_norm: r.dense(&format!("{p}.attn_norm.weight"))?,
            q: lin(&mut r, "attn_q")?,
            k: lin(&mut r, "attn_k")?,
            v: lin(&mut r, "attn_v")?,
            o: lin(&mut r, "attn_output")?,
            ffn_norm: r.dense(&format!("{p}.ffn_norm.weight"))?,
            gate: Some(lin(&mut r, "ffn_gate")?),
            attn_norm_bias: None,
            ffn_norm_bias: None,
            up: lin(&mut r, "ffn_up")?,
            down: lin(&mut r, "ffn_down")?,
            q_norm,
            k_norm,
            post_attn_norm,
            post_ffn_norm,
        });
    }
    let final_norm = r.dense("output_norm.weight")?;
    Ok(Loaded {
        model: Model::new(cfg, embed, blocks, final_norm, unembed, device.clone())?
            .with_small_unembed(unembed_small),
        tokenizer,
        name,
        precision,
    })
}

/// GPT-2 in llama.cpp's layout: LayerNorms with biases (`attn_norm`, `ffn_norm`,
/// `output_norm`), the fused `attn_qkv` `[3·hidden, hidden]` split into q, k, v by rows (dense:
/// a quantized block may straddle the split), a plain MLP `ffn_up` / `ffn_down` with biases,
/// learned positions `position_embd`.
fn gpt2_blocks<R: Read + Seek>(
    cfg: Config,
    r: &mut TensorReader<'_, R>,
    embed: Embeddings,
    unembed: QMatMul,
    dense: bool,
    device: &Device,
) -> Result<Model, Error> {
    let h = cfg.hidden;
    let positions = r.dense("position_embd.weight")?;
    expect_dims(&positions, &[cfg.context, h], "position_embd.weight")?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("blk.{i}");
        let qkv = r.dense(&format!("{p}.attn_qkv.weight"))?;
        expect_dims(&qkv, &[3 * h, h], "attn_qkv.weight")?;
        let qkv_b = r.dense(&format!("{p}.attn_qkv.bias"))?;
        expect_dims(&qkv_b, &[3 * h], "attn_qkv.bias")?;
        let part = |j: usize| -> Result<Linear, Error> {
            let w = qkv.narrow(0, j * h, h)?.contiguous()?;
            let b = qkv_b.narrow(0, j * h, h)?.contiguous()?;
            Ok(Linear::dense(w, Some(b)))
        };
        blocks.push(Block {
            attn_norm: r.dense(&format!("{p}.attn_norm.weight"))?,
            attn_norm_bias: Some(r.dense(&format!("{p}.attn_norm.bias"))?),
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            o: r.linear(&format!("{p}.attn_output"), dense)?,
            ffn_norm: r.dense(&format!("{p}.ffn_norm.weight"))?,
            ffn_norm_bias: Some(r.dense(&format!("{p}.ffn_norm.bias"))?),
            gate: None,
            up: r.linear(&format!("{p}.ffn_up"), dense)?,
            down: r.linear(&format!("{p}.ffn_down"), dense)?,
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            post_ffn_norm: None,
        });
    }
    let final_norm = r.dense("output_norm.weight")?;
    let final_bias = r.dense("output_norm.bias")?;
    Ok(
        Model::new(cfg, embed, blocks, final_norm, unembed, device.clone())?
            .with_gpt2_parts(final_bias, positions),
    )
}

fn weight_types(content: &Content) -> String {
    let mut types: Vec<String> = content
        .tensor_infos
        .values()
        .filter(|i| i.shape.rank() == 2)
        .map(|i| format!("{:?}", i.ggml_dtype).to_lowercase())
        .collect();
    types.sort();
    types.dedup();
    types.join("/")
}

fn matmul_from(q: Arc<QTensor>, dense: bool) -> Result<QMatMul, Error> {
    if dense {
        return Ok(QMatMul::Tensor(q.dequantize(&q.device())?));
    }
    match q.dtype() {
        // candle has SIMD kernels for Q4_0, Q8_0 and the K-quants only. Other types are
        // requantized to Q8_0 (error far below their own quantization step), which keeps the
        // fast path fast; the f32 path is the reference.
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1 => {
            let dense = q.dequantize(&q.device())?;
            Ok(QMatMul::from_qtensor(QTensor::quantize(
                &dense,
                GgmlDType::Q8_0,
            )?)?)
        }
        _ => Ok(QMatMul::from_arc(q)?),
    }
}

/// The exact small-batch kernel's copy of a quantized weight (the types it reads in place).
fn small_matrix(q: &QTensor) -> Option<Matrix> {
    if !q.device().is_cpu() {
        return None;
    }
    let (n, k) = q.shape().dims2().ok()?;
    let raw = q.data().ok()?;
    match q.dtype() {
        GgmlDType::Q4_1 => Matrix::from_q4_1(n, k, &raw),
        GgmlDType::Q8_0 => Matrix::from_q8_0(n, k, &raw),
        GgmlDType::Q5_0 => Matrix::from_blocks(n, k, &raw, BlockKind::Q5_0),
        GgmlDType::Q4K => Matrix::from_blocks(n, k, &raw, BlockKind::Q4K),
        GgmlDType::Q6K => Matrix::from_blocks(n, k, &raw, BlockKind::Q6K),
        _ => None,
    }
}

struct TensorReader<'a, R> {
    content: &'a Content,
    reader: &'a mut R,
    device: &'a Device,
}

impl<R: Read + Seek> TensorReader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor, Error> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::Format(format!("missing tensor `{name}`")));
        }
        Ok(self.content.tensor(self.reader, name, self.device)?)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor, Error> {
        Ok(self.qtensor(name)?.dequantize(self.device)?)
    }

    fn optional(&mut self, name: &str) -> Result<Option<Tensor>, Error> {
        match self.content.tensor_infos.contains_key(name) {
            true => self.dense(name).map(Some),
            false => Ok(None),
        }
    }

    /// The linear layer `name` (`name.weight`, and `name.bias` if the file has one).
    fn linear(&mut self, name: &str, dense: bool) -> Result<Linear, Error> {
        let bias = self.optional(&format!("{name}.bias"))?;
        let q = self.qtensor(&format!("{name}.weight"))?;
        // The f32 path multiplies the few rows of an edit straight from the blocks.
        let small = if dense { small_matrix(&q) } else { None };
        if small.as_ref().is_some_and(Matrix::fast_for_batches) {
            // Panels take every product of this matrix: no dense copy (SmolLM2's blocks: 424 MB).
            let w = QMatMul::QTensor(Arc::new(q));
            return Ok(Linear::new(w, bias).with_small(small).small_only());
        }
        let w = matmul_from(Arc::new(q), dense)?;
        // Other types (f32, f16, Q4_0, Q5_1, Q2_K…) are read from their dense f32 copy.
        let small = match (&w, small) {
            (QMatMul::Tensor(t), None) => Matrix::from_f32(t),
            (_, small) => small,
        };
        Ok(Linear::new(w, bias).with_small(small))
    }
}
