//! The tiny random Llama fixture, as safetensors and as an f32 GGUF, against its HF goldens.

use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, LensKind};

use crate::oracle::{self, Deviations};

fn check(path: &std::path::Path) {
    let backend = CandleBackend::load(path, Precision::F32).expect("load tiny-llama");
    assert_eq!(backend.info().n_layers, 4);
    assert_eq!(backend.info().vocab_size, 2048);
    let golden = oracle::load("tiny-llama/golden.json");
    let mut dev = Deviations::default();
    for prompt in golden["prompts"].as_array().expect("prompts") {
        oracle::compare_prompt(&backend, prompt, LensKind::Norm, Some(oracle::F32), &mut dev);
    }
    eprintln!("{}: {dev:?}", path.display());
    assert!(dev.failures.is_empty(), "{:#?}", &dev.failures[..dev.failures.len().min(20)]);
    assert_eq!(dev.cells, 5 * (8 + 26));
}

#[test]
fn safetensors_folder_matches_hf() {
    check(&crate::data_dir().join("oracle/tiny-llama"));
}

#[test]
fn f32_gguf_matches_hf() {
    check(&crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf"));
}
