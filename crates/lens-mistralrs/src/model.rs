//! The capture forward: the Llama family (llama, mistral, qwen2, qwen3) built from mistral.rs's public
//! blocks (`QRmsNorm`, `RotaryEmbedding`, `CausalMasker`, `repeat_kv`, `MatMul` over
//! `mistralrs_quant` linear layers), reading the weights from the GGUF file or the HF folder's
//! safetensors (through [`Weights`], by their GGUF names), and recording the
//! residual stream at every block boundary. mistral.rs 0.8.1 keeps its models' hidden states
//! private, so this is the per-layer view of the same arithmetic its quantized Llama runs.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use lens_core::Stop;
use lens_models::hf::{safetensors_files, HfConfig, HfError};
use mistralrs::core::layers::{repeat_kv, CausalMasker, MatMul, QRmsNorm, RotaryEmbedding};
use mistralrs_quant::{
    GgufMatMul, QuantMethod, QuantMethodConfig, QuantizeOntoGuard, UnquantLinear,
};

use crate::{Error, Precision};

/// Architectures as GGUF files name them (`general.architecture`).
pub(crate) const ARCHITECTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub architecture: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub context: usize,
    /// GGUF's llama stores q/k rows permuted so that RoPE rotates adjacent pairs; qwen2 rotates
    /// the two halves of a head (GPT-NeoX style).
    pub neox_rope: bool,
    /// Qwen3: an RMSNorm over each query and key head before RoPE.
    pub qk_norm: bool,
}

/// A linear layer as mistral.rs runs it: the file's blocks through `GgufMatMul` (fast), or the
/// same weights dequantized to f32 (the reference numbers).
struct Linear(Arc<dyn QuantMethod>);

impl Linear {
    fn new(
        q: QTensor,
        bias: Option<Tensor>,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, Error> {
        let q = match precision {
            Precision::F32 => {
                let dense = q.dequantize(device)?;
                QTensor::quantize(&dense, GgmlDType::F32)?
            }
            _ => q,
        };
        let m = GgufMatMul::new(QuantMethodConfig::Gguf {
            q_weight: Arc::new(q),
            b: bias,
        })?;
        Ok(Linear(Arc::new(m)))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(MatMul.qmethod_matmul(x, &*self.0)?)
    }
}

struct Block {
    attn_norm: QRmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: QRmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Qwen3's per-head norms of the queries and keys.
    q_norm: Option<QRmsNorm>,
    k_norm: Option<QRmsNorm>,
}

/// Keys and values of every block for the positions of one prompt (after RoPE), each
/// `(1, n_kv_heads, positions, head_dim)`.
#[derive(Clone)]
pub(crate) struct KvCache {
    pub tokens: Vec<u32>,
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// The first `n` positions (views of the same storage).
    pub fn prefix(&self, n: usize) -> Result<KvCache, Error> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))
            .collect::<Result<_, Error>>()?;
        Ok(KvCache {
            tokens: self.tokens[..n].to_vec(),
            layers,
        })
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// What one forward pass captured for its new positions.
pub(crate) struct Capture {
    /// Per new position: `[layer][hidden]` for layers `0..=n_layers`.
    pub resid: Vec<Vec<f32>>,
    /// Per new position: `[block - 1][hidden]`, when asked for.
    pub mid: Option<Vec<Vec<f32>>>,
    pub kv: KvCache,
}

pub(crate) struct Model {
    /// Where the weights live and the forward runs (the CPU, or a GPU in a build with the
    /// `cuda`/`metal` feature); captured rows come back to the host.
    device: Device,
    pub cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: QRmsNorm,
    unembed: Linear,
    rope: RotaryEmbedding,
}

