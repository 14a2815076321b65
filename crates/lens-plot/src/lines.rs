//! A line chart (one line per series, e.g. a lens's per-layer KL in `logit-lens eval-lens`).

use std::fmt::Write;

use crate::text::xml;

/// One line: a label and its points `(x, y)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 48.0;
/// Line colours, one per series in order (cycled), distinguishable in greyscale too.
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// The chart as a standalone SVG document: axes from 0 to the largest x and y, five ticks
/// each, a legend with the series' labels in order.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    let points = series.iter().flat_map(|s| s.points.iter());
    let x_max = points.clone().map(|p| finite(p.0)).fold(1e-9, f64::max);
    let y_max = points.map(|p| finite(p.1)).fold(1e-9, f64::max);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |v: f64| LEFT + finite(v) / x_max * pw;
    let y = |v: f64| TOP + ph - finite(v) / y_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="'DejaVu Sans Condensed', 'DejaVu Sans', sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="15">{}</text>"#,
        xml(title)
    );
    for i in 0..=5 {
        let (fx, fy) = (x_max * f64::from(i) / 5.0, y_max * f64::from(i) / 5.0);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{fy:.2}</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{fx:.0}</text>"##,
            W - RIGHT,
            y(fy),
            y(fy),
            LEFT - 6.0,
            y(fy) + 4.0,
            x(fx),
            H - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"##,
        LEFT + pw / 2.0,
        H - 12.0,
        xml(x_label),
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        xml(y_label)
    );
    for (i, series) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = series
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT - 250.0,
            W - RIGHT - 226.0,
            W - RIGHT - 220.0,
            ly + 4.0,
            xml(&series.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_series_is_a_line_with_its_label() {
        let svg = line_chart(
            "t <1>",
            "layer",
            "KL",
            &[
                Series {
                    label: "norm".into(),
                    points: vec![(0.0, 2.0), (1.0, 1.0)],
                },
                Series {
                    label: "tuned:a&b".into(),
                    points: vec![(0.0, 1.0), (1.0, 0.0)],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(
            svg.contains(">norm<") && svg.contains(">tuned:a&amp;b<"),
            "{svg}"
        );
        assert!(svg.contains("t &lt;1&gt;"));
        // The largest y sits at the top of the plot area, 0 at its bottom.
        assert!(svg.contains(&format!("{LEFT:.1},{TOP:.1}")), "{svg}");
        assert!(
            svg.contains(&format!("{:.1},{:.1}", W - RIGHT, H - BOTTOM)),
            "{svg}"
        );
    }
}
