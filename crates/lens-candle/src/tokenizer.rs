//! The model's tokenizer as a `tokenizers::Tokenizer`, built from a GGUF file's metadata or
//! read from an HF `tokenizer.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use lens_core::Token;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::spm::Spm;
use crate::Error;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's split pattern (also used by many recent byte-level BPE models).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern: like Llama 3's, but digits one by one.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(crate) struct ModelTokenizer {
    inner: Inner,
    bos: Option<u32>,
    add_bos: bool,
    vocab_size: usize,
    /// The tokens that end generation (end of sequence, end of turn).
    pub(crate) eos: Vec<u32>,
}

/// The two kinds of tokenizer: HF's library (byte-level BPE, `tokenizer.json`) or our own
/// score-driven SentencePiece BPE.
enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Spm),
}

impl ModelTokenizer {
    /// Build the tokenizer a GGUF file describes (`tokenizer.ggml.*`): byte-level BPE (`gpt2`)
    /// or SentencePiece BPE driven by scores (`llama`).
    pub(crate) fn from_gguf(content: &Content) -> Result<Self, Error> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| {
                Error::Unsupported("the GGUF file has no tokenizer (tokenizer.ggml.model)".into())
            })?;
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
            Some(Ok(v)) => v.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
            _ => Vec::new(),
        };
        let bos = md
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok());
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| md.get(*k).and_then(|v| v.to_u32().ok()))
            .collect();
        eos.dedup();
        let flag = |key: &str, default: bool| {
            md.get(key)
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(default)
        };
        match model.as_str() {
            "gpt2" => {}
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores").map(|v| v.to_vec()) {
                    Some(Ok(v)) => v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect(),
                    _ => {
                        return Err(Error::Format(
                            "the GGUF file lacks `tokenizer.ggml.scores`".into(),
                        ))
                    }
                };
                let unk = md
                    .get("tokenizer.ggml.unknown_token_id")
                    .and_then(|v| v.to_u32().ok());
                let spm = Spm::new(
                    tokens.into_iter().cloned().collect(),
                    scores,
                    types,
                    unk,
                    flag("tokenizer.ggml.add_space_prefix", true),
                )?;
                return Ok(ModelTokenizer {
                    vocab_size: spm.vocab_size(),
                    inner: Inner::Spm(spm),
                    bos,
                    add_bos: flag("tokenizer.ggml.add_bos_token", true),
                    eos,
                });
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model `{model}`: only byte-level BPE (`gpt2`) and SentencePiece BPE \
                     (`llama`) tokenizers are supported in GGUF files"
                )))
            }
        }
        let merges = string_array(md, "tokenizer.ggml.merges")?;
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map_or("default", String::as_str);

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        Error::Format(format!("malformed merge `{m}` in tokenizer.ggml.merges"))
                    })
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Format(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let byte_level = ByteLevel::new(false, true, true);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, Error> {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Format(format!("tokenizer split pattern: {e}")))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM: every digit its own pre-token, then GPT-2's split.
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => split(LLAMA3_PATTERN)?,
            "qwen2" | "deepseek-r1-qwen" => split(QWEN2_PATTERN)?,
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from((*tok).clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&specials);

        Ok(ModelTokenizer {
            inner: Inner::Hf(Box::new(inner)),
            bos,
            add_bos: flag("tokenizer.ggml.add_bos_token", false),
            vocab_size: tokens.len(),
            eos,
        })
    }

    /// Read an HF `tokenizer.json`. Its post-processor decides about BOS, as in transformers.
    pub(crate) fn from_file(path: &Path) -> Result<Self, Error> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(ModelTokenizer {
            inner: Inner::Hf(Box::new(inner)),
            bos: None,
            add_bos: false,
            vocab_size,
            eos: Vec::new(),
        })
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(crate) fn tokenize(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        let tokens = match &self.inner {
            Inner::Spm(spm) => spm.encode(text)?,
            Inner::Hf(hf) => {
                let enc = hf
                    .encode(text, true)
                    .map_err(|e| lens_core::Error::Tokenizer(e.to_string()))?;
                enc.get_ids()
                    .iter()
                    .zip(enc.get_offsets())
                    .map(|(&id, &(start, end))| Token {
                        id,
                        text: self.decode(id),
                        start,
                        end,
                    })
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(tokens.len() + 1);
        // Always, even before a BOS written in the text, as HF transformers and llama.cpp do.
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            out.push(Token {
                id: bos,
                text: self.decode(bos),
                start: 0,
                end: 0,
            });
        }
        out.extend(tokens);
        Ok(out)
    }

    pub(crate) fn decode(&self, id: u32) -> String {
        match &self.inner {
            Inner::Hf(hf) => hf.decode(&[id], false).unwrap_or_default(),
            Inner::Spm(spm) => spm.decode(id),
        }
    }
}

fn string_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a String>, Error> {
    let values = md
        .get(key)
        .ok_or_else(|| Error::Format(format!("the GGUF file lacks `{key}`")))?
        .to_vec()
        .map_err(|_| Error::Format(format!("`{key}` is not an array")))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .map_err(|_| Error::Format(format!("`{key}` holds a non-string")))
        })
        .collect()
}
