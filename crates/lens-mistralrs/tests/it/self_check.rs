//! The capture's last layer against mistral.rs's own final logits (its raw-logits request), on
//! every golden prompt, for both precisions; and the check catches a capture that is wrong.

use lens_conformance::{self as suite, oracle};
use lens_core::{engine_check, CaptureOptions, LensKind, Site};

use crate::{backend, smollm2, F32, FAST};

fn golden_ids() -> Vec<Vec<u32>> {
    let golden = oracle::load_json(&crate::oracle("golden_smollm2.json"));
    golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

#[test]
fn the_last_layer_is_mistral_rs_own_output() {
    for (options, bound) in [(F32, 2.0), (FAST, 2.0)] {
        let b = backend(&smollm2(), options);
        for ids in golden_ids() {
            let c = engine_check(&*b, &ids).unwrap().unwrap();
            eprintln!("{}: {} tokens: {c:?}", options.precision, ids.len());
            assert_eq!(c.bound, bound);
            assert!(c.passed(), "{c:?}");
            assert_eq!(c.positions, ids.len());
            assert_eq!(c.top1_agree, ids.len(), "{c:?}");
        }
    }
}

/// The check is not vacuous: mistral.rs's logits for a prompt against the capture of the same
/// prompt shifted by one token are far beyond the bound.
#[test]
fn the_self_check_sees_a_wrong_capture() {
    let b = backend(&smollm2(), FAST);
    let ids = suite::ids(&*b, "The capital of France is Paris, and");
    let theirs = match b.engine_logits(&ids) {
        Some(r) => r.unwrap(),
        None => panic!("the mistralrs backend has an engine"),
    };
    let shifted: Vec<u32> = ids[1..].iter().chain(&ids[..1]).copied().collect();
    let states = b.forward(&shifted, CaptureOptions::default()).unwrap();
    let n = b.info().n_layers;
    let rows: Vec<f32> = (0..ids.len())
        .flat_map(|p| states.row(Site::Layer(n), p).unwrap().to_vec())
        .collect();
    let ours = b.readout(&rows, LensKind::Norm).unwrap();
    let worst = ours
        .iter()
        .zip(&theirs.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("shifted by one token: max |Δlogit| {worst}");
    assert!(worst > 4.0 * theirs.bound, "{worst}");
}
