//! `logit-lens diff` on the default model: the alignment, the top-1 that an edit changes,
//! zero KL where nothing changed, and both versions' cells against independent numbers (the
//! HF transformers golden for the "France" prompt, `run` for the other).

use serde_json::Value;

use crate::{data_dir, logit_lens};

const FRANCE: &str = "The capital of France is";
const GERMANY: &str = "The capital of Germany is";

fn json(args: &[&str]) -> Value {
    let run = logit_lens(args);
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    serde_json::from_str(&run.stdout).expect("stdout is one JSON document")
}

fn top1_text(cells: &Value) -> &str {
    cells[0]["text"].as_str().expect("text")
}

#[test]
fn diff_shows_paris_turning_into_berlin_and_nothing_else_moving_before_the_edit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svg = dir.path().join("diff.svg");
    let svg_arg = svg.to_str().expect("utf-8 path");
    let d = json(&[
        "diff", FRANCE, GERMANY, "--format", "json", "--out", svg_arg,
    ]);
    assert_eq!(d["schema"], "logit-lens/diff/v1");
    assert_eq!(d["alignment"]["prefix"], 3);
    assert_eq!(d["alignment"]["suffix"], 1);
    assert_eq!(d["alignment"]["before_changed"], serde_json::json!([3, 4]));
    let pairs = d["pairs"].as_array().expect("pairs");
    let parts: Vec<&str> = pairs
        .iter()
        .map(|p| p["part"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(parts, ["prefix", "prefix", "prefix", "changed", "suffix"]);
    // The shared prefix: the same states, so the same distribution at every layer.
    for p in &pairs[..3] {
        for c in p["cells"].as_array().expect("cells") {
            assert_eq!(
                c["kl"].as_f64(),
                Some(0.0),
                "prefix position {}",
                p["after"]
            );
            assert_eq!(c["top1_changed"], false);
        }
    }
    // The last position: " Paris" before, " Berlin" after, at the last layer.
    let last = &pairs[4]["cells"];
    let n = last.as_array().map_or(0, Vec::len);
    assert_eq!(n, 31);
    assert_eq!(top1_text(&last[30]["before"]), " Paris");
    assert_eq!(top1_text(&last[30]["after"]), " Berlin");
    assert_eq!(last[30]["top1_changed"], true);
    assert!(last[30]["kl"].as_f64().unwrap_or(0.0) > 1.0);
    // The changes list carries both tokens with their probabilities in both versions.
    let changes = last[30]["changes"].as_array().expect("changes");
    let berlin = changes
        .iter()
        .find(|c| c["text"] == " Berlin")
        .expect("Berlin");
    let paris = changes
        .iter()
        .find(|c| c["text"] == " Paris")
        .expect("Paris");
    assert!(berlin["after"].as_f64() > berlin["before"].as_f64());
    assert!(paris["before"].as_f64() > paris["after"].as_f64());

    // The before version against HF transformers (the oracle's golden of this prompt).
    let text =
        std::fs::read_to_string(data_dir().join("oracle/golden_smollm2.json")).expect("golden");
    let golden: Value = serde_json::from_str(&text).expect("json");
    let golden = golden["prompts"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["text"] == FRANCE))
        .expect("the golden has the France prompt");
    for p in pairs {
        let pos = p["before"].as_u64().expect("before") as usize;
        for c in p["cells"].as_array().expect("cells") {
            let l = c["layer"].as_u64().expect("layer") as usize;
            for i in 0..5 {
                let got = c["before"][i]["prob"].as_f64().expect("prob");
                let want = golden["layers"][l]["top5_probs"][pos][i]
                    .as_f64()
                    .expect("golden prob");
                assert!(
                    (got - want).abs() < 1e-4,
                    "layer {l} pos {pos}: {got} vs {want}"
                );
            }
        }
    }
    // The after version against `run` on the after text alone (fresh states, no reuse).
    let run = json(&["run", GERMANY, "--format", "json"]);
    for p in pairs {
        let pos = p["after"].as_u64().expect("after") as usize;
        for (c, r) in p["cells"].as_array().expect("cells").iter().zip(
            run["positions"][pos]["cells"]
                .as_array()
                .expect("run cells"),
        ) {
            for i in 0..5 {
                assert_eq!(c["after"][i]["id"], r["top"][i]["id"]);
                let (a, b) = (
                    c["after"][i]["prob"].as_f64().unwrap_or(-1.0),
                    r["top"][i]["prob"].as_f64().unwrap_or(1.0),
                );
                assert!((a - b).abs() < 1e-5, "pos {pos}: {a} vs {b}");
            }
        }
    }
    // The heatmap names both versions' top-1 and marks the changed cells.
    let svg = std::fs::read_to_string(&svg).expect("svg written");
    assert!(svg.contains("Berlin") && svg.contains("Paris"));
    assert!(svg.contains(r#"class="changed""#));
}

#[test]
fn diff_in_the_terminal_and_its_errors() {
    let run = logit_lens(&[
        "diff",
        FRANCE,
        GERMANY,
        "--layers",
        "28..",
        "--position",
        "-1",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("shared prefix 3, suffix 1"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("Paris→·Ber"), "{}", run.stdout);
    assert!(run.stdout.contains("changed"), "{}", run.stdout);
    for (args, want) in [
        (&["diff", FRANCE][..], "give two versions"),
        (&["diff", FRANCE, ""][..], "the after version is empty"),
        (&["diff", FRANCE, GERMANY, "--layers", "40"][..], "layer"),
        (
            &["diff", FRANCE, GERMANY, "--out", "x.bmp"][..],
            "cannot tell the format",
        ),
    ] {
        let r = logit_lens(args);
        assert_ne!(r.code, 0, "{args:?} succeeded");
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
}

/// `lens/diff` on the socket: the same report as the CLI's, rendered pages, and clear errors
/// that leave the daemon serving.
#[test]
fn the_daemon_diffs_two_texts() {
    use crate::serve::{assert_error, Server};
    let server = Server::tcp(&[]);
    let mut c = server.connect();
    let got = c.ok(
        "lens/diff",
        serde_json::json!({ "before": FRANCE, "after": GERMANY, "layers": "28..", "topK": 3 }),
    );
    let cli = json(&[
        "diff", FRANCE, GERMANY, "--format", "json", "--layers", "28..", "-k", "3",
    ]);
    assert_eq!(got["schema"], "logit-lens/diff/v1");
    assert_eq!(got["alignment"], cli["alignment"]);
    assert_eq!(got["layers"], serde_json::json!([28, 29, 30]));
    let (gp, cp) = (
        got["pairs"].as_array().expect("pairs"),
        cli["pairs"].as_array().expect("pairs"),
    );
    assert_eq!(gp.len(), cp.len());
    for (g, c) in gp.iter().zip(cp) {
        assert_eq!(g["part"], c["part"]);
        for (gc, cc) in g["cells"]
            .as_array()
            .expect("cells")
            .iter()
            .zip(c["cells"].as_array().expect("cells"))
        {
            assert_eq!(gc["top1_changed"], cc["top1_changed"]);
            let (a, b) = (
                gc["kl"].as_f64().unwrap_or(-1.0),
                cc["kl"].as_f64().unwrap_or(1.0),
            );
            assert!((a - b).abs() <= 1e-5 * b.max(1.0), "{a} vs {b}");
            for side in ["before", "after"] {
                for i in 0..3 {
                    assert_eq!(gc[side][i]["id"], cc[side][i]["id"]);
                }
            }
        }
    }
    let page = c.ok("lens/diff", serde_json::json!({ "before": FRANCE, "after": GERMANY, "format": "html", "positions": [-1] }));
    assert_eq!(page["format"], "html");
    let html = page["content"].as_str().expect("content");
    assert!(html.contains("France") && html.contains("Germany") && html.contains("Berlin"));
    assert_error(
        &c.request(
            "lens/diff",
            serde_json::json!({ "before": FRANCE, "after": GERMANY, "format": "pdf" }),
        ),
        -32602,
        None,
    );
    assert_error(
        &c.request("lens/diff", serde_json::json!({ "before": FRANCE })),
        -32602,
        None,
    );
    assert_error(
        &c.request(
            "lens/diff",
            serde_json::json!({ "before": "", "after": GERMANY }),
        ),
        -32010,
        Some("empty_text"),
    );
    assert_eq!(
        c.ok("lens/modelInfo", serde_json::json!({}))["n_layers"],
        30
    );
}

/// In an editor session: after an edit, `lens/diff` with the document's uri compares it with
/// the text before the edit, and a hover after the edit shows what each layer said before.
#[test]
fn the_lsp_compares_a_document_with_its_previous_version() {
    use crate::serve::{assert_error, hover, rows, Lsp};
    let mut lsp = Lsp::start();
    lsp.ok(
        "initialize",
        serde_json::json!({ "processId": null, "rootUri": null, "capabilities": {} }),
    );
    lsp.notify("initialized", serde_json::json!({}));
    let uri = "file:///tmp/capital.txt";
    lsp.notify("textDocument/didOpen", serde_json::json!({ "textDocument": { "uri": uri, "languageId": "plaintext", "version": 1, "text": FRANCE } }));
    // Not edited yet: nothing to compare with.
    assert_error(
        &lsp.request("lens/diff", serde_json::json!({ "uri": uri })),
        -32602,
        None,
    );
    let is = FRANCE.find(" is").expect("is") as u32 + 1;
    let before = hover(&mut lsp, uri, 0, is);
    lsp.notify(
        "textDocument/didChange",
        serde_json::json!({ "textDocument": { "uri": uri, "version": 2 },
                "contentChanges": [{ "range": { "start": { "line": 0, "character": 15 }, "end": { "line": 0, "character": 21 } }, "text": "Germany" }] }),
    );
    let d = lsp.ok(
        "lens/diff",
        serde_json::json!({ "uri": uri, "positions": [-1] }),
    );
    let toks = |v: &serde_json::Value| -> String {
        v.as_array()
            .expect("tokens")
            .iter()
            .map(|t| t["text"].as_str().unwrap_or(""))
            .collect()
    };
    assert_eq!(toks(&d["before"]), FRANCE);
    assert_eq!(toks(&d["after"]), GERMANY);
    let last = &d["pairs"][0]["cells"][30];
    assert_eq!(top1_text(&last["before"]), " Paris");
    assert_eq!(top1_text(&last["after"]), " Berlin");
    // The hover on " is" now: the last layer says " Berlin", and " Paris" before the edit.
    let md = |h: &serde_json::Value| {
        h["result"]["contents"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let after = hover(&mut lsp, uri, 0, is + 1);
    let (now, then) = (md(&after), md(&before));
    assert!(now.contains("Before the last edit"), "{now}");
    let last_row = &rows(&now)[0];
    assert!(last_row[1].starts_with("␣Berlin"), "{now}");
    assert!(
        last_row[4].starts_with("␣Paris") && last_row[4].ends_with('✱'),
        "{now}"
    );
    assert_eq!(
        last_row[4].trim_end_matches(" ✱"),
        rows(&then)[0][1].split(" · ").next().unwrap_or_default()
    );
    assert!(last_row[5].parse::<f64>().expect("KL") > 1.0);
    // Without positions: around the edit (two tokens before it, the change, what follows).
    let around = lsp.ok(
        "lens/diff",
        serde_json::json!({ "uri": uri, "layers": [30] }),
    );
    let afters: Vec<u64> = around["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .filter_map(|p| p["after"].as_u64())
        .collect();
    assert_eq!(afters, [1, 2, 3, 4]);
    // The page for the editor's command.
    let page = lsp.ok(
        "lens/diff",
        serde_json::json!({ "uri": uri, "format": "html" }),
    );
    assert!(page["content"]
        .as_str()
        .is_some_and(|h| h.contains("Germany") && h.contains("France")));
}
