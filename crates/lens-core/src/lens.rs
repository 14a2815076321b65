use rayon::prelude::*;

use crate::math::{self, Reference, RowStats};
use crate::{Backend, Error, HiddenStates, LensKind, Site, Stop, Translators};

/// Rows read out in one call to the backend when scanning a whole prompt. Small enough that
/// a batch's logits (128 rows of SmolLM2's 49,152: 25 MB) stay in the last-level cache while
/// they are reduced, and that a backend's small-batch kernel takes them (the candle backend's
/// below 128 rows): measured on SmolLM2 f32, 256 tokens, 2 cores, alternating in one sitting,
/// the full lens took 4.4–5.1 s against 5.4–5.9 s with 512 rows and 6.6–7.4 s with 160.
const ROWS_PER_READOUT: usize = 128;

/// And at most this many bytes of logits per call: below the largest size the system allocator
/// (glibc) serves from memory it has freed before, so each batch reuses the last one's pages
/// instead of faulting in fresh zeroed ones (128 rows of Gemma 3's 262,144 logits are 134 MB:
/// 55 ms of page faults each, measured). Gemma 3's full lens of 64 tokens: 3.27–3.34 s
/// instead of 3.47–3.55 s (alternating runs).
const READOUT_BYTES: usize = 24 << 20;

/// One of the most likely next tokens at a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: u32,
    pub logit: f32,
    pub prob: f32,
}

/// How a cell's distribution treats the token that actually comes next in the prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NextToken {
    pub id: u32,
    /// 0-based: the number of vocabulary entries with a strictly larger logit.
    pub rank: usize,
    pub prob: f32,
}

/// The lens read at one (site, position).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub site: Site,
    pub top: Vec<Prediction>,
    /// Entropy of the cell's distribution, nats.
    pub entropy: f64,
    /// `KL(model output ‖ this cell)`, nats; 0 at the last layer of the norm lens.
    pub kl_to_final: f64,
    /// The next token of the prompt under this cell's distribution (`None` at the last position).
    pub next: Option<NextToken>,
    /// Rank, in this cell, of the model's final top-1 token at the same position.
    pub final_top1_rank: usize,
    /// Probability, in this cell, of the model's final top-1 token at the same position (the
    /// trajectory of the model's answer across layers).
    pub final_top1_prob: f32,
}

/// Every requested site at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionView {
    pub position: usize,
    pub token: u32,
    /// The model's output (norm lens at the last layer) at this position, top-1.
    pub final_top1: Prediction,
    /// The first layer from which on the final top-1 stays top-1 through the last layer
    /// (only layer sites count; `None` if no requested layer qualifies).
    pub decided_at: Option<usize>,
    pub cells: Vec<Cell>,
}

/// [`PositionView::decided_at`] of a position's cells: walking down from the last requested
/// layer, the last layer whose cell still ranks the final top-1 first. (A backend that reduces
/// the cells of one position in several places joins them and asks this again.)
pub fn decided_at(cells: &[Cell]) -> Option<usize> {
    let mut decided_at = None;
    let mut layer_cells: Vec<&Cell> = cells
        .iter()
        .filter(|c| matches!(c.site, Site::Layer(_)))
        .collect();
    layer_cells.sort_by_key(|c| c.site);
    for c in layer_cells.iter().rev() {
        if c.final_top1_rank != 0 {
            break;
        }
        if let Site::Layer(l) = c.site {
            decided_at = Some(l);
        }
    }
    decided_at
}

/// The logits behind a [`PositionView`]: one row of the vocabulary per site, in the order of
/// the sites, and each row's `ln Σ exp`.
#[derive(Debug, Clone)]
pub struct SiteLogits {
    pub vocab: usize,
    pub logits: Vec<f32>,
    pub log_z: Vec<f32>,
}

