//! mistral.rs's own side: its pipeline (a GGUF file, or an HF folder quantized in situ; its
//! tokenizer, chat template and model) and its engine, asked for raw final logits of given
//! tokens, for a chat turn's tokens, and to generate.
//!
//! mistral.rs runs its engine on a thread of its own with a tokio runtime; requests go through
//! a channel. Every call here runs on a fresh thread of ours (no runtime context, where
//! blocking on a channel is allowed whoever calls: the CLI, the daemon's blocking pool), and a
//! panic inside mistral.rs ends as an error, not in the caller.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs::core::{
    AutoDeviceMapParams, IsqType, Loader, MessageContent, NormalLoaderBuilder, NormalLoaderType,
    NormalSpecificConfig,
};
use mistralrs::core::{
    Constraint, CustomLogitsProcessor, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, MistralRs, MistralRsBuilder, ModelDType, NormalRequest, Request,
    RequestMessage, Response, SamplingParams, SchedulerConfig, StopTokens, TokenSource,
    TERMINATE_ALL_NEXT_STEP,
};

use crate::{Error, Precision};

/// Run `f` on a thread of its own and contain its panics.
pub(crate) fn isolated<T: Send>(
    what: &str,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("lens-mistralrs".into())
            .spawn_scoped(s, f)
            .map_err(|e| Error::Engine(format!("{what}: cannot start a thread: {e}")))?
            .join()
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                Err(Error::Engine(format!("{what} failed: {msg}")))
            })
    })
}

/// What [`Engine::generate`] reports while the engine writes.
#[derive(Debug)]
pub(crate) enum Event {
    /// The engine drew its `index`-th token (0-based among the generated ones).
    Token { index: usize, id: u32 },
    /// The request ended.
    Done(Result<Ended, Error>),
}

/// How a generation request ended.
#[derive(Debug)]
pub(crate) struct Ended {
    /// mistral.rs's finish reason: `length`, `stop`, `canceled`, …
    pub reason: String,
    /// Tokens it generated.
    pub generated: usize,
    /// The last generated token's text, special tokens written out.
    pub last: Option<String>,
}

/// A model loaded by mistral.rs, and its engine.
pub(crate) struct Engine {
    runner: Arc<MistralRs>,
    pub tokenizer: Arc<tokenizers_mistralrs::Tokenizer>,
    /// Token ids that end generation (the model's EOS tokens as mistral.rs reads them).
    pub eos: Vec<u32>,
    /// The activations' dtype mistral.rs runs with.
    pub dtype: DType,
    /// One request in the engine at a time. mistral.rs 0.8.1 batches requests that arrive
    /// together, and refuses raw logits for a batch ("Raw response only supports batch size of
    /// 1"); its cancellation flag is global too. Two clients of the daemon, or two threads of a
    /// program, take turns here.
    turn: std::sync::Mutex<()>,
}

