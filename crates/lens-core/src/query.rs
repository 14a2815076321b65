//! The one query pipeline: which layers and positions, which lens, how many predictions, read
//! from one prompt's states. The CLI's table and JSON, the plots, the daemon's `lens/*` replies
//! and its hovers all read the lens through [`Query::run`], so the same cell is the same
//! numbers everywhere.

use crate::diff::{self, Alignment, Diff};
use crate::{Backend, Error, HiddenStates, IndexSpec, Lens, LensKind, PositionView, Site, Stop};

/// What to read: validated against the model ([`Query::layers_of`]) before any forward pass
/// and against the prompt ([`Query::positions_of`]) right after tokenizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub layers: IndexSpec,
    pub positions: IndexSpec,
    pub kind: LensKind,
    /// Predictions per cell, 1..=[`Query::MAX_TOP_K`].
    pub top_k: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            layers: IndexSpec::default(),
            positions: IndexSpec::default(),
            kind: LensKind::Norm,
            top_k: 5,
        }
    }
}

/// A query's result: the resolved layers and positions and one view per position.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub kind: LensKind,
    pub top_k: usize,
    /// Ascending lens layers (0 = embeddings).
    pub layers: Vec<usize>,
    pub views: Vec<PositionView>,
}

impl Query {
    pub const MAX_TOP_K: usize = 100;

    /// The layers of a model with `n_layers` blocks; also checks `top_k`.
    pub fn layers_of(&self, n_layers: usize) -> Result<Vec<usize>, Error> {
        if !(1..=Self::MAX_TOP_K).contains(&self.top_k) {
            return Err(Error::Layers(format!(
                "top-k must be 1..={}, not {}",
                Self::MAX_TOP_K,
                self.top_k
            )));
        }
        self.layers.layers(n_layers).map_err(Error::Layers)
    }

    /// The positions of a prompt of `len` tokens.
    pub fn positions_of(&self, len: usize) -> Result<Vec<usize>, Error> {
        self.positions.positions(len).map_err(Error::Positions)
    }

    /// Read the lens from `states` (through [`Backend::lens`], stoppable).
    pub fn run(
        &self,
        backend: &dyn Backend,
        states: &HiddenStates,
        stop: &Stop,
    ) -> Result<Answer, Error> {
        let layers = self.layers_of(states.n_layers())?;
        let positions = self.positions_of(states.n_positions())?;
        let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
        let views = Lens::new(backend, states, self.kind, self.top_k)
            .with_stop(stop.clone())
            .positions(&positions, &sites)?;
        Ok(Answer {
            kind: self.kind,
            top_k: self.top_k,
            layers,
            views,
        })
    }

    /// The diff lens of two versions of a prompt: their tokens aligned ([`Alignment`]), and at
    /// each aligned pair whose *after* position the query selects, each selected layer of both
    /// versions compared ([`crate::DiffCell`]). Both states come from the same backend.
    pub fn diff(
        &self,
        backend: &dyn Backend,
        before: &HiddenStates,
        after: &HiddenStates,
        stop: &Stop,
    ) -> Result<Diff, Error> {
        let layers = self.layers_of(after.n_layers())?;
        if before.n_layers() != after.n_layers() || before.hidden_size() != after.hidden_size() {
            return Err(Error::Shape(
                "the two versions' states come from different models".into(),
            ));
        }
        let mut chosen = vec![false; after.n_positions()];
        for p in self.positions_of(after.n_positions())? {
            chosen[p] = true;
        }
        let alignment = Alignment::new(before.tokens(), after.tokens());
        let pairs: Vec<_> = alignment
            .pairs()
            .into_iter()
            .filter(|p| chosen[p.after])
            .collect();
        let pairs = diff::compare(
            backend,
            (before, after),
            &pairs,
            &layers,
            (self.kind, self.top_k),
            stop,
        )?;
        Ok(Diff {
            kind: self.kind,
            top_k: self.top_k,
            layers,
            alignment,
            pairs,
        })
    }
}