impl SiteLogits {
    /// Row `i` of the logits.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        self.logits.get(i * self.vocab..(i + 1) * self.vocab)
    }

    /// (probability, 0-based rank) of token `id` in row `i`.
    pub fn prob_and_rank(&self, i: usize, id: u32) -> Option<(f32, usize)> {
        let row = self.row(i)?;
        let x = *row.get(id as usize)?;
        Some((math::exp(x - self.log_z.get(i)?), math::rank_of(row, x)))
    }
}

/// The cells a lens readout is asked for: every site at each position, position-major.
#[derive(Debug, Clone, Copy)]
pub struct LensRequest<'a> {
    pub states: &'a HiddenStates,
    pub positions: &'a [usize],
    pub sites: &'a [Site],
    pub kind: LensKind,
    /// The translators of [`LensKind::Tuned`].
    pub translators: Option<&'a Translators>,
    /// Predictions kept per cell.
    pub top_k: usize,
}

/// The lens on the host: rows read out in bounded batches through
/// [`Backend::readout_until`], each reduced at once by [`crate::math`] (the default of
/// [`Backend::lens`], and the reference every override is held to).
pub fn host_lens<B: Backend + ?Sized>(
    backend: &B,
    request: &LensRequest<'_>,
    stop: &Stop,
) -> Result<Vec<PositionView>, Error> {
    // `Lens`'s batching and reduction, on the backend's readout (never its own `lens`).
    let lens = Lens {
        backend,
        states: request.states,
        kind: request.kind,
        translators: request.translators,
        top_k: request.top_k,
        stop: stop.clone(),
    };
    let (positions, sites) = (request.positions, request.sites);
    let final_in_sites = lens.check(positions, sites)?;
    let per_position = sites.len() + usize::from(!final_in_sites);
    let vocab = backend.info().vocab_size;
    let rows = ROWS_PER_READOUT.min((READOUT_BYTES / (vocab.max(1) * 4)).max(1));
    let chunk = (rows / per_position.max(1)).max(1);
    let mut views = Vec::with_capacity(positions.len());
    for group in positions.chunks(chunk) {
        let (site_logits, final_logits) = lens.read_group(group, sites, final_in_sites)?;
        let group_views: Vec<PositionView> = group
            .par_iter()
            .enumerate()
            .map(|(g, &position)| {
                let rows = &site_logits[g * sites.len() * vocab..(g + 1) * sites.len() * vocab];
                let final_row = lens.final_row(g, sites, rows, final_logits.as_deref());
                lens.view(position, sites, rows, final_row).map(|v| v.0)
            })
            .collect::<Vec<_>>()
            // The first position's error, whichever thread found one first.
            .into_iter()
            .collect::<Result<_, Error>>()?;
        views.extend(group_views);
    }
    Ok(views)
}

/// The logit lens over one prompt's captured hidden states.
///
/// Logits are computed on demand, in bounded batches, and reduced to [`Cell`]s at once: a
/// layers × positions × vocabulary array never exists.
///
/// Generic over the backend so that [`host_lens`], the default of [`Backend::lens`], runs the
/// same batching on any backend, sized or not; callers use the default, `dyn Backend`.
pub struct Lens<'a, B: Backend + ?Sized = dyn Backend> {
    backend: &'a B,
    states: &'a HiddenStates,
    kind: LensKind,
    translators: Option<&'a Translators>,
    top_k: usize,
    stop: Stop,
}

impl<'a, B: Backend + ?Sized> Lens<'a, B> {
    pub fn new(backend: &'a B, states: &'a HiddenStates, kind: LensKind, top_k: usize) -> Self {
        Lens {
            backend,
            states,
            kind,
            translators: None,
            top_k,
            stop: Stop::never(),
        }
    }

    /// The translators [`LensKind::Tuned`] reads through (it requires them).
    pub fn with_translators(mut self, translators: Option<&'a Translators>) -> Self {
        self.translators = translators;
        self
    }

    /// Readouts give up with [`Error::Stopped`] once `stop` is raised.
    pub fn with_stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    pub fn states(&self) -> &HiddenStates {
        self.states
    }

