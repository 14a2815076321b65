//! A GGUF file's header, walked with every number checked before it is used.
//!
//! Libraries that read GGUF (candle, mistral.rs) allocate on the header's word: a key length,
//! an array count or a tensor's dimensions of 2^40 make them ask for that much memory and
//! abort the process, and an offset near 2^64 wraps past their extent checks. [`check`] reads
//! the header first, in bounded memory, and refuses it unless
//!
//! - every count and length fits in the bytes that remain of the file (a string or an array
//!   can never be longer than what is left to read it from);
//! - every tensor has 1 to 4 dimensions, none zero, a known type, an element count that is a
//!   whole number of its type's blocks, and its bytes (checked arithmetic throughout) inside
//!   the file after the aligned data start;
//! - no key and no tensor name repeats.
//!
//! A file that passes can then be handed to a library. The summary it returns (tensors, their
//! types and offsets) is also what tests use to locate a tensor's bytes.

pub mod write;

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// Longest key or tensor name accepted (llama.cpp's keys are a few dozen bytes).
pub const MAX_NAME: u64 = 1 << 16;
/// Most dimensions of a tensor (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in a value.
const MAX_DEPTH: u32 = 2;

/// Why a header was refused: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("not a GGUF file (no GGUF magic)")]
    NotGguf,
    #[error("the file ends inside its header (at byte {at}, reading {what})")]
    Truncated { at: u64, what: String },
    #[error("bad GGUF header at byte {at}: {message}")]
    Bad { at: u64, message: String },
    /// A count or a length says more than the rest of the file holds: a file cut short, or a
    /// corrupt number.
    #[error("the header announces more than the file holds (at byte {at}): {message}")]
    Short { at: u64, message: String },
    #[error("tensor `{name}` {message}")]
    Tensor { name: String, message: String },
    /// A tensor's bytes end past the end of the file (a truncated file, or a crafted offset).
    #[error("tensor `{name}` lies outside the file: {message}")]
    Outside { name: String, message: String },
}

impl Error {
    /// Whether the file looks cut short (rather than malformed).
    pub fn is_truncated(&self) -> bool {
        matches!(
            self,
            Error::Truncated { .. } | Error::Outside { .. } | Error::Short { .. }
        )
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as the file lists them (innermost first).
    pub dims: Vec<u64>,
    /// The ggml type number.
    pub dtype: u32,
    /// Offset of the tensor's bytes from [`Header::data_start`].
    pub offset: u64,
    /// Its bytes.
    pub bytes: u64,
}

/// What a checked header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub n_keys: u64,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where tensor data starts in the file.
    pub data_start: u64,
}

