//! The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with
//! the Tuned Lens"): one affine translator per layer in front of the frozen norm readout.
//!
//! This crate reads and writes lens files and trains them; the translators themselves are
//! lens-core's [`Translators`] (plain f32), which the one query pipeline applies.
//!
//! - Our file (`*.safetensors`): tensors `translators.{l}.weight` (`hidden × hidden`, `out ×
//!   in`) and `translators.{l}.bias` for `l = 0..N`, the translator being `h + W·h + b`; the
//!   metadata ([`Meta`]) names the model it belongs to (architecture, hidden size, blocks,
//!   vocabulary, a SHA-256 of the unembedding) and how far training got. [`load`] refuses it
//!   on any other model. While it is trained, AdamW's moments are kept beside it
//!   ([`adam_path`]: `NAME.adam.safetensors`) so that a stopped run resumes exactly.
//! - The `tuned-lens` Python package's folder (`lens.save(DIR)`: `params.pt`, a torch pickle of
//!   the translators `{l}.weight`/`{l}.bias` in the same parameterisation, and `config.json`
//!   with `d_model` and `num_hidden_layers`), read with candle's pickle reader. Its
//!   `unembed_hash` hashes numpy's printed form of the matrix, which is not reproduced here:
//!   a Python lens is checked by its shapes only.

mod eval;
mod train;

use std::collections::HashMap;
use std::path::Path;

use lens_core::{Affine, Backend, ModelInfo, ReadoutWeights, Translators};
use sha2::{Digest, Sha256};

pub use eval::{LayerStats, LensStats};
pub use train::{AdamState, Batch, LayerMoments, TrainOptions, Trainer};

/// The format our lens files declare in their metadata.
pub const FORMAT: &str = "logit-lens/tuned-lens/v1";

/// The format of the optimiser state saved beside a lens being trained ([`adam_path`]).
pub const ADAM_FORMAT: &str = "logit-lens/tuned-lens-adam/v1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// The lens belongs to another model.
    #[error("{path} is a tuned lens for another model: {message}")]
    WrongModel { path: String, message: String },
    #[error("{0}")]
    Lens(#[from] lens_core::Error),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// What a lens file records about its model and its training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub model: String,
    pub architecture: String,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub vocab_size: usize,
    /// [`fingerprint`] of the model's unembedding.
    pub unembedding_sha256: String,
    /// Optimisation steps done so far and the tokens they saw (to resume).
    pub steps: usize,
    pub tokens: usize,
}

impl Meta {
    /// The metadata of a not yet trained lens for the model `info` with readout `weights`.
    pub fn of(info: &ModelInfo, weights: &ReadoutWeights) -> Meta {
        Meta {
            model: info.name.clone(),
            architecture: info.architecture.clone(),
            hidden_size: info.hidden_size,
            n_layers: info.n_layers,
            vocab_size: info.vocab_size,
            unembedding_sha256: fingerprint(weights),
            steps: 0,
            tokens: 0,
        }
    }

