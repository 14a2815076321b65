//! Mutated model headers: thousands of them, each gives a model or a clear error, never a
//! panic and never an abort (an abort would end this test's process, which fails the suite).
//!
//! The tiny fixture goes through the whole load path (our header check, candle's reader, the
//! model and tokenizer built from the metadata, a forward pass when it loads); the default
//! model's header (1.6 MB of vocabulary and merges) through our check and candle's reader.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, CaptureOptions};

/// xorshift64*: reproducible mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Numbers that break readers that trust them.
const NASTY: [u64; 12] = [
    0,
    1,
    3,
    0xff,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 59,
    1 << 60,
    1 << 62,
    u64::MAX - 4095,
    u64::MAX,
];

/// Damage `header` in place: a nasty number over 8 bytes, a few random bytes, or a flipped bit.
fn mutate(header: &mut [u8], rng: &mut Rng) {
    let n = header.len();
    match rng.below(3) {
        0 => {
            // Counts, lengths, dimensions and offsets are u64s, mostly at 4-byte boundaries.
            let at = (rng.below(n.saturating_sub(8)) / 4) * 4;
            let v = NASTY[rng.below(NASTY.len())];
            header[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        1 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(n);
                header[at] = rng.next() as u8;
            }
        }
        _ => {
            let at = rng.below(n);
            header[at] ^= 1 << rng.below(8);
        }
    }
}

#[derive(Default)]
struct Tally {
    loaded: usize,
    errors: BTreeMap<String, usize>,
    panics: Vec<String>,
}

impl Tally {
    fn error(&mut self, e: &str) {
        // The kind of error, without its numbers.
        let kind: String = e.chars().filter(|c| !c.is_ascii_digit()).take(60).collect();
        *self.errors.entry(kind).or_default() += 1;
    }
}

#[test]
fn mutated_headers_give_errors_never_panics_or_aborts() {
    let t0 = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let dir = tempfile::tempdir().expect("tempdir");

    // The tiny fixture, whole load path.
    let gguf = std::fs::read(crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf"))
        .expect("fixture");
    let header_len = lens_gguf::check(&gguf[..], gguf.len() as u64)
        .expect("the fixture is valid")
        .data_start as usize;
    let mut tiny = Tally::default();
    let path = dir.path().join("mutated.gguf");
    for i in 0..1500 {
        let mut m = gguf.clone();
        mutate(&mut m[..header_len], &mut rng);
        if i % 10 == 0 {
            // Cut short somewhere in the header as well.
            m.truncate(rng.below(header_len));
        }
        std::fs::write(&path, &m).expect("write");
        let got = catch_unwind(AssertUnwindSafe(|| {
            let b = CandleBackend::load(&path, Precision::F32).map_err(|e| e.to_string())?;
            let tokens = b
                .tokenize("The capital of France is")
                .map_err(|e| e.to_string())?;
            let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            if !ids.is_empty() {
                b.forward(&ids, CaptureOptions::default())
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
        match got {
            Ok(Ok(())) => tiny.loaded += 1,
            Ok(Err(e)) => tiny.error(&e),
            Err(p) => tiny.panics.push(panic_text(&*p)),
        }
    }

    // The default model's header: our check, then candle's reader on what passes.
    let model = std::fs::read(crate::default_model_path()).expect("default model");
    let file_len = model.len() as u64;
    let header_len = lens_gguf::check(&model[..], file_len)
        .expect("the default model is valid")
        .data_start as usize;
    let model_header = model[..header_len].to_vec();
    drop(model);
    let mut default = Tally::default();
    for _ in 0..1500 {
        let mut m = model_header.clone();
        mutate(&mut m, &mut rng);
        let got = catch_unwind(AssertUnwindSafe(|| {
            lens_gguf::check(&m[..], file_len).map_err(|e| e.to_string())?;
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&m))
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        }));
        match got {
            Ok(Ok(())) => default.loaded += 1,
            Ok(Err(e)) => default.error(&e),
            Err(p) => default.panics.push(panic_text(&*p)),
        }
    }
    for (name, t) in [("tiny fixture", &tiny), ("default model header", &default)] {
        eprintln!(
            "{name}: 1500 mutations, {} loaded, {} errors, {} panics",
            t.loaded,
            t.errors.values().sum::<usize>(),
            t.panics.len()
        );
        for (kind, n) in &t.errors {
            eprintln!("  {n:5} {kind}");
        }
    }
    eprintln!("{:.1} s", t0.elapsed().as_secs_f64());
    assert!(tiny.panics.is_empty(), "panics: {:?}", tiny.panics);
    assert!(default.panics.is_empty(), "panics: {:?}", default.panics);
    // The mutations reach past the first check: some load, many fail in different ways.
    assert!(tiny.errors.len() >= 5 && default.errors.len() >= 5);
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}
