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
    assert_eq!(candle["isq"], false, "{candle}");
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

/// `bench` prints every measure of the first backend (with a generation step) and, in a build
/// with mistralrs, the same on mistralrs beside it; without a Python it says why HF is absent.
#[test]
fn bench_prints_each_measure_and_the_backends_side_by_side() {
    let run = crate::logit_lens_env(
        &["bench", "--sizes", "8", "--repeats", "1"],
        &[("LOGIT_LENS_MPI_RANKS", "1")],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    assert!(out.contains("HF transformers reference not run"), "{out}");
    let header = out
        .lines()
        .find(|l| l.trim_start().starts_with("tokens  forward ms"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(header.contains("step ms"), "{header}");
    // One row for 8 tokens: forward, full lens, one position and a step, all measured.
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("8"))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    for (i, what) in ["forward", "full", "one position", "step"]
        .iter()
        .enumerate()
    {
        let v: f64 = row[i + 1]
            .parse()
            .unwrap_or_else(|_| panic!("{what}: {row:?}"));
        assert!(v > 0.0, "{what}: {row:?}");
    }
    assert!(out.contains("GFLOP/s"), "{out}");
    if cfg!(feature = "mistralrs") {
        assert!(out.contains("candle mistralrs"), "{out}");
        let side = out
            .lines()
            .rfind(|l| l.trim_start().starts_with("8 |"))
            .unwrap_or_else(|| panic!("{out}"));
        // forward, full lens and step on both backends are numbers; HF's are absent.
        let cells: Vec<&str> = side.split('|').collect();
        for cell in &cells[1..4] {
            let v: Vec<&str> = cell.split_whitespace().collect();
            assert_eq!(v.len(), 3, "{side}");
            assert!(
                v[0].parse::<f64>().is_ok() && v[1].parse::<f64>().is_ok(),
                "{side}"
            );
            assert_eq!(v[2], "—", "{side}");
        }
    }
}

/// `bench-server --lsp` drives a real `serve --stdio` through every case by name and finishes
/// on a model other than SmolLM2 (the tiny Llama: 4 blocks, so the cold analyze cannot ask for
/// SmolLM2's layer 30).
#[test]
fn bench_server_lsp_runs_every_case_on_any_model() {
    let model = data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf");
    let run = crate::logit_lens(&[
        "bench-server",
        "--lsp",
        "--model",
        model.to_str().expect("utf8"),
        "--tokens",
        "32",
        "--edits",
        "3",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for case in [
        "end edit + hover at the typed token",
        "end edit + hover elsewhere",
        "middle edit + hover at the edit",
        "middle edit + hover 16 tokens later",
        "warm hover (no edit)",
        "one-position lens, every layer",
        "cold analyze (a new document)",
    ] {
        let line = run
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(case))
            .unwrap_or_else(|| panic!("no {case:?} in {}", run.stdout));
        assert!(line.contains("p50") && line.contains("runs)"), "{line}");
    }
    // The floor the one-position lens is read against, measured in the same run: a rate and
    // the product's time at that rate, both positive numbers.
    let floor = run
        .stdout
        .lines()
        .find(|l| l.starts_with("f32 GEMM rate here"))
        .unwrap_or_else(|| panic!("no GEMM floor in {}", run.stdout));
    let number_before = |unit: &str| -> f64 {
        let head = &floor[..floor
            .find(unit)
            .unwrap_or_else(|| panic!("{unit} in {floor}"))];
        head.rsplit(' ')
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("a number before {unit} in {floor}"))
    };
    assert!(number_before(" GFLOP/s") > 0.0, "{floor}");
    assert!(number_before(" ms") > 0.0, "{floor}");
}
