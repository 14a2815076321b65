//! The mistralrs backend through the conformance suite (`lens_conformance`), loaded by its
//! registry entry `lens_mistralrs::LOADER`: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF;
//! f32 = dequantized, as the goldens) against its HF transformers goldens with the candle
//! backend's bounds, and through every other check; the quantized path against the same
//! goldens with the quantized bound (the same top-1 on ≥ 99 % of clear cells).

use std::time::Instant;

use lens_conformance::{self as suite, oracle, Deviations};
use lens_core::{Device, Error, Isq, LensKind, LoadOptions, Loader, Precision, Registry, Source};

use crate::{backend, smollm2, F32, FAST, PROMPT};

#[test]
fn smollm2_norm_lens_matches_hf_transformers() {
    let b = backend(&smollm2(), F32);
    let dev = suite::check_golden(
        &*b,
        &crate::oracle("golden_smollm2.json"),
        LensKind::Norm,
        suite::F32,
    );
    assert_eq!(dev.cells, 31 * (20 + 5 + 18 + 14));
}

#[test]
fn smollm2_raw_lens_matches_hf_transformers() {
    let b = backend(&smollm2(), F32);
    let dev = suite::check_golden(
        &*b,
        &crate::oracle("golden_smollm2_nonorm.json"),
        LensKind::Raw,
        suite::F32_RAW,
    );
    assert_eq!(dev.cells, 31 * (20 + 5));
}

/// mistral.rs's quantized kernels (8-bit activations inside the products) against the f32
/// goldens: measured, and held to the same top-1 on ≥ 99 % of the clear cells.
#[test]
fn smollm2_quantized_agrees_with_hf_transformers_on_clear_cells() {
    let b = backend(&smollm2(), FAST);
    let golden = oracle::load_json(&crate::oracle("golden_smollm2.json"));
    let mut dev = Deviations::default();
    for prompt in golden["prompts"].as_array().unwrap() {
        oracle::compare_prompt(&*b, prompt, LensKind::Norm, None, &mut dev);
    }
    eprintln!(
        "quantized vs HF: top-1 {}/{} clear cells, max |Δp| {:.3e}",
        dev.clear_agree, dev.clear_cells, dev.prob
    );
    assert_eq!(dev.cells, 31 * (20 + 5 + 18 + 14));
    assert!(dev.top1_agreement() >= 0.99, "{dev:?}");
}

/// A tiny family member as an f32 GGUF, loaded by mistral.rs (the self-check against its own
/// logits runs in `backend`), against its HF transformers golden with the f32 bounds.
#[track_caller]
fn check_tiny(gguf: &str, golden: &str, n_layers: usize, cells: usize) {
    let data = crate::data_dir();
    let b = backend(&Source::Gguf(data.join(gguf)), F32);
    assert_eq!(b.info().n_layers, n_layers);
    let dev = suite::check_golden(&*b, &data.join(golden), LensKind::Norm, suite::F32);
    eprintln!("{gguf}: {dev:?}");
    assert_eq!(dev.cells, cells);
}

/// An HF folder loaded by mistral.rs (its normal loader, offline) and read by the capture
/// forward from the same safetensors, self-checked against mistral.rs's logits in `backend`,
/// against its HF transformers golden with the f32 bounds.
#[track_caller]
fn check_folder(folder: &str, golden: &str, n_layers: usize, cells: usize) {
    let data = crate::data_dir();
    let b = backend(&Source::HfFolder(data.join(folder)), F32);
    assert_eq!(b.info().n_layers, n_layers);
    let dev = suite::check_golden(&*b, &data.join(golden), LensKind::Norm, suite::F32);
    eprintln!("{folder}: {dev:?}");
    assert_eq!(dev.cells, cells);
}

#[test]
fn hf_folders_match_hf_transformers() {
    check_folder(
        "oracle/tiny-llama",
        "oracle/tiny-llama/golden.json",
        4,
        5 * (8 + 26),
    );
    // mistral.rs 0.8.1 reads `rope_theta` at the top of config.json only; transformers 5 writes
    // it under `rope_parameters` (the tiny Qwen fixtures): a clear error, not a panic.
    for folder in ["fixtures/tiny-qwen2", "fixtures/tiny-qwen3"] {
        let source = Source::HfFolder(crate::data_dir().join(folder));
        let r = lens_mistralrs::LOADER.load(&source, &F32).map(drop);
        assert!(
            matches!(&r, Err(Error::Load(m)) if m.contains("rope_theta")),
            "{folder}: {r:?}"
        );
    }
}

