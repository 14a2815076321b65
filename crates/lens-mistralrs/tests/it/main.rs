//! Integration tests of the mistralrs backend: the conformance suite against the independent
//! references in `tests/data/oracle/` (HF transformers; see PROVENANCE.md there), the capture's
//! last layer against mistral.rs's own final logits on every model loaded, and generation.

// Tests report the deviations they measure on stderr.
#![allow(clippy::print_stderr, clippy::unwrap_used)]

mod conformance;
mod generate;
mod self_check;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use lens_conformance::Subject;
use lens_core::{Backend, Device, LoadOptions, Precision, Source};

pub const F32: LoadOptions = LoadOptions {
    precision: Precision::F32,
    device: Device::Cpu,
    threads: None,
    isq: None,
};

pub const FAST: LoadOptions = LoadOptions {
    precision: Precision::Fast,
    ..F32
};

pub fn subject(options: LoadOptions) -> Subject {
    Subject {
        loader: &lens_mistralrs::LOADER,
        options,
    }
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

pub fn oracle(name: &str) -> PathBuf {
    data_dir().join("oracle").join(name)
}

/// The default model, fetched into the cache by the same code the CLI uses.
pub fn default_model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| lens_models::ensure_default_model(false).expect("fetch the default model"))
        .clone()
}

pub fn smollm2() -> Source {
    Source::Gguf(default_model_path())
}

/// A prompt of a dozen tokens.
pub const PROMPT: &str = "The capital of France is Paris, and the capital of Italy is";

/// `source` loaded through the mistralrs loader once per process; the first time, its
/// capture's last layer is checked against mistral.rs's own final logits for [`PROMPT`].
pub fn backend(source: &Source, options: LoadOptions) -> Arc<dyn Backend> {
    static CHECKED: Mutex<Vec<(Source, LoadOptions)>> = Mutex::new(Vec::new());
    let backend = subject(options).backend(source);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.iter().any(|(s, o)| s == source && *o == options) {
        let ids = lens_conformance::ids(&*backend, PROMPT);
        let check = lens_core::engine_check(&*backend, &ids)
            .expect("mistral.rs's own logits")
            .expect("the mistralrs backend has an engine");
        eprintln!("{source} ({}): self-check {check:?}", options.precision);
        assert!(
            check.passed(),
            "{source} ({}): {check:?}",
            options.precision
        );
        assert_eq!(check.top1_agree, ids.len(), "{check:?}");
        checked.push((source.clone(), options));
    }
    backend
}
