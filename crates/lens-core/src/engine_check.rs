//! The capture against the engine: a backend that wraps an inference engine whose hidden
//! states it cannot read runs a capture forward of its own; its last layer must give the
//! engine's own final logits ([`crate::Backend::engine_logits`]). [`engine_check`] measures
//! how far they are apart.

use crate::math;
use crate::{Backend, Error, LensKind, Site};

/// An engine's own final logits for some tokens, and how far a correct capture may be from
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineLogits {
    /// Row-major, `vocab_size` per position.
    pub logits: Vec<f32>,
    /// The largest |Δlogit| a correct capture shows (the backend documents why).
    pub bound: f32,
}

/// The capture's last layer (norm lens) against the engine's final logits.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineCheck {
    pub positions: usize,
    /// Largest |Δlogit| over every position and vocabulary entry (infinite for a NaN).
    pub max_abs_logit: f32,
    /// Positions whose top-1 is the same in both.
    pub top1_agree: usize,
    /// Positions where the engine's top-1 leads its runner-up by more than twice the bound
    /// (there the capture's top-1 must be the same), and how many of them agree.
    pub clear: usize,
    pub clear_agree: usize,
    pub bound: f32,
}

impl EngineCheck {
    /// Within the bound everywhere, and the same top-1 wherever the engine's is clear.
    pub fn passed(&self) -> bool {
        self.max_abs_logit <= self.bound && self.clear_agree == self.clear
    }
}

/// Compare `backend`'s capture with its engine's own final logits for `tokens`; `None` when the
/// backend has no separate engine.
pub fn engine_check<B: Backend + ?Sized>(
    backend: &B,
    tokens: &[u32],
) -> Result<Option<EngineCheck>, Error> {
    let Some(engine) = backend.engine_logits(tokens) else {
        return Ok(None);
    };
    let EngineLogits { logits, bound } = engine?;
    let info = backend.info();
    let vocab = info.vocab_size;
    if logits.len() != tokens.len() * vocab {
        return Err(Error::Shape(format!(
            "the engine gave {} logits for {} positions of {vocab}",
            logits.len(),
            tokens.len()
        )));
    }
    let states = backend.forward(tokens, Default::default())?;
    let mut rows = Vec::with_capacity(tokens.len() * info.hidden_size);
    for p in 0..tokens.len() {
        let row = states
            .row(Site::Layer(info.n_layers), p)
            .ok_or(Error::PositionOutOfRange {
                position: p,
                len: tokens.len(),
            })?;
        rows.extend_from_slice(row);
    }
    let ours = backend.readout(&rows, LensKind::Norm)?;
    let mut check = EngineCheck {
        positions: tokens.len(),
        max_abs_logit: 0.0,
        top1_agree: 0,
        clear: 0,
        clear_agree: 0,
        bound,
    };
    for (a, b) in ours.chunks_exact(vocab).zip(logits.chunks_exact(vocab)) {
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs();
            check.max_abs_logit = match d.is_nan() {
                true => f32::INFINITY,
                false => check.max_abs_logit.max(d),
            };
        }
        let top = math::top_k(b, 2);
        let agree = math::top_k(a, 1).first().map(|t| t.id) == top.first().map(|t| t.id);
        check.top1_agree += usize::from(agree);
        if let [first, second] = &top[..] {
            if first.logit - second.logit > 2.0 * bound {
                check.clear += 1;
                check.clear_agree += usize::from(agree);
            }
        }
    }
    Ok(Some(check))
}
