//! The heatmap as one self-contained HTML page: data as JSON in a `<script>` element, the
//! page's CSS and JS inline (`page.css`, `page.js`), nothing fetched from the network.

use lens_core::math::shortest;
use serde_json::{json, Value};

use crate::grid::{Grid, Metric};
use crate::text::xml;
use crate::{color, Options};

const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");

pub fn render(grid: &Grid, options: &Options) -> String {
    let data = data(grid, options);
    // JSON inside <script>: no `<` may appear literally (it could close the element).
    let json = serde_json::to_string(&data)
        .unwrap_or_else(|_| "{}".to_string())
        .replace('<', "\\u003c");
    let options_html: String = Metric::ALL
        .iter()
        .map(|m| {
            let sel = if *m == options.metric {
                " selected"
            } else {
                ""
            };
            format!(
                r#"<option value="{}"{sel}>{}</option>"#,
                m.as_str(),
                xml(m.label())
            )
        })
        .collect();
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{CSS}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p id="subtitle">{subtitle}</p>
<label>Colour: <select id="metric">{options_html}</select></label>
<span class="hint">Hover a cell for its top-k; click a column for its trajectory across layers.</span>
</header>
<main>
<div id="figure"><div id="scroll"><table id="heatmap"></table></div><div id="legend"></div></div>
<section id="trajectory" hidden></section>
</main>
<div id="tooltip" role="tooltip" hidden></div>
<script type="application/json" id="lens-data">{json}</script>
<script>
{JS}</script>
</body>
</html>
"#,
        title = xml(&grid.title()),
        subtitle = xml(&grid.subtitle(options.metric)),
    )
}

fn data(grid: &Grid, options: &Options) -> Value {
    let scales: serde_json::Map<String, Value> = Metric::ALL
        .iter()
        .map(|&m| {
            let s = grid.scale(m);
            let ticks: Vec<Value> = s
                .ticks
                .iter()
                .map(|(v, label)| json!([s.t(*v), label]))
                .collect();
            (
                m.as_str().to_string(),
                json!({ "label": m.label(), "subtitle": grid.subtitle(m), "ticks": ticks }),
            )
        })
        .collect();
    let columns: Vec<Value> = grid
        .columns
        .iter()
        .map(|col| {
            let cells: Vec<Value> = col
                .cells
                .iter()
                .map(|c| match c {
                    None => Value::Null,
                    Some(c) => {
                        let colors: Vec<Value> =
                            Metric::ALL.iter().map(|&m| json!(grid.color_index(c, m))).collect();
                        json!({
                            "top": c.top.iter().map(|(t, p)| json!([t, shortest(*p)])).collect::<Vec<_>>(),
                            "entropy": c.entropy,
                            "kl": c.kl,
                            "next_rank": c.next.map(|(r, _)| r + 1),
                            "next_prob": c.next.map(|(_, p)| shortest(p)),
                            "final_top1_rank": c.final_top1_rank + 1,
                            "hit": c.hit,
                            "c": colors,
                        })
                    }
                })
                .collect();
            let tracks: Vec<Value> = col
                .tracks
                .iter()
                .map(|t| {
                    json!({
                        "label": t.label,
                        "probs": t.probs.iter().map(|p| p.map(shortest)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "position": col.position,
                "input": col.input,
                "next": col.next,
                "final_top1": col.final_top1,
                "cells": cells,
                "tracks": tracks,
            })
        })
        .collect();
    json!({
        "model": grid.model,
        "lens": grid.lens.as_str(),
        "layers": grid.layers,
        "flip": options.flip,
        "metric": options.metric.as_str(),
        "metrics": Metric::ALL.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
        "colormap": color::table(),
        "text_on": (0..color::STEPS).map(color::text_on).collect::<Vec<_>>(),
        "scales": scales,
        "columns": columns,
    })
}
