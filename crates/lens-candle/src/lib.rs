//! A logit-lens backend on [candle](https://github.com/huggingface/candle).
//!
//! Loads Llama-family models (Llama, Mistral, SmolLM, Qwen2) from a GGUF file or an HF-style
//! folder and implements [`lens_core::Backend`]: a forward pass that captures the residual
//! stream at every block boundary, and the lens readout (final RMSNorm, then unembedding).

mod error;
mod gguf;
mod hf;
mod kernels;
mod model;
mod spm;
mod stage;
mod tokenizer;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use lens_core::{
    Backend, Capabilities, CaptureOptions, Device as LensDevice, Finish, GenerateRequest,
    Generator, HiddenStates, LensKind, LoadOptions, Loader, ModelInfo, Source, SourceKind, Step,
    Stop, Token,
};

pub use error::Error;
/// The precisions this backend offers are [`Precision::F32`] (every weight dequantized to f32:
/// the reference path, whose numbers match HF transformers on the same dequantized weights)
/// and [`Precision::Fast`] (a GGUF file's blocks multiplied by candle's quantized kernels,
/// activations quantized to 8 bits inside the products as llama.cpp does; the lens readout
/// stays f32).
pub use lens_core::Precision;
use model::{KvCache, Model};
pub use stage::{split_blocks, Stage, StageInput, StageRun};
use tokenizer::ModelTokenizer;

/// A loaded model.
pub struct CandleBackend {
    info: ModelInfo,
    model: Model,
    tokenizer: ModelTokenizer,
}

impl CandleBackend {
    /// Load a GGUF file or an HF-style folder. Never panics on a malformed file.
    pub fn load(path: &Path, precision: Precision) -> Result<Self, Error> {
        let device = Device::Cpu;
        let display = path.display().to_string();
        if !path.exists() {
            return Err(Error::Io {
                path: display,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
        // candle's readers trust the sizes a file declares; keep a hostile file from taking the
        // process down with it.
        let refuse =
            |kind| refuse_precision(kind, precision).map_or(Ok(()), |why| Err(Error::Option(why)));
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            if gguf::is_gguf(path) {
                refuse(SourceKind::Gguf)?;
                gguf::load(path, precision, &device)
            } else if hf::is_hf_folder(path) {
                refuse(SourceKind::HfFolder)?;
                hf::load(path, &device)
            } else if path.is_file() {
                std::fs::File::open(path).map_err(|source| Error::Io {
                    path: display.clone(),
                    source,
                })?;
                Err(Error::NotAModel {
                    path: display.clone(),
                })
            } else {
                Err(Error::NotAModel {
                    path: display.clone(),
                })
            }
        }))
        .map_err(|_| {
            Error::Format(format!(
                "{display}: the file's declared sizes are inconsistent"
            ))
        })??;
        let cfg = &loaded.model.cfg;
        let info = ModelInfo {
            name: loaded.name,
            architecture: cfg.architecture.clone(),
            n_layers: cfg.n_layers,
            hidden_size: cfg.hidden,
            vocab_size: cfg.vocab,
            context_length: cfg.context,
            precision: loaded.precision,
        };
        tracing::info!(?info, "model loaded");
        Ok(CandleBackend {
            info,
            model: loaded.model,
            tokenizer: loaded.tokenizer,
        })
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), lens_core::Error> {
        if tokens.is_empty() {
            return Err(lens_core::Error::EmptyPrompt);
        }
        if tokens.len() > self.info.context_length {
            return Err(lens_core::Error::PromptTooLong {
                tokens: tokens.len(),
                context: self.info.context_length,
            });
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.info.vocab_size)
        {
            return Err(lens_core::Error::TokenOutOfRange {
                id,
                vocab: self.info.vocab_size,
            });
        }
        Ok(())
    }

    fn run(
        &self,
        tokens: &[u32],
        prefix: Option<(&HiddenStates, &KvCache)>,
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.check_tokens(tokens)?;
        // On rayon's pool whoever the caller is (see `in_pool`).
        let capture = lens_core::in_pool(|| {
            self.model
                .forward(tokens, prefix.map(|(_, kv)| kv), options.mid_block, stop)
        })?;
        // The prefix's positions are shared, not copied.
        let keep = prefix.map_or(0, |(_, kv)| kv.tokens.len());
        let join = |old: Option<&[Arc<[f32]>]>, new: Vec<Arc<[f32]>>| {
            let mut all = Vec::with_capacity(tokens.len());
            all.extend_from_slice(&old.unwrap_or(&[])[..keep.min(old.map_or(0, <[_]>::len))]);
            all.extend(new);
            all
        };
        let resid = join(prefix.map(|(s, _)| s.position_rows()), capture.resid);
        let mid = capture
            .mid
            .map(|m| join(prefix.and_then(|(s, _)| s.mid_position_rows()), m));
        let kv = join(prefix.map(|(_, kv)| &kv.positions[..]), capture.kv);
        let cache = Arc::new(KvCache {
            tokens: tokens.to_vec(),
            positions: kv,
        });
        Ok(
            HiddenStates::from_positions(&self.info, tokens.to_vec(), resid, mid)?
                .with_backend_state(cache),
        )
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        self.tokenizer.tokenize(text)
    }

