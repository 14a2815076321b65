//! The diff lens as a heatmap: one column per aligned pair of positions (before → after), one
//! row per layer, each cell coloured by `KL(before ‖ after)` on the same viridis map as the
//! lens (bright = unchanged), showing both versions' top-1 (before above, after below) and
//! outlined where the top-1 changed. The SVG carries each cell's top-k of both versions as its
//! tooltip; the PNG is that SVG rasterised; the HTML page is the SVG with a table of the
//! top-1 changes, self-contained.

use std::fmt::Write;

use lens_core::{Diff, DiffCell, Part, Prediction, Token};

use crate::grid::{nice_step, trim_float};
use crate::text::{fit, visible, xml};
use crate::{color, Error, Options};

const CELL_W: u32 = 78;
const CELL_H: u32 = 30;
const LEFT: u32 = 78;
const TOP: u32 = 58;
const HEAD_H: u32 = 34;
const PANEL_GAP: u32 = 22;
const LEGEND_W: u32 = 150;
const FONT: f32 = 10.0;
const CHANGED: &str = "#ff2a6d";
const FAMILY: &str = "'DejaVu Sans Condensed', 'DejaVu Sans', sans-serif";

/// What to plot: a diff (`lens_core::Query::diff`) and what is needed to label it.
pub struct DiffPlot<'a> {
    pub diff: &'a Diff,
    pub before: &'a [Token],
    pub after: &'a [Token],
    /// The text of a token id (`Backend::decode`).
    pub decode: &'a dyn Fn(u32) -> String,
    pub model: &'a str,
}

/// Where a KL lies on the colour map of `diff` (0 = dark, 1 = bright; a KL of 0 is bright):
/// the SVG, PNG, page and terminal colour a cell alike.
pub fn kl_t(diff: &Diff, kl: f64) -> f64 {
    t_of(kl, kl_scale(diff).0)
}

/// The colour scale of the KL: 0 (bright) to a round number at least the largest KL.
fn kl_scale(diff: &Diff) -> (f64, Vec<f64>) {
    let max = diff
        .pairs
        .iter()
        .flat_map(|p| &p.cells)
        .map(|c| c.kl)
        .fold(0.0_f64, f64::max);
    let step = nice_step(max / 4.0);
    let hi = ((max / step).ceil() * step).max(step);
    let n = (hi / step).round() as usize;
    (hi, (0..=n).map(|i| i as f64 * step).collect())
}

fn t_of(kl: f64, hi: f64) -> f64 {
    1.0 - (kl / hi.max(f64::MIN_POSITIVE)).clamp(0.0, 1.0)
}

fn subtitle(diff: &Diff) -> String {
    format!(
        "{} lens · colour: KL(before ‖ after), nats · top line before, bottom line after · outlined: top-1 changed",
        diff.kind
    )
}

