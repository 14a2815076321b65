//! Integration tests of the candle backend against the independent references in
//! `tests/data/oracle/` (HF transformers, llama.cpp; see PROVENANCE.md there).

// Tests report the deviations they measure on stderr.
#![allow(clippy::print_stderr)]

mod bad_input;
mod conformance;
mod gemma3;
mod mutation;
mod oracle;
mod reuse;
mod smollm2;
mod stage;
mod stop;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lens_candle::{CandleBackend, Precision};

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

/// The default model, fetched into the cache by the same code the CLI uses.
pub fn default_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| lens_models::ensure_default_model(false).expect("fetch the default model"))
        .clone()
}

/// Gemma 3 270M, fetched into the cache by the same code the CLI uses.
pub fn gemma3_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        lens_models::ensure_model(&lens_models::GEMMA3_270M, false).expect("fetch Gemma 3 270M")
    })
    .clone()
}

pub fn smollm2(precision: Precision) -> Arc<CandleBackend> {
    static F32: OnceLock<Arc<CandleBackend>> = OnceLock::new();
    static FAST: OnceLock<Arc<CandleBackend>> = OnceLock::new();
    let cell = match precision {
        Precision::F32 => &F32,
        Precision::Fast => &FAST,
        other => panic!("the candle backend has no {other} precision"),
    };
    cell.get_or_init(|| {
        Arc::new(CandleBackend::load(&default_model_path(), precision).expect("load SmolLM2"))
    })
    .clone()
}
