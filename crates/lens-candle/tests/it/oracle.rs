//! Comparing the lens with a golden file: the comparison lives in the conformance suite
//! (`lens_conformance::oracle`); here golden files are named relative to `tests/data/oracle/`.

use std::path::PathBuf;

pub use lens_conformance::oracle::{compare_prompt, Deviations};
use serde_json::Value;

/// A file under `tests/data/oracle/`.
pub fn path(name: &str) -> PathBuf {
    crate::data_dir().join("oracle").join(name)
}

/// A golden file under `tests/data/oracle/`, parsed.
pub fn load(name: &str) -> Value {
    lens_conformance::oracle::load_json(&path(name))
}