/// The diff heatmap as a standalone SVG document.
pub fn diff_svg(plot: &DiffPlot<'_>, options: &Options) -> String {
    let diff = plot.diff;
    let decode = |id: u32| visible(&(plot.decode)(id));
    let per = options.max_columns.max(1);
    let n_layers = diff.layers.len();
    let n_cols = diff.pairs.len();
    let panels = n_cols.div_ceil(per).max(1) as u32;
    let panel_h = HEAD_H + 4 + n_layers as u32 * CELL_H;
    let (hi, ticks) = kl_scale(diff);
    let title = format!("Diff lens · {}", plot.model);
    let sub = subtitle(diff);
    let legend_h = (n_layers as u32 * CELL_H).clamp(110, 260);
    let width = (LEFT + n_cols.min(per).max(1) as u32 * CELL_W + 20 + LEGEND_W)
        .max(LEFT + crate::text::width(&sub, 11.0).ceil() as u32 + 12);
    let height =
        (TOP + panels * panel_h + (panels - 1) * PANEL_GAP).max(TOP + HEAD_H + legend_h + 60) + 16;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="{}" font-size="{FONT}"><rect width="{width}" height="{height}" fill="#ffffff"/>"##,
        xml(FAMILY)
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="22" font-size="16" font-weight="bold" fill="#111111">{}</text><text x="{LEFT}" y="40" font-size="11" fill="#444444">{}</text>"##,
        xml(&title),
        xml(&sub)
    );
    if diff.pairs.is_empty() || n_layers == 0 {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{}" fill="#444444">no aligned positions to compare</text></svg>"##,
            TOP + 20
        );
        return s;
    }
    let order: Vec<usize> = match options.flip {
        true => (0..n_layers).collect(),
        false => (0..n_layers).rev().collect(),
    };
    for (k, chunk) in diff.pairs.chunks(per).enumerate() {
        let y0 = TOP + k as u32 * (panel_h + PANEL_GAP);
        let _ = writeln!(s, r#"<g class="panel" data-panel="{k}">"#);
        for (j, pd) in chunk.iter().enumerate() {
            let x = LEFT + j as u32 * CELL_W;
            let label = match pd.pair.part {
                Part::Changed => format!(
                    "{}→{}",
                    visible(&token_text(plot.before, pd.pair.before)),
                    visible(&token_text(plot.after, pd.pair.after))
                ),
                _ => visible(&token_text(plot.after, pd.pair.after)),
            };
            let fill = match pd.pair.part {
                Part::Prefix => "#eef0f3",
                Part::Changed => "#ffd6e2",
                Part::Suffix => "#dde1e7",
            };
            let _ = writeln!(
                s,
                r##"<g class="column" data-part="{}"><rect x="{}" y="{y0}" width="{}" height="{}" fill="{fill}"/><text x="{}" y="{}" text-anchor="middle" font-weight="bold" fill="#111111">{}</text><text x="{}" y="{}" text-anchor="middle" font-size="9" fill="#666666">{}</text></g>"##,
                pd.pair.part.as_str(),
                x + 1,
                CELL_W - 2,
                HEAD_H - 4,
                x + CELL_W / 2,
                y0 + 14,
                xml(&fit(&label, FONT, (CELL_W - 6) as f32)),
                x + CELL_W / 2,
                y0 + 26,
                match pd.pair.before == pd.pair.after {
                    true => format!("{}", pd.pair.after),
                    false => format!("{}→{}", pd.pair.before, pd.pair.after),
                }
            );
        }
        let rows_y = y0 + HEAD_H + 4;
        for (r, &li) in order.iter().enumerate() {
            let y = rows_y + r as u32 * CELL_H;
            let layer = diff.layers[li];
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#333333">{}</text>"##,
                LEFT - 6,
                y + 19,
                match layer {
                    0 => "0 (emb)".to_string(),
                    l => l.to_string(),
                }
            );
            for (j, pd) in chunk.iter().enumerate() {
                let x = LEFT + j as u32 * CELL_W;
                cell(&mut s, &decode, x, y, &pd.cells[li], hi);
            }
        }
        let mid = rows_y + n_layers as u32 * CELL_H / 2;
        let _ = writeln!(
            s,
            r##"<text x="14" y="{mid}" text-anchor="middle" fill="#444444" transform="rotate(-90 14 {mid})">layer</text></g>"##
        );
    }
    legend(
        &mut s,
        LEFT + n_cols.min(per) as u32 * CELL_W + 20,
        TOP + HEAD_H + 4,
        legend_h,
        hi,
        &ticks,
    );
    s.push_str("</svg>\n");
    s
}

fn token_text(tokens: &[Token], i: usize) -> String {
    tokens.get(i).map_or_else(String::new, |t| t.text.clone())
}

