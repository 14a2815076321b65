//! Gemma 3 270M (Q4_K_M GGUF) beyond the conformance suite: `--precision fast` (candle's
//! quantized kernels on Q4_K, Q6_K and Q8_0 blocks, Q5_0 requantized to Q8_0) against the HF
//! golden.

use lens_candle::{CandleBackend, Precision};
use lens_core::LensKind;

use crate::oracle::{self, Deviations};

#[test]
fn fast_path_agrees_on_clear_top1() {
    let backend = CandleBackend::load(&crate::gemma3_model_path(), Precision::Fast)
        .expect("load Gemma 3 270M with --precision fast");
    let golden = oracle::load("golden_gemma3.json");
    let mut dev = Deviations::default();
    for prompt in golden["prompts"].as_array().expect("prompts") {
        oracle::compare_prompt(&backend, prompt, LensKind::Norm, None, &mut dev);
    }
    eprintln!(
        "Gemma fast path: top-1 agreement {:.4} on {} clear cells; max |dp| {:.3e}, max |d entropy| {:.3e}, max KL rel {:.3e}",
        dev.top1_agreement(),
        dev.clear_cells,
        dev.prob,
        dev.entropy,
        dev.kl_rel,
    );
    assert_eq!(dev.cells, 19 * (19 + 6 + 22 + 15));
    assert!(dev.clear_cells > 800);
    assert!(
        dev.top1_agreement() >= 0.98,
        "top-1 agreement {}",
        dev.top1_agreement()
    );
}