fn metadata_str(md: &std::collections::HashMap<String, Value>, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// The GGUF file's header and config, and whether this forward can run it.
pub(crate) fn read_config(path: &Path) -> Result<(Content, Config), Error> {
    let display = path.display().to_string();
    let io = |source| Error::Io {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    let content =
        Content::read(&mut reader).map_err(|e| Error::Format(format!("{display}: {e}")))?;
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let bytes =
            (info.shape.elem_count() / dtype.block_size()) as u64 * dtype.type_size() as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > file_len {
            return Err(Error::Format(format!(
                "{display} is truncated: tensor `{name}` ends at byte {end} but the file has {file_len}"
            )));
        }
    }
    let md = &content.metadata;
    let arch = metadata_str(md, "general.architecture")
        .ok_or_else(|| Error::Format("the GGUF file has no general.architecture".into()))?;
    let neox_rope = match arch.as_str() {
        "llama" | "mistral" => false,
        "qwen2" | "qwen3" => true,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    let get = |key: &str| md.get(&format!("{arch}.{key}"));
    let get_usize = |key: &str| -> Result<usize, Error> {
        let v = get(key).ok_or_else(|| Error::Format(format!("missing `{arch}.{key}`")))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map(|x| x as usize)
            .map_err(|_| Error::Format(format!("`{arch}.{key}` is not an integer")))
    };
    let get_f32 =
        |key: &str, default: f32| get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default);
    if let Some(v) = get("rope.scaling.type") {
        if v.to_string().map(|s| s != "none").unwrap_or(true) {
            return Err(Error::Format("RoPE scaling is not implemented".into()));
        }
    }
    let hidden = get_usize("embedding_length")?;
    let n_heads = get_usize("attention.head_count")?;
    let n_kv_heads = get_usize("attention.head_count_kv").unwrap_or(n_heads);
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|i| i.shape.dims().first().copied())
        .ok_or_else(|| Error::Format("missing tensor token_embd.weight".into()))?;
    let head_dim = hidden.checked_div(n_heads).unwrap_or(0);
    let cfg = Config {
        architecture: arch.clone(),
        n_layers: get_usize("block_count")?,
        hidden,
        n_heads,
        n_kv_heads,
        // Qwen3 has a head dimension of its own (not hidden / heads): `attention.key_length`.
        head_dim: get_usize("attention.key_length")
            .or_else(|_| get_usize("rope.dimension_count"))
            .unwrap_or(head_dim),
        vocab,
        rms_eps: get_f32("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: get_f32("rope.freq_base", 10_000.0),
        context: get_usize("context_length").unwrap_or(4096),
        neox_rope,
        qk_norm: arch == "qwen3",
    };
    check_shape(&cfg)?;
    Ok((content, cfg))
}

/// The dimensions agree with one another.
fn check_shape(cfg: &Config) -> Result<(), Error> {
    let valid = cfg.n_layers > 0
        && cfg.hidden > 0
        && cfg.n_heads > 0
        && cfg.n_kv_heads > 0
        && cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
        && (cfg.qk_norm || cfg.head_dim * cfg.n_heads == cfg.hidden)
        && cfg.head_dim > 0
        && cfg.head_dim.is_multiple_of(2)
        && cfg.vocab > 0
        && cfg.context > 0;
    if !valid {
        return Err(Error::Format(format!("inconsistent model shape: {cfg:?}")));
    }
    Ok(())
}

/// An HF folder's `config.json` as the capture forward's config, and whether the embeddings
/// are tied; what this forward cannot run is refused here, before mistral.rs reads the folder.
pub(crate) fn read_folder_config(dir: &Path) -> Result<(Config, bool), Error> {
    let display = dir.join("config.json").display().to_string();
    let c = HfConfig::read(dir).map_err(hf_error)?;
    let arch = c
        .model_type
        .clone()
        .ok_or_else(|| Error::Format(format!("{display} has no model_type")))?;
    let neox_rope = match arch.as_str() {
        // HF checkpoints keep q/k rows as trained: RoPE rotates the two halves of a head.
        "llama" | "mistral" | "qwen2" | "qwen3" => true,
        other => return Err(Error::UnsupportedArchitecture(other.to_string())),
    };
    if let Some(kind) = c.rope_scaling() {
        return Err(Error::Format(format!(
            "{display}: RoPE scaling ({kind}) is not implemented"
        )));
    }
    let (hidden, n_heads) = (c.hidden_size, c.num_attention_heads);
    let cfg = Config {
        n_layers: c.num_hidden_layers,
        hidden,
        n_heads,
        n_kv_heads: c.num_key_value_heads.unwrap_or(n_heads),
        head_dim: c
            .head_dim
            .unwrap_or(hidden.checked_div(n_heads).unwrap_or(0)),
        vocab: c.vocab_size,
        rms_eps: c.rms_norm_eps.unwrap_or(1e-6) as f32,
        rope_theta: c.rope_theta(),
        context: c.max_position_embeddings.unwrap_or(4096),
        neox_rope,
        qk_norm: arch == "qwen3",
        architecture: arch,
    };
    check_shape(&cfg)?;
    Ok((cfg, c.tie_word_embeddings))
}

/// The shared folder reader's errors as this crate's.
fn hf_error(e: HfError) -> Error {
    match e {
        HfError::Io { path, source } => Error::Io { path, source },
        HfError::Format(message) => Error::Format(message),
    }
}

/// Where the capture forward's weights come from, by their GGUF names (`blk.3.attn_q`,
/// `output_norm`): a GGUF file's tensors, or an HF folder's safetensors under their HF names.
trait Weights {
    /// A matrix `[out, in]` (and its bias, if the model has one) as mistral.rs runs it.
    fn linear(&mut self, name: &str) -> Result<Linear, Error>;
    fn norm(&mut self, name: &str, eps: f32) -> Result<QRmsNorm, Error>;
    /// The token embeddings, dense.
    fn embed(&mut self) -> Result<Tensor, Error>;
    /// The unembedding (the embeddings when tied).
    fn unembed(&mut self) -> Result<Linear, Error>;
}

struct Reader<'a, R> {
    content: &'a Content,
    reader: R,
    device: &'a Device,
    precision: Precision,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor, Error> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(Error::Format(format!("missing tensor `{name}`")));
        }
        Ok(self.content.tensor(&mut self.reader, name, self.device)?)
    }

    fn optional_dense(&mut self, name: &str) -> Result<Option<Tensor>, Error> {
        match self.content.tensor_infos.contains_key(name) {
            true => {
                let device = self.device;
                Ok(Some(self.qtensor(name)?.dequantize(device)?))
            }
            false => Ok(None),
        }
    }
}