    fn decode(&self, id: u32) -> String {
        self.tokenizer.decode(id)
    }

    fn forward(
        &self,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.run(tokens, None, options, &Stop::never())
    }

    fn forward_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.run_reusing(prefix, tokens, options, &Stop::never())
    }

    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, lens_core::Error> {
        self.readout_until(rows, lens, &Stop::never())
    }

    /// Stops between blocks.
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, lens_core::Error> {
        stop.check()?;
        match prefix {
            Some(prefix) => self.run_reusing(prefix, tokens, options, stop),
            None => self.run(tokens, None, options, stop),
        }
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }

    fn readout_weights(&self) -> Option<Result<lens_core::ReadoutWeights, lens_core::Error>> {
        Some(self.model.readout_weights().map_err(Into::into))
    }

    fn state_bytes(&self, states: &HiddenStates) -> usize {
        states
            .backend_state()
            .and_then(|s| s.downcast_ref::<KvCache>())
            .map_or(0, KvCache::bytes)
    }

    /// Small batches (the daemon's hovers) stop between blocks of the vocabulary; large ones
    /// only before they start.
    fn readout_until(
        &self,
        rows: &[f32],
        lens: LensKind,
        stop: &Stop,
    ) -> Result<Vec<f32>, lens_core::Error> {
        readout(&self.model, &self.info, rows, lens, stop)
    }
}

/// Generation on our own forward ([`lens_core::host_generate`]): one token's forward per step,
/// reusing the KV cache of the tokens before it, greedy or seeded top-p sampling; it stops at
/// the model's end-of-sequence (and end-of-turn) tokens.
impl Generator for CandleBackend {
    fn chat_prompt(&self, _text: &str) -> Result<Vec<u32>, lens_core::Error> {
        Err(lens_core::Error::Unsupported(
            "the candle backend has no chat template engine (--chat needs --backend mistralrs)"
                .into(),
        ))
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.tokenizer.eos.clone()
    }

    fn generate(
        &self,
        request: &GenerateRequest<'_>,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), lens_core::Error>,
    ) -> Result<Finish, lens_core::Error> {
        lens_core::host_generate(self, request, &self.tokenizer.eos, stop, on_step)
    }
}

/// The lens readout of `rows` (whole rows of the hidden size) on `model`: a whole model's or a
/// pipeline stage's (the final norm and unembedding are on each).
fn readout(
    model: &Model,
    info: &ModelInfo,
    rows: &[f32],
    lens: LensKind,
    stop: &Stop,
) -> Result<Vec<f32>, lens_core::Error> {
    if !rows.len().is_multiple_of(info.hidden_size) {
        return Err(lens_core::Error::Shape(format!(
            "{} values is not a whole number of rows of {}",
            rows.len(),
            info.hidden_size
        )));
    }
    stop.check()?;
    Ok(model.readout(rows, lens.applies_norm(), stop)?)
}

impl CandleBackend {
    fn run_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, lens_core::Error> {
        let kv = prefix
            .backend_state()
            .and_then(|s| s.downcast_ref::<KvCache>());
        let Some(kv) = kv else {
            return self.run(tokens, None, options, stop);
        };
        if options.mid_block && !prefix.has_mid_block() {
            return self.run(tokens, None, options, stop);
        }
        // Reuse the longest shared prefix, but always recompute at least the last token.
        let common = kv
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        if common == tokens.len() {
            // A prefix of the cached prompt: its states are the cached states' first positions
            // (attention is causal), shared, with nothing to compute.
            let n = tokens.len();
            let rows = prefix.position_rows()[..n].to_vec();
            let mid = prefix.mid_position_rows().map(|m| m[..n].to_vec());
            let kv: Arc<KvCache> = Arc::new(kv.prefix(n));
            return Ok(
                HiddenStates::from_positions(&self.info, tokens.to_vec(), rows, mid)?
                    .with_backend_state(kv),
            );
        }
        let keep = common.min(tokens.len().saturating_sub(1));
        if keep == 0 {
            return self.run(tokens, None, options, stop);
        }
        let trimmed = kv.prefix(keep);
        self.run(tokens, Some((prefix, &trimmed)), options, stop)
    }
}

