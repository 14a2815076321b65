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
    let run = logit_lens(&["run", "hello", "--top-k", "0"]);
    assert_eq!(run.code, 2, "clap rejects --top-k 0: {}", run.stderr);
}
