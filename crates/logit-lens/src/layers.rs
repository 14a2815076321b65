//! The `--layers` syntax lives in `lens-server` (the daemon parses the same specs).

pub use lens_server::layers::LayerSpec;
