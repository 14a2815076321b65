//! Loading a Llama-family (Llama, Mistral, Qwen2, Qwen3) or GPT-2 model from an HF-style
//! folder: `config.json` + `*.safetensors` + `tokenizer.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QMatMul;

use candle_core::{DType, Device, Tensor};
use lens_models::hf::{safetensors_files, HfConfig, HfError};

use crate::gguf::Loaded;
use crate::model::{Activation, Block, Config, Linear, Model, NormKind, RopeLayout};
use crate::tokenizer::ModelTokenizer;
use crate::Error;

/// `t`'s shape is `dims`, or an error naming the tensor `what`.
pub(crate) fn expect_dims(t: &Tensor, dims: &[usize], what: &str) -> Result<(), Error> {
    match t.dims() == dims {
        true => Ok(()),
        false => Err(Error::Format(format!(
            "`{what}` has shape {:?}, expected {dims:?}",
            t.dims()
        ))),
    }
}

/// The shared folder reader's errors as this crate's (the same messages).
fn hf_error(e: HfError) -> Error {
    match e {
        HfError::Io { path, source } => Error::Io { path, source },
        HfError::Format(message) => Error::Format(message),
    }
}

pub(crate) fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

pub(crate) fn load(dir: &Path, device: &Device) -> Result<Loaded, Error> {
    let hf = HfConfig::read(dir).map_err(hf_error)?;
    let arch = hf.model_type.clone().unwrap_or_else(|| "llama".into());
    let gpt2 = match arch.as_str() {
        "llama" | "mistral" | "qwen2" | "qwen3" => false,
        "gpt2" => true,
        _ => return Err(Error::UnsupportedArchitecture(arch)),
    };
    if let Some(rope_type) = hf.rope_scaling() {
        return Err(Error::Unsupported(format!(
            "RoPE scaling (`{rope_type}`) is not implemented"
        )));
    }
    let activation = match (gpt2, hf.hidden_act.as_deref()) {
        (false, None | Some("silu")) => Activation::Silu,
        (true, Some("gelu_new" | "gelu_pytorch_tanh")) => Activation::GeluTanh,
        (_, act) => {
            return Err(Error::Unsupported(format!(
                "activation `{}` (only SwiGLU with silu, and GPT-2's gelu_new)",
                act.unwrap_or("none")
            )))
        }
    };
    let rope_theta = hf.rope_theta();
    // Sliding-window attention equals full attention up to the window: cap the context there
    // rather than compute longer prompts wrongly.
    let max_pos = hf.max_position_embeddings.unwrap_or(2048);
    let window = match (arch.as_str(), hf.use_sliding_window, hf.sliding_window) {
        (_, Some(false), _) | (_, _, None) => None,
        (_, _, Some(w)) => Some(w),
    };
    let context = window.map_or(max_pos, |w| w.min(max_pos));
    let cfg = Config {
        architecture: arch,
        n_layers: hf.num_hidden_layers,
        hidden: hf.hidden_size,
        n_heads: hf.num_attention_heads,
        n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        vocab: hf.vocab_size,
        rms_eps: match gpt2 {
            true => hf.layer_norm_epsilon.unwrap_or(1e-5),
            false => hf.rms_norm_eps.unwrap_or(1e-6),
        },
        rope_theta,
        context,
        rope: match gpt2 {
            true => RopeLayout::Learned,
            false => RopeLayout::Halves,
        },
        embed_scale: None,
        activation,
        sliding: None,
        norm: match gpt2 {
            true => NormKind::Layer,
            false => NormKind::Rms,
        },
    };
    cfg.validate()?;

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Format(format!("{} is missing", tok_path.display())));
    }
    let mut tokenizer = ModelTokenizer::from_file(&tok_path)?;
    tokenizer.eos = match &hf.eos_token_id {
        Some(serde_json::Value::Array(ids)) => ids
            .iter()
            .filter_map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect(),
        Some(v) => v
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .into_iter()
            .collect(),
        None => Vec::new(),
    };

    let files = safetensors_files(dir).map_err(hf_error)?;
    if files.is_empty() {
        return Err(Error::NotAModel {
            path: dir.display().to_string(),
        });
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| Error::Format(format!("{}: {e}", f.display())))?;
        tensors.extend(loaded);
    }
    let mut take = |name: &str| -> Result<Tensor, Error> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::Format(format!("missing tensor `{name}`")))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    if gpt2 {
        return load_gpt2(cfg, tensors, tokenizer, dir, device);
    }
    let embed = take("model.embed_tokens.weight")?;
    let unembed = if hf.tie_word_embeddings {
        embed.clone()
    } else {
        take("lm_head.weight")?
    };
    if embed.dims() != [cfg.vocab, cfg.hidden] || unembed.dims() != [cfg.vocab, cfg.hidden] {
        return Err(Error::Format(format!(
            "embedding shape {:?} does not match vocab {} x hidden {}",
            embed.dims(),
            cfg.vocab,
            cfg.hidden
        )));
    }
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}");
        let mut lin = |n: &str| -> Result<Linear, Error> {
            let w = take(&format!("{p}.{n}.weight"))?;
            let bias = take(&format!("{p}.{n}.bias")).ok();
            Ok(Linear::dense(w, bias))
        };
        let (q, k, v, o) = (
            lin("self_attn.q_proj")?,
            lin("self_attn.k_proj")?,
            lin("self_attn.v_proj")?,
            lin("self_attn.o_proj")?,
        );
        let (gate, up, down) = (
            lin("mlp.gate_proj")?,
            lin("mlp.up_proj")?,
            lin("mlp.down_proj")?,
        );
        // Qwen3: RMSNorm of each query and key head.
        let q_norm = take(&format!("{p}.self_attn.q_norm.weight")).ok();
        let k_norm = take(&format!("{p}.self_attn.k_norm.weight")).ok();
        blocks.push(Block {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            q,
            k,
            v,
            o,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: Some(gate),
            up,
            down,
            attn_norm_bias: None,
            ffn_norm_bias: None,
            q_norm,
            k_norm,
            post_attn_norm: None,
            post_ffn_norm: None,
        });
    }
    let final_norm = take("model.norm.weight")?;
    let name = hf
        .name_or_path
        .filter(|s| !s.is_empty())
        .or_else(|| dir.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Ok(Loaded {
        model: Model::new(
            cfg,
            embed,
            blocks,
            final_norm,
            QMatMul::Tensor(unembed),
            device.clone(),
        )?,
        tokenizer,
        name,
        precision: "f32 (safetensors)".into(),
    })
}