impl Engine {
    /// Load the GGUF file at `path` offline (no hub, no token) on `device`.
    pub fn load_gguf(path: &Path, precision: Precision, device: &Device) -> Result<Engine, Error> {
        let (dir, file) = match (path.parent(), path.file_name()) {
            (Some(dir), Some(file)) => (dir.to_path_buf(), file.to_string_lossy().into_owned()),
            _ => {
                return Err(Error::Format(format!(
                    "{} is not a file path",
                    path.display()
                )))
            }
        };
        let dir = match dir.as_os_str().is_empty() {
            true => std::path::PathBuf::from("."),
            false => dir,
        };
        let loader = move || {
            Ok(GGUFLoaderBuilder::new(
                None,
                None,
                dir.to_string_lossy().into_owned(),
                vec![file],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build())
        };
        Engine::load(loader, precision, device, None)
    }

    /// Load the HF folder `dir` (config.json, safetensors, tokenizer.json) offline on
    /// `device`, its linear layers quantized to `isq` as they load when given.
    pub fn load_folder(
        dir: &Path,
        architecture: &str,
        precision: Precision,
        isq: Option<IsqType>,
        device: &Device,
    ) -> Result<Engine, Error> {
        let kind = match architecture {
            "llama" => NormalLoaderType::Llama,
            "mistral" => NormalLoaderType::Mistral,
            "qwen2" => NormalLoaderType::Qwen2,
            "qwen3" => NormalLoaderType::Qwen3,
            other => return Err(Error::UnsupportedArchitecture(other.to_string())),
        };
        let id = dir.to_string_lossy().into_owned();
        let loader = move || {
            NormalLoaderBuilder::new(
                NormalSpecificConfig::default(),
                None,
                None,
                Some(id),
                false,
                None,
            )
            .build(Some(kind))
            .map_err(|e| Error::Engine(format!("{e:#}")))
        };
        Engine::load(loader, precision, device, isq)
    }

    fn load(
        loader: impl FnOnce() -> Result<Box<dyn Loader>, Error> + Send,
        precision: Precision,
        device: &Device,
        isq: Option<IsqType>,
    ) -> Result<Engine, Error> {
        // On the CPU mistral.rs's automatic dtype is f16 activations; the reference path is f32.
        let dtype = match precision {
            Precision::F32 | Precision::Fast => ModelDType::F32,
            Precision::Bf16 => ModelDType::BF16,
            Precision::F16 => ModelDType::F16,
        };
        isolated("loading the model", move || {
            let pipeline = loader()?
                .load_model_from_hf(
                    None,
                    TokenSource::None,
                    &dtype,
                    device,
                    true,
                    DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                    isq,
                    None,
                )
                .map_err(|e| Error::Engine(format!("{e:#}")))?;
            let (tokenizer, eos, dtype) = {
                let p = pipeline.blocking_lock();
                let tokenizer = p
                    .tokenizer()
                    .ok_or_else(|| Error::Engine("the pipeline has no tokenizer".into()))?;
                let md = p.get_metadata();
                (tokenizer, md.eos_tok.clone(), md.activation_dtype)
            };
            let method = SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(NonZeroUsize::MIN),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Engine(format!("tokio runtime: {e}")))?;
            // No prefix cache: every request computes every position it asks logits for.
            let runner = runtime.block_on(
                MistralRsBuilder::new(pipeline, method, false, None)
                    .with_no_prefix_cache(true)
                    .build(),
            );
            Ok(Engine {
                runner,
                tokenizer,
                eos,
                dtype,
                turn: std::sync::Mutex::new(()),
            })
        })
    }

    fn send(&self, request: Request) -> Result<(), Error> {
        self.runner
            .get_sender(None)
            .map_err(|e| Error::Engine(format!("{e:?}")))?
            .blocking_send(request)
            .map_err(|_| Error::Engine("the engine is gone".into()))
    }

