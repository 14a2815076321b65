//! The lens in the terminal: the layer × position grid, and one position's per-layer table.
//!
//! Colour is truecolor through `anstream`, which drops it when `NO_COLOR` is set or stdout is
//! not a terminal.

use std::io::Write;

use anstyle::{Color, RgbColor, Style};
use lens_core::{Answer, Backend, Diff, Part, PositionView, Token};
use lens_plot::visible;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

const LABEL: usize = 6;
const CELL: usize = 10;

pub(crate) fn cell_style(prob: f32) -> Style {
    let t = f64::from(prob);
    let (r, g, b) = lens_plot::rgb(t);
    let fg = match lens_plot::dark_text(t) {
        true => RgbColor(0, 0, 0),
        false => RgbColor(255, 255, 255),
    };
    Style::new()
        .bg_color(Some(Color::Rgb(RgbColor(r, g, b))))
        .fg_color(Some(Color::Rgb(fg)))
}

/// `s` cut to at most `width` columns, padded with spaces to exactly `width`.
pub fn fit(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut w = 0;
    let total = s.width();
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        let room = if total > width {
            width.saturating_sub(1)
        } else {
            width
        };
        if w + cw > room {
            out.push('…');
            w += 1;
            break;
        }
        out.push(c);
        w += cw;
    }
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(w)));
    out
}

pub(crate) fn terminal_width() -> usize {
    if let Some(cols) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return cols;
    }
    terminal_size::terminal_size_of(std::io::stdout()).map_or(120, |(w, _)| usize::from(w.0))
}

/// The seed's picture: one row per layer (last layer on top), one column per input token, each
/// cell the top-1 prediction coloured by its probability; `*` marks a cell whose top-1 is the
/// prompt's actual next token.
pub fn grid(
    out: &mut dyn Write,
    backend: &dyn Backend,
    tokens: &[Token],
    answer: &Answer,
) -> std::io::Result<()> {
    let (views, layers, lens) = (&answer.views, &answer.layers, answer.kind);
    let info = backend.info();
    writeln!(
        out,
        "{} · {} lens · {} tokens · layers {}..={} (0 = embeddings)",
        info.name,
        lens,
        tokens.len(),
        layers.first().copied().unwrap_or(0),
        layers.last().copied().unwrap_or(0)
    )?;
    let per_panel = ((terminal_width().saturating_sub(LABEL)) / CELL).max(1);
    let dim = Style::new().dimmed();
    let bold = Style::new().bold();
    for panel in views.chunks(per_panel) {
        writeln!(out)?;
        write!(out, "{}", fit("", LABEL))?;
        for v in panel {
            write!(
                out,
                "{bold}{}{bold:#}",
                fit(&visible(&tokens[v.position].text), CELL)
            )?;
        }
        writeln!(out)?;
        for (row, &layer) in layers.iter().enumerate().rev() {
            write!(out, "{dim}{}{dim:#}", fit(&format!("L{layer}"), LABEL))?;
            for v in panel {
                let cell = &v.cells[row];
                let Some(top) = cell.top.first() else {
                    continue;
                };
                let hit = cell.next.is_some_and(|n| n.id == top.id);
                let text = fit(&visible(&backend.decode(top.id)), CELL - 2);
                let style = cell_style(top.prob);
                write!(
                    out,
                    "{style}{text}{}{style:#} ",
                    if hit { '*' } else { ' ' }
                )?;
            }
            writeln!(out)?;
        }
        write!(out, "{dim}{}{dim:#}", fit("next", LABEL))?;
        for v in panel {
            let next = tokens
                .get(v.position + 1)
                .map_or(String::from("—"), |t| visible(&t.text));
            write!(out, "{dim}{}{dim:#}", fit(&next, CELL))?;
        }
        writeln!(out)?;
        write!(out, "{dim}{}{dim:#}", fit("since", LABEL))?;
        for v in panel {
            let since = v.decided_at.map_or(String::from("—"), |l| format!("L{l}"));
            write!(out, "{dim}{}{dim:#}", fit(&since, CELL))?;
        }
        writeln!(out)?;
    }
    if let Some(last) = views.last() {
        writeln!(out)?;
        let since = match last.decided_at {
            Some(l) => format!("top-1 from layer {l} of {} on", info.n_layers),
            None => "not top-1 at any shown layer before the last".into(),
        };
        writeln!(
            out,
            "Prediction after {:?}: {:?} (p = {:.3}), {since}",
            tokens[last.position].text,
            backend.decode(last.final_top1.id),
            last.final_top1.prob
        )?;
    }
    Ok(())
}