    fn to_map(&self) -> HashMap<String, String> {
        [
            ("format", FORMAT.to_string()),
            ("model", self.model.clone()),
            ("architecture", self.architecture.clone()),
            ("hidden_size", self.hidden_size.to_string()),
            ("n_layers", self.n_layers.to_string()),
            ("vocab_size", self.vocab_size.to_string()),
            ("unembedding_sha256", self.unembedding_sha256.clone()),
            ("steps", self.steps.to_string()),
            ("tokens", self.tokens.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn from_map(m: &HashMap<String, String>, path: &str) -> Result<Meta, Error> {
        let fields = Fields::of(m, path, FORMAT)?;
        let (get, num) = (|k| fields.get(k), |k| fields.count(k));
        Ok(Meta {
            model: get("model")?,
            architecture: get("architecture")?,
            hidden_size: num("hidden_size")?,
            n_layers: num("n_layers")?,
            vocab_size: num("vocab_size")?,
            unembedding_sha256: get("unembedding_sha256")?,
            steps: num("steps")?,
            tokens: num("tokens")?,
        })
    }

    /// An error unless the lens was made for the model `info` whose readout hashes to
    /// `unembedding_sha256`.
    pub fn check(
        &self,
        info: &ModelInfo,
        unembedding_sha256: &str,
        path: &str,
    ) -> Result<(), Error> {
        let wrong = |what: &str, lens: String, model: String| {
            Err(Error::WrongModel {
                path: path.to_string(),
                message: format!(
                    "its {what} is {lens}, the model's ({}) is {model}",
                    info.name
                ),
            })
        };
        if self.architecture != info.architecture {
            return wrong(
                "architecture",
                self.architecture.clone(),
                info.architecture.clone(),
            );
        }
        if self.hidden_size != info.hidden_size {
            return wrong(
                "hidden size",
                self.hidden_size.to_string(),
                info.hidden_size.to_string(),
            );
        }
        if self.n_layers != info.n_layers {
            return wrong(
                "block count",
                self.n_layers.to_string(),
                info.n_layers.to_string(),
            );
        }
        if self.vocab_size != info.vocab_size {
            return wrong(
                "vocabulary",
                self.vocab_size.to_string(),
                info.vocab_size.to_string(),
            );
        }
        if self.unembedding_sha256 != unembedding_sha256 {
            return wrong(
                "unembedding's SHA-256",
                self.unembedding_sha256.clone(),
                unembedding_sha256.to_string(),
            );
        }
        Ok(())
    }
}

/// A safetensors file's metadata, read field by field; errors name the file.
struct Fields<'a> {
    map: &'a HashMap<String, String>,
    path: &'a str,
}

impl<'a> Fields<'a> {
    /// The metadata of a file that must declare `format`.
    fn of(map: &'a HashMap<String, String>, path: &'a str, format: &str) -> Result<Self, Error> {
        let fields = Fields { map, path };
        if fields.get("format")? != format {
            return Err(fields.bad(format!("not a {format} file")));
        }
        Ok(fields)
    }

    fn bad(&self, message: String) -> Error {
        Error::Format {
            path: self.path.to_string(),
            message,
        }
    }

    fn get(&self, k: &str) -> Result<String, Error> {
        self.map
            .get(k)
            .cloned()
            .ok_or_else(|| self.bad(format!("the metadata has no `{k}`")))
    }

    fn count(&self, k: &str) -> Result<usize, Error> {
        self.get(k)?
            .parse::<usize>()
            .map_err(|_| self.bad(format!("the metadata's `{k}` is not a count")))
    }
}

/// A lens file's contents.
#[derive(Debug, Clone)]
pub struct LensFile {
    pub translators: Translators,
    /// `None` for a lens of the Python package (no training record of ours).
    pub meta: Option<Meta>,
}

/// SHA-256 of the unembedding's f32 values (little-endian, row-major `vocab × hidden`), hex.
pub fn fingerprint(weights: &ReadoutWeights) -> String {
    let mut h = Sha256::new();
    for chunk in weights.unembedding.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The backend's readout weights, or an error saying it cannot hand them out.
pub fn readout_weights(backend: &dyn Backend) -> Result<ReadoutWeights, Error> {
    backend
        .readout_weights()
        .unwrap_or_else(|| {
            Err(lens_core::Error::Unsupported(
                "this backend cannot hand out its readout weights, which the tuned lens needs \
             (use --backend candle)"
                    .into(),
            ))
        })
        .map_err(Error::Lens)
}

/// Read a lens file (ours, or the Python package's folder) and check it belongs to the model
/// `backend` runs.
pub fn load(path: &Path, backend: &dyn Backend) -> Result<LensFile, Error> {
    let file = read(path)?;
    let info = backend.info();
    let shown = path.display().to_string();
    match &file.meta {
        Some(meta) => {
            // The cheap checks first: a lens of another shape is refused before hashing.
            meta.check(info, &meta.unembedding_sha256, &shown)?;
            let weights = readout_weights(backend)?;
            meta.check(info, &fingerprint(&weights), &shown)?;
        }
        None => {
            let t = &file.translators;
            if t.hidden_size() != info.hidden_size || t.n_layers() != info.n_layers {
                return Err(Error::WrongModel {
                    path: shown,
                    message: format!(
                        "it has {} translators of width {}, the model ({}) has {} blocks of \
                         width {}",
                        t.n_layers(),
                        t.hidden_size(),
                        info.name,
                        info.n_layers,
                        info.hidden_size
                    ),
                });
            }
        }
    }
    Ok(file)
}

/// Read a lens file without a model: ours (a file) or the Python package's (a folder with
/// `params.pt` and `config.json`, or its `params.pt`).
pub fn read(path: &Path) -> Result<LensFile, Error> {
    let is_python = path.is_dir() || path.extension().is_some_and(|e| e == "pt");
    match is_python {
        true => read_python(path),
        false => read_ours(path),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn read_ours(path: &Path) -> Result<LensFile, Error> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (metadata, st) = open_safetensors(path, &bytes)?;
    let meta = Meta::from_map(&metadata, &path.display().to_string())?;
    let d = meta.hidden_size;
    let layers = (0..meta.n_layers)
        .map(|l| {
            Ok(Affine {
                weight: f32_tensor(path, &st, format!("translators.{l}.weight"), &[d, d])?,
                bias: f32_tensor(path, &st, format!("translators.{l}.bias"), &[d])?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let translators = Translators::new(path.display().to_string(), d, layers)?;
    Ok(LensFile {
        translators,
        meta: Some(meta),
    })
}

/// Write our lens file, atomically (a temporary file beside it, renamed into place), so a
/// stopped training never leaves half a file.
pub fn save(path: &Path, translators: &Translators, meta: &Meta) -> Result<(), Error> {
    let d = translators.hidden_size();
    let tensors = translators
        .layers()
        .iter()
        .enumerate()
        .flat_map(|(l, a)| {
            [
                (format!("translators.{l}.weight"), &a.weight[..], vec![d, d]),
                (format!("translators.{l}.bias"), &a.bias[..], vec![d]),
            ]
        })
        .collect::<Vec<_>>();
    write_f32_tensors(path, &tensors, meta.to_map())
}

/// Where the optimiser state of the lens file `lens` is kept while it is trained:
/// `NAME.adam.safetensors` beside `NAME.safetensors`. The lens file itself stays the size of
/// its translators (the moments would triple it), and a finished lens can be shared without it.
pub fn adam_path(lens: &Path) -> std::path::PathBuf {
    let stem = lens.file_stem().unwrap_or_default().to_string_lossy();
    lens.with_file_name(format!("{stem}.adam.safetensors"))
}

/// Save the optimiser state of a lens trained for `steps` steps (atomically, as [`save`]).
pub fn save_adam(path: &Path, state: &AdamState, steps: usize) -> Result<(), Error> {
    let tensors = state
        .layers
        .iter()
        .enumerate()
        .flat_map(|(l, m)| {
            let d = m.bias_m.len();
            [
                (format!("{l}.weight.m"), &m.weight_m[..], vec![d, d]),
                (format!("{l}.weight.v"), &m.weight_v[..], vec![d, d]),
                (format!("{l}.bias.m"), &m.bias_m[..], vec![d]),
                (format!("{l}.bias.v"), &m.bias_v[..], vec![d]),
            ]
        })
        .collect::<Vec<_>>();
    let meta = [
        ("format", ADAM_FORMAT.to_string()),
        ("steps", steps.to_string()),
        ("t", state.t.to_string()),
        ("layers", state.layers.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    write_f32_tensors(path, &tensors, meta)
}

/// Read the optimiser state saved by [`save_adam`] for a lens of `n_layers` translators of
/// width `hidden`: the state and the step count it was saved at.
pub fn read_adam(path: &Path, hidden: usize, n_layers: usize) -> Result<(AdamState, usize), Error> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (meta, st) = open_safetensors(path, &bytes)?;
    let shown = path.display().to_string();
    let fields = Fields::of(&meta, &shown, ADAM_FORMAT)?;
    let (bad, num) = (|message| format_error(path, message), |k| fields.count(k));
    if num("layers")? != n_layers {
        return Err(bad(format!(
            "it holds {} layers' moments, the lens has {n_layers}",
            num("layers")?
        )));
    }
    let layers = (0..n_layers)
        .map(|l| {
            Ok(LayerMoments {
                weight_m: f32_tensor(path, &st, format!("{l}.weight.m"), &[hidden, hidden])?,
                weight_v: f32_tensor(path, &st, format!("{l}.weight.v"), &[hidden, hidden])?,
                bias_m: f32_tensor(path, &st, format!("{l}.bias.m"), &[hidden])?,
                bias_v: f32_tensor(path, &st, format!("{l}.bias.v"), &[hidden])?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((
        AdamState {
            t: num("t")?,
            layers,
        },
        num("steps")?,
    ))
}

/// A safetensors file of f32 tensors with `metadata`, written atomically (a temporary file
/// beside it, renamed into place).
fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, &[f32], Vec<usize>)],
    metadata: HashMap<String, String>,
) -> Result<(), Error> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format_error(path, e.to_string()))?;
    let data = safetensors::serialize(views, Some(metadata))
        .map_err(|e| format_error(path, e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A safetensors file's metadata and tensors.
fn open_safetensors<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(HashMap<String, String>, safetensors::SafeTensors<'a>), Error> {
    let bad = |e: safetensors::SafeTensorError| {
        format_error(path, format!("not a safetensors file ({e})"))
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(bad)?;
    let meta = header.metadata().clone().unwrap_or_default();
    Ok((
        meta,
        safetensors::SafeTensors::deserialize(bytes).map_err(bad)?,
    ))
}

/// The f32 tensor `name` of shape `shape`, or an error naming the file.
fn f32_tensor(
    path: &Path,
    st: &safetensors::SafeTensors<'_>,
    name: String,
    shape: &[usize],
) -> Result<Vec<f32>, Error> {
    let t = st
        .tensor(&name)
        .map_err(|_| format_error(path, format!("no tensor `{name}`")))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
        return Err(format_error(
            path,
            format!(
                "`{name}` is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The Python package's `config.json`, the fields we use.
#[derive(serde::Deserialize)]
struct PythonConfig {
    d_model: usize,
    num_hidden_layers: usize,
    #[serde(default = "yes")]
    bias: bool,
    #[serde(default)]
    lens_type: Option<String>,
}

fn yes() -> bool {
    true
}

fn read_python(path: &Path) -> Result<LensFile, Error> {
    let (dir, params) = match path.is_dir() {
        true => (path.to_path_buf(), path.join("params.pt")),
        false => (
            path.parent().map_or_else(|| ".".into(), Path::to_path_buf),
            path.to_path_buf(),
        ),
    };
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let config: PythonConfig = serde_json::from_str(&text)
        .map_err(|e| format_error(&config_path, format!("not a tuned-lens config ({e})")))?;
    if let Some(kind) = config
        .lens_type
        .as_deref()
        .filter(|k| *k != "linear_tuned_lens")
    {
        return Err(format_error(
            &config_path,
            format!("lens_type {kind} is not supported (only linear_tuned_lens)"),
        ));
    }
    if !params.is_file() {
        return Err(Error::Io {
            path: params.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let pth = candle_core::pickle::PthTensors::new(&params, None)
        .map_err(|e| format_error(&params, format!("not a torch checkpoint ({e})")))?;
    let d = config.d_model;
    let get = |name: String, shape: &[usize]| -> Result<Option<Vec<f32>>, Error> {
        let Some(t) = pth.get(&name)? else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(format_error(
                &params,
                format!("`{name}` has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        Ok(Some(
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        ))
    };
    let layers = (0..config.num_hidden_layers)
        .map(|l| {
            let weight = get(format!("{l}.weight"), &[d, d])?
                .ok_or_else(|| format_error(&params, format!("no tensor `{l}.weight`")))?;
            let bias = match config.bias {
                true => get(format!("{l}.bias"), &[d])?
                    .ok_or_else(|| format_error(&params, format!("no tensor `{l}.bias`")))?,
                false => vec![0.0; d],
            };
            Ok(Affine { weight, bias })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let translators = Translators::new(dir.display().to_string(), d, layers)?;
    Ok(LensFile {
        translators,
        meta: None,
    })
}
