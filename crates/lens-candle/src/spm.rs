//! A SentencePiece-style BPE tokenizer driven by piece scores (GGUF `tokenizer.ggml.model =
//! llama`), giving the ids HF transformers gives for the same file (its GGUF converter turns
//! the scores into BPE merges), which are llama.cpp's up to ties:
//!
//! - control and user-defined pieces are cut out of the text first (longest match at the
//!   leftmost position), except user-defined pieces with a space (Gemma's runs of spaces):
//!   HF matches its added tokens after normalisation, where spaces are `▁`, so those are
//!   pieces (in their `▁` form) that merges build, before any other merge (40 spaces and
//!   `x` are 16 + 24 spaces and `x` in HF, not 31 + 9, nor 16 + 23 and `▁x`);
//! - spaces become `▁` (no space prefix unless the file asks for one), the rest starts as one
//!   symbol per character, and the adjacent pair whose concatenation is a vocabulary piece
//!   with the highest score is merged until no pair merges; among equal scores the piece with
//!   the lower id first (HF's merge ranks; llama.cpp takes the leftmost), then the leftmost;
//! - a character that is no piece falls back to its UTF-8 bytes as `<0xNN>` pieces.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use lens_core::Token;

use crate::Error;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// SentencePiece's meta symbol for a space.
const SPACE: char = '\u{2581}';

pub(crate) struct Spm {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    /// `<0xNN>` pieces by byte.
    bytes: Vec<Option<u32>>,
    /// Control and user-defined pieces, matched in the raw text before anything else: by
    /// first byte, longest first.
    specials: HashMap<u8, Vec<(String, u32)>>,
    unk: Option<u32>,
    space_prefix: bool,
}

/// A symbol being merged: a byte range of the original text.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// Merged away into its left neighbour.
    gone: bool,
}