/// In-situ quantization: mistral.rs quantizes the folder's linear layers as it loads, and the
/// `fast` capture quantizes its own copy the same way, so the two agree to within the engine's
/// attention (the self-check in `backend`); against the f32 golden, measured.
#[test]
fn an_hf_folder_quantized_in_situ_agrees_with_mistral_rs() {
    let folder = Source::HfFolder(crate::data_dir().join("oracle/tiny-llama"));
    for isq in [Isq::Q8_0, Isq::Q4_0] {
        let options = LoadOptions {
            isq: Some(isq),
            ..FAST
        };
        let b = backend(&folder, options);
        assert!(
            b.info().precision.contains("in-situ"),
            "{}",
            b.info().precision
        );
        let golden = oracle::load_json(&crate::oracle("tiny-llama/golden.json"));
        let mut dev = Deviations::default();
        for prompt in golden["prompts"].as_array().unwrap() {
            oracle::compare_prompt(&*b, prompt, LensKind::Norm, None, &mut dev);
        }
        eprintln!(
            "{isq} vs HF: top-1 {}/{} clear cells, max |Δp| {:.3e}",
            dev.clear_agree, dev.clear_cells, dev.prob
        );
        assert_eq!(dev.cells, 5 * (8 + 26));
        // The quantized weights move the numbers (so the f32 bounds would fail) ...
        assert!(dev.prob > 1e-4, "{isq}: {dev:?}");
    }
}

/// Llama: the tiny oracle fixture (no biases, grouped-query attention, GGUF's permuted q/k).
#[test]
fn tiny_llama_gguf_matches_hf_transformers() {
    check_tiny(
        "oracle/tiny-llama/tiny-llama.f32.gguf",
        "oracle/tiny-llama/golden.json",
        4,
        5 * (8 + 26),
    );
}

/// Qwen3: an RMSNorm over each query and key head, a head dimension of its own (24, where
/// hidden / heads is 16), NeoX RoPE (fixture: tests/data/fixtures/make_tiny_qwen3_gguf.py).
#[test]
fn tiny_qwen3_gguf_matches_hf_transformers() {
    check_tiny(
        "fixtures/tiny-qwen3/tiny-qwen3.f32.gguf",
        "fixtures/tiny-qwen3/golden.json",
        3,
        4 * (8 + 26),
    );
}

#[test]
fn tokenization_matches_the_goldens() {
    let b = backend(&smollm2(), F32);
    let checked = suite::tokenization(&*b, &crate::oracle("golden_smollm2.json"));
    assert_eq!(checked, 20 + 5 + 18 + 14);
}

#[test]
fn prefix_reuse_equals_a_fresh_forward() {
    for options in [F32, FAST] {
        let b = backend(&smollm2(), options);
        let ids = suite::ids(&*b, PROMPT);
        let t = Instant::now();
        let worst = suite::prefix_reuse(&*b, &ids);
        eprintln!(
            "{}: prefix reuse within {worst:.2e} of a fresh forward ({:?})",
            options.precision,
            t.elapsed()
        );
        assert!(worst <= suite::REUSE_BOUND);
    }
}

#[test]
fn mid_block_capture_is_complete() {
    let b = backend(&smollm2(), F32);
    suite::mid_block(&*b, &suite::ids(&*b, PROMPT));
}

#[test]
fn a_stop_is_honoured_between_blocks() {
    let b = backend(&smollm2(), F32);
    let long = suite::ids(
        &*b,
        &"The sun rises in the east and sets in the west. ".repeat(12),
    );
    assert!(long.len() > 100, "{} tokens", long.len());
    let timings = suite::stop_between_layers(&*b, &long);
    eprintln!("{} tokens: {timings:?}", long.len());
    assert!(timings.latency * 3 < timings.full);
}

#[test]
fn the_lens_reduce_matches_the_host_math() {
    let b = backend(&smollm2(), F32);
    let ids = suite::ids(&*b, "The capital of France is");
    let cells = suite::reduce_matches_host(&*b, &ids);
    assert_eq!(cells, 3 * 5 * 31 + 2 * 3 * 5);
}

#[test]
fn bad_inputs_are_errors() {
    let b = backend(&smollm2(), F32);
    suite::bad_inputs(&*b, &suite::ids(&*b, PROMPT));
}

#[test]
fn the_registry_picks_mistralrs_and_refuses_what_it_cannot_do() {
    let isq = LoadOptions {
        isq: Some(Isq::Q8_0),
        ..F32
    };
    let folder = Source::HfFolder(crate::oracle("tiny-llama"));
    let refused = [(smollm2(), isq, "--isq"), (folder, FAST, "--isq TYPE")];
    for options in [F32, FAST] {
        suite::registry(&lens_mistralrs::LOADER, &smollm2(), &options, &refused);
    }
    let caps = lens_mistralrs::LOADER.capabilities();
    assert_eq!(caps.precisions, [Precision::F32, Precision::Fast]);
    assert_eq!(caps.devices, [Device::Cpu]);
    let cuda = LoadOptions {
        device: Device::Cuda(0),
        ..F32
    };
    let registry = Registry::new(vec![&lens_mistralrs::LOADER]);
    let r = registry
        .pick(Some("mistralrs"), &smollm2(), &cuda)
        .map(drop);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("cuda:0")),
        "{r:?}"
    );
}

/// A file that is not a model is an error, not a panic (mistral.rs panics on some).
#[test]
fn a_bad_file_is_an_error() {
    let dir = std::env::temp_dir().join(format!("lens-mistralrs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("truncated.gguf");
    let real = std::fs::read(crate::default_model_path()).unwrap();
    std::fs::write(&path, &real[..4096]).unwrap();
    let r = lens_mistralrs::LOADER
        .load(&Source::Gguf(path.clone()), &F32)
        .map(drop);
    assert!(matches!(&r, Err(Error::Load(m)) if !m.is_empty()), "{r:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
