//! The HTML page in real headless Chromium, driven by playwright-core (tests/browser/drive.mjs;
//! both installed by scripts/deps/chromium.sh). Fails, never skips, when they are missing.

use std::path::PathBuf;
use std::process::Command;

use lens_plot::{Metric, Options};
use serde_json::Value;

fn deps_dir() -> PathBuf {
    match std::env::var_os("LOGIT_LENS_BROWSER_DEPS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME"))
            .join(".cache/logit-lens/test-deps/browser"),
    }
}

/// Run the driver on `html`; its JSON report. The screenshot goes to `shot`.
fn drive(html: &str, shot: &std::path::Path) -> Value {
    let chromium =
        std::env::var("LOGIT_LENS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/deps/chromium.sh (or ./scripts/test.sh)"
    );
    let deps = deps_dir();
    assert!(
        deps.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing from {}: run scripts/deps/chromium.sh (or ./scripts/test.sh)",
        deps.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("lens.html");
    std::fs::write(&page, html).expect("write page");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/drive.mjs");
    let out = Command::new("node")
        .arg(&script)
        .arg(&page)
        .arg(shot)
        .env("LOGIT_LENS_BROWSER_DEPS", &deps)
        .output()
        .expect("run node (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drive.mjs failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("drive.mjs printed no JSON ({e}): {stdout}"))
}

#[test]
fn html_page_in_headless_chromium() {
    let top_k = 7;
    let run = crate::run("The capital of France is", top_k);
    let html = lens_plot::html(
        &run.plot(),
        &Options {
            metric: Metric::Prob,
            ..Options::default()
        },
    );
    for needle in [
        "src=",
        "href=",
        "<link",
        "@import",
        "url(http",
        "fetch(",
        "XMLHttpRequest",
    ] {
        assert!(
            !html.contains(needle),
            "the page must load nothing, but has `{needle}`"
        );
    }
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lens-plot-browser.png");
    let _ = std::fs::remove_file(&shot);
    let r = drive(&html, &shot);
    #[allow(clippy::print_stderr)]
    {
        eprintln!("{r:#}\nscreenshot: {}", shot.display());
    }

    assert_eq!(r["consoleErrors"], serde_json::json!([]), "console errors");
    assert_eq!(r["requests"], serde_json::json!([]), "network requests");
    let (n_layers, n_tokens) = (run.layers.len(), run.tokens.len());
    assert_eq!(r["cells"], n_layers * n_tokens);
    assert_eq!(r["rows"], n_layers);
    assert_eq!(r["columns"], n_tokens);
    // Last layer on top, embeddings at the bottom.
    assert_eq!(
        r["rowLabels"],
        serde_json::json!(["4", "3", "2", "1", "0 (emb)"])
    );
    let inputs: Vec<String> = run
        .tokens
        .iter()
        .map(|t| t.text.replace(' ', "·"))
        .collect();
    assert_eq!(r["inputs"], serde_json::json!(inputs));
    let hits: usize = run
        .views
        .iter()
        .flat_map(|v| &v.cells)
        .filter(|c| c.next.is_some_and(|n| c.top[0].id == n.id))
        .count();
    assert_eq!(r["hits"], hits);

    // The hovered cell (last layer, position 0) lists its top-k, best first, as the lens has it.
    let cell = &run.views[0].cells[n_layers - 1];
    let rows = r["tooltip"]["rows"].as_array().expect("tooltip rows");
    assert_eq!(rows.len(), top_k);
    let top1 = crate::decode(cell.top[0].id).replace(' ', "·");
    assert_eq!(r["hoveredCellText"], top1.as_str());
    assert_eq!(rows[0][1], top1.as_str());
    let shown = rows[0][3]
        .as_str()
        .expect("probability")
        .trim_end_matches('%')
        .parse::<f32>()
        .expect("percent");
    assert!(
        (shown - 100.0 * cell.top[0].prob).abs() < 0.06,
        "{shown}% vs {}",
        cell.top[0].prob
    );
    let next = cell.next.expect("next token");
    let rank_text = r["tooltip"]["nextRank"].as_str().expect("next rank");
    assert!(
        rank_text.contains(&format!("rank {}", next.rank + 1)),
        "{rank_text}"
    );

    // Switching the metric recolours the cells and the legend.
    assert_eq!(r["metricBefore"], "prob");
    assert_eq!(r["metricAfter"], "rank");
    assert!(
        r["recoloured"].as_u64().expect("count") as usize > n_layers * n_tokens / 2,
        "{}",
        r["recoloured"]
    );
    assert!(r["distinctColors"].as_u64().expect("count") > 5);
    assert_eq!(r["legendChanged"], true);
    assert!(r["subtitle"]
        .as_str()
        .expect("subtitle")
        .contains("next-token rank"));

    // Clicking column 2 pins its trajectory: final top-1 and next token, one point per layer.
    let t = &r["trajectory"];
    let final1 = crate::decode(run.views[2].final_top1.id).replace(' ', "·");
    let next2 = run.tokens[3].text.replace(' ', "·");
    let expected_lines = if run.views[2].final_top1.id == run.tokens[3].id {
        1
    } else {
        2
    };
    assert_eq!(t["lines"], expected_lines);
    assert_eq!(t["points"], expected_lines * n_layers);
    assert_eq!(t["pinned"], n_layers + 2);
    let legend = t["legend"].to_string();
    assert!(
        legend.contains(&final1) && legend.contains(&next2),
        "{legend}"
    );
    assert!(t["title"]
        .as_str()
        .expect("title")
        .contains(&format!("Position 2 «{}»", inputs[2])));

    // The screenshot is a real PNG of the viewport.
    let bytes = std::fs::read(&shot).expect("screenshot");
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("screenshot PNG");
    assert!(reader.info().width >= 1000 && reader.info().height >= 600);
}
