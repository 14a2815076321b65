//! A logit-lens backend on [mistral.rs](https://github.com/EricLBuehler/mistral.rs) 0.8.1.
//!
//! mistral.rs loads the model (a GGUF file, or an HF folder with optional in-situ quantization;
//! offline), and its tokenizer, chat template and engine are the ones the lens uses (it
//! generates, and the lens follows each token it draws). mistral.rs keeps its models' hidden states private, so
//! the per-layer capture is a forward pass of our own built from its public blocks
//! (`mistralrs::core::layers`, `mistralrs_quant`'s linear layers) over the same weights;
//! [`MistralRsBackend::self_check`] compares its last layer with mistral.rs's own final logits
//! for the same tokens, so the two cannot drift apart unnoticed.

mod engine;
mod error;
mod model;
mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use lens_core::{
    Backend, Capabilities, CaptureOptions, Device as LensDevice, EngineCheck, EngineLogits,
    GenerateRequest, Generator, HiddenStates, LensKind, LoadOptions, Loader, ModelInfo, Source,
    SourceKind, Step, Stop, Token,
};

pub use error::Error;
/// [`Precision::F32`]: every weight dequantized to f32 in the capture forward (the reference
/// numbers), mistral.rs's engine with f32 activations; [`Precision::Fast`]: the capture
/// forward multiplies the file's quantized blocks with mistral.rs's `GgufMatMul`, exactly as
/// mistral.rs's engine does.
pub use lens_core::Precision;

use engine::Engine;
use model::{KvCache, Model};

/// How far the capture's last layer may be from mistral.rs's own final logits (max |Δlogit|).
///
/// Measured on SmolLM2 (57 positions of the four oracle prompts): at position 0 the
/// [`Precision::Fast`] capture equals mistral.rs's logits bit for bit (same kernels on the same
/// blocks); from position 1 on, mistral.rs 0.8.1's CPU attention (its flash-attention kernel)
/// moves its logits by up to 1.1 from the arithmetic HF transformers and this capture share,
/// whose f32 path is within 3.2e-5 in probability of HF. With [`Precision::F32`] the capture's
/// weights are dequantized and its activations f32, where mistral.rs quantizes activations to
/// 8 bits inside its products: up to 1.65. The top-1 agreed at every position in both.
pub const SELF_CHECK_BOUND: f32 = 2.0;

/// A model loaded through mistral.rs.
pub struct MistralRsBackend {
    info: ModelInfo,
    precision: Precision,
    model: Model,
    engine: Engine,
    tokenizer: tokenizers_mistralrs::Tokenizer,
    bos: Option<u32>,
}

impl MistralRsBackend {
    /// Load a GGUF file on the CPU: mistral.rs's pipeline and engine, and the capture
    /// forward's weights.
    pub fn load(path: &Path, precision: Precision) -> Result<Self, Error> {
        Self::load_on(path, precision, LensDevice::Cpu)
    }

    /// [`MistralRsBackend::load`] on `device`: a GPU needs a build with the crate's `cuda` or
    /// `metal` feature (mistral.rs's and candle's kernels for it).
    pub fn load_on(path: &Path, precision: Precision, device: LensDevice) -> Result<Self, Error> {
        let device = candle_device(device)?;
        if let Some(why) = refuse_precision(precision) {
            return Err(Error::Option(why));
        }
        if !path.is_file() {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        // Every number of the header checked before candle's reader or mistral.rs allocates on
        // its word; then what the capture forward can run, before mistral.rs reads the file (it
        // panics in places on files it does not expect).
        lens_gguf::check_file(path)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let (content, cfg) = model::read_config(path)?;
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos = content
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok())
            .filter(|_| add_bos);
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let mut types: Vec<String> = content
            .tensor_infos
            .values()
            .filter(|i| i.shape.rank() == 2)
            .map(|i| format!("{:?}", i.ggml_dtype).to_lowercase())
            .collect();
        types.sort();
        types.dedup();
        let types = types.join("/");
        let md_str = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let (tok_model, tok_pre) = (md_str("tokenizer.ggml.model"), md_str("tokenizer.ggml.pre"));
        let engine = Engine::load_gguf(path, precision, &device)?;
        let tokenizer =
            tokenizer::for_lens(&engine.tokenizer, tok_model.as_deref(), tok_pre.as_deref())?;
        let model = engine::isolated("reading the weights", || {
            Model::load(path, &content, cfg, precision, &device)
        })?;
        let described = match precision {
            Precision::F32 => format!("f32 (dequantized from {types})"),
            _ => format!(
                "quantized matmuls ({types}), {:?} activations",
                engine.dtype
            ),
        };
        Ok(Self::assemble(
            name, described, precision, model, engine, tokenizer, bos,
        ))
    }