/// GPT-2 (`transformer.` prefix or none): learned positions, LayerNorm with biases, the fused
/// `c_attn` and the MLP as Conv1D weights `[in, out]` (transposed here), tied `wte`.
fn load_gpt2(
    cfg: Config,
    mut tensors: HashMap<String, Tensor>,
    tokenizer: ModelTokenizer,
    dir: &Path,
    device: &Device,
) -> Result<Loaded, Error> {
    let prefix = match tensors.contains_key("transformer.wte.weight") {
        true => "transformer.",
        false => "",
    };
    let mut take = |name: &str| -> Result<Tensor, Error> {
        let t = tensors
            .remove(&format!("{prefix}{name}"))
            .ok_or_else(|| Error::Format(format!("missing tensor `{prefix}{name}`")))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let (h, n_layers, vocab) = (cfg.hidden, cfg.n_layers, cfg.vocab);
    let embed = take("wte.weight")?;
    expect_dims(&embed, &[vocab, h], "wte.weight")?;
    let positions = take("wpe.weight")?;
    expect_dims(&positions, &[cfg.context, h], "wpe.weight")?;
    // A Conv1D `[in, out]` as a linear map `[out, in]`, with its bias.
    let linear = |w: Tensor, b: Tensor| -> Result<Linear, Error> {
        Ok(Linear::dense(w.t()?.contiguous()?, Some(b)))
    };
    let mut blocks = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let p = format!("h.{i}");
        let attn = take(&format!("{p}.attn.c_attn.weight"))?;
        expect_dims(&attn, &[h, 3 * h], "c_attn.weight")?;
        let attn_b = take(&format!("{p}.attn.c_attn.bias"))?;
        expect_dims(&attn_b, &[3 * h], "c_attn.bias")?;
        let part = |j: usize| -> Result<Linear, Error> {
            linear(
                attn.narrow(1, j * h, h)?,
                attn_b.narrow(0, j * h, h)?.contiguous()?,
            )
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let o = linear(
            take(&format!("{p}.attn.c_proj.weight"))?,
            take(&format!("{p}.attn.c_proj.bias"))?,
        )?;
        let up = linear(
            take(&format!("{p}.mlp.c_fc.weight"))?,
            take(&format!("{p}.mlp.c_fc.bias"))?,
        )?;
        let down = linear(
            take(&format!("{p}.mlp.c_proj.weight"))?,
            take(&format!("{p}.mlp.c_proj.bias"))?,
        )?;
        blocks.push(Block {
            attn_norm: take(&format!("{p}.ln_1.weight"))?,
            attn_norm_bias: Some(take(&format!("{p}.ln_1.bias"))?),
            q,
            k,
            v,
            o,
            ffn_norm: take(&format!("{p}.ln_2.weight"))?,
            ffn_norm_bias: Some(take(&format!("{p}.ln_2.bias"))?),
            gate: None,
            up,
            down,
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            post_ffn_norm: None,
        });
    }
    let final_norm = take("ln_f.weight")?;
    let final_bias = take("ln_f.bias")?;
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Loaded {
        model: Model::new(
            cfg,
            embed.clone(),
            blocks,
            final_norm,
            QMatMul::Tensor(embed),
            device.clone(),
        )?
        .with_gpt2_parts(final_bias, positions),
        tokenizer,
        name,
        precision: "f32 (safetensors)".into(),
    })
}
