//! The heatmap as SVG text. Geometry is in whole SVG units (px at scale 1).

use std::fmt::Write;

use crate::grid::{CellData, Grid, Metric};
use crate::text::{fit, xml};
use crate::{color, Options};

pub const CELL_W: u32 = 64;
pub const CELL_H: u32 = 22;
const LEFT: u32 = 78;
const TOP: u32 = 56;
const PANEL_GAP: u32 = 26;
const LEGEND_W: u32 = 150;
const FONT: f32 = 11.0;
/// Input row: token text, then the position index below it.
const INPUT_H: u32 = CELL_H + 13;
const FAMILY: &str = "'DejaVu Sans Condensed', 'DejaVu Sans', sans-serif";
const HIT: &str = "#ff2a6d";
const MISSING: &str = "#d4d4d4";

/// Size of the whole figure for a grid of `n_columns` × `n_layers`, in SVG units.
pub fn size(n_columns: usize, n_layers: usize, max_columns: usize) -> (u32, u32) {
    let per = max_columns.max(1);
    let panels = n_columns.div_ceil(per).max(1) as u32;
    let cols = n_columns.min(per).max(1) as u32;
    let width = LEFT + cols * CELL_W + 20 + LEGEND_W;
    let panel_h = panel_height(n_layers);
    let panels_bottom = TOP + panels * panel_h + (panels - 1) * PANEL_GAP;
    let legend_bottom = TOP + CELL_H + 4 + legend_height(n_layers) + 18 + 2 * CELL_H;
    (width, panels_bottom.max(legend_bottom) + 16)
}

fn legend_height(n_layers: usize) -> u32 {
    (n_layers as u32 * CELL_H).clamp(110, 260)
}

fn panel_height(n_layers: usize) -> u32 {
    CELL_H + 4 + (n_layers as u32) * CELL_H + 4 + INPUT_H
}

pub fn render(grid: &Grid, options: &Options) -> String {
    let metric = options.metric;
    let per = options.max_columns.max(1);
    let n_layers = grid.layers.len();
    let (width, height) = size(grid.columns.len(), n_layers, per);
    // Narrow plots: room for the title lines.
    let text_w = crate::text::width(&grid.subtitle(metric), FONT)
        .max(crate::text::width(&grid.title(), 16.0));
    let width = width.max(LEFT + text_w.ceil() as u32 + 12);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="{family}" font-size="{FONT}">"#,
        family = xml(FAMILY)
    );
    s.push('\n');
    let _ = writeln!(
        s,
        r##"<rect width="{width}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="22" font-size="16" font-weight="bold" fill="#111111">{}</text>"##,
        xml(&grid.title())
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="40" fill="#444444">{}</text>"##,
        xml(&grid.subtitle(metric))
    );

    if grid.columns.is_empty() || n_layers == 0 {
        let _ = writeln!(
            s,
            r##"<text x="{LEFT}" y="{}" fill="#444444">nothing to plot</text>"##,
            TOP + 20
        );
        s.push_str("</svg>\n");
        return s;
    }

    // Layers top to bottom on the page.
    let order: Vec<usize> = if options.flip {
        (0..n_layers).collect()
    } else {
        (0..n_layers).rev().collect()
    };
    let panel_h = panel_height(n_layers);
    for (k, chunk) in grid.columns.chunks(per).enumerate() {
        let y0 = TOP + k as u32 * (panel_h + PANEL_GAP);
        let _ = writeln!(s, r#"<g class="panel" data-panel="{k}">"#);
        // Actual next tokens, above the layers.
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#444444" font-style="italic">next</text>"##,
            LEFT - 6,
            y0 + 15
        );
        for (j, col) in chunk.iter().enumerate() {
            let x = LEFT + j as u32 * CELL_W;
            let label = col.next.as_deref().unwrap_or("");
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{y0}" width="{}" height="{}" fill="#eef0f3"/><text x="{}" y="{}" text-anchor="middle" fill="#222222" font-style="italic">{}</text>"##,
                x + 1,
                CELL_W - 2,
                CELL_H - 2,
                x + CELL_W / 2,
                y0 + 15,
                xml(&fit(label, FONT, (CELL_W - 6) as f32))
            );
        }
        // The layers.
        let rows_y = y0 + CELL_H + 4;
        for (r, &li) in order.iter().enumerate() {
            let y = rows_y + r as u32 * CELL_H;
            let layer = grid.layers[li];
            let name = if layer == 0 {
                "0 (emb)".to_string()
            } else {
                layer.to_string()
            };
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="end" fill="#333333">{name}</text>"##,
                LEFT - 6,
                y + 15
            );
            for (j, col) in chunk.iter().enumerate() {
                let x = LEFT + j as u32 * CELL_W;
                cell(&mut s, grid, metric, x, y, layer, col.cells[li].as_ref());
            }
        }
        // Input tokens and their positions, below.
        let iy = rows_y + n_layers as u32 * CELL_H + 4;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#444444" font-weight="bold">input</text>"##,
            LEFT - 6,
            iy + 15
        );
        for (j, col) in chunk.iter().enumerate() {
            let x = LEFT + j as u32 * CELL_W;
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{iy}" width="{}" height="{}" fill="#dde1e7"/><text x="{}" y="{}" text-anchor="middle" fill="#111111" font-weight="bold">{}</text><text x="{}" y="{}" text-anchor="middle" fill="#777777" font-size="9">{}</text>"##,
                x + 1,
                CELL_W - 2,
                CELL_H - 2,
                x + CELL_W / 2,
                iy + 15,
                xml(&fit(&col.input, FONT, (CELL_W - 6) as f32)),
                x + CELL_W / 2,
                iy + CELL_H + 9,
                col.position
            );
        }
        // The axis name.
        let mid = rows_y + n_layers as u32 * CELL_H / 2;
        let _ = writeln!(
            s,
            r##"<text x="14" y="{mid}" text-anchor="middle" fill="#444444" transform="rotate(-90 14 {mid})">layer</text>"##
        );
        s.push_str("</g>\n");
    }
    legend(
        &mut s,
        grid,
        metric,
        LEFT + per.min(grid.columns.len()) as u32 * CELL_W + 20,
        TOP + CELL_H + 4,
        n_layers,
    );
    s.push_str("</svg>\n");
    s
}

