//! `logit-lens generate`: on the candle backend (our own forward, greedy) and the mistralrs
//! backend, each new token streams as one JSON line with every layer's top-1 at that step.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use crate::logit_lens;

#[cfg(feature = "candle")]
#[test]
fn candle_generates_greedily_on_its_own_forward() {
    let run = logit_lens(&[
        "generate",
        "The capital of France is",
        "--backend",
        "candle",
        "--max-tokens",
        "6",
        "--format",
        "jsonl",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines = check_jsonl(&run.stdout, 30, true);
    assert_eq!(lines.len(), 6, "{}", run.stdout);
    assert_eq!(lines[5]["finish"], "length");
    let text: String = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert!(text.contains("Paris"), "{text:?}");
    // No chat template engine here: said, not guessed.
    let chat = logit_lens(&[
        "generate",
        "The capital of France is",
        "--backend",
        "candle",
        "--chat",
    ]);
    assert_eq!(chat.code, 2, "{}", chat.stderr);
    assert!(chat.stderr.contains("no chat template"), "{}", chat.stderr);
}

/// The JSON lines of `generate`, each checked: every shown layer once, the step's token the
/// final layer's top-1 when greedy, and the first layer where it is top-1 consistent with the
/// layers. Returns the lines.
pub fn check_jsonl(stdout: &str, n_layers: usize, greedy: bool) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i, "{line}");
        let layers = line["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), n_layers + 1, "{line}");
        let token = &line["token"];
        let first = layers.iter().find(|l| l["top1"] == *token);
        assert_eq!(
            line["first_top1_layer"],
            first.map_or(serde_json::Value::Null, |l| l["layer"].clone())
        );
        if greedy {
            assert_eq!(layers[n_layers]["top1"], *token, "step {i}: greedy");
            assert_eq!(layers[n_layers]["token_rank"], 0);
        }
        for l in layers {
            let p = l["token_prob"].as_f64().expect("token_prob");
            assert!((0.0..=1.0).contains(&p), "{l}");
            assert!(l["top1_prob"].as_f64().expect("top1_prob") >= p, "{l}");
        }
    }
    lines
}

#[test]
fn bad_sampling_parameters_are_usage_errors() {
    for (flag, value, says) in [
        ("--temperature", "-1", "temperature -1"),
        ("--top-p", "0", "top-p 0"),
    ] {
        let run = logit_lens(&["generate", "The capital", flag, value]);
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains(says), "{}", run.stderr);
    }
}

#[cfg(feature = "mistralrs")]
mod mistralrs {
    use serde_json::Value;

    use super::check_jsonl;
    use crate::{data_dir, logit_lens};

    #[test]
    fn mistralrs_generate_streams_one_line_per_token() {
        let run = logit_lens(&[
            "generate",
            "The capital of France is",
            "--backend",
            "mistralrs",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--format",
            "jsonl",
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let lines = check_jsonl(&run.stdout, 30, true);
        assert_eq!(lines.len(), 8, "{}", run.stdout);
        assert_eq!(lines[7]["finish"], "length");
        let text: String = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
        assert!(text.contains("Paris"), "{text:?}");
    }

    #[test]
    fn mistralrs_generate_samples_with_a_seed_and_chats() {
        let args = |seed: &'static str| {
            vec![
                "generate",
                "What is the capital of France?",
                "--backend",
                "mistralrs",
                "--chat",
                "--max-tokens",
                "5",
                "--temperature",
                "0.9",
                "--top-p",
                "0.9",
                "--seed",
                seed,
                "--format",
                "jsonl",
            ]
        };
        let a = logit_lens(&args("1"));
        let b = logit_lens(&args("1"));
        assert_eq!(a.code, 0, "{}", a.stderr);
        assert_eq!(a.stdout, b.stdout, "the same seed, the same tokens");
        let lines = check_jsonl(&a.stdout, 30, false);
        assert!(!lines.is_empty() && lines.len() <= 5);
        // The terminal view: a heatmap with one column per token.
        let text = logit_lens(&[
            "generate",
            "The capital of France is",
            "--backend",
            "mistralrs",
            "--max-tokens",
            "3",
            "--layers",
            "0,15,30",
        ]);
        assert_eq!(text.code, 0, "{}", text.stderr);
        assert!(text.stdout.contains("3 tokens (length)"), "{}", text.stdout);
        assert!(
            !text.stdout.contains('\x1b'),
            "piped output has escape codes"
        );
        assert_eq!(
            text.stdout
                .lines()
                .filter(|l| l.trim_start().starts_with("30 "))
                .count(),
            1,
            "{}",
            text.stdout
        );
    }

    #[test]
    fn mistralrs_is_listed_and_its_run_matches_the_oracle() {
        let run = logit_lens(&["backends", "--format", "json"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        let names: Vec<&str> = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert!(names.contains(&"mistralrs"), "{names:?}");

        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(data_dir().join("oracle/golden_smollm2.json")).unwrap(),
        )
        .unwrap();
        let golden = &golden["prompts"][0];
        let text = golden["text"].as_str().unwrap();
        let run = logit_lens(&[
            "--verbose",
            "run",
            text,
            "--backend",
            "mistralrs",
            "--format",
            "json",
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let r: Value = serde_json::from_str(&run.stdout).unwrap();
        let ids: Vec<&Value> = r["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["id"])
            .collect();
        let want: Vec<&Value> = golden["token_ids"].as_array().unwrap().iter().collect();
        assert_eq!(ids, want);
        let positions = r["positions"].as_array().unwrap();
        for (l, layer) in golden["layers"].as_array().unwrap().iter().enumerate() {
            for (p, pos) in positions.iter().enumerate() {
                let cell = &pos["cells"][l];
                for i in 0..5 {
                    let got = cell["top"][i]["prob"].as_f64().unwrap();
                    let want = layer["top5_probs"][p][i].as_f64().unwrap();
                    assert!(
                        (got - want).abs() < 1e-4,
                        "layer {l} pos {p} top-{i}: {got} vs {want}"
                    );
                }
                assert_eq!(
                    cell["top"][0]["id"], layer["top5_ids"][p][0],
                    "layer {l} pos {p}"
                );
            }
        }
    }
}
