//! Malformed models and prompts give clear errors, never panics.

use std::path::Path;

use lens_candle::{CandleBackend, Error, Precision};
use lens_core::{Backend, CaptureOptions, LensKind};

fn tiny_gguf() -> Vec<u8> {
    std::fs::read(crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf")).expect("fixture")
}

#[track_caller]
fn check(path: &Path, expect: &str) {
    let msg = match CandleBackend::load(path, Precision::F32) {
        Ok(_) => "loaded".to_string(),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains(expect),
        "loading {}: got {msg:?}, expected it to contain {expect:?}",
        path.display()
    );
}

#[test]
fn bad_model_files_are_reported_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    check(&dir.path().join("missing.gguf"), "no such file or folder");
    check(
        &write("empty.gguf", b""),
        "is not a GGUF file or an HF model folder",
    );
    check(
        &write("picture.png", b"\x89PNG\r\n\x1a\n0000000000000000"),
        "is not a GGUF file or an HF model folder",
    );
    check(dir.path(), "is not a GGUF file or an HF model folder");

    let gguf = tiny_gguf();
    check(&write("cut-header.gguf", &gguf[..100]), "is truncated");
    check(
        &write("cut-data.gguf", &gguf[..gguf.len() - 1000]),
        "is truncated",
    );
    check(&write("magic-only.gguf", b"GGUF"), "is truncated");

    // Same-length rename of the architecture: a model family the backend does not know.
    let mut foreign = gguf.clone();
    let key = b"general.architecture";
    let at = foreign
        .windows(key.len())
        .position(|w| w == key)
        .expect("key")
        + key.len()
        + 4
        + 8;
    assert_eq!(&foreign[at..at + 5], b"llama");
    foreign[at..at + 5].copy_from_slice(b"bloom");
    check(
        &write("bloom.gguf", &foreign),
        "unsupported architecture `bloom`",
    );

    // A header that declares absurd sizes.
    let mut absurd = b"GGUF".to_vec();
    absurd.extend_from_slice(&3u32.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    let p = write("absurd.gguf", &absurd);
    assert!(CandleBackend::load(&p, Precision::F32).is_err());

    // An HF folder with a broken config.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).expect("mkdir");
    std::fs::write(hf.join("config.json"), "{ not json").expect("write");
    check(&hf, "malformed model file");
}

#[test]
fn bad_prompts_are_errors() {
    let backend = CandleBackend::load(&crate::data_dir().join("oracle/tiny-llama"), Precision::F32)
        .expect("load");
    let opts = CaptureOptions::default();
    assert!(matches!(
        backend.forward(&[], opts),
        Err(lens_core::Error::EmptyPrompt)
    ));
    let long = vec![42u32; backend.info().context_length + 1];
    assert!(matches!(
        backend.forward(&long, opts),
        Err(lens_core::Error::PromptTooLong { .. })
    ));
    assert!(matches!(
        backend.forward(&[1, 99_999], opts),
        Err(lens_core::Error::TokenOutOfRange { id: 99_999, .. })
    ));
    assert!(backend.readout(&[1.0; 65], LensKind::Norm).is_err());
    assert!(backend.tokenize("").expect("tokenize").is_empty());
    let _: &Error = &Error::Unsupported(String::new());
}
