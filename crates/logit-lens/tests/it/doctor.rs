//! `logit-lens doctor`: every backend of the build on the fixed prompts and a golden file;
//! exit 0 when everything is within its bounds, 1 (naming what) when not.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use crate::{data_dir, logit_lens};

#[test]
fn doctor_passes_on_the_default_model_and_its_golden() {
    let golden = data_dir().join("oracle/golden_smollm2.json");
    let run = logit_lens(&[
        "doctor",
        "--golden",
        golden.to_str().unwrap(),
        "A custom prompt",
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    assert!(out.contains("all checks passed"), "{out}");
    assert!(out.contains("prompt \"A custom prompt\""), "{out}");
    assert!(out.contains("vs the golden: every layer: top-1"), "{out}");
    assert!(
        !out.contains("DIFFERENT") && !out.contains("BEYOND"),
        "{out}"
    );
    #[cfg(feature = "mistralrs")]
    {
        assert!(out.contains("mistralrs vs candle: every layer"), "{out}");
        assert!(
            out.contains("last layer vs its engine's own logits"),
            "{out}"
        );
    }
}

#[test]
fn doctor_fails_on_a_golden_that_disagrees() {
    let text =
        std::fs::read_to_string(data_dir().join("oracle/golden_smollm2.json")).expect("golden");
    let mut golden: serde_json::Value = serde_json::from_str(&text).expect("json");
    // One probability moved by 0.01 at the last layer of the second prompt.
    let p = &mut golden["prompts"][1]["layers"][30]["top5_probs"][4][0];
    *p = serde_json::json!(p.as_f64().expect("prob") - 0.01);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("golden.json");
    std::fs::write(&path, golden.to_string()).expect("write");
    let run = logit_lens(&[
        "doctor",
        "--backend",
        "candle",
        "--golden",
        path.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("BEYOND THE BOUNDS"), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("candle vs the golden on \"The capital of France is\""),
        "{}",
        run.stderr
    );
}