    /// The backend over a loaded engine and capture forward; its [`ModelInfo`] from the
    /// capture's config.
    fn assemble(
        name: String,
        described: String,
        precision: Precision,
        model: Model,
        engine: Engine,
        tokenizer: tokenizers_mistralrs::Tokenizer,
        bos: Option<u32>,
    ) -> Self {
        let cfg = &model.cfg;
        let info = ModelInfo {
            name,
            architecture: cfg.architecture.clone(),
            n_layers: cfg.n_layers,
            hidden_size: cfg.hidden,
            vocab_size: cfg.vocab,
            context_length: cfg.context,
            precision: described,
        };
        tracing::info!(?info, "model loaded through mistral.rs");
        MistralRsBackend {
            info,
            precision,
            model,
            engine,
            tokenizer,
            bos,
        }
    }

    /// Load an HF folder (`config.json`, safetensors, `tokenizer.json`) on `device`: mistral.rs's
    /// pipeline, with its linear layers quantized to `isq` as they load when given (its
    /// in-situ quantization), and the capture forward's weights (with [`Precision::Fast`] and
    /// `isq`, quantized the same way; otherwise f32 as stored).
    pub fn load_folder(
        dir: &Path,
        precision: Precision,
        isq: Option<lens_core::Isq>,
        device: LensDevice,
    ) -> Result<Self, Error> {
        if let Some(why) = refuse_precision(precision) {
            return Err(Error::Option(why));
        }
        let device = candle_device(device)?;
        let (cfg, tied) = model::read_folder_config(dir)?;
        let isq = isq.map(isq_type);
        let engine = Engine::load_folder(dir, &cfg.architecture, precision, isq, &device)?;
        let tokenizer = engine.tokenizer.as_ref().clone();
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let model = engine::isolated("reading the weights", || {
            Model::load_folder(dir, cfg, tied, precision, isq, &device)
        })?;
        let described = match (precision, isq) {
            (Precision::Fast, Some(t)) => format!("in-situ quantized ({t:?}), f32 activations"),
            _ => "f32 (safetensors as stored)".to_string(),
        };
        // tokenizer.json's own post-processor adds BOS where the model wants it.
        Ok(Self::assemble(
            name, described, precision, model, engine, tokenizer, None,
        ))
    }

