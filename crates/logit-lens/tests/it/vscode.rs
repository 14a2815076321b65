//! The VS Code extension (`editors/vscode`) against the real `logit-lens` binary: its unit
//! tests, the protocol test (the daemon over stdio, as the extension speaks to it) and the
//! end-to-end test in real VS Code (code-server 4.100.3 in headless Chromium).
//!
//! Prerequisites come from `scripts/deps/vscode.sh` (Node 20+, `npm ci` in editors/vscode,
//! Chromium, code-server in `~/.cache/logit-lens/test-deps/code-server` or
//! `$LOGIT_LENS_CODE_SERVER`). A missing one fails the test with the command to run.

#![allow(clippy::print_stderr)] // the tests print what they measured

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn ext_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../editors/vscode")
}

const SETUP: &str = "run scripts/deps/vscode.sh";

/// The three tests share `editors/vscode/out` and the CPU: one at a time, built once.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = ext_dir();
        let version = Command::new("node")
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("node is missing ({e}): {SETUP}"));
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        let major: u32 = version
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert!(
            major >= 20,
            "Node 20+ is needed, found {version:?}: {SETUP}"
        );
        assert!(
            dir.join("node_modules/.bin/esbuild").exists(),
            "editors/vscode/node_modules is missing: {SETUP}"
        );
        // The tests and the .vsix (esbuild bundles, then `vsce package --no-dependencies`).
        run_ok(&dir, "node", &["build.mjs", "tests"], &[]);
        run_ok(&dir, "npm", &["run", "-s", "package"], &[]);
        super::ensure_model();
    });
    guard
}

struct Out {
    stdout: String,
    stderr: String,
}

fn run(dir: &Path, program: &str, args: &[&str], envs: &[(&str, &str)]) -> (bool, Out) {
    let out = Command::new("timeout")
        .arg("600")
        .arg(program)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("LOGIT_LENS_MODEL")
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let o = Out {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    (out.status.success(), o)
}

fn run_ok(dir: &Path, program: &str, args: &[&str], envs: &[(&str, &str)]) -> Out {
    let (ok, out) = run(dir, program, args, envs);
    assert!(
        ok,
        "{program} {args:?} failed\n--- stdout\n{}\n--- stderr\n{}",
        out.stdout, out.stderr
    );
    out
}

/// `# pass N` and `# fail N` of node's TAP reporter.
fn tap_counts(tap: &str) -> (usize, usize) {
    let count = |key: &str| {
        tap.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{key}` in:\n{tap}"))
    };
    (count("# pass "), count("# fail "))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_logit-lens")
}

#[test]
fn vscode_unit_tests() {
    let _g = serial();
    let out = run_ok(
        &ext_dir(),
        "node",
        &["--test", "--test-reporter=tap", "out/test/unit/"],
        &[],
    );
    let (pass, fail) = tap_counts(&out.stdout);
    assert_eq!(fail, 0, "{}", out.stdout);
    assert!(
        pass >= 40,
        "expected the 40+ unit tests to run, {pass} passed:\n{}",
        out.stdout
    );
}

#[test]
fn vscode_protocol_against_the_daemon() {
    let _g = serial();
    let out = run_ok(
        &ext_dir(),
        "node",
        &["--test", "--test-reporter=tap", "out/test/protocol/"],
        &[("LOGIT_LENS_BIN", bin())],
    );
    let (pass, fail) = tap_counts(&out.stdout);
    assert_eq!((pass, fail), (10, 0), "{}\n{}", out.stdout, out.stderr);
    let metric = out
        .stdout
        .lines()
        .find(|l| l.contains("protocol_change_to_hover_ms"));
    eprintln!("protocol: {}", metric.unwrap_or("(no metric)"));
}

#[test]
fn vscode_end_to_end_in_code_server() {
    let _g = serial();
    let dir = ext_dir();
    let code_server = std::env::var_os("LOGIT_LENS_CODE_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/logit-lens/test-deps/code-server")
        });
    assert!(
        code_server.join("out/node/entry.js").exists(),
        "code-server is missing at {}: {SETUP}",
        code_server.display()
    );
    let chromium =
        std::env::var("LOGIT_LENS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium is missing at {chromium}: {SETUP}"
    );
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vscode-e2e");
    // The model picker is given the default model's file (the daemon restarts with --model).
    let model = lens_models::ensure_default_model(false).expect("the default model");
    // The daemon appends to its log: this run's alone.
    let log = out_dir.join("daemon.log");
    let _ = std::fs::remove_file(&log);
    let (ok, out) = run(
        &dir,
        "node",
        &["out/test/e2e/e2e.js"],
        &[
            ("LOGIT_LENS_BIN", bin()),
            ("LOGIT_LENS_CODE_SERVER", &code_server.to_string_lossy()),
            ("LOGIT_LENS_CHROMIUM", &chromium),
            ("LOGIT_LENS_E2E_OUT", &out_dir.to_string_lossy()),
            ("LOGIT_LENS_E2E_MODEL", &model.to_string_lossy()),
            // The daemon's log (hover timings at debug level) beside the screenshots.
            ("LOGIT_LENS_LOG_FILE", &log.to_string_lossy()),
            ("LOGIT_LENS_LOG", "info,lens_server=debug"),
        ],
    );
    let last = out.stdout.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "e2e printed no JSON result ({e}):\n{}\n{}",
            out.stdout, out.stderr
        )
    });
    assert!(
        ok && result["ok"] == true,
        "the e2e test failed (screenshots in {}):\n{last}\n{}",
        out_dir.display(),
        out.stderr
    );
    assert_eq!(result["hoverRows"], 31, "{last}");
    assert_eq!(
        result["typingToHoverMs"].as_array().map(Vec::len),
        Some(20),
        "{last}"
    );
    assert_eq!(
        result["cachedHoverMs"].as_array().map(Vec::len),
        Some(20),
        "{last}"
    );
    // Every typing round is found in the daemon's log (its hover timings), so the breakdown
    // of where the time went covers them all.
    assert_eq!(result["typingBreakdownMs"]["rounds"], 20, "{last}");
    for shot in [
        "hover.png",
        "hover-after-typing.png",
        "heatmap.png",
        "model-info.png",
    ] {
        assert!(out_dir.join(shot).exists(), "screenshot {shot}");
    }
    eprintln!(
        "vscode e2e: typing -> hover {} ms (median {} ms; from the key press: median {} ms; the harness's view {}, median {} ms; {} tokens; the same hover from the daemon's cache: median {} ms; where the time went, medians: {}), screenshots in {}",
        result["typingToHoverMs"],
        result["typingToHoverMedianMs"],
        result["keydownToHoverMedianMs"],
        result["harnessTypingToHoverMs"],
        result["harnessTypingToHoverMedianMs"],
        result["documentTokens"],
        result["cachedHoverMedianMs"],
        result["typingBreakdownMs"],
        out_dir.display()
    );
}
