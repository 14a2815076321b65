//! How good a lens is, per layer, over a text (Belrose et al.'s measures): the mean KL from
//! the model's output to the lens, how often the lens's top-1 is the model's, and the
//! perplexity of the text's next token under the lens. Accumulated from the cells of
//! [`lens_core::Query::run`] answers, so every lens is measured through the one pipeline.

use lens_core::{Answer, Site};

/// One layer's measures.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    /// Mean `KL(model output ‖ lens)`, nats, over every position.
    pub kl: f64,
    /// Fraction of positions whose lens top-1 is the model's top-1.
    pub top1_agreement: f64,
    /// `exp` of the mean negative log-probability of the next token (positions that have one).
    pub perplexity: f64,
}

#[derive(Debug, Clone, Default)]
struct Sums {
    kl: f64,
    agree: usize,
    positions: usize,
    nll: f64,
    predicted: usize,
}

/// A lens's measures over a text, accumulated answer by answer.
#[derive(Debug, Clone)]
pub struct LensStats {
    pub label: String,
    sums: Vec<Sums>,
}

impl LensStats {
    pub fn new(label: impl Into<String>) -> Self {
        LensStats {
            label: label.into(),
            sums: Vec::new(),
        }
    }

    /// Add the cells of `answer` (layer sites only; positions without a next token count for
    /// KL and agreement, not perplexity).
    pub fn add(&mut self, answer: &Answer) {
        for view in &answer.views {
            for cell in &view.cells {
                let Site::Layer(l) = cell.site else { continue };
                if self.sums.len() <= l {
                    self.sums.resize(l + 1, Sums::default());
                }
                let s = &mut self.sums[l];
                s.kl += cell.kl_to_final;
                s.agree += usize::from(cell.final_top1_rank == 0);
                s.positions += 1;
                if let Some(next) = cell.next {
                    s.nll -= f64::from(next.prob.max(f32::MIN_POSITIVE)).ln();
                    s.predicted += 1;
                }
            }
        }
    }

    /// The measures of every layer seen.
    pub fn layers(&self) -> Vec<LayerStats> {
        self.sums
            .iter()
            .enumerate()
            .filter(|(_, s)| s.positions > 0)
            .map(|(layer, s)| LayerStats {
                layer,
                kl: s.kl / s.positions as f64,
                top1_agreement: s.agree as f64 / s.positions as f64,
                perplexity: (s.nll / s.predicted.max(1) as f64).exp(),
            })
            .collect()
    }

    /// The mean over layers `1..N` (`N` the last layer, the model output, left out, as is the
    /// embedding layer) of each layer's mean KL: the tuned-lens paper's summary.
    pub fn mean_kl_inner(&self) -> f64 {
        let layers = self.layers();
        let n = layers.last().map_or(0, |l| l.layer);
        let inner: Vec<f64> = layers
            .iter()
            .filter(|l| l.layer >= 1 && l.layer < n)
            .map(|l| l.kl)
            .collect();
        inner.iter().sum::<f64>() / inner.len().max(1) as f64
    }
}