fn cell(
    s: &mut String,
    grid: &Grid,
    metric: Metric,
    x: u32,
    y: u32,
    layer: usize,
    data: Option<&CellData>,
) {
    let Some(c) = data else {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{MISSING}"/>"#
        );
        return;
    };
    let idx = grid.color_index(c, metric);
    let (fill, ink) = match idx {
        Some(i) => (color::table()[i].as_str(), color::text_on(i)),
        None => (MISSING, "#222222"),
    };
    let p1 = c.top.first().map_or(0.0, |(_, p)| *p);
    let mut title = format!("layer {layer}: {} p={p1:.3}", c.top1());
    if let Some((rank, p)) = c.next {
        let _ = write!(title, "; next rank {} p={p:.3}", rank + 1);
    }
    let _ = write!(title, "; entropy {:.3}; KL {:.3}", c.entropy, c.kl);
    let _ = writeln!(
        s,
        r#"<g><title>{}</title><rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{fill}"/>"#,
        xml(&title)
    );
    if c.hit {
        let _ = writeln!(
            s,
            r#"<rect class="hit" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{HIT}" stroke-width="2.5"/>"#,
            f64::from(x) + 1.75,
            f64::from(y) + 1.75,
            f64::from(CELL_W) - 3.5,
            f64::from(CELL_H) - 3.5
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" fill="{ink}">{}</text></g>"#,
        x + CELL_W / 2,
        y + 15,
        xml(&fit(c.top1(), FONT, (CELL_W - 8) as f32))
    );
}

fn legend(s: &mut String, grid: &Grid, metric: Metric, x: u32, y: u32, n_layers: usize) {
    let scale = grid.scale(metric);
    let h = legend_height(n_layers);
    let bar_w = 14;
    let _ = writeln!(s, r#"<g class="legend">"#);
    let _ = writeln!(
        s,
        r#"<defs><linearGradient id="cmap" x1="0" y1="1" x2="0" y2="0">"#
    );
    gradient_stops(s);
    s.push_str("</linearGradient></defs>\n");
    let _ = writeln!(
        s,
        r##"<text x="{x}" y="{}" fill="#222222" font-weight="bold">{}</text>"##,
        y.saturating_sub(8),
        xml(metric.label())
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x}" y="{y}" width="{bar_w}" height="{h}" fill="url(#cmap)" stroke="#555555" stroke-width="0.5"/>"##
    );
    for (v, label) in &scale.ticks {
        let t = scale.t(*v);
        let ty = f64::from(y) + (1.0 - t) * f64::from(h);
        tick(s, x + bar_w, ty, label);
    }
    // The outline's key.
    let ky = y + h + 18;
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#3b528b" stroke="{HIT}" stroke-width="2.5"/><text x="{}" y="{}" fill="#333333">top-1 = next token</text>"##,
        f64::from(x) + 1.25,
        f64::from(ky) + 1.25,
        bar_w + 6,
        CELL_H - 8,
        x + bar_w + 14,
        ky + 12
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x}" y="{}" width="{}" height="{}" fill="{MISSING}"/><text x="{}" y="{}" fill="#333333">no value</text>"##,
        ky + CELL_H,
        bar_w + 8,
        CELL_H - 6,
        x + bar_w + 14,
        ky + CELL_H + 12
    );
    s.push_str("</g>\n");
}

/// The stops of a legend's gradient: every 15th entry of the colour table, dark to bright.
pub(crate) fn gradient_stops(s: &mut String) {
    let table = color::table();
    for i in (0..color::STEPS).step_by(15) {
        let _ = writeln!(
            s,
            r#"<stop offset="{:.3}" stop-color="{}"/>"#,
            i as f64 / (color::STEPS - 1) as f64,
            table[i]
        );
    }
}

/// A legend tick at height `ty` on the right edge `x` of the colour bar, with its label.
pub(crate) fn tick(s: &mut String, x: u32, ty: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<line x1="{x}" y1="{ty:.1}" x2="{}" y2="{ty:.1}" stroke="#333333"/><text x="{}" y="{:.1}" fill="#333333">{}</text>"##,
        x + 4,
        x + 7,
        ty + 4.0,
        xml(label)
    );
}
