//! LSP positions ↔ byte offsets. LSP counts characters in UTF-16 code units unless the
//! client and server agree on UTF-8 (`positionEncoding`); the tokenizer gives UTF-8 byte
//! offsets. Lines end at `\n` (a `\r` before it is not part of the line).

/// The negotiated unit of `Position.character`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    Utf8,
    #[default]
    Utf16,
}

impl Encoding {
    fn width(self, c: char) -> usize {
        match self {
            Encoding::Utf8 => c.len_utf8(),
            Encoding::Utf16 => c.len_utf16(),
        }
    }
}

/// Byte range of line `line` without its terminator, or `None` past the last line.
fn line_range(text: &str, line: usize) -> Option<(usize, usize)> {
    let mut start = 0;
    for _ in 0..line {
        start += text.get(start..)?.find('\n')? + 1;
    }
    let rest = text.get(start..)?;
    let mut end = start + rest.find('\n').unwrap_or(rest.len());
    if end > start && text.as_bytes().get(end - 1) == Some(&b'\r') && end < text.len() {
        end -= 1;
    }
    Some((start, end))
}

/// The byte offset of (`line`, `character`), or `None` when the position is outside the
/// text (past the last line, or past the end of its line). A `character` inside a
/// multi-unit character (half a surrogate pair, a byte inside a UTF-8 sequence) maps to
/// the start of that character.
pub fn offset(text: &str, line: u32, character: u32, enc: Encoding) -> Option<usize> {
    let (start, end) = line_range(text, line as usize)?;
    let want = character as usize;
    let mut units = 0;
    for (i, c) in text.get(start..end)?.char_indices() {
        let w = enc.width(c);
        if units + w > want {
            return Some(start + i);
        }
        units += w;
    }
    (units == want).then_some(end)
}

/// Like [`offset`], but positions past a line's end or past the last line are clamped to the
/// nearest valid offset (for applying edits robustly).
pub fn offset_clamped(text: &str, line: u32, character: u32, enc: Encoding) -> usize {
    match line_range(text, line as usize) {
        None => text.len(),
        Some((start, end)) => offset(text, line, character, enc)
            .unwrap_or(end)
            .clamp(start, end),
    }
}

/// The position of byte offset `byte` (rounded down to a character boundary).
pub fn position(text: &str, byte: usize, enc: Encoding) -> (u32, u32) {
    let mut byte = byte.min(text.len());
    while !text.is_char_boundary(byte) {
        byte -= 1;
    }
    let before = &text[..byte];
    let line = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let character: usize = before[line_start..].chars().map(|c| enc.width(c)).sum();
    (line as u32, character as u32)
}

/// Round `byte` up to a character boundary of `text`.
pub fn ceil_boundary(text: &str, byte: usize) -> usize {
    let mut byte = byte.min(text.len());
    while !text.is_char_boundary(byte) {
        byte += 1;
    }
    byte
}

/// Where the byte range `range` is after the bytes `edit` (start, end) were replaced by `len`
/// new ones: moved along when the edit is before it, unchanged when after, `None` when the
/// edit touches it (an insertion at its start is before it).
pub fn moved(range: (usize, usize), edit: (usize, usize), len: usize) -> Option<(usize, usize)> {
    let (start, end) = range;
    let (a, b) = edit;
    if b <= start {
        Some((start - (b - a) + len, end - (b - a) + len))
    } else if a >= end {
        Some(range)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_move_with_edits() {
        #[track_caller]
        fn check(edit: (usize, usize), len: usize, expect: Option<(usize, usize)>) {
            assert_eq!(moved((10, 15), edit, len), expect, "edit {edit:?} + {len}");
        }
        check((3, 3), 4, Some((14, 19))); // an insertion before
        check((10, 10), 2, Some((12, 17))); // an insertion at its start
        check((2, 8), 0, Some((4, 9))); // a deletion before
        check((4, 10), 1, Some((5, 10))); // a replacement ending at its start
        check((15, 15), 3, Some((10, 15))); // an insertion at its end
        check((20, 25), 0, Some((10, 15))); // after
        check((12, 12), 1, None); // inside
        check((8, 11), 0, None); // over its start
        check((14, 30), 2, None); // over its end
        check((0, 40), 5, None); // over all of it
    }

    #[track_caller]
    fn check(text: &str, line: u32, character: u32, enc: Encoding, expect: Option<&str>) {
        let got = offset(text, line, character, enc);
        assert_eq!(
            got.map(|b| &text[b..]),
            expect,
            "({line}, {character}) {enc:?}"
        );
        if let Some(b) = got {
            assert_eq!(position(text, b, enc), (line, character), "round trip");
        }
    }

    #[test]
    fn positions_in_diacritics_cjk_and_emoji() {
        let t = "ab\nZażółć 🦀 日本\r\nx";
        check(t, 0, 0, Encoding::Utf16, Some(t));
        check(t, 0, 2, Encoding::Utf16, Some("\nZażółć 🦀 日本\r\nx"));
        check(t, 0, 3, Encoding::Utf16, None);
        check(t, 1, 2, Encoding::Utf16, Some("żółć 🦀 日本\r\nx"));
        check(t, 1, 3, Encoding::Utf16, Some("ółć 🦀 日本\r\nx"));
        check(t, 1, 4, Encoding::Utf8, Some("ółć 🦀 日本\r\nx"));
        // 🦀 is two UTF-16 units and four bytes.
        check(t, 1, 7, Encoding::Utf16, Some("🦀 日本\r\nx"));
        check(t, 1, 9, Encoding::Utf16, Some(" 日本\r\nx"));
        check(t, 1, 10, Encoding::Utf16, Some("日本\r\nx"));
        check(t, 1, 11, Encoding::Utf16, Some("本\r\nx"));
        check(t, 1, 12, Encoding::Utf16, Some("\r\nx"));
        check(t, 1, 13, Encoding::Utf16, None);
        check(t, 1, 16, Encoding::Utf8, Some("日本\r\nx"));
        check(t, 1, 19, Encoding::Utf8, Some("本\r\nx"));
        check(t, 2, 1, Encoding::Utf16, Some(""));
        check(t, 3, 0, Encoding::Utf16, None);
        // Half a surrogate pair maps to the start of the character.
        assert_eq!(
            offset(t, 1, 8, Encoding::Utf16).map(|b| &t[b..b + 4]),
            Some("🦀")
        );
        assert_eq!(
            offset_clamped(t, 1, 99, Encoding::Utf16),
            t.find('\r').unwrap_or(0)
        );
        assert_eq!(offset_clamped(t, 9, 0, Encoding::Utf16), t.len());
        assert_eq!(
            position(t, t.find('🦀').unwrap_or(0) + 2, Encoding::Utf16),
            (1, 7)
        );
    }
}
