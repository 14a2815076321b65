//! The page's trajectories (per-layer probabilities of the final top-1 and of the next token,
//! read from the cells) against HF transformers' goldens for the tiny-llama fixture
//! (tests/data/oracle/tiny-llama/golden.json).

use lens_plot::Options;

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(crate::data_dir().join("oracle/tiny-llama/golden.json"))
        .expect("golden");
    serde_json::from_str(&text).expect("golden JSON")
}

fn page_data(html: &str) -> serde_json::Value {
    let open = r#"<script type="application/json" id="lens-data">"#;
    let start = html.find(open).expect("data element") + open.len();
    let end = start + html[start..].find("</script>").expect("end of data");
    serde_json::from_str(&html[start..end]).expect("JSON")
}

#[test]
fn tracks_match_hf_transformers() {
    let g = golden();
    let prompt = &g["prompts"][0];
    let run = crate::run(prompt["text"].as_str().expect("text"), 5);
    let ids: Vec<u64> = prompt["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let got: Vec<u64> = run.tokens.iter().map(|t| u64::from(t.id)).collect();
    assert_eq!(got, ids);
    let layers = prompt["layers"].as_array().expect("layers");
    let last = &layers[layers.len() - 1];
    let page = page_data(&lens_plot::html(&run.plot(), &Options::default()));
    let columns = page["columns"].as_array().expect("columns");
    assert_eq!(columns.len(), run.tokens.len());
    let (mut next_checked, mut top_checked) = (0, 0);
    for (p, col) in columns.iter().enumerate() {
        let gold_top1 = last["top5_ids"][p][0].as_u64().expect("id");
        assert_eq!(u64::from(run.views[p].final_top1.id), gold_top1);
        let tracks = col["tracks"].as_array().expect("tracks");
        let next = run.tokens.get(p + 1).map(|t| u64::from(t.id));
        let (final_line, next_line) = match (tracks.len(), next == Some(gold_top1)) {
            (1, _) => (&tracks[0], next.map(|_| &tracks[0])),
            (2, false) => (&tracks[0], Some(&tracks[1])),
            (n, same) => panic!("position {p}: {n} lines (final top-1 is next: {same})"),
        };
        for (l, layer) in layers.iter().enumerate() {
            let prob = |line: &serde_json::Value| line["probs"][l].as_f64().expect("prob");
            // The next token's probability is in the golden at every layer...
            if let Some(line) = next_line {
                let want = layer["next_prob"][p].as_f64().expect("next_prob");
                assert!(
                    (prob(line) - want).abs() < 1e-4,
                    "next p={p} layer {l}: {} vs {want}",
                    prob(line)
                );
                next_checked += 1;
            }
            // ...the final top-1's wherever it is in the golden top-5.
            let top5 = layer["top5_ids"][p].as_array().expect("top5");
            if let Some(k) = top5.iter().position(|id| id.as_u64() == Some(gold_top1)) {
                let want = layer["top5_probs"][p][k].as_f64().expect("prob");
                assert!(
                    (prob(final_line) - want).abs() < 1e-4,
                    "top-1 p={p} layer {l}: {} vs {want}",
                    prob(final_line)
                );
                top_checked += 1;
            }
        }
    }
    // Every layer of every position but the last has a next token; the final top-1 is in the
    // golden top-5 at least at the last layer of every position.
    assert_eq!(next_checked, (run.tokens.len() - 1) * layers.len());
    assert!(
        top_checked >= run.tokens.len(),
        "only {top_checked} checked"
    );
}
