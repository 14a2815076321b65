//! The page's embedded data: escaped so that token text cannot end the script element, and
//! complete (the browser test checks what the page does with it).

use lens_plot::{Metric, Options};

fn data(html: &str) -> serde_json::Value {
    let open = r#"<script type="application/json" id="lens-data">"#;
    let start = html.find(open).expect("data element") + open.len();
    let end = start + html[start..].find("</script>").expect("end of data");
    serde_json::from_str(&html[start..end]).expect("JSON")
}

#[test]
fn markup_in_tokens_stays_data() {
    let run = crate::run("a < b </script><b>x</b> & 'c'", 3);
    let html = lens_plot::html(
        &run.plot(),
        &Options {
            metric: Metric::Kl,
            flip: true,
            max_columns: 4,
        },
    );
    // Exactly the page's own two script elements close.
    assert_eq!(html.matches("</script>").count(), 2);
    assert!(!html.contains("<b>"));
    let d = data(&html);
    let inputs: Vec<String> = run
        .tokens
        .iter()
        .map(|t| t.text.replace(' ', "·"))
        .collect();
    let shown: Vec<&str> = d["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["input"].as_str())
        .collect();
    assert_eq!(shown, inputs);
    assert!(inputs.concat().contains("</"), "{inputs:?}");
    assert_eq!(d["metric"], "kl");
    assert_eq!(d["flip"], true);
    assert_eq!(d["colormap"].as_array().expect("colormap").len(), 256);
    // Every cell carries a colour per metric; next-token metrics have none at the last position.
    let last = d["columns"]
        .as_array()
        .and_then(|c| c.last())
        .expect("last column");
    let c = &last["cells"][0]["c"];
    assert!(c[0].is_u64() && c[2].is_u64() && c[3].is_u64(), "{c}");
    assert!(c[1].is_null() && c[4].is_null(), "{c}");
    assert!(html.contains(r#"<option value="kl" selected>"#));
}

#[test]
fn without_tracks_the_chart_uses_the_views() {
    let run = crate::run("The capital of France is", 5);
    let plot = lens_plot::Plot {
        tracks: &[],
        ..run.plot()
    };
    let d = data(&lens_plot::html(&plot, &Options::default()));
    let col = &d["columns"][1];
    let tracks = col["tracks"].as_array().expect("tracks");
    assert_eq!(tracks.len(), 2);
    assert!(tracks[0]["label"]
        .as_str()
        .expect("label")
        .contains("where in top-k"));
    // The next token's line is the cells' next-token probability at every layer.
    for (li, p) in tracks[1]["probs"]
        .as_array()
        .expect("probs")
        .iter()
        .enumerate()
    {
        let want = run.views[1].cells[li].next.expect("next").prob;
        assert!(
            (p.as_f64().expect("prob") - f64::from(want)).abs() < 1e-6 * f64::from(want).max(1e-3)
        );
    }
    // The final top-1's line is known at the last layer at least (it is top-1 there).
    assert!(tracks[0]["probs"][4].is_f64());
}