    fn request(
        &self,
        messages: RequestMessage,
        what: &str,
    ) -> Result<(Vec<Tensor>, Vec<u32>), Error> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        isolated(what, || {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            self.send(Request::Normal(Box::new(NormalRequest {
                id: 0,
                messages,
                sampling_params: SamplingParams::deterministic(),
                response: tx,
                return_logprobs: false,
                is_streaming: false,
                constraint: Constraint::None,
                suffix: None,
                tool_choice: None,
                tools: None,
                logits_processors: None,
                return_raw_logits: true,
                web_search_options: None,
                model_id: None,
                truncate_sequence: false,
            })))?;
            match rx.blocking_recv() {
                Some(Response::Raw {
                    logits_chunks,
                    tokens,
                }) => Ok((logits_chunks, tokens)),
                Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                    Err(Error::Engine(e.to_string()))
                }
                Some(Response::ModelError(e, _)) | Some(Response::CompletionModelError(e, _)) => {
                    Err(Error::Engine(e))
                }
                Some(_) => Err(Error::Engine("an unexpected response".into())),
                None => Err(Error::Engine("the engine dropped the request".into())),
            }
        })
    }

    /// mistral.rs's own final logits at every position of `tokens`, row-major (`vocab` per
    /// row), in f32.
    pub fn final_logits(&self, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        let (chunks, _) = self.request(
            RequestMessage::CompletionTokens(tokens.to_vec()),
            "mistral.rs's forward",
        )?;
        let mut out = Vec::new();
        for c in chunks {
            out.extend(c.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Generate after `prompt` on mistral.rs's engine (its sampler, stop tokens and KV cache),
    /// reporting each drawn token on `events` as soon as the engine moves on to the next, and
    /// [`Event::Done`] last. Blocks until the request ends; [`Engine::cancel`] ends it early.
    ///
    /// mistral.rs 0.8.1 answers a generation with text, not token ids. The ids come from the
    /// context the engine hands its logits processors before each draw (the prompt and every
    /// token drawn so far): the processor here reports the newest one and changes nothing. The
    /// last token of a request is drawn after the last call, so its text (special tokens
    /// written out) comes with the answer, in [`Ended::last`].
    pub fn generate(
        &self,
        prompt: &[u32],
        sampling: SamplingParams,
        events: std::sync::mpsc::Sender<Event>,
    ) {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let prompt_len = prompt.len();
        let done = events.clone();
        let result =
            isolated("mistral.rs's generation", move || {
                let seen = move |logits: &Tensor, context: &[u32]| {
                    if let Some(index) = context.len().checked_sub(prompt_len + 1) {
                        let id = context[context.len() - 1];
                        // The receiver may be gone (the lens stopped); the engine then finishes
                        // or is cancelled on its own.
                        let _ = events.send(Event::Token { index, id });
                    }
                    Ok(logits.clone())
                };
                let processor: Arc<dyn CustomLogitsProcessor> = Arc::new(seen);
                let (tx, mut rx) = tokio::sync::mpsc::channel(1);
                self.send(Request::Normal(Box::new(NormalRequest {
                    id: 0,
                    messages: RequestMessage::CompletionTokens(prompt.to_vec()),
                    sampling_params: sampling,
                    response: tx,
                    return_logprobs: true,
                    is_streaming: false,
                    constraint: Constraint::None,
                    suffix: None,
                    tool_choice: None,
                    tools: None,
                    logits_processors: Some(vec![processor]),
                    return_raw_logits: false,
                    web_search_options: None,
                    model_id: None,
                    truncate_sequence: false,
                })))?;
                match rx.blocking_recv() {
                    Some(Response::CompletionDone(done)) => {
                        let choice =
                            done.choices.into_iter().next().ok_or_else(|| {
                                Error::Engine("an answer without a choice".into())
                            })?;
                        let last = choice
                            .logprobs
                            .and_then(|l| l.content)
                            .and_then(|c| c.into_iter().last())
                            .map(|l| l.token);
                        Ok(Ended {
                            reason: choice.finish_reason,
                            generated: done.usage.completion_tokens,
                            last,
                        })
                    }
                    Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                        Err(Error::Engine(e.to_string()))
                    }
                    Some(Response::ModelError(e, _))
                    | Some(Response::CompletionModelError(e, _)) => Err(Error::Engine(e)),
                    Some(_) => Err(Error::Engine("an unexpected response".into())),
                    None => Err(Error::Engine("the engine dropped the request".into())),
                }
            });
        let _ = done.send(Event::Done(result));
    }

    /// End the running generation at the engine's next step (it answers as usual, with the
    /// reason `canceled`). mistral.rs's flag for this is global; the lens runs one request at a
    /// time, so "all" is that one. [`Engine::cancelled`] lowers it once the answer is in.
    pub fn cancel(&self) {
        TERMINATE_ALL_NEXT_STEP.store(true, Ordering::SeqCst);
    }

    /// Lower the flag [`Engine::cancel`] raised, after the request's answer (the engine
    /// lowers it only when it found a sequence to end; a request that had just finished
    /// would otherwise leave it up for the next one).
    pub fn cancelled(&self) {
        TERMINATE_ALL_NEXT_STEP.store(false, Ordering::SeqCst);
    }

    /// The sampling parameters of mistral.rs for the lens's: greedy at temperature 0, else
    /// softmax at `temperature` within the top-p nucleus; at most `max_len` tokens, ending at
    /// any of `stop`.
    pub fn sampling(
        sampling: &lens_core::Sampling,
        max_len: usize,
        stop: &[u32],
    ) -> SamplingParams {
        let mut params = if sampling.temperature > 0.0 {
            SamplingParams {
                temperature: Some(f64::from(sampling.temperature)),
                top_p: (sampling.top_p < 1.0).then_some(f64::from(sampling.top_p)),
                ..SamplingParams::neutral()
            }
        } else {
            SamplingParams::deterministic()
        };
        params.max_len = Some(max_len);
        params.stop_toks = Some(StopTokens::Ids(stop.to_vec()));
        params
    }

    /// `text` as one user turn in the model's chat template (mistral.rs renders and tokenizes
    /// it), ready for the assistant's reply.
    pub fn chat_prompt(&self, text: &str) -> Result<Vec<u32>, Error> {
        let mut message = indexmap::IndexMap::new();
        message.insert("role".to_string(), MessageContent::Left("user".to_string()));
        message.insert(
            "content".to_string(),
            MessageContent::Left(text.to_string()),
        );
        let (_, tokens) = self.request(
            RequestMessage::Chat {
                messages: vec![message],
                enable_thinking: None,
                reasoning_effort: None,
            },
            "mistral.rs's chat template",
        )?;
        Ok(tokens)
    }
}
