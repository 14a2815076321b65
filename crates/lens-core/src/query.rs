//! The one query pipeline: which layers and positions, which lens, how many predictions, read
//! from one prompt's states. The CLI's table and JSON, the plots, the daemon's `lens/*` replies
//! and its hovers all read the lens through [`Query::run`], so the same cell is the same
//! numbers everywhere.

use std::sync::Arc;

use crate::{
    Backend, Error, HiddenStates, IndexSpec, Lens, LensKind, PositionView, Site, Stop, Translators,
};

use crate::diff::{self, Alignment, Diff};

/// What to read: validated against the model ([`Query::layers_of`]) before any forward pass
/// and against the prompt ([`Query::positions_of`]) right after tokenizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub layers: IndexSpec,
    pub positions: IndexSpec,
    pub kind: LensKind,
    /// The translators of [`LensKind::Tuned`] (required by it, ignored by the other kinds).
    pub tuned: Option<Arc<Translators>>,
    /// Predictions per cell, 1..=[`Query::MAX_TOP_K`].
    pub top_k: usize,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            layers: IndexSpec::default(),
            positions: IndexSpec::default(),
            kind: LensKind::Norm,
            tuned: None,
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

    /// A query for the tuned lens with `translators`.
    pub fn tuned(translators: Arc<Translators>) -> Query {
        Query {
            kind: LensKind::Tuned,
            tuned: Some(translators),
            ..Query::default()
        }
    }

    /// The translators the query reads through: `Some` for the tuned lens, which requires them.
    pub fn translators(&self) -> Result<Option<&Translators>, Error> {
        match (self.kind, &self.tuned) {
            (LensKind::Tuned, None) => Err(Error::Unsupported(
                "the tuned lens needs its translators: load a lens file (--lens tuned:PATH)".into(),
            )),
            (LensKind::Tuned, Some(t)) => Ok(Some(t)),
            _ => Ok(None),
        }
    }

    /// The layers of a model with `n_layers` blocks; also checks `top_k` and that a tuned
    /// lens has a translator for each block.
    pub fn layers_of(&self, n_layers: usize) -> Result<Vec<usize>, Error> {
        // A tuned query's translators may be loaded after this check (they need the model);
        // `run` requires them.
        if let (LensKind::Tuned, Some(t)) = (self.kind, &self.tuned) {
            if t.n_layers() != n_layers {
                t.check_fits(n_layers, t.hidden_size())?;
            }
        }
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
            .with_translators(self.translators()?)
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
            (self.kind, self.top_k, self.translators()?),
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
