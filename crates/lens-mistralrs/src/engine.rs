//! mistral.rs's own side: its GGUF pipeline (tokenizer, chat template, quantized model) and its
//! engine, asked for raw final logits of given tokens.
//!
//! mistral.rs runs its engine on a thread of its own with a tokio runtime; requests go through
//! a channel. Every call here runs on a fresh thread of ours (no runtime context, where
//! blocking on a channel is allowed whoever calls: the CLI, the daemon's blocking pool), and a
//! panic inside mistral.rs ends as an error, not in the caller.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs::core::{AutoDeviceMapParams, MessageContent};
use mistralrs::core::{
    Constraint, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig,
    MistralRs, MistralRsBuilder, ModelDType, NormalRequest, Request, RequestMessage, Response,
    SamplingParams, SchedulerConfig, TokenSource,
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

/// A model loaded by mistral.rs, and its engine.
pub(crate) struct Engine {
    runner: Arc<MistralRs>,
    pub tokenizer: Arc<tokenizers_mistralrs::Tokenizer>,
    /// Token ids that end generation (the model's EOS tokens as mistral.rs reads them).
    pub eos: Vec<u32>,
    /// The activations' dtype mistral.rs runs with.
    pub dtype: DType,
}

impl Engine {
    /// Load the GGUF file at `path` offline (no hub, no token) on the CPU.
    pub fn load_gguf(path: &Path, precision: Precision) -> Result<Engine, Error> {
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
        // On the CPU mistral.rs's automatic dtype is f16 activations; the reference path is f32.
        let dtype = match precision {
            Precision::F32 | Precision::Fast => ModelDType::F32,
            Precision::Bf16 => ModelDType::BF16,
            Precision::F16 => ModelDType::F16,
        };
        isolated("loading the model", move || {
            let loader = GGUFLoaderBuilder::new(
                None,
                None,
                dir.to_string_lossy().into_owned(),
                vec![file],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build();
            let pipeline = loader
                .load_model_from_hf(
                    None,
                    TokenSource::None,
                    &dtype,
                    &Device::Cpu,
                    true,
                    DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                    None,
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
            })
        })
    }

    fn request(
        &self,
        messages: RequestMessage,
        what: &str,
    ) -> Result<(Vec<Tensor>, Vec<u32>), Error> {
        isolated(what, || {
            let sender = self
                .runner
                .get_sender(None)
                .map_err(|e| Error::Engine(format!("{e:?}")))?;
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let request = Request::Normal(Box::new(NormalRequest {
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
            }));
            sender
                .blocking_send(request)
                .map_err(|_| Error::Engine("the engine is gone".into()))?;
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
