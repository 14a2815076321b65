//! Token text made visible and safe, and measured with the embedded font.

use std::sync::OnceLock;

use skrifa::instance::{LocationRef, Size};
use skrifa::MetadataProvider;

/// A token's text with its whitespace and control characters made visible: `·` for a space,
/// `↵` for a newline, `⇥` for a tab, `␍` for a carriage return, `∅` for the empty string,
/// and `\u{…}` for other control characters.
pub fn visible(s: &str) -> String {
    if s.is_empty() {
        return "∅".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push('·'),
            '\n' => out.push('↵'),
            '\t' => out.push('⇥'),
            '\r' => out.push('␍'),
            '\u{a0}' => out.push('⍽'),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Escape text for XML character data and attribute values.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Advance widths of the embedded font, per em.
struct Widths {
    ascii: [f32; 128],
    font: Option<skrifa::FontRef<'static>>,
    fallback: f32,
}

fn widths() -> &'static Widths {
    static W: OnceLock<Widths> = OnceLock::new();
    W.get_or_init(|| {
        let font = skrifa::FontRef::new(crate::FONT).ok();
        let mut ascii = [0.55; 128];
        let mut fallback = 0.6;
        if let Some(f) = &font {
            let metrics = f.glyph_metrics(Size::new(1.0), LocationRef::default());
            let charmap = f.charmap();
            for (i, w) in ascii.iter_mut().enumerate() {
                if let Some(a) = charmap.map(i as u32).and_then(|g| metrics.advance_width(g)) {
                    *w = a;
                }
            }
            fallback = ascii[usize::from(b'M')];
        }
        Widths {
            ascii,
            font,
            fallback,
        }
    })
}

/// Width of `s` in the embedded font at `size` px (no kerning: a slight overestimate).
pub fn width(s: &str, size: f32) -> f32 {
    let w = widths();
    let metrics = w.font.as_ref().map(|f| {
        (
            f.glyph_metrics(Size::new(1.0), LocationRef::default()),
            f.charmap(),
        )
    });
    let mut total = 0.0;
    for c in s.chars() {
        let a = if (c as u32) < 128 {
            w.ascii[c as usize]
        } else {
            metrics
                .as_ref()
                .and_then(|(m, cm)| cm.map(c).and_then(|g| m.advance_width(g)))
                .unwrap_or(w.fallback)
        };
        total += a;
    }
    total * size
}

/// `s` shortened with `…` so that it fits `max` px at `size` px.
pub fn fit(s: &str, size: f32, max: f32) -> String {
    if width(s, size) <= max {
        return s.to_string();
    }
    let ell = width("…", size);
    let mut out = String::new();
    let mut used = 0.0;
    for c in s.chars() {
        let w = width(c.encode_utf8(&mut [0; 4]), size);
        if used + w + ell > max {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_is_visible_and_xml_is_escaped() {
        assert_eq!(visible(" the\n\t"), "·the↵⇥");
        assert_eq!(visible(""), "∅");
        assert_eq!(visible("\u{1}"), "\\u{1}");
        assert_eq!(xml("<a & 'b'>\""), "&lt;a &amp; &apos;b&apos;&gt;&quot;");
    }

    #[test]
    fn fitting_shortens_only_long_text() {
        assert_eq!(fit("ab", 11.0, 60.0), "ab");
        let long = fit("·autoregressive", 11.0, 40.0);
        assert!(long.ends_with('…') && long.chars().count() < 15, "{long}");
        assert!(width(&long, 11.0) <= 40.0);
        // Wide letters are wider than narrow ones in a real font.
        assert!(width("MMMM", 11.0) > width("iiii", 11.0) * 2.0);
    }
}
