//! The logit lens, independent of any model runtime.
//!
//! A [`Backend`] runs a model and captures the residual stream at every layer boundary into
//! [`HiddenStates`]; it also applies the lens readout (final norm, then unembedding) to rows of
//! hidden states. Everything else — log-softmax, top-k, entropy, KL to the final layer, ranks —
//! lives here and is computed lazily, one (layer, position) row at a time, by [`Lens`].
//!
//! This crate does no IO and knows no tensor library. After [`HiddenStates::new`] has
//! validated shapes, the math cannot fail; only the backend's readout can.

mod backend;
mod hidden;
mod lens;
pub mod math;

pub use backend::{Backend, CaptureOptions, Error, LensKind, ModelInfo, Stop, Token};
pub use hidden::{HiddenStates, Site};
pub use lens::{Cell, Lens, NextToken, PositionView, Prediction, SiteLogits};