/// A candidate merge of `left` with its right neighbour into piece `id` of `score`, `len`
/// bytes long in the original text (a stale candidate's length no longer matches).
#[derive(PartialEq)]
struct Bigram {
    score: f32,
    id: u32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Highest score first, then the lower id, then leftmost.
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.id.cmp(&self.id))
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Spm {
    pub(crate) fn new(
        pieces: Vec<String>,
        mut scores: Vec<f32>,
        types: Vec<i32>,
        unk: Option<u32>,
        space_prefix: bool,
    ) -> Result<Self, Error> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(Error::Format(format!(
                "the tokenizer has {} pieces but {} scores and {} types",
                pieces.len(),
                scores.len(),
                types.len()
            )));
        }
        let mut ids = HashMap::with_capacity(pieces.len());
        let mut bytes = vec![None; 256];
        let mut specials: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
        for (i, (p, &t)) in pieces.iter().zip(&types).enumerate() {
            let id = i as u32;
            // The first of duplicate pieces wins, as in llama.cpp.
            ids.entry(p.clone()).or_insert(id);
            if t == TYPE_BYTE {
                if let Some(b) = byte_piece(p) {
                    bytes[usize::from(b)].get_or_insert(id);
                }
            }
            if t == TYPE_USER_DEFINED && p.contains(' ') {
                ids.entry(p.replace(' ', &SPACE.to_string())).or_insert(id);
                scores[i] = f32::MAX;
                continue;
            }
            if (t == TYPE_CONTROL || t == TYPE_USER_DEFINED) && !p.is_empty() {
                specials
                    .entry(p.as_bytes()[0])
                    .or_default()
                    .push((p.clone(), id));
            }
        }
        for list in specials.values_mut() {
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        }
        Ok(Spm {
            pieces,
            scores,
            types,
            ids,
            bytes,
            specials,
            unk,
            space_prefix,
        })
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The tokens of `text` with their byte ranges in it (a byte-fallback token has the range
    /// of its whole character).
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        let mut out = Vec::new();
        let mut plain = 0;
        let mut at = 0;
        let raw = text.as_bytes();
        while at < raw.len() {
            let found = self.specials.get(&raw[at]).and_then(|list| {
                list.iter()
                    .find(|(p, _)| raw[at..].starts_with(p.as_bytes()))
            });
            match found {
                Some((p, id)) => {
                    self.encode_plain(text, plain, at, &mut out)?;
                    out.push(self.token(*id, at, at + p.len()));
                    at += p.len();
                    plain = at;
                }
                None => at += 1,
            }
        }
        self.encode_plain(text, plain, raw.len(), &mut out)?;
        Ok(out)
    }

    fn token(&self, id: u32, start: usize, end: usize) -> Token {
        Token {
            id,
            text: self.decode(id),
            start,
            end,
        }
    }

    /// The piece `text[start..end]` stands for (spaces as `▁`).
    fn piece_of(text: &str, prefix: bool) -> String {
        let mut s = String::with_capacity(text.len() + 3);
        if prefix {
            s.push(SPACE);
        }
        s.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        s
    }

    fn encode_plain(
        &self,
        text: &str,
        start: usize,
        end: usize,
        out: &mut Vec<Token>,
    ) -> Result<(), lens_core::Error> {
        if start >= end {
            return Ok(());
        }
        let fragment = &text[start..end];
        // A space prefix only at the start of the text, as llama.cpp adds it.
        let prefix = self.space_prefix && start == 0;
        let mut symbols: Vec<Symbol> = fragment
            .char_indices()
            .map(|(b, c)| (start + b, start + b + c.len_utf8()))
            .enumerate()
            .map(|(i, (s, e))| Symbol {
                start: s,
                end: e,
                prev: i.checked_sub(1),
                next: None,
                gone: false,
            })
            .collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let piece = |s: usize, e: usize| Self::piece_of(&text[s..e], prefix && s == start);
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, queue: &mut BinaryHeap<Bigram>| {
            let Some(right) = symbols[left].next else {
                return;
            };
            let (s, e) = (symbols[left].start, symbols[right].end);
            if let Some(&id) = self.ids.get(&piece(s, e)) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    id,
                    left,
                    right,
                    len: e - s,
                });
            }
        };
        for i in 0..n.saturating_sub(1) {
            bigram(&symbols, i, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.gone || r.gone || l.next != Some(b.right) || r.end - l.start != b.len {
                continue;
            }
            symbols[b.left].end = r.end;
            symbols[b.left].next = r.next;
            symbols[b.right].gone = true;
            if let Some(nx) = r.next {
                symbols[nx].prev = Some(b.left);
            }
            if let Some(p) = l.prev {
                bigram(&symbols, p, &mut queue);
            }
            bigram(&symbols, b.left, &mut queue);
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let p = piece(s.start, s.end);
            match self.ids.get(&p) {
                Some(&id) => out.push(self.token(id, s.start, s.end)),
                None => {
                    for b in p.bytes() {
                        let id = self.bytes[usize::from(b)].or(self.unk).ok_or_else(|| {
                            lens_core::Error::Tokenizer(format!(
                                "{p:?} is no piece and the vocabulary has no byte pieces"
                            ))
                        })?;
                        out.push(self.token(id, s.start, s.end));
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    /// One token as text: `▁` as a space, a byte piece as its byte (U+FFFD when that byte is
    /// not a whole character), control pieces as written.
    pub(crate) fn decode(&self, id: u32) -> String {
        let Some(p) = self.pieces.get(id as usize) else {
            return String::new();
        };
        match self.types.get(id as usize) {
            Some(&TYPE_BYTE) => match byte_piece(p) {
                Some(b) => String::from_utf8_lossy(&[b]).into_owned(),
                None => p.clone(),
            },
            _ => p.replace(SPACE, " "),
        }
    }
}

/// The byte of a `<0xNN>` piece.
fn byte_piece(p: &str) -> Option<u8> {
    let hex = p.strip_prefix("<0x")?.strip_suffix('>')?;
    match hex.len() {
        2 => u8::from_str_radix(hex, 16).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small vocabulary: control `<bos>`, user-defined `\n` and two spaces, bytes for
    /// `a`, `\n`, `é` (two bytes), and pieces whose scores decide the merges.
    fn spm() -> Spm {
        let mut pieces: Vec<(&str, f32, i32)> = vec![
            ("<unk>", 0.0, 2),
            ("<bos>", 0.0, TYPE_CONTROL),
            ("\n", 0.0, TYPE_USER_DEFINED),
            ("  ", 0.0, TYPE_USER_DEFINED),
            ("<0x61>", 0.0, TYPE_BYTE),
            ("<0xC3>", 0.0, TYPE_BYTE),
            ("<0xA9>", 0.0, TYPE_BYTE),
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
            ("▁", -1.0, 1),
            ("ab", -5.0, 1),
            ("bc", -2.0, 1),
            ("abc", -3.0, 1),
            ("▁a", -4.0, 1),
        ];
        pieces.push(("▁abc", -10.0, 1));
        pieces.extend([("x", -1.0, 1), ("y", -1.0, 1), ("z", -1.0, 1)]);
        pieces.extend([("yz", -7.0, 1), ("xy", -7.0, 1)]);
        let (p, s, t) = pieces.into_iter().fold(
            (Vec::new(), Vec::new(), Vec::new()),
            |(mut p, mut s, mut t), (a, b, c)| {
                p.push(a.to_string());
                s.push(b);
                t.push(c);
                (p, s, t)
            },
        );
        Spm::new(p, s, t, Some(0), false).expect("spm")
    }

    #[track_caller]
    fn check(text: &str, expect: &[(&str, usize, usize)]) {
        let spm = spm();
        let got: Vec<(String, usize, usize)> = spm
            .encode(text)
            .expect("encode")
            .iter()
            .map(|t| (spm.pieces[t.id as usize].clone(), t.start, t.end))
            .collect();
        let want: Vec<(String, usize, usize)> = expect
            .iter()
            .map(|&(p, s, e)| (p.to_string(), s, e))
            .collect();
        assert_eq!(got, want, "{text:?}");
    }

    #[test]
    fn merges_follow_the_scores() {
        // "bc" (-2) before "ab" (-5), then "abc" (-3) from "a" + "bc".
        check("abc", &[("abc", 0, 3)]);
        check("ab", &[("ab", 0, 2)]);
        // "bc", then "abc", then "▁" + "abc": the stale "▁a" candidate is skipped.
        check(" abc", &[("▁abc", 0, 4)]);
        check("cab", &[("c", 0, 1), ("ab", 1, 3)]);
        // "xy" and "yz" score the same: the lower id ("yz") merges first, as in HF.
        check("xyz", &[("x", 0, 1), ("yz", 1, 3)]);
    }

    #[test]
    fn specials_are_cut_out_first_and_bytes_fall_back() {
        check("<bos>a", &[("<bos>", 0, 5), ("a", 5, 6)]);
        // A user-defined run of spaces is an ordinary piece, built by merges.
        check(
            "a\n  b",
            &[("a", 0, 1), ("\n", 1, 2), ("  ", 2, 4), ("b", 4, 5)],
        );
        check("a \n", &[("a", 0, 1), ("▁", 1, 2), ("\n", 2, 3)]);
        // Runs of spaces merge before anything else: "▁a" does not form.
        check("b  a", &[("b", 0, 1), ("  ", 1, 3), ("a", 3, 4)]);
        check("b   a", &[("b", 0, 1), ("  ", 1, 3), ("▁a", 3, 5)]);
        check("é", &[("<0xC3>", 0, 2), ("<0xA9>", 0, 2)]);
        // A byte without a byte piece is <unk>.
        check("w", &[("<unk>", 0, 1)]);
    }

    #[test]
    fn decoding() {
        let spm = spm();
        for (id, want) in [(14, " a"), (5, "\u{FFFD}"), (4, "a"), (1, "<bos>")] {
            assert_eq!(spm.decode(id), want);
        }
    }
}