    pub fn precision(&self) -> Precision {
        self.precision
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

    /// mistral.rs's own final logits at every position of `tokens` (row-major, vocabulary per
    /// row), from its engine.
    pub fn engine_logits(&self, tokens: &[u32]) -> Result<Vec<f32>, lens_core::Error> {
        self.check_tokens(tokens)?;
        let logits = self.engine.final_logits(tokens)?;
        if logits.len() != tokens.len() * self.info.vocab_size {
            return Err(lens_core::Error::Backend(format!(
                "mistral.rs returned {} logits for {} positions of {}",
                logits.len(),
                tokens.len(),
                self.info.vocab_size
            )));
        }
        Ok(logits)
    }

    /// The last layer of the capture (norm lens) against mistral.rs's own final logits for the
    /// same `tokens` (the check `logit-lens doctor` runs, and every test that loads a model).
    pub fn self_check(&self, tokens: &[u32]) -> Result<EngineCheck, lens_core::Error> {
        lens_core::engine_check(self, tokens)?.ok_or_else(|| {
            lens_core::Error::Backend("the mistralrs backend always has its engine".into())
        })
    }

    fn run(
        &self,
        tokens: &[u32],
        prefix: Option<(&HiddenStates, &KvCache)>,
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, lens_core::Error> {
        self.check_tokens(tokens)?;
        stop.check()?;
        let capture =
            self.model
                .forward(tokens, prefix.map(|(_, kv)| kv), options.mid_block, stop)?;
        let keep = prefix.map_or(0, |(_, kv)| kv.tokens.len());
        let join = |old: Option<&[Arc<[f32]>]>, new: Vec<Vec<f32>>| {
            let mut all: Vec<Arc<[f32]>> = Vec::with_capacity(tokens.len());
            if let Some(old) = old {
                all.extend_from_slice(&old[..keep.min(old.len())]);
            }
            all.extend(new.into_iter().map(Arc::from));
            all
        };
        let resid = join(prefix.map(|(s, _)| s.position_rows()), capture.resid);
        let mid = capture
            .mid
            .map(|m| join(prefix.and_then(|(s, _)| s.mid_position_rows()), m));
        Ok(
            HiddenStates::from_positions(&self.info, tokens.to_vec(), resid, mid)?
                .with_backend_state(Arc::new(capture.kv)),
        )
    }

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
        let common = kv
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        if common == tokens.len() {
            // A prefix of the cached prompt: its first positions, shared (attention is causal).
            self.check_tokens(tokens)?;
            let n = tokens.len();
            let rows = prefix.position_rows()[..n].to_vec();
            let mid = prefix.mid_position_rows().map(|m| m[..n].to_vec());
            let kv = Arc::new(kv.prefix(n)?);
            return Ok(
                HiddenStates::from_positions(&self.info, tokens.to_vec(), rows, mid)?
                    .with_backend_state(kv),
            );
        }
        // Reuse the longest shared prefix, but always compute at least the last token.
        let keep = common.min(tokens.len().saturating_sub(1));
        if keep == 0 {
            return self.run(tokens, None, options, stop);
        }
        let trimmed = kv.prefix(keep)?;
        self.run(tokens, Some((prefix, &trimmed)), options, stop)
    }
}

impl Backend for MistralRsBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| lens_core::Error::Tokenizer(e.to_string()))?;
        let mut out = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.bos {
            if enc.get_ids().first() != Some(&bos) {
                out.push(Token {
                    id: bos,
                    text: self.decode(bos),
                    start: 0,
                    end: 0,
                });
            }
        }
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            out.push(Token {
                id,
                text: self.decode(id),
                start,
                end,
            });
        }
        Ok(out)
    }

    fn decode(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
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

    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, lens_core::Error> {
        if !rows.len().is_multiple_of(self.info.hidden_size) {
            return Err(lens_core::Error::Shape(format!(
                "{} values is not a whole number of rows of {}",
                rows.len(),
                self.info.hidden_size
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.model.readout(rows, lens.applies_norm())?)
    }

    fn state_bytes(&self, states: &HiddenStates) -> usize {
        states
            .backend_state()
            .and_then(|s| s.downcast_ref::<KvCache>())
            .map_or(0, KvCache::bytes)
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }

    fn engine_logits(&self, tokens: &[u32]) -> Option<Result<EngineLogits, lens_core::Error>> {
        Some(
            MistralRsBackend::engine_logits(self, tokens).map(|logits| EngineLogits {
                logits,
                bound: SELF_CHECK_BOUND,
            }),
        )
    }
}

impl Generator for MistralRsBackend {
    fn chat_prompt(&self, text: &str) -> Result<Vec<u32>, lens_core::Error> {
        Ok(self.engine.chat_prompt(text)?)
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.engine.eos.clone()
    }

    fn generate(
        &self,
        request: &GenerateRequest<'_>,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), lens_core::Error>,
    ) -> Result<lens_core::Finish, lens_core::Error> {
        request.sampling.validate()?;
        if request.max_tokens == 0 {
            return Ok(lens_core::Finish::Length);
        }
        let context = self.info.context_length;
        if request.prompt.is_empty() || request.prompt.len() > context {
            return Err(lens_core::Error::Unsupported(format!(
                "a prompt of {} tokens (this model's context holds 1 to {context})",
                request.prompt.len()
            )));
        }
        // One token more than asked: the engine reveals a token's id when it draws the next
        // (see `Engine::generate`), so the last one asked for is seen for sure; the extra one
        // is not reported. The model's context caps it (the token drawn when it is full is
        // the last, fed back to nothing).
        let max_len = (request.max_tokens + 1).min(context - request.prompt.len() + 1);
        let stop_tokens = self.stop_tokens();
        let sampling = Engine::sampling(&request.sampling, max_len, &stop_tokens);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let engine = &self.engine;
            let prompt = request.prompt;
            s.spawn(move || engine.generate(prompt, sampling, tx));
            let mut follow = Follow {
                backend: self,
                request,
                stop_tokens: &stop_tokens,
                tokens: request.prompt.to_vec(),
                states: None,
                answered: false,
            };
            let result = follow.run(&rx, stop, on_step);
            // Stopped or failed: end the request. After the steps asked for, the engine ends
            // on its own at the extra token. Either way its answer is awaited before the
            // engine is used again.
            let cancel = result.is_err();
            if cancel {
                self.engine.cancel();
            }
            let ended = match follow.answered {
                true => None,
                false => rx.iter().find_map(|e| match e {
                    engine::Event::Done(d) => Some(d),
                    engine::Event::Token { .. } => None,
                }),
            };
            if cancel {
                self.engine.cancelled();
            }
            match (result, ended) {
                (Err(e), _) => Err(e),
                (Ok(Some(finish)), _) => Ok(finish),
                (Ok(None), Some(Err(e))) => Err(e.into()),
                (Ok(None), _) => Ok(lens_core::Finish::Length),
            }
        })
    }
}

/// The lens's side of a generation on mistral.rs's engine: each token the engine draws gets
/// the lens of the states that chose it, computed by the capture forward one token at a time.
struct Follow<'a> {
    backend: &'a MistralRsBackend,
    request: &'a GenerateRequest<'a>,
    stop_tokens: &'a [u32],
    /// The prompt and the tokens reported so far.
    tokens: Vec<u32>,
    /// Their states (all but the newest token's once a step was reported).
    states: Option<HiddenStates>,
    /// The engine's answer (the request's end) was received.
    answered: bool,
}

