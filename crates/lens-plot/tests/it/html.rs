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

/// The trajectory chart is drawn from the cells themselves: per layer, the final top-1's and
/// the next token's probability, the same `f32`s the cells hold (written alike).
#[test]
fn the_chart_is_the_cells_probabilities() {
    let run = crate::run("The capital of France is", 5);
    let d = data(&lens_plot::html(&run.plot(), &Options::default()));
    let columns = d["columns"].as_array().expect("columns");
    assert_eq!(columns.len(), run.views.len());
    for (col, view) in columns.iter().zip(&run.views) {
        let tracks = col["tracks"].as_array().expect("tracks");
        let next = run.tokens.get(view.position + 1).map(|t| t.id);
        let want_lines = if next.is_none() || next == Some(view.final_top1.id) {
            1
        } else {
            2
        };
        assert_eq!(tracks.len(), want_lines, "column {}", view.position);
        for (li, cell) in view.cells.iter().enumerate() {
            let shortest = |p: f32| serde_json::json!(lens_core::math::shortest(p));
            assert_eq!(tracks[0]["probs"][li], shortest(cell.final_top1_prob));
            if want_lines == 2 {
                assert_eq!(
                    tracks[1]["probs"][li],
                    shortest(cell.next.expect("next").prob)
                );
            }
        }
    }
}
