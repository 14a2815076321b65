//! `logit-lens plot` end to end on the default model: each format, the options, bad input.

use crate::{data_dir, logit_lens, logit_lens_stdin};

const PROMPT: &str = "We train GPT-3, an autoregressive language model with 175 billion parameters";

fn row_labels(svg: &str) -> Vec<String> {
    // Row labels are the right-aligned texts just left of the grid, in page order.
    svg.lines()
        .filter(|l| l.starts_with(r#"<text x="72" "#) && l.contains(r#"text-anchor="end""#))
        .filter_map(|l| {
            l.split('>')
                .nth(1)
                .and_then(|t| t.split('<').next())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn svg_png_and_html() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = |name: &str| dir.path().join(name).to_string_lossy().into_owned();

    let run = logit_lens(&["plot", PROMPT, "--layers", ":2", "--out", &out("a.svg")]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    let svg = std::fs::read_to_string(out("a.svg")).expect("svg");
    assert!(svg.starts_with("<svg "), "{}", &svg[..100]);
    assert_eq!(
        svg.matches("<title>").count(),
        16 * 20,
        "16 layers × 20 tokens"
    );
    assert!(svg.contains(">·train</text>") && svg.contains(">·billion</text>"));
    let labels = row_labels(&svg);
    assert_eq!(labels.first().map(String::as_str), Some("next"));
    assert_eq!(labels.get(1).map(String::as_str), Some("30"));
    assert_eq!(
        labels.iter().rev().nth(1).map(String::as_str),
        Some("0 (emb)")
    );
    assert!(svg.contains("colour: top-1 probability"));

    // Flipped, a token range, another metric.
    let run = logit_lens(&[
        "plot",
        PROMPT,
        "--layers",
        "28..",
        "--tokens",
        "-3..",
        "--flip",
        "--metric",
        "kl",
        "--out",
        &out("b.svg"),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let svg = std::fs::read_to_string(out("b.svg")).expect("svg");
    assert_eq!(svg.matches("<title>").count(), 3 * 3);
    assert_eq!(row_labels(&svg), ["next", "28", "29", "30", "input"]);
    assert!(
        svg.contains(">·billion</text>")
            && svg.contains(">·paramet…</text>")
            && !svg.contains(">·train</text>")
    );
    assert!(svg.contains("colour: KL to output (nats)"));

    // PNG at a chosen scale: the SVG's size times the scale.
    let run = logit_lens(&[
        "plot",
        PROMPT,
        "--layers",
        "28..",
        "--tokens",
        "-3..",
        "--flip",
        "--metric",
        "kl",
        "--scale",
        "1.5",
        "--out",
        &out("b.png"),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let bytes = std::fs::read(out("b.png")).expect("png");
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG");
    let attr = |name: &str| -> f32 {
        let start = svg.find(&format!(" {name}=\"")).expect("attribute") + name.len() + 3;
        svg[start..]
            .split('"')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("number")
    };
    assert_eq!(reader.info().width, (attr("width") * 1.5).ceil() as u32);
    assert_eq!(reader.info().height, (attr("height") * 1.5).ceil() as u32);

    // HTML, prompt on stdin, format named explicitly.
    let run = logit_lens_stdin(
        &[
            "plot",
            "--tokens",
            "0..3",
            "--top-k",
            "4",
            "--format",
            "html",
            "--out",
            &out("page.out"),
        ],
        Some(PROMPT.as_bytes()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let html = std::fs::read_to_string(out("page.out")).expect("html");
    assert!(html.starts_with("<!DOCTYPE html>"));
    let start = html
        .find(r#"<script type="application/json" id="lens-data">"#)
        .expect("data")
        + 47;
    let json: serde_json::Value =
        serde_json::from_str(&html[start..start + html[start..].find("</script>").expect("end")])
            .expect("embedded JSON");
    let columns = json["columns"].as_array().expect("columns");
    assert_eq!(columns.len(), 4);
    assert_eq!(columns[1]["input"], "·train");
    assert_eq!(columns[3]["next"], "-");
    assert_eq!(json["layers"].as_array().expect("layers").len(), 31);
    assert_eq!(
        columns[0]["cells"][30]["top"]
            .as_array()
            .expect("top")
            .len(),
        4
    );
    assert_eq!(columns[0]["tracks"].as_array().expect("tracks").len(), 2);
}

#[track_caller]
fn check_error(args: &[&str], expect: &str) {
    let run = logit_lens(args);
    assert_ne!(run.code, 0, "logit-lens {args:?} succeeded");
    assert!(
        run.stderr.contains(expect),
        "logit-lens {args:?}: expected {expect:?} in:\n{}",
        run.stderr
    );
}

#[test]
fn bad_plot_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let tiny = data_dir()
        .join("oracle/tiny-llama")
        .to_string_lossy()
        .into_owned();
    let m = ["--model", tiny.as_str()];
    check_error(
        &["plot", "hi", "--out", &out("a.jpg"), m[0], m[1]],
        "cannot tell the format",
    );
    check_error(
        &[
            "plot",
            "hi",
            "--out",
            &out("a.png"),
            "--scale",
            "0",
            m[0],
            m[1],
        ],
        "--scale must be in (0, 16]",
    );
    check_error(
        &[
            "plot",
            "hi",
            "--out",
            &out("a.svg"),
            "--tokens",
            "5..9",
            m[0],
            m[1],
        ],
        "token position 5 is outside the prompt",
    );
    check_error(
        &[
            "plot",
            "hi",
            "--out",
            &out("a.svg"),
            "--layers",
            "0..9",
            m[0],
            m[1],
        ],
        "layer 9 does not exist",
    );
    check_error(
        &[
            "plot",
            "hi",
            "--out",
            &out("a.svg"),
            "--metric",
            "probability",
        ],
        "invalid value 'probability'",
    );
    check_error(
        &["plot", "hi", "--out", &out("missing/dir/a.svg"), m[0], m[1]],
        "cannot write",
    );
    check_error(
        &["plot", "", "--out", &out("a.svg"), m[0], m[1]],
        "the prompt is empty",
    );
    assert!(!std::path::Path::new(&out("a.svg")).exists());
}
