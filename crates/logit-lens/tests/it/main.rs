//! End-to-end tests of the `logit-lens` binary: real process, real default model.

mod backends;
mod bad_input;
mod diff;
mod doctor;
mod gemma;
mod generate;
mod hardening;
mod model_cache;
#[cfg(feature = "mpi")]
mod mpi;
mod nvim;
mod plot;
mod run;
mod serve;
mod tuned;
mod vscode;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

/// Fetch the default model once, before any test process needs it.
pub fn ensure_model() {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| lens_models::ensure_default_model(false).expect("fetch the default model"));
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn logit_lens(args: &[&str]) -> Run {
    logit_lens_stdin(args, None)
}

pub fn logit_lens_stdin(args: &[&str], stdin: Option<&[u8]>) -> Run {
    logit_lens_with(args, stdin, &[])
}

/// [`logit_lens`] with extra environment variables.
pub fn logit_lens_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    logit_lens_with(args, None, env)
}

fn logit_lens_with(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Run {
    ensure_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_logit-lens"))
        .args(args)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .env_remove("LOGIT_LENS_MODEL")
        .env_remove("LOGIT_LENS_BENCH_PYTHON")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn logit-lens");
    if let Some(mut pipe) = child.stdin.take() {
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).expect("write stdin");
        }
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait");
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "logit-lens {args:?} panicked:\n{}",
        run.stderr
    );
    run
}
