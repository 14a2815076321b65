//! The logit lens, independent of any model runtime.
//!
//! A [`Backend`] runs a model and captures the residual stream at every layer boundary into
//! [`HiddenStates`]; it also applies the lens readout (final norm, then unembedding) to rows of
//! hidden states. Everything else — log-softmax, top-k, entropy, KL to the final layer, ranks —
//! lives here and is computed lazily, one (layer, position) row at a time, by [`Lens`].
//! Backends are found through their [`Loader`]s, collected in a [`Registry`]; a [`Query`] is
//! the one pipeline every output (table, JSON, plots, the daemon) reads the lens through.
//!
//! This crate does no IO and knows no tensor library. After [`HiddenStates::new`] has
//! validated shapes, the math cannot fail; only the backend's readout can.

mod backend;
mod diff;
mod engine_check;
mod generate;
mod hidden;
mod lens;
mod loader;
pub mod math;
mod query;
pub mod spec;
mod tuned;

pub use backend::{
    in_pool, Backend, CaptureOptions, Error, FinalNorm, LensKind, ModelInfo, ReadoutWeights, Stop,
    Token,
};
pub use diff::{Alignment, Change, Diff, DiffCell, Pair, PairDiff, Part};
pub use engine_check::{engine_check, EngineCheck, EngineLogits};
pub use generate::{
    host_generate, sample, Finish, GenerateRequest, Generator, Rng, Sampling, Step,
};
pub use hidden::{HiddenStates, Site};
pub use lens::{
    decided_at, host_lens, Cell, Lens, LensRequest, NextToken, PositionView, Prediction, SiteLogits,
};
pub use loader::{
    Capabilities, Device, Isq, LoadOptions, Loader, Precision, Registry, Source, SourceKind,
    ONE_PROCESS,
};
pub use query::{Answer, Query};
pub use spec::IndexSpec;
pub use tuned::{Affine, Translators};