impl<R: Read + Seek> Weights for Reader<'_, R> {
    fn linear(&mut self, name: &str) -> Result<Linear, Error> {
        let bias = self.optional_dense(&format!("{name}.bias"))?;
        let weight = self.qtensor(&format!("{name}.weight"))?;
        Linear::new(weight, bias, self.precision, self.device)
    }

    fn norm(&mut self, name: &str, eps: f32) -> Result<QRmsNorm, Error> {
        Ok(QRmsNorm::new(
            self.qtensor(&format!("{name}.weight"))?,
            eps,
        )?)
    }

    fn embed(&mut self) -> Result<Tensor, Error> {
        let device = self.device;
        Ok(self.qtensor("token_embd.weight")?.dequantize(device)?)
    }

    fn unembed(&mut self) -> Result<Linear, Error> {
        let name = match self.content.tensor_infos.contains_key("output.weight") {
            true => "output.weight",
            false => "token_embd.weight",
        };
        let q = self.qtensor(name)?;
        Linear::new(q, None, self.precision, self.device)
    }
}

/// An HF folder's weights (`model.safetensors` or its shards), under their HF names.
struct Folder<'a> {
    tensors: candle_core::safetensors::MmapedSafetensors,
    device: &'a Device,
    precision: Precision,
    /// Quantize each linear layer as mistral.rs's in-situ quantization does.
    isq: Option<mistralrs_quant::IsqType>,
    tied: bool,
}

impl Folder<'_> {
    /// The HF name of a GGUF-named tensor of the Llama family.
    fn hf_name(name: &str) -> String {
        let Some(rest) = name.strip_prefix("blk.") else {
            return match name {
                "output_norm" => "model.norm".into(),
                other => other.into(),
            };
        };
        let (block, part) = rest.split_once('.').unwrap_or((rest, ""));
        let part = match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            other => other,
        };
        format!("model.layers.{block}.{part}")
    }

    fn dense(&self, name: &str) -> Result<Tensor, Error> {
        let t = self
            .tensors
            .load(name, self.device)
            .map_err(|e| Error::Format(format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(DType::F32)?)
    }

    fn optional(&self, name: &str) -> Result<Option<Tensor>, Error> {
        match self.tensors.get(name) {
            Ok(_) => Ok(Some(self.dense(name)?)),
            Err(_) => Ok(None),
        }
    }

    fn linear_of(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Linear, Error> {
        match (self.precision, self.isq) {
            (Precision::Fast, Some(isq)) => {
                let dense = UnquantLinear::new(QuantMethodConfig::Unquantized(
                    candle_nn::Linear::new(weight, bias),
                ))?;
                let quantized = Arc::new(dense).apply_isq(
                    Some(isq),
                    self.device.clone(),
                    &std::sync::atomic::AtomicUsize::new(0),
                    None,
                    QuantizeOntoGuard::new(),
                )?;
                Ok(Linear(quantized))
            }
            _ => Linear::new(
                QTensor::quantize(&weight, GgmlDType::F32)?,
                bias,
                Precision::F32,
                self.device,
            ),
        }
    }
}

impl Weights for Folder<'_> {
    fn linear(&mut self, name: &str) -> Result<Linear, Error> {
        let name = Self::hf_name(name);
        let weight = self.dense(&format!("{name}.weight"))?;
        let bias = self.optional(&format!("{name}.bias"))?;
        self.linear_of(weight, bias)
    }

    fn norm(&mut self, name: &str, eps: f32) -> Result<QRmsNorm, Error> {
        let w = self.dense(&format!("{}.weight", Self::hf_name(name)))?;
        Ok(QRmsNorm::new(QTensor::quantize(&w, GgmlDType::F32)?, eps)?)
    }

    fn embed(&mut self) -> Result<Tensor, Error> {
        self.dense("model.embed_tokens.weight")
    }

    fn unembed(&mut self) -> Result<Linear, Error> {
        let name = match self.tied {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        };
        let weight = self.dense(name)?;
        self.linear_of(weight, None)
    }
}

