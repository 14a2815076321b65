//! A real editor as the LSP client: headless Neovim 0.11 (installed by scripts/deps/neovim.sh
//! into ~/.cache/logit-lens/test-deps/neovim, or $LOGIT_LENS_NVIM) runs tests/nvim/hover.lua,
//! which starts `logit-lens serve --stdio`, hovers, edits, hovers again and writes JSON.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::ensure_model;

fn nvim() -> PathBuf {
    if let Some(p) = std::env::var_os("LOGIT_LENS_NVIM") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    cache.join("logit-lens/test-deps/neovim/bin/nvim")
}

#[test]
fn neovim_hovers_and_edits() {
    ensure_model();
    let nvim = nvim();
    assert!(
        nvim.exists(),
        "{} is missing: run scripts/deps/neovim.sh",
        nvim.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("note.txt");
    std::fs::write(&file, "Zażółć gęślą jaźń 🦀 日本\nOne two three four\n").expect("write");
    let out_json = dir.path().join("out.json");
    let lua = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/nvim/hover.lua");
    let mut cmd = Command::new("timeout");
    cmd.arg("300")
        .arg(&nvim)
        .args(["--headless", "-i", "NONE", "-n", "-u"])
        .arg(&lua);
    for var in [
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
    ] {
        let d = dir.path().join(var);
        std::fs::create_dir_all(&d).expect("mkdir");
        cmd.env(var, d);
    }
    cmd.env("LENS_BIN", env!("CARGO_BIN_EXE_logit-lens"))
        .env("LENS_FILE", &file)
        .env("LENS_OUT", &out_json)
        .env_remove("LOGIT_LENS_MODEL")
        .current_dir(dir.path());
    let out = cmd.output().expect("run nvim");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap_or_else(|e| {
            panic!(
                "no results from nvim ({e}); status {}; stderr {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        }))
        .expect("results JSON");
    let failed: Vec<&Value> = results["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] != Value::Bool(true))
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}\n{results:#}");
    assert!(out.status.success(), "nvim exited with {}", out.status);
    assert_eq!(results["position_encoding"], "utf-8");
    let hovers = results["hovers"].as_array().expect("hovers");
    assert_eq!(hovers.len(), 2);
    // The hover on the `ę` of gęślą names the token there.
    let md = hovers[0]["markdown"].as_str().expect("md");
    let first_line = md.lines().next().unwrap_or("");
    assert!(
        first_line.contains('ę') || first_line.contains('�'),
        "{first_line}"
    );
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| layer"))
        .collect();
    assert_eq!(rows.len(), 4, "layers 30, 20, 10, 0: {md}");
    assert!(rows[0].starts_with("| 30"), "{md}");
    assert!(hovers[1]["markdown"]
        .as_str()
        .expect("md")
        .starts_with("**␣Paris**"));
    let float = results["float"].as_array().expect("float lines");
    assert!(
        float
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("p(written)"))),
        "{float:?}"
    );
    let hints = results["inlay_hints"].as_array().expect("hints");
    assert!(
        hints
            .iter()
            .all(|h| h["label"].as_str().is_some_and(|l| l.starts_with("→ "))),
        "{hints:?}"
    );
}
