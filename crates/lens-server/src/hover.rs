//! The hover's markdown: a heading with the token, then one table row per layer (last layer
//! first) with the top-k next-token predictions there, and the probability and rank, at the
//! previous position, of the token actually written here; after an edit that moved or replaced
//! the hovered token, what each layer predicted there before the edit.

use std::fmt::Write;

use lens_core::{Backend, Part, PositionView, Site, Token};

/// Make a token's text visible and inert in markdown: whitespace becomes a visible symbol,
/// markdown punctuation is backslash-escaped (a `|` would otherwise split a table cell).
pub fn escape(text: &str) -> String {
    if text.is_empty() {
        return "∅".into();
    }
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        match c {
            ' ' => out.push('␣'),
            '\n' => out.push('↵'),
            '\r' => out.push('␍'),
            '\t' => out.push('⇥'),
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '~' | '&' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn prob(p: f32) -> String {
    if p >= 0.01 {
        format!("{p:.2}")
    } else if p > 0.0 {
        format!("{p:.0e}")
    } else {
        "0".into()
    }
}

fn layer_of(site: Site) -> usize {
    match site {
        Site::Layer(l) | Site::MidBlock(l) => l,
    }
}

/// One layer of the hovered token before the last edit: that version's top-1 and its
/// probability, and `KL(before ‖ now)` in nats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeforeCell {
    pub top1: u32,
    pub prob: f32,
    pub kl: f64,
}

/// The hovered token compared with the previous version of the document: where it was there
/// (`part`: in a same-length changed span, or shifted after the edit) and, per cell of the
/// hover, what that layer predicted then.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub position: usize,
    pub part: Part,
    pub cells: Vec<BeforeCell>,
}

/// `context` is the context window (the hovered token last), `index` the hovered token's
/// index in the whole document; `here` the lens at the hovered position; `written`, per cell
/// of `here`, the probability and 0-based rank of the hovered token at the previous position
/// (`None` for the first token); `before`, the same token before the last edit.
pub fn markdown(
    backend: &dyn Backend,
    context: &[Token],
    index: usize,
    here: &PositionView,
    written: Option<&[Option<(f32, usize)>]>,
    before: Option<&Compared>,
) -> String {
    let mut md = String::new();
    let token = &context[context.len() - 1];
    let _ = writeln!(
        md,
        "**{}** · token {} · id {} · next: **{}** ({})\n",
        escape(&token.text),
        index,
        token.id,
        escape(&backend.decode(here.final_top1.id)),
        prob(here.final_top1.prob),
    );
    match before {
        None => md.push_str(
            "| layer | top predictions | p(written) | rank(written) |\n|---:|---|---:|---:|\n",
        ),
        Some(b) => {
            let how = match b.part {
                Part::Changed => "this token replaced another",
                _ => "the text before it changed",
            };
            let _ = writeln!(
                md,
                "Before the last edit ({how}; it was token {}):\n",
                b.position
            );
            md.push_str("| layer | top predictions | p(written) | rank(written) | before edit | KL(before‖now) |\n|---:|---|---:|---:|---|---:|\n");
        }
    }
    for (i, cell) in here.cells.iter().enumerate().rev() {
        let layer = layer_of(cell.site);
        let mark = if here.decided_at == Some(layer) {
            " ◀ decided"
        } else {
            ""
        };
        let top: Vec<String> = cell
            .top
            .iter()
            .map(|p| format!("{} {}", escape(&backend.decode(p.id)), prob(p.prob)))
            .collect();
        let (pw, rw) = match written.and_then(|w| w.get(i).copied().flatten()) {
            Some((p, rank)) => (prob(p), (rank + 1).to_string()),
            None => ("—".into(), "—".into()),
        };
        let _ = write!(md, "| {layer}{mark} | {} | {pw} | {rw} |", top.join(" · "));
        if let Some(c) = before.and_then(|b| b.cells.get(i)) {
            let changed = match cell.top.first().is_some_and(|t| t.id != c.top1) {
                true => " ✱",
                false => "",
            };
            let _ = write!(
                md,
                " {} {}{changed} | {:.3} |",
                escape(&backend.decode(c.top1)),
                prob(c.prob),
                c.kl
            );
        }
        md.push('\n');
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, expect: &str) {
        assert_eq!(escape(text), expect);
    }

    #[test]
    fn escapes_tokens() {
        check(" world", "␣world");
        check("a|b", "a\\|b");
        check(".-#(", ".-#(");
        check("**x**", "\\*\\*x\\*\\*");
        check("\n\t", "↵⇥");
        check("", "∅");
        check("gęślą", "gęślą");
        check("\u{1}", "\\u{1}");
    }
}
