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

    /// An HF folder quantized in situ by mistral.rs (`--isq`), from the command line; the
    /// candle backend says it cannot.
    #[test]
    fn mistralrs_runs_an_hf_folder_with_isq() {
        let folder = data_dir().join("oracle/tiny-llama");
        let folder = folder.to_str().unwrap();
        let run = logit_lens(&[
            "run",
            "Hello world",
            "--model",
            folder,
            "--backend",
            "mistralrs",
            "--precision",
            "fast",
            "--isq",
            "q8_0",
            "--format",
            "json",
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(v["model"]["n_layers"], 4, "{}", run.stdout);
        let precision = v["model"]["precision"].as_str().unwrap_or_default();
        assert!(precision.contains("in-situ"), "{precision}");
        let refused = logit_lens(&[
            "run",
            "Hi",
            "--model",
            folder,
            "--backend",
            "candle",
            "--isq",
            "q8_0",
        ]);
        assert_eq!(refused.code, 2, "{}", refused.stderr);
        assert!(
            refused.stderr.contains("no in-situ quantization"),
            "{}",
            refused.stderr
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
        let m = v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "mistralrs")
            .unwrap();
        assert_eq!(m["isq"], true, "{m}");
        assert_eq!(
            m["sources"],
            serde_json::json!(["gguf", "hf-folder"]),
            "{m}"
        );

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

    /// The daemon on the mistralrs backend streams the same steps as its CLI.
    #[test]
    fn the_daemon_streams_mistralrs_generation() {
        use crate::serve::Server;
        let server = Server::tcp(&["--backend", "mistralrs"]);
        let mut conn = server.connect();
        let prompt = "The capital of France is";
        let answer = conn.ok(
            "lens/generate",
            serde_json::json!({"text": prompt, "maxTokens": 3}),
        );
        assert_eq!(answer["generated"], 3, "{answer}");
        let cli = logit_lens(&[
            "generate",
            prompt,
            "--backend",
            "mistralrs",
            "--max-tokens",
            "3",
            "--format",
            "jsonl",
        ]);
        assert_eq!(cli.code, 0, "{}", cli.stderr);
        let text: String = check_jsonl(&cli.stdout, 30, true)
            .iter()
            .map(|l| l["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(answer["text"], text.as_str(), "{answer}");
    }
}

/// `lens/generate` over TCP: one `lens/generateStep` notification per token, each the same as
/// the CLI's JSON line for that step, then the answer; `$/cancelRequest` stops it within a
/// token and the daemon goes on serving.
#[cfg(feature = "candle")]
#[test]
fn the_daemon_streams_generation_and_stops_when_cancelled() {
    use crate::serve::{frame, Server};
    use serde_json::{json, Value};

    let server = Server::tcp(&[]);
    let mut conn = server.connect();
    let send =
        |conn: &mut crate::serve::Conn, v: Value| conn.send_raw(&frame(v.to_string().as_bytes()));
    let prompt = "The capital of France is";
    send(
        &mut conn,
        json!({"jsonrpc": "2.0", "id": 1, "method": "lens/generate",
               "params": {"text": prompt, "maxTokens": 6, "layers": "-4.."}}),
    );
    let mut steps = Vec::new();
    let answer = loop {
        let v: Value = serde_json::from_str(&conn.read().expect("a message")).unwrap();
        match v["method"].as_str() {
            Some("lens/generateStep") => {
                assert_eq!(v["params"]["id"], 1, "{v}");
                steps.push(v["params"].clone());
            }
            _ => {
                assert_eq!(v["id"], 1, "{v}");
                break v;
            }
        }
    };
    assert!(answer.get("error").is_none(), "{answer}");
    assert_eq!(steps.len(), 6);
    assert_eq!(answer["result"]["generated"], 6, "{answer}");
    assert_eq!(answer["result"]["finish"], "length", "{answer}");
    let text: String = steps.iter().map(|s| s["text"].as_str().unwrap()).collect();
    assert_eq!(answer["result"]["text"], text.as_str());
    // Each step is the CLI's line for it (the same wire type), with the request's id.
    let cli = logit_lens(&[
        "generate",
        prompt,
        "--max-tokens",
        "6",
        "--layers=-4..",
        "--format",
        "jsonl",
    ]);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    for (step, line) in steps.iter_mut().zip(cli.stdout.lines()) {
        step.as_object_mut().unwrap().remove("id");
        assert_eq!(*step, serde_json::from_str::<Value>(line).unwrap());
        assert_eq!(step["layers"].as_array().unwrap().len(), 4, "{step}");
    }

    // A long generation, cancelled after its second token.
    send(
        &mut conn,
        json!({"jsonrpc": "2.0", "id": 2, "method": "lens/generate",
               "params": {"text": prompt, "maxTokens": 500}}),
    );
    let mut seen = 0;
    while seen < 2 {
        let v: Value = serde_json::from_str(&conn.read().expect("a message")).unwrap();
        assert_eq!(v["method"], "lens/generateStep", "{v}");
        seen += 1;
    }
    send(
        &mut conn,
        json!({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 2}}),
    );
    // A request that needs the model waits for the generation's turn: when it is answered,
    // generation has ended and every step it sent has arrived.
    send(
        &mut conn,
        json!({"jsonrpc": "2.0", "id": 3, "method": "lens/position",
               "params": {"text": prompt, "position": -1}}),
    );
    let (mut after_cancel, mut cancelled, mut position) = (0, None, None);
    while position.is_none() {
        let v: Value = serde_json::from_str(&conn.read().expect("a message")).unwrap();
        match (v["method"].as_str(), v["id"].as_i64()) {
            (Some("lens/generateStep"), _) => after_cancel += 1,
            (_, Some(2)) => cancelled = Some(v),
            (_, Some(3)) => position = Some(v),
            _ => panic!("unexpected {v}"),
        }
    }
    let cancelled = cancelled.expect("the cancelled request is answered");
    assert_eq!(cancelled["error"]["code"], -32800, "{cancelled}");
    assert!(after_cancel <= 1, "{after_cancel} steps after the cancel");
    let position = position.unwrap();
    assert!(position.get("error").is_none(), "{position}");

    // The Python client: the same steps as a command, and leaving its loop cancels.
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../editors/python");
    let py = std::process::Command::new("python3")
        .arg(client.join("lens_client.py"))
        .args([server.addr.as_str(), "generate", prompt, "6"])
        .output()
        .expect("run python3");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&py.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "6 steps and the result: {lines:?}");
    assert_eq!(lines[6]["text"], answer["result"]["text"], "{lines:?}");
    assert_eq!(lines[0]["token"], steps[0]["token"]);
    let script = format!(
        "import sys; sys.path.insert(0, {dir:?})\n\
         from lens_client import LensClient\n\
         with LensClient('127.0.0.1', {port}) as c:\n\
         \x20   for i, step in enumerate(c.generate({prompt:?}, max_tokens=500)):\n\
         \x20       if i == 1: break\n\
         \x20   print(c.model_info()['n_layers'])\n",
        dir = client.display().to_string(),
        port = server.port(),
    );
    let py = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "30");

    // Bad params are errors, not a stream.
    for params in [
        json!({"text": prompt, "maxTokens": 0}),
        json!({"text": prompt, "temperature": -1.0}),
        json!({"text": prompt, "chat": true}),
        json!({"text": "", "maxTokens": 2}),
        json!({"text": prompt, "bogus": 1}),
    ] {
        let r = conn.request("lens/generate", params.clone());
        assert!(r["error"]["code"].as_i64().is_some(), "{params}: {r}");
    }
}