impl Header {
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// (block size in elements, bytes per block) of a ggml type; `None` for types no backend
/// here reads.
pub fn block(dtype: u32) -> Option<(u64, u64)> {
    Some(match dtype {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

/// Check the GGUF file at `path`.
pub fn check_file(path: &Path) -> Result<Header, Error> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io(e.to_string()))?;
    let len = file.metadata().map_err(|e| Error::Io(e.to_string()))?.len();
    check(std::io::BufReader::new(file), len)
}

/// Check a GGUF header read from `reader`, the start of a file of `file_len` bytes.
pub fn check<R: Read>(reader: R, file_len: u64) -> Result<Header, Error> {
    Walker {
        r: reader,
        at: 0,
        len: file_len,
    }
    .header()
}

struct Walker<R> {
    r: R,
    at: u64,
    len: u64,
}

impl<R: Read> Walker<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.at)
    }

    fn bad(&self, message: impl Into<String>) -> Error {
        Error::Bad {
            at: self.at,
            message: message.into(),
        }
    }

    fn short(&self, message: impl Into<String>) -> Error {
        Error::Short {
            at: self.at,
            message: message.into(),
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let mut buf = [0u8; N];
        if self.remaining() < N as u64 {
            return Err(self.truncated(what));
        }
        self.r.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.truncated(what),
            _ => Error::Io(e.to_string()),
        })?;
        self.at += N as u64;
        Ok(buf)
    }

    fn truncated(&self, what: &str) -> Error {
        Error::Truncated {
            at: self.at,
            what: what.to_string(),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// Skip `n` bytes that must lie in the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), Error> {
        if n > self.remaining() {
            return Err(self.short(format!(
                "{what} of {n} bytes is longer than the {} bytes left in the file",
                self.remaining()
            )));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| Error::Io(e.to_string()))?;
        self.at += copied;
        if copied != n {
            return Err(self.truncated(what));
        }
        Ok(())
    }

    /// A string's length, checked against what remains and `max`.
    fn string_len(&mut self, what: &str, max: u64) -> Result<u64, Error> {
        let n = self.u64(what)?;
        if n > max {
            return Err(self.bad(format!("{what} has a length of {n} bytes (at most {max})")));
        }
        if n > self.remaining() {
            return Err(self.short(format!(
                "{what} has a length of {n} bytes, more than the {} left in the file",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// A name (key or tensor name), read.
    fn name(&mut self, what: &str) -> Result<String, Error> {
        let n = self.string_len(what, MAX_NAME)?;
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.truncated(what),
            _ => Error::Io(e.to_string()),
        })?;
        self.at += n;
        String::from_utf8(buf).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    /// A count of things that each take at least `min_bytes`, checked against what remains.
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<u64, Error> {
        let n = self.u64(what)?;
        let most = self.remaining() / min_bytes.max(1);
        if n > most {
            return Err(self.short(format!(
                "{what} is {n}, but the {} bytes left in the file hold at most {most}",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// Skip a value of type `ty`; returns it when it is an unsigned integer (for
    /// `general.alignment`).
    fn value(&mut self, ty: u32, depth: u32) -> Result<Option<u64>, Error> {
        let fixed = |ty: u32| -> Option<u64> {
            Some(match ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                _ => return None,
            })
        };
        match ty {
            4 => return self.u32("a value").map(|v| Some(u64::from(v))),
            10 => return self.u64("a value").map(Some),
            8 => {
                let n = self.string_len("a string value", u64::MAX)?;
                self.skip(n, "a string value")?;
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let elem = self.u32("an array's element type")?;
                let min = match elem {
                    8 | 9 => 8,
                    t => fixed(t).ok_or_else(|| self.bad(format!("unknown value type {t}")))?,
                };
                let n = self.count("an array's length", min)?;
                match fixed(elem) {
                    // n * size fits: count() checked n <= remaining / size.
                    Some(size) => self.skip(n * size, "an array")?,
                    None => {
                        for _ in 0..n {
                            self.value(elem, depth + 1)?;
                        }
                    }
                }
            }
            t => {
                let size = fixed(t).ok_or_else(|| self.bad(format!("unknown value type {t}")))?;
                self.skip(size, "a value")?;
            }
        }
        Ok(None)
    }

    fn header(mut self) -> Result<Header, Error> {
        let magic = self.bytes::<4>("the magic").map_err(|_| Error::NotGguf)?;
        if &magic != b"GGUF" {
            return Err(Error::NotGguf);
        }
        let version = self.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(self.bad(format!(
                "GGUF version {version} (versions 2 and 3 are read)"
            )));
        }
        // A tensor entry takes at least 8 (name length) + 4 + 8 + 4 + 8 bytes; a key/value
        // at least 8 (key length) + 4 (type) + 1.
        let n_tensors = self.count("the tensor count", 32)?;
        let n_keys = self.count("the key count", 13)?;
        let mut alignment = 32;
        let mut keys = HashSet::new();
        for _ in 0..n_keys {
            let key = self.name("a key")?;
            let ty = self.u32("a value type")?;
            let value = self.value(ty, 0)?;
            if key == "general.alignment" {
                alignment = match value {
                    Some(a) if a > 0 && a <= 1 << 20 && a.is_power_of_two() => a,
                    _ => return Err(self.bad("general.alignment must be a power of two")),
                };
            }
            if !keys.insert(key.clone()) {
                return Err(self.bad(format!("the key `{key}` appears twice")));
            }
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        let mut names = HashSet::new();
        for _ in 0..n_tensors {
            let name = self.name("a tensor name")?;
            let n_dims = self.u32("a tensor's dimension count")?;
            let bad = |message: String| Error::Tensor {
                name: name.clone(),
                message,
            };
            if !(1..=MAX_DIMS).contains(&n_dims) {
                return Err(bad(format!("has {n_dims} dimensions (1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64("a tensor's dimensions")?);
            }
            let dtype = self.u32("a tensor's type")?;
            let offset = self.u64("a tensor's offset")?;
            if dims.contains(&0) {
                return Err(bad(format!("has a zero dimension {dims:?}")));
            }
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&e| e <= self.len.saturating_mul(8))
                .ok_or_else(|| {
                    bad(format!(
                        "has dimensions {dims:?}, more elements than the file can hold"
                    ))
                })?;
            let (block, size) = block(dtype)
                .ok_or_else(|| bad(format!("has the unsupported ggml type {dtype}")))?;
            if dims[0] % block != 0 {
                return Err(bad(format!(
                    "has a first dimension of {} that is not a multiple of its type's block of {block}",
                    dims[0]
                )));
            }
            let bytes = (elems / block)
                .checked_mul(size)
                .ok_or_else(|| bad("is too large".into()))?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "has offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(bad("appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
                bytes,
            });
        }
        let data_start = self
            .at
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| self.bad("the data start overflows"))?;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            match end {
                Some(end) if end <= self.len => {}
                _ => {
                    return Err(Error::Outside {
                        name: t.name.clone(),
                        message: format!(
                            "offset {} + {} bytes after the data start {data_start}, in a file of {} bytes",
                            t.offset, t.bytes, self.len
                        ),
                    })
                }
            }
        }
        Ok(Header {
            version,
            n_keys,
            tensors,
            alignment,
            data_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::write::{Gguf, Value};
    use super::*;
    use expect_test::{expect, Expect};

    fn check_bytes(bytes: &[u8], expect: Expect) {
        let got = match check(bytes, bytes.len() as u64) {
            Ok(h) => format!(
                "ok: {} tensors at {}",
                h.tensors.len(),
                h.tensors
                    .iter()
                    .map(|t| t.offset.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Err(e) => e.to_string(),
        };
        expect.assert_eq(&got);
    }

    fn base() -> Gguf {
        Gguf::default()
            .key("general.architecture", Value::Str("llama".into()))
            .key(
                "tokenizer.ggml.tokens",
                Value::Strs(vec!["a".into(), "b".into()]),
            )
            .f32("a", &[4], &[1.0, 2.0, 3.0, 4.0])
            .f32("b", &[2, 2], &[1.0; 4])
    }

    /// Overwrite 8 bytes at `at` with `v`.
    fn patch(mut bytes: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        bytes
    }

    #[test]
    fn crafted_headers_are_refused_with_one_clear_error() {
        let ok = base().bytes();
        check_bytes(&ok, expect!["ok: 2 tensors at 0,32"]);
        // The first key's length (right after magic, version and the two counts).
        check_bytes(&patch(ok.clone(), 24, 1 << 40), expect!["bad GGUF header at byte 32: a key has a length of 1099511627776 bytes (at most 65536)"]);
        check_bytes(&patch(ok.clone(), 24, 1 << 62), expect!["bad GGUF header at byte 32: a key has a length of 4611686018427387904 bytes (at most 65536)"]);
        // Counts.
        check_bytes(&patch(ok.clone(), 8, 1 << 59), expect!["the header announces more than the file holds (at byte 16): the tensor count is 576460752303423488, but the 256 bytes left in the file hold at most 8"]);
        check_bytes(&patch(ok.clone(), 16, 1 << 60), expect!["the header announces more than the file holds (at byte 24): the key count is 1152921504606846976, but the 248 bytes left in the file hold at most 19"]);
        check_bytes(&patch(ok.clone(), 16, u64::MAX), expect!["the header announces more than the file holds (at byte 24): the key count is 18446744073709551615, but the 248 bytes left in the file hold at most 19"]);
        // A token array of 2^40 entries.
        let tokens = Gguf::default()
            .key(
                "tokenizer.ggml.tokens",
                Value::Raw(
                    9,
                    [
                        8u32.to_le_bytes().to_vec(),
                        (1u64 << 40).to_le_bytes().to_vec(),
                    ]
                    .concat(),
                ),
            )
            .bytes();
        check_bytes(&tokens, expect!["the header announces more than the file holds (at byte 69): an array's length is 1099511627776, but the 27 bytes left in the file hold at most 3"]);
        // Dimensions of 2^40 x 2^40, and an offset that wraps.
        let mut huge = base();
        huge.tensors[1].dims = vec![1 << 40, 1 << 40];
        check_bytes(&huge.bytes(), expect!["tensor `b` has dimensions [1099511627776, 1099511627776], more elements than the file can hold"]);
        let mut wraps = base();
        wraps.tensors[1].offset = Some(u64::MAX - 4095);
        check_bytes(&wraps.bytes(), expect!["tensor `b` lies outside the file: offset 18446744073709547520 + 16 bytes after the data start 224, in a file of 272 bytes"]);
        // Random bytes after a valid magic.
        let mut random = b"GGUF".to_vec();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            random.push(x as u8);
        }
        check_bytes(
            &random,
            expect![
                "bad GGUF header at byte 8: GGUF version 918020327 (versions 2 and 3 are read)"
            ],
        );
        random[4..8].copy_from_slice(&3u32.to_le_bytes());
        check_bytes(&random, expect!["the header announces more than the file holds (at byte 16): the tensor count is 8778880233942073742, but the 4084 bytes left in the file hold at most 127"]);
        // Truncated, and not GGUF at all.
        check_bytes(&ok[..ok.len() - 1], expect!["tensor `b` lies outside the file: offset 32 + 16 bytes after the data start 224, in a file of 271 bytes"]);
        check_bytes(&ok[..40], expect!["the header announces more than the file holds (at byte 16): the tensor count is 2, but the 24 bytes left in the file hold at most 0"]);
        check_bytes(b"GGML", expect!["not a GGUF file (no GGUF magic)"]);
        check_bytes(b"GG", expect!["not a GGUF file (no GGUF magic)"]);
    }

    /// Every single-byte change and every truncation of a small valid file gives Ok or an
    /// error, and what passes lies inside the file.
    #[test]
    fn every_mutation_of_a_small_file_is_checked() {
        let ok = base().bytes();
        for i in 0..ok.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut m = ok.clone();
                m[i] = v;
                if let Ok(h) = check(&m[..], m.len() as u64) {
                    for t in &h.tensors {
                        assert!(h.data_start + t.offset + t.bytes <= m.len() as u64);
                    }
                }
            }
            let _ = check(&ok[..i], i as u64);
        }
    }
}
