//! The capture's last layer against mistral.rs's own final logits (its raw-logits request), on
//! every golden prompt, for both precisions, from one thread and from several at once; and the
//! check catches a capture that is wrong.

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

/// Requests from several threads at once take turns in the one engine: mistral.rs 0.8.1
/// batches a generation with a raw-logits request that arrives meanwhile and refuses the
/// latter ("Raw response only supports batch size of 1"), as it once did to two of these
/// tests running side by side.
#[test]
fn requests_from_several_threads_take_turns_in_the_engine() {
    let b = backend(&smollm2(), F32);
    let ids = golden_ids();
    let prompt = suite::ids(&*b, "The capital of France is");
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..2)
            .map(|_| s.spawn(|| suite::generation(&*b, &prompt, 8)))
            .collect();
        let checks: Vec<_> = ids
            .iter()
            .map(|ids| s.spawn(|| engine_check(&*b, ids)))
            .collect();
        for (run, ids) in checks.into_iter().zip(&ids) {
            let c = run.join().expect("no panic").expect("the engine answers");
            let c = c.expect("an engine");
            assert!(c.passed(), "{c:?}");
            assert_eq!(c.positions, ids.len());
        }
        for w in writers {
            let out = w.join().expect("the generation ends");
            let text: String = out.tokens.iter().map(|&t| b.decode(t)).collect();
            assert!(text.contains("Paris"), "{text:?}");
        }
    });
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