fn top_line(decode: &dyn Fn(u32) -> String, top: &[Prediction]) -> String {
    top.iter()
        .map(|p| format!("{} {:.3}", decode(p.id), p.prob))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cell(s: &mut String, decode: &dyn Fn(u32) -> String, x: u32, y: u32, c: &DiffCell, hi: f64) {
    let i = color::index(t_of(c.kl, hi));
    let (fill, ink) = (color::table()[i].as_str(), color::text_on(i));
    let title = format!(
        "layer {}: KL(before ‖ after) {:.4}\nbefore: {}\nafter: {}",
        c.layer,
        c.kl,
        top_line(decode, &c.before),
        top_line(decode, &c.after)
    );
    let before = c.before.first().map_or_else(String::new, |p| decode(p.id));
    let after = c.after.first().map_or_else(String::new, |p| decode(p.id));
    let _ = writeln!(
        s,
        r#"<g class="cell" data-layer="{}" data-kl="{}"><title>{}</title><rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{fill}"/>"#,
        c.layer,
        c.kl,
        xml(&title)
    );
    if c.top1_changed {
        let _ = writeln!(
            s,
            r#"<rect class="changed" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{CHANGED}" stroke-width="2.5"/>"#,
            f64::from(x) + 1.75,
            f64::from(y) + 1.75,
            f64::from(CELL_W) - 3.5,
            f64::from(CELL_H) - 3.5
        );
    }
    let w = (CELL_W - 8) as f32;
    let _ = writeln!(
        s,
        r#"<text x="{cx}" y="{}" text-anchor="middle" fill="{ink}" opacity="0.8" font-size="9">{}</text><text x="{cx}" y="{}" text-anchor="middle" fill="{ink}">{}</text></g>"#,
        y + 12,
        xml(&fit(&before, 9.0, w)),
        y + 25,
        xml(&fit(&after, FONT, w)),
        cx = x + CELL_W / 2,
    );
}

fn legend(s: &mut String, x: u32, y: u32, h: u32, hi: f64, ticks: &[f64]) {
    let bar_w = 14;
    let _ = writeln!(
        s,
        r#"<g class="legend"><defs><linearGradient id="kmap" x1="0" y1="1" x2="0" y2="0">"#
    );
    crate::svg::gradient_stops(s);
    let _ = writeln!(
        s,
        r##"</linearGradient></defs><text x="{x}" y="{}" fill="#222222" font-weight="bold">KL (nats)</text><rect x="{x}" y="{y}" width="{bar_w}" height="{h}" fill="url(#kmap)" stroke="#555555" stroke-width="0.5"/>"##,
        y.saturating_sub(8)
    );
    for &v in ticks {
        let ty = f64::from(y) + (1.0 - t_of(v, hi)) * f64::from(h);
        crate::svg::tick(s, x + bar_w, ty, &trim_float(v));
    }
    let ky = y + h + 18;
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{ky}" width="{}" height="14" fill="#3b528b" stroke="{CHANGED}" stroke-width="2.5"/><text x="{}" y="{}" fill="#333333">top-1 changed</text></g>"##,
        x + 1,
        bar_w + 6,
        x + bar_w + 14,
        ky + 11
    );
}

/// The diff heatmap as PNG bytes (the SVG rasterised at `scale`).
pub fn diff_png(plot: &DiffPlot<'_>, options: &Options, scale: f32) -> Result<Vec<u8>, Error> {
    crate::rasterize(&diff_svg(plot, options), scale)
}

/// The diff as one self-contained HTML page: both texts, the heatmap (hover a cell for both
/// versions' top-k) and a table of the cells whose top-1 changed.
pub fn diff_html(plot: &DiffPlot<'_>, options: &Options) -> String {
    let decode = |id: u32| visible(&(plot.decode)(id));
    let text = |tokens: &[Token], changed: std::ops::Range<usize>| -> String {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match changed.contains(&i) {
                true => format!(r#"<mark class="tok">{}</mark>"#, xml(&visible(&t.text))),
                false => format!(r#"<span class="tok">{}</span>"#, xml(&visible(&t.text))),
            })
            .collect()
    };
    let al = &plot.diff.alignment;
    let mut rows = String::new();
    for pd in &plot.diff.pairs {
        for c in pd.cells.iter().filter(|c| c.top1_changed) {
            let top1 = |top: &[Prediction]| {
                top.first()
                    .map_or_else(String::new, |p| format!("{} ({:.3})", decode(p.id), p.prob))
            };
            let _ = writeln!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
                pd.pair.after,
                c.layer,
                xml(&top1(&c.before)),
                xml(&top1(&c.after)),
                c.kl
            );
        }
    }
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>Diff lens · {model}</title>
<style>
body {{ font-family: 'DejaVu Sans', sans-serif; margin: 1.2em; color: #111; }}
.versions p {{ margin: 0.3em 0; }}
.tok {{ white-space: pre; display: inline-block; border-right: 1px dotted #bbb; }}
mark.tok {{ background: #ffd6e2; }}
table.changes {{ border-collapse: collapse; margin-top: 1em; }}
table.changes td, table.changes th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
</style>
</head>
<body>
<h1>Diff lens · {model}</h1>
<div class="versions">
<p id="before"><b>before</b> {before}</p>
<p id="after"><b>after</b> {after}</p>
</div>
<div id="figure">
{svg}</div>
<table class="changes"><thead><tr><th>position</th><th>layer</th><th>before top-1</th><th>after top-1</th><th>KL</th></tr></thead>
<tbody>
{rows}</tbody></table>
</body>
</html>
"#,
        model = xml(plot.model),
        before = text(plot.before, al.before_changed()),
        after = text(plot.after, al.after_changed()),
        svg = diff_svg(plot, options),
    )
}