/// The diff lens in the terminal: one row per layer (last on top), one column per aligned pair
/// of positions, each cell the after version's top-1 (`before→after` where the top-1 changed,
/// marked `!`), coloured by `KL(before ‖ after)` on the plots' scale (bright = unchanged).
pub fn diff_grid(
    out: &mut dyn Write,
    backend: &dyn Backend,
    before: &[Token],
    after: &[Token],
    diff: &Diff,
) -> std::io::Result<()> {
    let al = &diff.alignment;
    let span = |tokens: &[Token], r: std::ops::Range<usize>| -> String {
        tokens[r]
            .iter()
            .map(|t| t.text.as_str())
            .collect::<String>()
    };
    writeln!(
        out,
        "{} · {} lens · before {} tokens, after {} · shared prefix {}, suffix {} · changed {:?} → {:?}",
        backend.info().name,
        diff.kind,
        before.len(),
        after.len(),
        al.prefix,
        al.suffix,
        span(before, al.before_changed()),
        span(after, al.after_changed()),
    )?;
    let per_panel = ((terminal_width().saturating_sub(LABEL)) / (CELL + 4)).max(1);
    let (dim, bold) = (Style::new().dimmed(), Style::new().bold());
    let text = |id: u32| visible(&backend.decode(id));
    for panel in diff.pairs.chunks(per_panel) {
        writeln!(out)?;
        write!(out, "{}", fit("", LABEL))?;
        for p in panel {
            let label = match p.pair.part {
                Part::Changed => format!(
                    "{}→{}",
                    visible(&before[p.pair.before].text),
                    visible(&after[p.pair.after].text)
                ),
                _ => visible(&after[p.pair.after].text),
            };
            write!(out, "{bold}{}{bold:#}", fit(&label, CELL + 4))?;
        }
        writeln!(out)?;
        for (row, &layer) in diff.layers.iter().enumerate().rev() {
            write!(out, "{dim}{}{dim:#}", fit(&format!("L{layer}"), LABEL))?;
            for p in panel {
                let c = &p.cells[row];
                let top =
                    |v: &[lens_core::Prediction]| v.first().map_or(String::new(), |t| text(t.id));
                let label = match c.top1_changed {
                    true => format!("{}→{}", top(&c.before), top(&c.after)),
                    false => top(&c.after),
                };
                let style = cell_style(lens_plot::kl_t(diff, c.kl) as f32);
                write!(
                    out,
                    "{style}{}{}{style:#} ",
                    fit(&label, CELL + 2),
                    if c.top1_changed { '!' } else { ' ' }
                )?;
            }
            writeln!(out)?;
        }
        write!(out, "{dim}{}{dim:#}", fit("pos", LABEL))?;
        for p in panel {
            let pos = match p.pair.before == p.pair.after {
                true => p.pair.after.to_string(),
                false => format!("{}→{}", p.pair.before, p.pair.after),
            };
            write!(out, "{dim}{}{dim:#}", fit(&pos, CELL + 4))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// One aligned position of the diff in detail: per layer the KL and both versions' top-1.
pub fn diff_table(
    out: &mut dyn Write,
    backend: &dyn Backend,
    before: &[Token],
    after: &[Token],
    diff: &Diff,
    position: usize,
) -> std::io::Result<()> {
    writeln!(out)?;
    let Some(p) = diff.pairs.iter().find(|p| p.pair.after == position) else {
        writeln!(
            out,
            "Position {position} ({:?}) of the after version has no counterpart before: it is in the changed span.",
            after.get(position).map_or("", |t| t.text.as_str())
        )?;
        return Ok(());
    };
    writeln!(
        out,
        "Position {} {:?} (before: position {} {:?}), {}:",
        p.pair.after,
        after[p.pair.after].text,
        p.pair.before,
        before[p.pair.before].text,
        p.pair.part.as_str()
    )?;
    writeln!(
        out,
        "{:>6}  {:>9}  {:<24}  {:<24}",
        "layer", "KL", "before top-1 (p)", "after top-1 (p)"
    )?;
    let top = |v: &[lens_core::Prediction]| {
        v.first().map_or(String::new(), |t| {
            format!("{} ({:.3})", visible(&backend.decode(t.id)), t.prob)
        })
    };
    for c in p.cells.iter().rev() {
        writeln!(
            out,
            "{:>6}  {:>9.5}  {}  {}{}",
            c.layer,
            c.kl,
            fit(&top(&c.before), 24),
            fit(&top(&c.after), 24),
            if c.top1_changed { "  changed" } else { "" }
        )?;
    }
    Ok(())
}

/// One position in detail: per layer the top-k, the rank and probability of the actual next
/// token, entropy and KL to the final layer.
pub fn position_table(
    out: &mut dyn Write,
    backend: &dyn Backend,
    tokens: &[Token],
    view: &PositionView,
) -> std::io::Result<()> {
    let p = view.position;
    let next = tokens.get(p + 1);
    writeln!(
        out,
        "Position {p}: {:?}{}",
        tokens[p].text,
        next.map_or(String::new(), |t| format!(", next token {:?}", t.text))
    )?;
    let k = view.cells.first().map_or(0, |c| c.top.len());
    let bold = Style::new().bold();
    writeln!(
        out,
        "{bold}{:>5}  {:<w$}  {:>7} {:>9}  {:>7}  {:>8}{bold:#}",
        "layer",
        "top predictions",
        "next rk",
        "next p",
        "entropy",
        "KL",
        w = k * 17
    )?;
    for cell in view.cells.iter().rev() {
        let layer = match cell.site {
            lens_core::Site::Layer(l) => format!("{l}"),
            lens_core::Site::MidBlock(l) => format!("{l}.5"),
        };
        let mark = if view
            .decided_at
            .is_some_and(|d| cell.site == lens_core::Site::Layer(d))
        {
            "▸"
        } else {
            " "
        };
        write!(out, "{mark}{layer:>4}  ")?;
        for t in &cell.top {
            let style = cell_style(t.prob);
            write!(
                out,
                "{style}{}{style:#} {:.3} ",
                fit(&visible(&backend.decode(t.id)), 10),
                t.prob
            )?;
        }
        match cell.next {
            Some(n) => write!(out, " {:>7} {:>9.3e}", n.rank, n.prob)?,
            None => write!(out, " {:>7} {:>9}", "—", "—")?,
        }
        writeln!(out, "  {:>7.3}  {:>8.3}", cell.entropy, cell.kl_to_final)?;
    }
    writeln!(
        out,
        "▸ first layer from which the final prediction {:?} stays top-1",
        backend.decode(view.final_top1.id)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_pads_and_cuts_by_display_width() {
        assert_eq!(fit("ab", 4), "ab  ");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("日本語", 4), "日… ");
        assert_eq!(fit("abcd", 4), "abcd");
    }
}
