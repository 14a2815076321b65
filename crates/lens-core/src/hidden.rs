use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::{Error, ModelInfo};

/// Where in the residual stream a row is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// The residual stream at a layer boundary: 0 = embeddings, i = after block i.
    Layer(usize),
    /// The residual stream after block i's attention (1-based block), before its MLP.
    MidBlock(usize),
}

/// Residual-stream activations of one prompt, as captured by a backend.
///
/// Layout: `resid[layer][position][hidden]`, `layer` in `0..=n_layers`, and optionally
/// `mid[block - 1][position][hidden]` for blocks `1..=n_layers`. Shapes are checked once in
/// [`HiddenStates::new`]; every accessor after that is infallible for in-range indices.
#[derive(Clone)]
pub struct HiddenStates {
    n_layers: usize,
    n_positions: usize,
    hidden: usize,
    tokens: Vec<u32>,
    resid: Vec<f32>,
    mid: Option<Vec<f32>>,
    /// Opaque per-prompt state a backend keeps to extend this prompt cheaply (its KV cache).
    backend_state: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for HiddenStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HiddenStates")
            .field("n_layers", &self.n_layers)
            .field("n_positions", &self.n_positions)
            .field("hidden", &self.hidden)
            .field("mid", &self.mid.is_some())
            .field("backend_state", &self.backend_state.is_some())
            .finish()
    }
}

impl HiddenStates {
    /// Validate and wrap captured activations.
    pub fn new(
        info: &ModelInfo,
        tokens: Vec<u32>,
        resid: Vec<f32>,
        mid: Option<Vec<f32>>,
    ) -> Result<Self, Error> {
        let (n_layers, hidden, n_positions) = (info.n_layers, info.hidden_size, tokens.len());
        if n_positions == 0 {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab: info.vocab_size,
            });
        }
        let want = (n_layers + 1) * n_positions * hidden;
        if resid.len() != want {
            return Err(Error::Shape(format!(
                "residual stream has {} values, expected {} layers x {} positions x {} = {want}",
                resid.len(),
                n_layers + 1,
                n_positions,
                hidden
            )));
        }
        if let Some(mid) = &mid {
            let want = n_layers * n_positions * hidden;
            if mid.len() != want {
                return Err(Error::Shape(format!(
                    "mid-block stream has {} values, expected {want}",
                    mid.len()
                )));
            }
        }
        Ok(HiddenStates {
            n_layers,
            n_positions,
            hidden,
            tokens,
            resid,
            mid,
            backend_state: None,
        })
    }

    /// Attach a backend's opaque state (e.g. its KV cache) so the prompt can be extended later.
    pub fn with_backend_state(mut self, state: Arc<dyn Any + Send + Sync>) -> Self {
        self.backend_state = Some(state);
        self
    }

    pub fn backend_state(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.backend_state.as_ref()
    }

    /// Number of transformer blocks; layers are `0..=n_layers`.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    pub fn n_positions(&self) -> usize {
        self.n_positions
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn has_mid_block(&self) -> bool {
        self.mid.is_some()
    }

    /// Whether `site` can be read from these states.
    pub fn contains(&self, site: Site) -> bool {
        match site {
            Site::Layer(l) => l <= self.n_layers,
            Site::MidBlock(b) => self.mid.is_some() && (1..=self.n_layers).contains(&b),
        }
    }

    /// The hidden vector at `site` and `position`, or `None` when out of range.
    pub fn row(&self, site: Site, position: usize) -> Option<&[f32]> {
        if position >= self.n_positions || !self.contains(site) {
            return None;
        }
        let (data, layer) = match site {
            Site::Layer(l) => (&self.resid, l),
            Site::MidBlock(b) => (self.mid.as_ref()?, b - 1),
        };
        let start = (layer * self.n_positions + position) * self.hidden;
        data.get(start..start + self.hidden)
    }

    /// Bytes held by the captured activations (not counting backend state).
    pub fn activation_bytes(&self) -> usize {
        (self.resid.len() + self.mid.as_ref().map_or(0, Vec::len)) * std::mem::size_of::<f32>()
    }
}
