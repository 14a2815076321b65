//! The lens's tokenizer: mistral.rs's conversion of the GGUF tokenizer, with the pre-tokenizer
//! the file names. mistral.rs 0.8.1 gives every byte-level BPE file one split pattern (Qwen2's),
//! whatever its `tokenizer.ggml.pre` says; for SmolLM2 ("smollm") that splits `"\n    if"`
//! as `"\n"`, `"   "`, `" if"` where the model was trained on `"\n   "`, `" if"` (HF
//! transformers and llama.cpp agree). The vocabulary, merges, special tokens and decoder stay
//! mistral.rs's.

use tokenizers_mistralrs::pre_tokenizers::byte_level::ByteLevel;
use tokenizers_mistralrs::pre_tokenizers::digits::Digits;
use tokenizers_mistralrs::pre_tokenizers::sequence::Sequence;
use tokenizers_mistralrs::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers_mistralrs::pre_tokenizers::PreTokenizerWrapper;
use tokenizers_mistralrs::{SplitDelimiterBehavior, Tokenizer};

use crate::Error;

/// Llama 3's split pattern (llama.cpp's `llama-bpe`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// mistral.rs's tokenizer for a GGUF file whose tokenizer is `model` (`tokenizer.ggml.model`)
/// with pre-tokenizer `pre` (`tokenizer.ggml.pre`), its split corrected where it differs.
pub(crate) fn for_lens(
    engine: &Tokenizer,
    model: Option<&str>,
    pre: Option<&str>,
) -> Result<Tokenizer, Error> {
    let mut tokenizer = engine.clone();
    if model != Some("gpt2") {
        return Ok(tokenizer);
    }
    let gpt2 = || ByteLevel::new(false, true, true);
    let split: PreTokenizerWrapper = match pre.unwrap_or("default") {
        // mistral.rs's own split is Qwen2's.
        "qwen2" | "deepseek-r1-qwen" => return Ok(tokenizer),
        // SmolLM, StarCoder: every digit its own pre-token, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into()
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Format(format!("tokenizer split pattern: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        _ => gpt2().into(),
    };
    tokenizer.with_pre_tokenizer(Some(split));
    Ok(tokenizer)
}
