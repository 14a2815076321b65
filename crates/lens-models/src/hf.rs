//! An HF-style model folder as the backends read it: `config.json` (transformers' names, and
//! GPT-2's own) and its `*.safetensors` files. One reading for every backend, so they agree on
//! what a folder says (the RoPE base in either place transformers writes it, RoPE scaling).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What an HF folder could not give.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not the JSON of a model config (the message names the file).
    #[error("{0}")]
    Format(String),
}

/// `config.json`, the fields the lens's backends read.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(alias = "n_embd")]
    pub hidden_size: usize,
    #[serde(alias = "n_layer")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: Option<f64>,
    /// GPT-2's LayerNorm epsilon.
    pub layer_norm_epsilon: Option<f64>,
    pub rope_theta: Option<f32>,
    #[serde(alias = "n_positions")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5: `{ "rope_theta": …, "rope_type": "default" | "llama3" | … }`.
    pub rope_parameters: Option<RopeParameters>,
    #[serde(alias = "activation_function")]
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub name_or_path: Option<String>,
    /// One id or a list: the tokens that end generation.
    pub eos_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f32>,
    pub rope_type: Option<String>,
}

impl HfConfig {
    /// `dir/config.json`.
    pub fn read(dir: &Path) -> Result<HfConfig, HfError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| HfError::Format(format!("{}: {e}", path.display())))
    }

    /// The RoPE base: `rope_theta`, or transformers 5's `rope_parameters.rope_theta`, or 10,000.
    pub fn rope_theta(&self) -> f32 {
        self.rope_theta
            .or(self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0)
    }

    /// The RoPE scaling the config asks for, which no backend implements: the `rope_type` of
    /// `rope_parameters` (`default` when it names none) when it is not `default` or when an
    /// older `rope_scaling` object is set; `None` for plain RoPE.
    pub fn rope_scaling(&self) -> Option<&str> {
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref())
            .unwrap_or("default");
        let scaled = self.rope_scaling.as_ref().is_some_and(|v| !v.is_null());
        (scaled || rope_type != "default").then_some(rope_type)
    }
}

/// The folder's `*.safetensors` files (a checkpoint and its shards), sorted; empty when it
/// has none.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| HfError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with the required fields and `extra`, its RoPE base and scaling.
    fn check(extra: &str, theta: f32, scaling: Option<&str>) {
        let json = format!(
            r#"{{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "vocab_size": 100{extra}}}"#
        );
        let c: HfConfig = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(c.rope_theta(), theta, "{extra}");
        assert_eq!(c.rope_scaling(), scaling, "{extra}");
    }

    #[test]
    fn the_rope_base_and_scaling_in_either_place() {
        check("", 10_000.0, None);
        check(r#", "rope_theta": 5e5"#, 5e5, None);
        check(
            r#", "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}"#,
            1e6,
            None,
        );
        check(
            r#", "rope_theta": 2.0, "rope_parameters": {"rope_theta": 3.0}"#,
            2.0,
            None,
        );
        check(r#", "rope_scaling": null"#, 10_000.0, None);
        check(
            r#", "rope_parameters": {"rope_type": "llama3"}"#,
            10_000.0,
            Some("llama3"),
        );
        check(
            r#", "rope_scaling": {"type": "linear"}"#,
            10_000.0,
            Some("default"),
        );
    }

    #[test]
    fn gpt2_names_are_read() {
        let c: HfConfig = serde_json::from_str(
            r#"{"n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 2048, "n_positions": 128,
                "activation_function": "gelu_new"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (64, 3, 4)
        );
        assert_eq!(c.max_position_embeddings, Some(128));
        assert_eq!(c.hidden_act.as_deref(), Some("gelu_new"));
    }
}