/// Why this backend cannot use `precision` on a source of `kind`, if it cannot: the one check
/// behind both [`CandleBackend::load`] and the loader's `supports`.
fn refuse_precision(kind: SourceKind, precision: Precision) -> Option<String> {
    match (kind, precision) {
        (_, Precision::Bf16 | Precision::F16) => Some(format!(
            "the candle backend has no {precision} precision (it offers f32, fast)"
        )),
        (SourceKind::HfFolder, Precision::Fast) => Some(
            "--precision fast multiplies a GGUF file's quantized blocks; an HF folder's weights \
             are dense safetensors: use --precision f32"
                .into(),
        ),
        _ => None,
    }
}

/// The candle backend's entry in a registry of backends.
pub struct CandleLoader;

/// The loader the binary registers (behind its `candle` feature).
pub static LOADER: CandleLoader = CandleLoader;

impl Loader for CandleLoader {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sources: vec![SourceKind::Gguf, SourceKind::HfFolder],
            devices: vec![LensDevice::Cpu],
            precisions: vec![Precision::F32, Precision::Fast],
            architectures: model::ARCHITECTURES.to_vec(),
            isq: false,
        }
    }

    fn supports(&self, source: &Source, options: &LoadOptions) -> Result<(), lens_core::Error> {
        let why = self
            .capabilities()
            .refuse(self.name(), source, options)
            .or_else(|| refuse_precision(source.kind(), options.precision));
        match why {
            Some(why) => Err(lens_core::Error::Unsupported(why)),
            None => Ok(()),
        }
    }

    fn load(
        &self,
        source: &Source,
        options: &LoadOptions,
    ) -> Result<Box<dyn Backend>, lens_core::Error> {
        self.supports(source, options)?;
        if let Some(n) = options.threads {
            set_threads(n)?;
        }
        // `supports` has refused every other kind of source.
        let (Source::Gguf(path) | Source::HfFolder(path)) = source else {
            return Err(lens_core::Error::Unsupported(format!(
                "the candle backend cannot load {source}"
            )));
        };
        let backend = CandleBackend::load(path, options.precision).map_err(|e| match e {
            Error::Option(why) => lens_core::Error::Unsupported(why),
            e => lens_core::Error::Load(e.to_string()),
        })?;
        Ok(Box::new(backend))
    }
}

/// Size rayon's global pool (which candle's kernels and the lens share) to `n` threads: once
/// per process; asking again for another size is an error, not ignored.
pub fn set_threads(n: usize) -> Result<(), lens_core::Error> {
    if n == 0 {
        return Err(lens_core::Error::Unsupported(
            "--threads must be at least 1".into(),
        ));
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(lens_core::Error::Unsupported(format!(
            "the thread pool already runs {} threads; it cannot change to {n} in this process",
            rayon::current_num_threads()
        ))),
    }
}

/// The f32 matrix-multiply rate this machine reaches with candle's CPU GEMM (the one the
/// dense forward and readout use), in FLOP/s: the median of `repeats` products
/// `[m, k] · [k, n]` of fixed pseudo-random values. Benchmarks divide a product's FLOPs by it
/// to print the floor their timings are held to.
pub fn gemm_rate(m: usize, k: usize, n: usize, repeats: usize) -> Result<f64, lens_core::Error> {
    let fill = |len: usize, seed: u32| -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1u32 << 24) as f32
                    - 0.5
            })
            .collect()
    };
    let dev = candle_core::Device::Cpu;
    let run = || -> Result<std::time::Duration, Error> {
        let a = candle_core::Tensor::from_vec(fill(m * k, 1), (m, k), &dev)?;
        let b = candle_core::Tensor::from_vec(fill(k * n, 2), (k, n), &dev)?;
        let t = std::time::Instant::now();
        let c = a.matmul(&b)?;
        let elapsed = t.elapsed();
        // Read one value so the product is not optimised away (candle computes eagerly).
        let _ = c.get(0)?.get(0)?.to_scalar::<f32>()?;
        Ok(elapsed)
    };
    run()?; // warm-up: threads started, pages touched
    let mut times = (0..repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>, Error>>()?;
    times.sort();
    let median = times[times.len() / 2].as_secs_f64();
    Ok(2.0 * (m * k * n) as f64 / median.max(1e-9))
}