impl Follow<'_> {
    /// Follow the engine's events until `max_tokens` steps were reported (`Ok(None)`: the
    /// engine still draws one more, to be cancelled) or the request ended (`Ok(Some)`).
    fn run(
        &mut self,
        events: &std::sync::mpsc::Receiver<engine::Event>,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), lens_core::Error>,
    ) -> Result<Option<lens_core::Finish>, lens_core::Error> {
        use lens_core::Finish;
        let n = self.request.max_tokens;
        let prompt_len = self.request.prompt.len();
        // The prompt's forward runs while the engine computes its own.
        self.states = Some(self.backend.forward_until(
            None,
            &self.tokens,
            CaptureOptions::default(),
            stop,
        )?);
        loop {
            let event = events
                .recv()
                .map_err(|_| lens_core::Error::Backend("mistral.rs's generation ended".into()))?;
            let index = self.tokens.len() - prompt_len;
            match event {
                engine::Event::Token { index: i, id } => {
                    if i != index {
                        return Err(lens_core::Error::Backend(format!(
                            "mistral.rs reported token {i} where {index} was due"
                        )));
                    }
                    self.step(index, id, stop, on_step)?;
                    if index + 1 == n {
                        return Ok(None);
                    }
                }
                engine::Event::Done(ended) => {
                    self.answered = true;
                    let ended = ended?;
                    if ended.reason == "canceled" {
                        return Err(lens_core::Error::Stopped);
                    }
                    if ended.generated <= index {
                        return Err(lens_core::Error::Backend(format!(
                            "mistral.rs ended ({}) after {} tokens, {index} reported",
                            ended.reason, ended.generated
                        )));
                    }
                    // The last token drawn, which no later draw revealed.
                    let stop_token = ended.reason == "stop";
                    let id = self.identify(ended.last.as_deref(), stop_token)?;
                    self.step(index, id, stop, on_step)?;
                    return Ok(Some(if stop_token {
                        Finish::StopToken(id)
                    } else if index + 1 == n {
                        Finish::Length
                    } else {
                        Finish::Context
                    }));
                }
            }
        }
    }

    /// Report step `index` (the lens of the current states' last position, which chose `id`),
    /// then extend the states by `id`.
    fn step(
        &mut self,
        index: usize,
        id: u32,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), lens_core::Error>,
    ) -> Result<(), lens_core::Error> {
        let info = &self.backend.info;
        let states = self
            .states
            .take()
            .ok_or_else(|| lens_core::Error::Backend("a step before the prompt's states".into()))?;
        let last = self.tokens.len() - 1;
        let row = states
            .row(lens_core::Site::Layer(info.n_layers), last)
            .ok_or(lens_core::Error::PositionOutOfRange {
                position: last,
                len: self.tokens.len(),
            })?;
        let logits = self.backend.readout_until(row, LensKind::Norm, stop)?;
        on_step(Step {
            index,
            token: id,
            states: &states,
            logits: &logits,
        })?;
        self.tokens.push(id);
        let more = index + 1 < self.request.max_tokens
            && !self.stop_tokens.contains(&id)
            && self.tokens.len() <= info.context_length;
        if more {
            stop.check()?;
            self.states = Some(self.backend.forward_until(
                Some(&states),
                &self.tokens,
                CaptureOptions::default(),
                stop,
            )?);
        }
        Ok(())
    }

    /// The id of the request's last token from its text: among the stop tokens when it ended
    /// on one, else the one token of the vocabulary with that text.
    fn identify(&self, text: Option<&str>, stop_token: bool) -> Result<u32, lens_core::Error> {
        let tokenizer = &self.backend.tokenizer;
        let text = text.ok_or_else(|| {
            lens_core::Error::Backend("mistral.rs's answer has no text for its last token".into())
        })?;
        let spelled = |id: u32| tokenizer.decode(&[id], false).is_ok_and(|t| t == text);
        let found: Vec<u32> = if stop_token {
            self.stop_tokens
                .iter()
                .copied()
                .filter(|&t| spelled(t))
                .collect()
        } else {
            (0..tokenizer.get_vocab_size(true) as u32)
                .filter(|&t| spelled(t))
                .collect()
        };
        match found[..] {
            [id] => Ok(id),
            _ => Err(lens_core::Error::Backend(format!(
                "mistral.rs's last token {text:?} is {} tokens of the vocabulary",
                found.len()
            ))),
        }
    }
}

