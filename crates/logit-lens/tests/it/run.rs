use serde_json::Value;

use crate::{data_dir, logit_lens, logit_lens_stdin};

const SEED: &str = "We train GPT-3, an autoregressive language model with 175 billion parameters";

fn golden_seed() -> Value {
    let text =
        std::fs::read_to_string(data_dir().join("oracle/golden_smollm2.json")).expect("golden");
    let g: Value = serde_json::from_str(&text).expect("json");
    g["prompts"][0].clone()
}

#[test]
fn json_report_matches_the_oracle() {
    let run = logit_lens(&["run", SEED, "--format", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r: Value = serde_json::from_str(&run.stdout).expect("stdout is one JSON document");
    assert_eq!(r["schema"], "logit-lens/run/v1");
    assert_eq!(r["model"]["n_layers"], 30);
    assert_eq!(r["model"]["architecture"], "llama");
    assert_eq!(r["lens"], "norm");
    assert_eq!(r["layers"].as_array().map(Vec::len), Some(31));
    let golden = golden_seed();
    let ids: Vec<&Value> = r["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| &t["id"])
        .collect();
    let want: Vec<&Value> = golden["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .collect();
    assert_eq!(ids, want);
    // Byte offsets point into the prompt.
    for t in r["tokens"].as_array().expect("tokens") {
        let (s, e) = (
            t["start"].as_u64().expect("start") as usize,
            t["end"].as_u64().expect("end") as usize,
        );
        assert_eq!(&SEED[s..e], t["text"].as_str().expect("text"));
    }
    // Every cell's top-5 and entropy against HF transformers.
    let positions = r["positions"].as_array().expect("positions");
    assert_eq!(positions.len(), 20);
    for (l, layer) in golden["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .enumerate()
    {
        for (p, pos) in positions.iter().enumerate() {
            let cell = &pos["cells"][l];
            assert_eq!(cell["layer"], l);
            for i in 0..5 {
                let got = cell["top"][i]["prob"].as_f64().expect("prob");
                let want = layer["top5_probs"][p][i].as_f64().expect("prob");
                assert!(
                    (got - want).abs() < 1e-4,
                    "layer {l} pos {p} top-{i}: {got} vs {want}"
                );
            }
            assert_eq!(
                cell["top"][0]["id"], layer["top5_ids"][p][0],
                "layer {l} pos {p}"
            );
            let (e, we) = (
                cell["entropy"].as_f64().expect("e"),
                layer["entropy"][p].as_f64().expect("e"),
            );
            assert!(
                (e - we).abs() < 1e-4,
                "entropy layer {l} pos {p}: {e} vs {we}"
            );
            match layer["next_rank"][p].as_u64() {
                Some(rank) if rank < 10 => assert_eq!(cell["next"]["rank"].as_u64(), Some(rank)),
                Some(_) => assert!(cell["next"]["rank"].is_u64()),
                None => assert!(cell["next"].is_null()),
            }
        }
    }
    // "an aut" -> "oreg".
    let aut = &positions[8];
    assert_eq!(aut["final_top1"]["text"], "oreg");
    assert_eq!(aut["next_token_id"], 32520);
}

#[test]
fn terminal_grid_shows_every_layer_and_the_final_prediction() {
    let run = logit_lens(&["run", SEED]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    assert!(!out.contains('\x1b'), "NO_COLOR output has escape codes");
    for l in 0..=30 {
        assert!(
            out.lines().any(|line| line.starts_with(&format!("L{l} "))),
            "no row for layer {l}:\n{out}"
        );
    }
    assert!(out.contains("·aut"), "{out}");
    assert!(
        out.contains("oreg    *"),
        "the hit on 'oreg' is starred:\n{out}"
    );
    assert!(out.contains("Prediction after \" parameters\":"), "{out}");
}

#[test]
fn one_position_table_and_layer_strides() {
    let run = logit_lens(&["run", SEED, "--position", "8", "--top-k", "3"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("Position 8: \" aut\", next token \"oreg\""),
        "{}",
        run.stdout
    );
    let rows = run
        .stdout
        .lines()
        .filter(|l| {
            l.trim_start_matches('▸')
                .trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .count();
    assert_eq!(rows, 31, "{}", run.stdout);

    let run = logit_lens(&[
        "run",
        SEED,
        "--layers",
        ":7",
        "--format",
        "json",
        "--position",
        "-1",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(r["layers"], serde_json::json!([0, 7, 14, 21, 28, 30]));
    assert_eq!(r["positions"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["positions"][0]["position"], 19);
    assert!(r["positions"][0]["next_token_id"].is_null());
}

#[test]
fn raw_lens_fast_path_stdin_and_files() {
    let run = logit_lens_stdin(
        &[
            "run",
            "--format",
            "json",
            "--lens",
            "raw",
            "--precision",
            "fast",
            "--layers",
            "30",
        ],
        Some(b"The capital of France is"),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(r["lens"], "raw");
    assert!(r["model"]["precision"]
        .as_str()
        .is_some_and(|p| p.starts_with("quantized")));
    assert_eq!(r["tokens"].as_array().map(Vec::len), Some(5));

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("prompt.txt");
    std::fs::write(
        &file,
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    )
    .expect("write");
    let run = logit_lens(&[
        "run",
        "--file",
        file.to_str().expect("utf8"),
        "--format",
        "json",
        "--layers",
        "30",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(r["tokens"].as_array().map(Vec::len), Some(18));

    // Any local model folder works, e.g. the tiny Llama fixture.
    let tiny = data_dir().join("oracle/tiny-llama");
    let run = logit_lens(&[
        "run",
        "--model",
        tiny.to_str().expect("utf8"),
        "Hello",
        "--format",
        "json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(r["model"]["n_layers"], 4);
}

#[test]
fn info_and_tokenize() {
    let run = logit_lens(&["info"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("blocks:       30"), "{}", run.stdout);
    assert!(run.stdout.contains("vocabulary:   49152"), "{}", run.stdout);
    let run = logit_lens(&["tokenize", "The capital of France is"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ids: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(ids, ["504", "3575", "282", "4649", "314"]);
}