    /// All layer sites `0..=N`.
    pub fn all_layers(&self) -> Vec<Site> {
        (0..=self.states.n_layers()).map(Site::Layer).collect()
    }

    /// The lens at `sites` for one position.
    pub fn position(&self, position: usize, sites: &[Site]) -> Result<PositionView, Error> {
        self.only(self.positions(&[position], sites)?, position)
    }

    /// [`Lens::position`], also returning the logits it read (for callers that keep them, e.g.
    /// to look up the probability of whatever token is written next).
    pub fn position_with_logits(
        &self,
        position: usize,
        sites: &[Site],
    ) -> Result<(PositionView, SiteLogits), Error> {
        self.only(self.positions_with_logits(&[position], sites)?, position)
    }

    /// The one result of a one-position batch.
    fn only<T>(&self, mut batch: Vec<T>, position: usize) -> Result<T, Error> {
        batch.pop().ok_or(Error::PositionOutOfRange {
            position,
            len: self.states.n_positions(),
        })
    }

    /// [`Lens::position_with_logits`] for a few positions, read out in one batch (one pass
    /// over the unembedding for all of them).
    pub fn positions_with_logits(
        &self,
        positions: &[usize],
        sites: &[Site],
    ) -> Result<Vec<(PositionView, SiteLogits)>, Error> {
        let final_in_sites = self.check(positions, sites)?;
        let (mut logits, final_logits) = self.read_group(positions, sites, final_in_sites)?;
        let vocab = self.backend.info().vocab_size;
        let per = sites.len() * vocab;
        // Split the batch into one vector per position (from the back: each split moves only
        // the tail).
        let mut rows: Vec<Vec<f32>> = (1..positions.len())
            .rev()
            .map(|g| logits.split_off(g * per))
            .collect();
        rows.push(logits);
        rows.reverse();
        positions
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(g, (&position, logits))| {
                let final_row = self.final_row(g, sites, &logits, final_logits.as_deref());
                let (view, log_z) = self.view(position, sites, &logits, final_row)?;
                Ok((
                    view,
                    SiteLogits {
                        vocab,
                        logits,
                        log_z,
                    },
                ))
            })
            .collect()
    }

    /// The error for a non-finite readout at `site` of `position`: blames the first layer at
    /// that position whose residual stream is not finite, if any, else the readout.
    fn non_finite(&self, position: usize, site: Site) -> Error {
        let st = self.states;
        let finite = |l: usize| {
            st.row(Site::Layer(l), position)
                .is_none_or(|r| r.iter().all(|x| x.is_finite()))
        };
        match (0..=st.n_layers()).find(|&l| !finite(l)) {
            Some(layer) => Error::NonFinite {
                layer,
                position,
                residual: true,
            },
            None => Error::NonFinite {
                layer: match site {
                    Site::Layer(l) | Site::MidBlock(l) => l,
                },
                position,
                residual: false,
            },
        }
    }

    /// The lens at `sites` for every position of the prompt.
    pub fn grid(&self, sites: &[Site]) -> Result<Vec<PositionView>, Error> {
        let positions: Vec<usize> = (0..self.states.n_positions()).collect();
        self.positions(&positions, sites)
    }

    /// The lens at `sites` for each of `positions`, in that order, through the backend's
    /// [`Backend::lens`] (the host math unless the backend reduces on its device). The tuned
    /// lens translates rows on the host, so it always runs [`host_lens`].
    pub fn positions(
        &self,
        positions: &[usize],
        sites: &[Site],
    ) -> Result<Vec<PositionView>, Error> {
        self.check(positions, sites)?;
        let request = LensRequest {
            states: self.states,
            positions,
            sites,
            kind: self.kind,
            translators: self.translators,
            top_k: self.top_k,
        };
        let views = match self.kind {
            LensKind::Tuned => host_lens(self.backend, &request, &self.stop)?,
            _ => self.backend.lens(&request, &self.stop)?,
        };
        if views.len() != positions.len()
            || views
                .iter()
                .zip(positions)
                .any(|(v, &p)| v.position != p || v.cells.len() != sites.len())
        {
            return Err(Error::Shape(format!(
                "the backend's lens returned {} positions for {} asked",
                views.len(),
                positions.len()
            )));
        }
        Ok(views)
    }

    /// The model output at position `g` of a batch: its row of `final_logits` when the output
    /// was read separately, else the last layer's row among `rows` (this position's rows, one
    /// per site).
    fn final_row<'r>(
        &self,
        g: usize,
        sites: &[Site],
        rows: &'r [f32],
        final_logits: Option<&'r [f32]>,
    ) -> &'r [f32] {
        let vocab = self.backend.info().vocab_size;
        match final_logits {
            Some(f) => &f[g * vocab..(g + 1) * vocab],
            None => {
                let last = Site::Layer(self.states.n_layers());
                let i = sites.iter().position(|s| *s == last).unwrap_or(0);
                &rows[i * vocab..(i + 1) * vocab]
            }
        }
    }

    /// Validate positions and sites; whether the model output is among the sites' rows.
    fn check(&self, positions: &[usize], sites: &[Site]) -> Result<bool, Error> {
        let st = self.states;
        if let Some(&position) = positions.iter().find(|&&p| p >= st.n_positions()) {
            return Err(Error::PositionOutOfRange {
                position,
                len: st.n_positions(),
            });
        }
        if let Some(site) = sites.iter().find(|s| !st.contains(**s)) {
            let layer = match *site {
                Site::Layer(l) | Site::MidBlock(l) => l,
            };
            return Err(Error::LayerOutOfRange {
                layer,
                max: st.n_layers(),
            });
        }
        if self.kind == LensKind::Tuned {
            let t = self.translators.ok_or_else(|| {
                Error::Unsupported(
                    "the tuned lens needs its translators: load a lens file (--lens tuned:PATH)"
                        .into(),
                )
            })?;
            t.check_fits(st.n_layers(), st.hidden_size())?;
            if let Some(Site::MidBlock(l)) = sites.iter().find(|s| matches!(s, Site::MidBlock(_))) {
                return Err(Error::Unsupported(format!(
                    "the tuned lens translates layer boundaries only, not the middle of block {l}"
                )));
            }
        }
        // With the norm and tuned lenses, the last layer's row *is* the model output; reuse it.
        Ok(self.kind.last_layer_is_output() && sites.contains(&Site::Layer(st.n_layers())))
    }

    /// Logits of every site at each position of `group` (position-major), and, unless the
    /// sites already contain it, the model output at each position.
    fn read_group(
        &self,
        group: &[usize],
        sites: &[Site],
        final_in_sites: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), Error> {
        let st = self.states;
        let hidden = st.hidden_size();
        let mut rows = Vec::with_capacity(group.len() * sites.len() * hidden);
        for &p in group {
            for &s in sites {
                rows.extend_from_slice(st.row(s, p).unwrap_or(&[]));
            }
        }
        let (rows, kind) = match (self.kind, self.translators) {
            (LensKind::Tuned, Some(t)) => {
                let layers: Vec<usize> = group
                    .iter()
                    .flat_map(|_| {
                        // Mid-block sites were refused by `check`; none is translated.
                        sites.iter().map(|s| match *s {
                            Site::Layer(l) => l,
                            Site::MidBlock(_) => usize::MAX,
                        })
                    })
                    .collect();
                (t.translate(&rows, &layers), LensKind::Norm)
            }
            (kind, _) => (rows, kind),
        };
        let logits = self.backend.readout_until(&rows, kind, &self.stop)?;
        let final_logits = if final_in_sites {
            None
        } else {
            let mut rows = Vec::with_capacity(group.len() * hidden);
            for &p in group {
                rows.extend_from_slice(st.row(Site::Layer(st.n_layers()), p).unwrap_or(&[]));
            }
            Some(
                self.backend
                    .readout_until(&rows, LensKind::Norm, &self.stop)?,
            )
        };
        let vocab = self.backend.info().vocab_size;
        let want = group.len() * sites.len() * vocab;
        if logits.len() != want
            || final_logits
                .as_ref()
                .is_some_and(|f| f.len() != group.len() * vocab)
        {
            return Err(Error::Shape(format!(
                "readout returned {} logits, expected {want}",
                logits.len()
            )));
        }
        Ok((logits, final_logits))
    }

    /// Reduce one position's rows to its view (and each row's log-sum-exp). A row that is
    /// not finite is an error naming where it went non-finite, never a quiet empty cell.
    fn view(
        &self,
        position: usize,
        sites: &[Site],
        rows: &[f32],
        final_row: &[f32],
    ) -> Result<(PositionView, Vec<f32>), Error> {
        let (view, log_z) = self.reduce(position, sites, rows, final_row);
        let finite = |x: &f32| x.is_finite() || *x == f32::NEG_INFINITY;
        if let Some(i) = log_z.iter().position(|z| !z.is_finite()) {
            return Err(self.non_finite(position, sites[i]));
        }
        if !final_row.iter().all(finite) {
            return Err(self.non_finite(position, Site::Layer(self.states.n_layers())));
        }
        Ok((view, log_z))
    }

    fn reduce(
        &self,
        position: usize,
        sites: &[Site],
        rows: &[f32],
        final_row: &[f32],
    ) -> (PositionView, Vec<f32>) {
        let vocab = final_row.len();
        let reference = Reference::new(final_row);
        let final_top = math::top_k(final_row, 1);
        let final_top1 = final_top.first().map_or(
            math::TopEntry {
                id: 0,
                logit: f32::NAN,
            },
            |e| *e,
        );
        let tokens = self.states.tokens();
        let next_id = tokens.get(position + 1).copied();

        let (cells, log_z): (Vec<Cell>, Vec<f32>) = sites
            .par_iter()
            .enumerate()
            .map(|(i, &site)| {
                let row = &rows[i * vocab..(i + 1) * vocab];
                let mut stats = math::row_stats(row, self.top_k, Some(&reference));
                if std::ptr::eq(row, final_row) {
                    // The model output itself: KL(p ‖ p) is 0 by definition, not the ~1e-7
                    // that cancelling −H − p·x + log Z leaves in floating point.
                    stats.kl = Some(0.0);
                }
                (
                    self.cell(site, row, &stats, next_id, final_top1.id),
                    stats.log_z,
                )
            })
            .unzip();

        let decided_at = decided_at(&cells);
        let view = PositionView {
            position,
            token: tokens.get(position).copied().unwrap_or(0),
            final_top1: Prediction {
                id: final_top1.id,
                logit: final_top1.logit,
                prob: math::exp(final_top1.logit - reference.log_z()),
            },
            decided_at,
            cells,
        };
        (view, log_z)
    }

    fn cell(
        &self,
        site: Site,
        row: &[f32],
        stats: &RowStats,
        next_id: Option<u32>,
        final_top1: u32,
    ) -> Cell {
        let logit_of = |id: u32| row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
        let next = next_id.map(|id| {
            let logit = logit_of(id);
            NextToken {
                id,
                rank: math::rank_of(row, logit),
                prob: stats.prob(logit),
            }
        });
        Cell {
            site,
            top: stats
                .top
                .iter()
                .map(|e| Prediction {
                    id: e.id,
                    logit: e.logit,
                    prob: stats.prob(e.logit),
                })
                .collect(),
            entropy: stats.entropy,
            kl_to_final: stats.kl.unwrap_or(0.0),
            next,
            final_top1_rank: math::rank_of(row, logit_of(final_top1)),
            final_top1_prob: stats.prob(logit_of(final_top1)),
        }
    }
}
