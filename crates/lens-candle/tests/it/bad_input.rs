//! Malformed models and prompts give clear errors, never panics.

use std::path::Path;

use lens_candle::{CandleBackend, Error, Precision};
use lens_core::{Backend, CaptureOptions, LensKind};

fn tiny_gguf() -> Vec<u8> {
    std::fs::read(crate::data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf")).expect("fixture")
}

/// Loading `path` fails, with a message that contains `expect`; the error, for its variant.
#[track_caller]
fn check(path: &Path, expect: &str) -> Error {
    let e = match CandleBackend::load(path, Precision::F32) {
        Ok(_) => panic!("{} loaded, expected {expect:?}", path.display()),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains(expect),
        "loading {}: got {msg:?}, expected it to contain {expect:?}",
        path.display()
    );
    e
}

#[test]
fn bad_model_files_are_reported_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let missing = dir.path().join("missing.gguf");
    let e = check(&missing, "no such file or folder");
    assert!(
        matches!(&e, Error::Io { path, source }
            if path == &missing.display().to_string()
                && source.kind() == std::io::ErrorKind::NotFound),
        "{e:?}"
    );
    for path in [
        write("empty.gguf", b""),
        write("picture.png", b"\x89PNG\r\n\x1a\n0000000000000000"),
        dir.path().to_path_buf(),
    ] {
        let e = check(&path, "is not a GGUF file or an HF model folder");
        assert!(
            matches!(&e, Error::NotAModel { path: p } if p == &path.display().to_string()),
            "{e:?}"
        );
    }

    let gguf = tiny_gguf();
    // The whole file loads from the same folder: what fails below is the damage.
    CandleBackend::load(&write("whole.gguf", &gguf), Precision::F32).expect("the whole file");
    for path in [
        write("cut-header.gguf", &gguf[..100]),
        write("cut-data.gguf", &gguf[..gguf.len() - 1000]),
        write("magic-only.gguf", b"GGUF"),
    ] {
        let e = check(&path, "is truncated");
        assert!(matches!(e, Error::Truncated { .. }), "{e:?}");
    }

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
    let e = check(
        &write("bloom.gguf", &foreign),
        "unsupported architecture `bloom`",
    );
    assert!(
        matches!(&e, Error::UnsupportedArchitecture(a) if a == "bloom"),
        "{e:?}"
    );

    // The same for the tokenizer: a SentencePiece-style model is not byte-level BPE.
    let mut bert = gguf.clone();
    let key = b"tokenizer.ggml.model";
    let at = bert.windows(key.len()).position(|w| w == key).expect("key") + key.len() + 4 + 8;
    assert_eq!(&bert[at..at + 4], b"gpt2");
    bert[at..at + 4].copy_from_slice(b"bert");
    let e = check(&write("bert.gguf", &bert), "tokenizer model `bert`");
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");

    // A header that declares absurd sizes.
    let mut absurd = b"GGUF".to_vec();
    absurd.extend_from_slice(&3u32.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    let p = write("absurd.gguf", &absurd);
    // Checked against the bytes that remain before anything is allocated on its word.
    let e = check(
        &p,
        "the header announces more than the file holds (at byte 16): the tensor count is 18446744073709551615",
    );
    assert!(matches!(e, Error::Truncated { .. }), "{e:?}");

    // An HF folder with a broken config.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).expect("mkdir");
    std::fs::write(hf.join("config.json"), "{ not json").expect("write");
    let e = check(&hf, "malformed model file");
    assert!(matches!(e, Error::Format(_)), "{e:?}");
}

#[test]
fn bad_prompts_are_errors() {
    let backend = CandleBackend::load(&crate::data_dir().join("oracle/tiny-llama"), Precision::F32)
        .expect("load");
    let opts = CaptureOptions::default();
    let r = backend.forward(&[], opts).map(|_| ());
    assert!(matches!(r, Err(lens_core::Error::EmptyPrompt)), "{r:?}");
    let context = backend.info().context_length;
    let long = vec![42u32; context + 1];
    let r = backend.forward(&long, opts).map(|_| ());
    assert!(
        matches!(r, Err(lens_core::Error::PromptTooLong { tokens, context: c })
            if tokens == context + 1 && c == context),
        "{r:?}"
    );
    let vocab = backend.info().vocab_size;
    assert!(vocab < 99_999);
    let r = backend.forward(&[1, 99_999], opts).map(|_| ());
    assert!(
        matches!(r, Err(lens_core::Error::TokenOutOfRange { id: 99_999, vocab: v }) if v == vocab),
        "{r:?}"
    );
    // The first id past the vocabulary too, and the last one inside it is fine.
    let r = backend.forward(&[1, vocab as u32], opts).map(|_| ());
    assert!(
        matches!(r, Err(lens_core::Error::TokenOutOfRange { id, .. }) if id as usize == vocab),
        "{r:?}"
    );
    backend
        .forward(&[1, vocab as u32 - 1], opts)
        .expect("the last id");

    // Rows of the wrong width, for both lenses.
    let hidden = backend.info().hidden_size;
    for lens in [LensKind::Norm, LensKind::Raw] {
        let r = backend.readout(&vec![1.0; hidden + 1], lens);
        assert!(
            matches!(&r, Err(lens_core::Error::Shape(m)) if m.contains(&format!("{} values", hidden + 1))),
            "{lens:?}: {r:?}"
        );
    }
    assert_eq!(
        backend
            .readout(&vec![1.0; hidden], LensKind::Norm)
            .expect("one row")
            .len(),
        vocab
    );
    assert!(backend.tokenize("").expect("tokenize").is_empty());
}
