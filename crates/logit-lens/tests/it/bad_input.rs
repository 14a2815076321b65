//! Bad input: one clear message on stderr, a non-zero exit, never a panic.

use crate::{data_dir, logit_lens, logit_lens_stdin};

#[track_caller]
fn check(args: &[&str], stdin: Option<&[u8]>, expect: &str) {
    let run = logit_lens_stdin(args, stdin);
    assert_ne!(run.code, 0, "logit-lens {args:?} succeeded");
    assert!(run.stdout.is_empty(), "stdout: {}", run.stdout);
    assert!(run.stderr.starts_with("error: "), "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(expect),
        "logit-lens {args:?}: expected {expect:?} in:\n{}",
        run.stderr
    );
    assert!(!run.stderr.contains("backtrace"), "{}", run.stderr);
}

#[test]
fn bad_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let gguf =
        std::fs::read(data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf")).expect("fixture");
    std::fs::write(path("cut.gguf"), &gguf[..gguf.len() / 2]).expect("write");
    std::fs::write(path("notes.txt"), "just some text").expect("write");
    let mut foreign = gguf.clone();
    let key = b"general.architecture";
    let at = foreign
        .windows(key.len())
        .position(|w| w == key)
        .expect("key")
        + key.len()
        + 12;
    foreign[at..at + 5].copy_from_slice(b"bloom");
    std::fs::write(path("bloom.gguf"), &foreign).expect("write");

    check(
        &["run", "hi", "--model", &path("nope.gguf")],
        None,
        "cannot read",
    );
    check(
        &["run", "hi", "--model", &path("notes.txt")],
        None,
        "is not a GGUF file or an HF model folder",
    );
    check(
        &["run", "hi", "--model", &path("cut.gguf")],
        None,
        "is truncated",
    );
    check(
        &["run", "hi", "--model", &path("bloom.gguf")],
        None,
        "unsupported architecture `bloom`",
    );
    check(
        &["info", "--model", &path("cut.gguf")],
        None,
        "is truncated",
    );
}

#[test]
fn bad_prompts_and_options() {
    check(&["run", ""], None, "the prompt is empty");
    check(&["run"], Some(b""), "the prompt is empty");
    check(&["run"], Some(b"caf\xc3\x28 au lait"), "not valid UTF-8");
    let tiny = data_dir().join("oracle/tiny-llama");
    let long = "word ".repeat(400);
    check(
        &["run", &long, "--model", tiny.to_str().expect("utf8")],
        None,
        "more than the model's context of 256",
    );
    check(
        &["run", "hello", "--layers", "0..31"],
        None,
        "layer 31 does not exist",
    );
    check(
        &["run", "hello", "--position", "7"],
        None,
        "position 7 is outside the prompt of 1 tokens",
    );
    check(
        &["run", "--file", "/nonexistent/prompt.txt"],
        None,
        "cannot read /nonexistent/prompt.txt",
    );
    for empty in [",", ",,,", "", " "] {
        check(&["run", "hello", "--layers", empty], None, "empty");
    }
    let run = logit_lens(&["run", "hello", "--top-k", "0"]);
    assert_eq!(run.code, 2, "clap rejects --top-k 0: {}", run.stderr);
}

/// Overwrite 8 bytes at `at` with `v`.
fn patch(bytes: &[u8], at: usize, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

/// Where `needle` first occurs in `hay`, plus `skip`.
fn find(hay: &[u8], needle: &[u8], skip: usize) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle")
        + needle.len()
        + skip
}

/// Headers crafted to make a trusting reader allocate without bound, overflow or wrap: each is
/// one clear error, never an abort or a panic.
#[test]
fn crafted_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf =
        std::fs::read(data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf")).expect("fixture");
    // The tensor entry of `output_norm.weight`: name, n_dims (u32), dims (u64 each), type
    // (u32), offset (u64). Its name occurs first in the tensor entries.
    let norm = find(&gguf, b"output_norm.weight", 0);
    let n_dims = u32::from_le_bytes(gguf[norm..norm + 4].try_into().expect("4 bytes")) as usize;
    let offset_at = norm + 4 + 8 * n_dims + 4;
    let tokens_count = find(&gguf, b"tokenizer.ggml.tokens", 4 + 4);
    let mut random = b"GGUF".to_vec();
    let mut x = 0x853c_49e6_748f_ea9b_u64;
    while random.len() < 1 << 16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.extend_from_slice(&x.to_le_bytes());
    }
    let mut two_dims = gguf.clone();
    // A 2-D tensor's dims: `token_embd.weight` is [64, 2048].
    let embd = find(&gguf, b"token_embd.weight", 4);
    two_dims[embd..embd + 16]
        .copy_from_slice(&[(1u64 << 40).to_le_bytes(), (1u64 << 40).to_le_bytes()].concat());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "key-2^40",
            patch(&gguf, 24, 1 << 40),
            "a key has a length of 1099511627776 bytes",
        ),
        (
            "key-2^62",
            patch(&gguf, 24, 1 << 62),
            "a key has a length of 4611686018427387904 bytes",
        ),
        (
            "tokens-2^40",
            patch(&gguf, tokens_count, 1 << 40),
            "an array's length is 1099511627776",
        ),
        (
            "dims-2^40",
            two_dims,
            "more elements than the file can hold",
        ),
        ("random", random, "bad GGUF header at byte 8"),
        (
            "tensors-2^59",
            patch(&gguf, 8, 1 << 59),
            "the tensor count is 576460752303423488",
        ),
        (
            "keys-2^60",
            patch(&gguf, 16, 1 << 60),
            "the key count is 1152921504606846976",
        ),
        (
            "keys-max",
            patch(&gguf, 16, u64::MAX),
            "the key count is 18446744073709551615",
        ),
        (
            "offset-wraps",
            patch(&gguf, offset_at, u64::MAX - 4095),
            "lies outside the file",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).expect("write");
        let path = path.to_string_lossy().into_owned();
        check(&["run", "hi", "--model", &path], None, expect);
        let run = logit_lens_stdin(&["run", "hi", "--model", &path], None);
        assert_eq!(run.stderr.lines().count(), 1, "{name}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{name}: {}", run.stderr);
    }
}

/// A NaN in a weight is an error that names where the numbers went non-finite, not a grid of
/// empty cells.
#[test]
fn a_nan_in_a_weight_names_the_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = data_dir().join("oracle/tiny-llama/tiny-llama.f32.gguf");
    let gguf = std::fs::read(&fixture).expect("fixture");
    let header = lens_gguf::check_file(&fixture).expect("valid fixture");
    let with_nan = |tensor: &str| {
        let t = header.tensor(tensor).expect("tensor");
        assert_eq!(t.dtype, 0, "{tensor} is f32");
        let at = (header.data_start + t.offset) as usize;
        let mut bytes = gguf.clone();
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let path = dir.path().join(format!("{tensor}.gguf"));
        std::fs::write(&path, bytes).expect("write");
        path.to_string_lossy().into_owned()
    };
    // blk.1 is the second block: the residual after it is layer 2.
    check(
        &["run", "The capital of France is", "--model", &with_nan("blk.1.attn_norm.weight")],
        None,
        "the residual stream is not finite (NaN or infinity) at layer 2, position 0: block 2 produced it",
    );
    check(
        &["run", "The capital of France is", "--model", &with_nan("output_norm.weight")],
        None,
        "the lens's logits are not finite (NaN or infinity) at layer 0, position 0, while the residual stream there is finite",
    );
}