/// Why this backend cannot use `precision`, if it cannot.
fn refuse_precision(precision: Precision) -> Option<String> {
    match precision {
        Precision::F32 | Precision::Fast => None,
        p => Some(format!(
            "the mistralrs backend has no {p} precision (it offers f32, fast)"
        )),
    }
}

/// The mistralrs backend's entry in a registry of backends.
pub struct MistralRsLoader;

/// The loader the binary registers (behind its `mistralrs` feature).
pub static LOADER: MistralRsLoader = MistralRsLoader;

impl Loader for MistralRsLoader {
    fn name(&self) -> &'static str {
        "mistralrs"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sources: vec![SourceKind::Gguf, SourceKind::HfFolder],
            devices: devices(),
            precisions: vec![Precision::F32, Precision::Fast],
            architectures: model::ARCHITECTURES.to_vec(),
            isq: true,
        }
    }

    fn supports(&self, source: &Source, options: &LoadOptions) -> Result<(), lens_core::Error> {
        let caps = self.capabilities();
        let why = caps.refuse(self.name(), source, options).or_else(|| {
            // `fast` means quantized kernels; an HF folder has them only once quantized.
            let dense = source.kind() == SourceKind::HfFolder && options.isq.is_none();
            (dense && options.precision == Precision::Fast).then(|| {
                "--precision fast on an HF folder needs --isq TYPE (q8_0, q4k, …) to quantize \
                 it as it loads; or use --precision f32"
                    .to_string()
            })
        });
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
            threads(n)?;
        }
        let backend = match source {
            Source::Gguf(path) => {
                MistralRsBackend::load_on(path, options.precision, options.device)
            }
            Source::HfFolder(dir) => {
                MistralRsBackend::load_folder(dir, options.precision, options.isq, options.device)
            }
            _ => {
                return Err(lens_core::Error::Unsupported(format!(
                    "the mistralrs backend cannot load {source}"
                )))
            }
        };
        let backend = backend.map_err(|e| match e {
            Error::Option(why) => lens_core::Error::Unsupported(why),
            e => lens_core::Error::Load(e.to_string()),
        })?;
        Ok(Box::new(backend))
    }
}

