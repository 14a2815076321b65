//! Per-layer probabilities of the final top-1 and the next token, against HF transformers'
//! goldens for the tiny-llama fixture (tests/data/oracle/tiny-llama/golden.json).

use lens_core::Site;

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(crate::data_dir().join("oracle/tiny-llama/golden.json"))
        .expect("golden");
    serde_json::from_str(&text).expect("golden JSON")
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
    assert_eq!(
        run.tokens
            .iter()
            .map(|t| u64::from(t.id))
            .collect::<Vec<_>>(),
        ids
    );
    let layers = prompt["layers"].as_array().expect("layers");
    let last = &layers[layers.len() - 1];
    let mut checked = 0;
    for view in &run.views {
        let p = view.position;
        let gold_top1 = last["top5_ids"][p][0].as_u64().expect("id");
        assert_eq!(u64::from(view.final_top1.id), gold_top1);
        for track in run.tracks.iter().filter(|t| t.position == p) {
            for (i, &prob) in track.probs.iter().enumerate() {
                let layer = &layers[track.layers[i]];
                // The next token's probability is in the golden at every layer...
                if Some(track.id) == run.tokens.get(p + 1).map(|t| t.id) {
                    let want = layer["next_prob"][p].as_f64().expect("next_prob");
                    assert!(
                        (f64::from(prob) - want).abs() < 1e-4,
                        "next p={p} layer {i}: {prob} vs {want}"
                    );
                    checked += 1;
                }
                // ...the final top-1's where it is in the golden top-5.
                let top5 = layer["top5_ids"][p].as_array().expect("top5");
                if let Some(k) = top5
                    .iter()
                    .position(|id| id.as_u64() == Some(u64::from(track.id)))
                {
                    let want = layer["top5_probs"][p][k].as_f64().expect("prob");
                    assert!(
                        (f64::from(prob) - want).abs() < 1e-4,
                        "top p={p} layer {i}: {prob} vs {want}"
                    );
                    checked += 1;
                }
            }
        }
        // One track per token: two unless the final top-1 is the next token (or no next).
        let n = run.tracks.iter().filter(|t| t.position == p).count();
        let next = run.tokens.get(p + 1).map(|t| t.id);
        assert_eq!(
            n,
            if next.is_none() || next == Some(view.final_top1.id) {
                1
            } else {
                2
            }
        );
        // The lens itself agrees at the last layer.
        let c = view
            .cells
            .iter()
            .find(|c| c.site == Site::Layer(4))
            .expect("last layer");
        let t = run
            .tracks
            .iter()
            .find(|t| t.position == p && t.id == view.final_top1.id)
            .expect("track");
        assert!((t.probs[4] - c.top[0].prob).abs() < 1e-6);
    }
    assert!(checked >= 8 * 5, "only {checked} values checked");
}
