//! Per-layer probabilities of chosen tokens, for the HTML page's trajectory chart.

use lens_core::{math, Backend, Error, HiddenStates, LensKind, PositionView, Site};

/// The lens probability of token `id` at `position`, at each of `layers`.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub position: usize,
    pub id: u32,
    pub layers: Vec<usize>,
    pub probs: Vec<f32>,
}

/// Rows per readout call, as in `lens_core::Lens`.
const ROWS_PER_READOUT: usize = 512;

/// For every view, the per-layer probability of its final top-1 token and of the token that
/// actually comes next (one track when they are the same token), read with `kind` from
/// `states`. This is one more readout of the plotted rows (the cells keep only the top-k).
pub fn tracks(
    backend: &dyn Backend,
    states: &HiddenStates,
    kind: LensKind,
    views: &[PositionView],
    layers: &[usize],
) -> Result<Vec<Track>, Error> {
    let vocab = backend.info().vocab_size;
    let tokens = states.tokens();
    let chunk = (ROWS_PER_READOUT / layers.len().max(1)).max(1);
    let mut out = Vec::new();
    for group in views.chunks(chunk) {
        let mut rows = Vec::with_capacity(group.len() * layers.len() * states.hidden_size());
        for v in group {
            for &l in layers {
                let row =
                    states
                        .row(Site::Layer(l), v.position)
                        .ok_or(if l > states.n_layers() {
                            Error::LayerOutOfRange {
                                layer: l,
                                max: states.n_layers(),
                            }
                        } else {
                            Error::PositionOutOfRange {
                                position: v.position,
                                len: states.n_positions(),
                            }
                        })?;
                rows.extend_from_slice(row);
            }
        }
        let logits = backend.readout(&rows, kind)?;
        if logits.len() != group.len() * layers.len() * vocab {
            return Err(Error::Shape(format!(
                "readout returned {} logits, expected {}",
                logits.len(),
                group.len() * layers.len() * vocab
            )));
        }
        for (g, v) in group.iter().enumerate() {
            let mut ids = vec![v.final_top1.id];
            if let Some(&next) = tokens.get(v.position + 1) {
                if next != v.final_top1.id {
                    ids.push(next);
                }
            }
            for id in ids {
                let probs = (0..layers.len())
                    .map(|i| {
                        let r = (g * layers.len() + i) * vocab;
                        let row = &logits[r..r + vocab];
                        let logit = row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
                        (logit - math::log_sum_exp(row)).exp()
                    })
                    .collect();
                out.push(Track {
                    position: v.position,
                    id,
                    layers: layers.to_vec(),
                    probs,
                });
            }
        }
    }
    Ok(out)
}
