//! The cached default model is hashed again when its size or modification time changed: a
//! damaged cache is one clear error that names the file and the fix.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use crate::Run;

/// `logit-lens run Hello` with the default model taken from the cache folder `cache`; pip is
/// out of reach, so nothing can be downloaded behind the test's back.
fn run_hello(cache: &Path) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args(["run", "Hello"])
        .env("NO_COLOR", "1")
        .env_remove("LOGIT_LENS_MODEL")
        .env(lens_models::CACHE_ENV, cache)
        .env(lens_models::PYTHON_ENV, "/nonexistent/python3")
        .stdin(Stdio::null())
        .output()
        .expect("run logit-lens");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

#[test]
fn a_flipped_byte_in_the_cached_model_fails_the_next_run_with_the_fix() {
    let real = lens_models::ensure_default_model(false).expect("the default model");
    let cache = tempfile::tempdir().expect("tempdir");
    let copy = cache.path().join(lens_models::DEFAULT_MODEL.file_name);
    std::fs::copy(&real, &copy).expect("copy the cached model");
    // An old modification time, as a long-cached file has: the write below surely changes it.
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .expect("open")
        .set_modified(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .expect("set mtime");

    // First use of a cache without a record: hashed, accepted, and recorded.
    let ok = run_hello(cache.path());
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(!ok.stdout.is_empty());
    let record = lens_models::record_path(&copy);
    assert!(record.exists(), "no record {}", record.display());

    // One byte in the middle flipped, in place.
    {
        let mut f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&copy)
            .expect("open");
        let mid = lens_models::DEFAULT_MODEL.size / 2;
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(mid)).expect("seek");
        f.read_exact(&mut byte).expect("read");
        byte[0] ^= 0x01;
        f.seek(SeekFrom::Start(mid)).expect("seek");
        f.write_all(&byte).expect("write");
    }

    let bad = run_hello(cache.path());
    assert_ne!(bad.code, 0, "a corrupted model was used:\n{}", bad.stdout);
    assert!(bad.stdout.is_empty(), "stdout: {}", bad.stdout);
    assert!(bad.stderr.starts_with("error: "), "stderr: {}", bad.stderr);
    for piece in [
        copy.display().to_string().as_str(),
        "is corrupted",
        lens_models::DEFAULT_MODEL.sha256,
        "logit-lens fetch --force",
    ] {
        assert!(
            bad.stderr.contains(piece),
            "{piece:?} not in:\n{}",
            bad.stderr
        );
    }
}
