//! The tiny random Llama fixture, as safetensors and as an f32 GGUF, against its HF goldens.

use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, LensKind};

use crate::oracle::{self, Deviations};

fn check(path: &std::path::Path) {
    check_golden(path, "oracle/tiny-llama/golden.json", 4, 5 * (8 + 26));
}

fn check_golden(path: &std::path::Path, golden: &str, n_layers: usize, cells: usize) {
    let backend = CandleBackend::load(path, Precision::F32).expect("load the fixture");
    assert_eq!(backend.info().n_layers, n_layers);
    assert_eq!(backend.info().vocab_size, 2048);
    let golden = oracle::load_data(golden);
    let mut dev = Deviations::default();
    for prompt in golden["prompts"].as_array().expect("prompts") {
        oracle::compare_prompt(
            &backend,
            prompt,
            LensKind::Norm,
            Some(oracle::F32),
            &mut dev,
        );
    }
    eprintln!("{}: {dev:?}", path.display());
    assert!(
        dev.failures.is_empty(),
        "{:#?}",
        &dev.failures[..dev.failures.len().min(20)]
    );
    assert_eq!(dev.cells, cells);
}

#[test]
fn safetensors_folder_matches_hf() {
    check(&crate::data_dir().join("oracle/tiny-llama"));
}

#[test]
fn f32_gguf_matches_hf() {
    check(&crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf"));
}

/// Qwen2: q/k/v biases, tied embeddings, HF layout (fixture made by
/// tests/data/fixtures/make_tiny_qwen2.py with HF transformers).
#[test]
fn qwen2_safetensors_folder_matches_hf() {
    check_golden(
        &crate::data_dir().join("fixtures/tiny-qwen2"),
        "fixtures/tiny-qwen2/golden.json",
        3,
        4 * (8 + 26),
    );
}
