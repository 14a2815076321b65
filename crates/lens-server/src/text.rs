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

#[cfg(test)]
mod tests {
    use super::*;

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
