//! Comparing the lens with a golden file: the comparison lives in the conformance suite
//! (`lens_conformance::oracle`); here golden files are named relative to `tests/data/oracle/`.

use std::path::PathBuf;

pub use lens_conformance::oracle::{compare_prompt, Deviations, Tolerance, F32, F32_RAW};
use lens_core::{Backend, LensKind};
use serde_json::Value;

/// A file under `tests/data/oracle/`.
pub fn path(name: &str) -> PathBuf {
    crate::data_dir().join("oracle").join(name)
}

/// A golden file under `tests/data/oracle/`, parsed.
pub fn load(name: &str) -> Value {
    lens_conformance::oracle::load_json(&path(name))
}

/// [`lens_conformance::check_golden`] with a golden file under `tests/data/oracle/`.
pub fn check_golden(
    backend: &dyn Backend,
    file: &str,
    lens: LensKind,
    tol: Tolerance,
) -> Deviations {
    lens_conformance::check_golden(backend, &path(file), lens, tol)
}
