//! The JSON report schema `logit-lens/run/v1` lives in `lens_server::wire`, shared with the
//! daemon's `lens/analyze` so both print the same bytes.

pub use lens_server::wire::build;