impl Model {
    /// The capture forward over a GGUF file's tensors.
    pub fn load(
        path: &Path,
        content: &Content,
        cfg: Config,
        precision: Precision,
        device: &Device,
    ) -> Result<Model, Error> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut r = Reader {
            content,
            reader: BufReader::new(file),
            device,
            precision,
        };
        Model::build(cfg, &mut r, device)
    }

    /// The capture forward over an HF folder's safetensors: f32 (or `fast` without ISQ) as
    /// they are, `fast` with `isq` quantized as mistral.rs's ISQ quantizes its own copy.
    pub fn load_folder(
        dir: &Path,
        cfg: Config,
        tied: bool,
        precision: Precision,
        isq: Option<mistralrs_quant::IsqType>,
        device: &Device,
    ) -> Result<Model, Error> {
        let files = safetensors_files(dir).map_err(hf_error)?;
        if files.is_empty() {
            return Err(Error::Format(format!(
                "{} has no *.safetensors",
                dir.display()
            )));
        }
        // SAFETY: the files are mapped read-only and not written while the model lives (the
        // same contract as candle's and mistral.rs's own loaders).
        #[allow(unsafe_code)]
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let mut folder = Folder {
            tensors,
            device,
            precision,
            isq,
            tied,
        };
        Model::build(cfg, &mut folder, device)
    }

    fn build(cfg: Config, w: &mut dyn Weights, device: &Device) -> Result<Model, Error> {
        let embed = w.embed()?;
        let unembed = w.unembed()?;
        let eps = cfg.rms_eps;
        let norm = |w: &mut dyn Weights, name: &str| w.norm(name, eps);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |n: &str| format!("blk.{i}.{n}");
            let (q, k, v, o) = (
                w.linear(&p("attn_q"))?,
                w.linear(&p("attn_k"))?,
                w.linear(&p("attn_v"))?,
                w.linear(&p("attn_output"))?,
            );
            let (gate, up, down) = (
                w.linear(&p("ffn_gate"))?,
                w.linear(&p("ffn_up"))?,
                w.linear(&p("ffn_down"))?,
            );
            let (q_norm, k_norm) = match cfg.qk_norm {
                true => (
                    Some(norm(w, &p("attn_q_norm"))?),
                    Some(norm(w, &p("attn_k_norm"))?),
                ),
                false => (None, None),
            };
            blocks.push(Block {
                attn_norm: norm(w, &p("attn_norm"))?,
                q,
                k,
                v,
                o,
                ffn_norm: norm(w, &p("ffn_norm"))?,
                gate,
                up,
                down,
                q_norm,
                k_norm,
            });
        }
        let final_norm = norm(w, "output_norm")?;
        let rope = RotaryEmbedding::new(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.context,
            device,
            cfg.neox_rope,
            DType::F32,
        )?;
        Ok(Model {
            device: device.clone(),
            cfg,
            embed,
            blocks,
            final_norm,
            unembed,
            rope,
        })
    }

    /// Run `tokens` (the whole prompt) through the model, reusing `prefix`'s keys and values
    /// for its positions, and capture the residual stream of the new positions.
    pub fn forward(
        &self,
        tokens: &[u32],
        prefix: Option<&KvCache>,
        mid_block: bool,
        stop: &Stop,
    ) -> Result<Capture, Error> {
        let past = prefix.map_or(0, |kv| kv.tokens.len());
        let new = &tokens[past..];
        let (n, hidden) = (new.len(), self.cfg.hidden);
        let cfg = &self.cfg;
        let ids = Tensor::new(new, &self.device)?;
        {
            let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
            let mut resid: Vec<Vec<f32>> = (0..n)
                .map(|_| Vec::with_capacity((cfg.n_layers + 1) * hidden))
                .collect();
            let mut mid: Option<Vec<Vec<f32>>> = mid_block.then(|| {
                (0..n)
                    .map(|_| Vec::with_capacity(cfg.n_layers * hidden))
                    .collect()
            });
            let record = |rows: &mut Vec<Vec<f32>>, x: &Tensor| -> Result<(), Error> {
                let flat = x.flatten_all()?.to_vec1::<f32>()?;
                for (row, chunk) in rows.iter_mut().zip(flat.chunks_exact(hidden)) {
                    row.extend_from_slice(chunk);
                }
                Ok(())
            };
            record(&mut resid, &x)?;
            // The mask of the new positions over all positions (none for a single token).
            let past_lens: &[usize] = &[past];
            let mask = CausalMasker.make_causal_mask_matrix(
                &ids.unsqueeze(0)?,
                &past_lens,
                DType::F32,
                cfg.n_heads,
            )?;
            let mut kv_out = Vec::with_capacity(cfg.n_layers);
            for (i, block) in self.blocks.iter().enumerate() {
                if stop.is_stopped() {
                    return Err(Error::Stopped);
                }
                let h = block.attn_norm.forward(&x)?;
                let q = block.q.forward(&h)?;
                let k = block.k.forward(&h)?;
                let v = block.v.forward(&h)?;
                let heads = |t: Tensor, n_h: usize| -> Result<Tensor, Error> {
                    Ok(t.reshape((1, n, n_h, cfg.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let mut q = heads(q, cfg.n_heads)?;
                let mut k = heads(k, cfg.n_kv_heads)?;
                let v = heads(v, cfg.n_kv_heads)?;
                if let (Some(qn), Some(kn)) = (&block.q_norm, &block.k_norm) {
                    q = qn.forward(&q)?;
                    k = kn.forward(&k)?;
                }
                let (q, k) = self.rope.forward(&q, &k, &[past])?;
                let (k, v) = match prefix {
                    Some(kv) => {
                        let (pk, pv) = &kv.layers[i];
                        (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?)
                    }
                    None => (k, v),
                };
                kv_out.push((k.clone(), v.clone()));
                let rep = cfg.n_heads / cfg.n_kv_heads;
                let k = repeat_kv(k, rep)?.contiguous()?;
                let v = repeat_kv(v, rep)?.contiguous()?;
                let scale = 1.0 / (cfg.head_dim as f64).sqrt();
                let mut att = (q.matmul(&k.t()?)? * scale)?;
                if let Some(mask) = &mask {
                    att = att.broadcast_add(mask)?;
                }
                let att = att.broadcast_sub(&att.max_keepdim(D::Minus1)?)?.exp()?;
                let att = att.broadcast_div(&att.sum_keepdim(D::Minus1)?)?;
                let y =
                    att.matmul(&v)?
                        .transpose(1, 2)?
                        .reshape((1, n, cfg.n_heads * cfg.head_dim))?;
                x = (block.o.forward(&y)? + &x)?;
                if let Some(mid) = mid.as_mut() {
                    record(mid, &x)?;
                }
                let h = block.ffn_norm.forward(&x)?;
                let g = block.gate.forward(&h)?.silu()?;
                let u = block.up.forward(&h)?;
                x = (block.down.forward(&(g * u)?)? + &x)?;
                record(&mut resid, &x)?;
            }
            Ok(Capture {
                resid,
                mid,
                kv: KvCache {
                    tokens: tokens.to_vec(),
                    layers: kv_out,
                },
            })
        }
    }

    /// The lens readout of `rows` (row-major, `hidden` each): the final norm when `norm`, then
    /// the unembedding.
    pub fn readout(&self, rows: &[f32], norm: bool) -> Result<Vec<f32>, Error> {
        let n = rows.len() / self.cfg.hidden;
        let x = Tensor::from_slice(rows, (1, n, self.cfg.hidden), &self.device)?;
        let x = match norm {
            true => self.final_norm.forward(&x)?,
            false => x,
        };
        Ok(self.unembed.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
