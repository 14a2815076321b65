//! Loading a Llama-family model from an HF-style folder:
//! `config.json` + `*.safetensors` + `tokenizer.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QMatMul;

use crate::kernels::Matrix;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::gguf::Loaded;
use crate::model::{Activation, Block, Config, Linear, Model, RopeLayout};
use crate::tokenizer::ModelTokenizer;
use crate::Error;

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5: `{ "rope_theta": …, "rope_type": "default" | "llama3" | … }`.
    rope_parameters: Option<RopeParameters>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    #[serde(default)]
    name_or_path: Option<String>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f32>,
    rope_type: Option<String>,
}

pub(crate) fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

pub(crate) fn load(dir: &Path, device: &Device) -> Result<Loaded, Error> {
    let read = |name: &str| -> Result<String, Error> {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })
    };
    let hf: HfConfig = serde_json::from_str(&read("config.json")?)
        .map_err(|e| Error::Format(format!("{}: {e}", dir.join("config.json").display())))?;
    let arch = hf.model_type.clone().unwrap_or_else(|| "llama".into());
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(Error::UnsupportedArchitecture(arch));
    }
    let rope_type = hf
        .rope_parameters
        .as_ref()
        .and_then(|r| r.rope_type.as_deref())
        .unwrap_or("default");
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) || rope_type != "default" {
        return Err(Error::Unsupported(format!(
            "RoPE scaling (`{rope_type}`) is not implemented"
        )));
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(Error::Unsupported(format!(
            "activation `{act}` (only SwiGLU with silu)"
        )));
    }
    let rope_theta = hf
        .rope_theta
        .or(hf.rope_parameters.as_ref().and_then(|r| r.rope_theta))
        .unwrap_or(10_000.0);
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
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        context,
        rope: RopeLayout::Halves,
        embed_scale: None,
        activation: Activation::Silu,
        sliding: None,
    };
    cfg.validate()?;

    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::Format(format!("{} is missing", tok_path.display())));
    }
    let tokenizer = ModelTokenizer::from_file(&tok_path)?;

    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
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
            // The small-batch kernel reads the dense weights in place.
            let small = Matrix::from_f32(&w);
            Ok(Linear::new(QMatMul::Tensor(w), bias).with_small(small))
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
        blocks.push(Block {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            q,
            k,
            v,
            o,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            gate,
            up,
            down,
            q_norm: None,
            k_norm: None,
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