/// The candle device of a lens device (a GPU needs the `cuda` or `metal` feature).
fn candle_device(device: LensDevice) -> Result<candle_core::Device, Error> {
    match device {
        LensDevice::Cpu => Ok(candle_core::Device::Cpu),
        LensDevice::Cuda(n) => {
            candle_core::Device::new_cuda(n).map_err(|e| Error::Option(format!("cuda:{n}: {e}")))
        }
        LensDevice::Metal(n) => {
            candle_core::Device::new_metal(n).map_err(|e| Error::Option(format!("metal:{n}: {e}")))
        }
    }
}

/// mistral.rs's name for an ISQ type.
fn isq_type(isq: lens_core::Isq) -> mistralrs::core::IsqType {
    use lens_core::Isq;
    use mistralrs::core::IsqType;
    match isq {
        Isq::Q4_0 => IsqType::Q4_0,
        Isq::Q4_1 => IsqType::Q4_1,
        Isq::Q5_0 => IsqType::Q5_0,
        Isq::Q5_1 => IsqType::Q5_1,
        Isq::Q8_0 => IsqType::Q8_0,
        Isq::Q2K => IsqType::Q2K,
        Isq::Q3K => IsqType::Q3K,
        Isq::Q4K => IsqType::Q4K,
        Isq::Q5K => IsqType::Q5K,
        Isq::Q6K => IsqType::Q6K,
    }
}

/// The devices this build can run on: the CPU, and a GPU with the `cuda` or `metal` feature
/// (any ordinal; one that is absent is an error at load).
fn devices() -> Vec<LensDevice> {
    let mut devices = vec![LensDevice::Cpu];
    if cfg!(feature = "cuda") {
        devices.push(LensDevice::Cuda(0));
    }
    if cfg!(feature = "metal") {
        devices.push(LensDevice::Metal(0));
    }
    devices
}

/// Size rayon's global pool (candle's kernels and the lens share it) to `n` threads: once per
/// process; asking again for another size is an error, not ignored.
fn threads(n: usize) -> Result<(), lens_core::Error> {
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
