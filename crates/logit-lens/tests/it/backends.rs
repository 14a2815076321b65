//! The backend registry from the command line: `logit-lens backends`, `--backend`,
//! `--device`, `--precision`, and the one clear error (exit 2) for what a build cannot do.

use serde_json::Value;

use crate::{data_dir, logit_lens};

#[test]
fn the_build_lists_its_backends() {
    let run = logit_lens(&["backends", "--format", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).expect("json");
    let backends = v["backends"].as_array().expect("backends");
    let candle = backends
        .iter()
        .find(|b| b["name"] == "candle")
        .unwrap_or_else(|| panic!("no candle backend in {v}"));
    let list = |k: &str| -> Vec<&str> {
        candle[k]
            .as_array()
            .expect(k)
            .iter()
            .filter_map(Value::as_str)
            .collect()
    };
    assert_eq!(list("sources"), ["gguf", "hf-folder"]);
    assert_eq!(list("devices"), ["cpu"]);
    assert_eq!(list("precisions"), ["f32", "fast"]);
    assert_eq!(
        list("architectures"),
        ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2"]
    );
    let text = logit_lens(&["backends"]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].starts_with("backend"), "{}", text.stdout);
    assert!(
        lines.iter().any(|l| l.starts_with("candle")
            && l.contains("gguf, hf-folder")
            && l.contains("f32, fast")),
        "{}",
        text.stdout
    );
}

#[test]
fn auto_and_candle_give_the_same_report() {
    let prompt = "The capital of France is";
    let auto = logit_lens(&["run", prompt, "--format", "json", "--layers", ":10"]);
    let named = logit_lens(&[
        "run",
        prompt,
        "--format",
        "json",
        "--layers",
        ":10",
        "--backend",
        "candle",
    ]);
    assert_eq!(auto.code, 0, "{}", auto.stderr);
    assert_eq!(named.code, 0, "{}", named.stderr);
    assert!(auto.stdout.contains("\"schema\":\"logit-lens/run/v1\""));
    assert_eq!(auto.stdout, named.stdout);
}

#[track_caller]
fn refused(args: &[&str], expect: &[&str]) {
    let run = logit_lens(args);
    assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: {}", run.stderr);
    for e in expect {
        assert!(
            errors[0].contains(e),
            "{args:?}: {:?} lacks {e:?}",
            errors[0]
        );
    }
}

#[test]
fn what_a_build_cannot_do_is_one_clear_error() {
    let folder = data_dir().join("oracle/tiny-llama");
    let folder = folder.to_str().expect("utf8");
    refused(
        &["run", "Hi", "--backend", "nosuch"],
        &["unknown backend `nosuch`", "auto, candle"],
    );
    refused(
        &["run", "Hi", "--device", "cuda:0"],
        &["runs on cpu, not cuda:0", "cargo feature"],
    );
    refused(
        &["run", "Hi", "--backend", "candle", "--device", "metal"],
        &["runs on cpu, not metal:0"],
    );
    refused(
        &["run", "Hi", "--precision", "bf16"],
        &["no bf16 precision", "f32, fast"],
    );
    refused(
        &["run", "Hi", "--model", folder, "--precision", "fast"],
        &["--precision fast", "HF folder", "--precision f32"],
    );
    // clap's own parse errors are usage errors too.
    let bad = logit_lens(&["run", "Hi", "--device", "tpu"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("unknown device `tpu`"),
        "{}",
        bad.stderr
    );
}
