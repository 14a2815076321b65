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
/// Stored per position: `resid[position]` holds `[layer][hidden]` for layers `0..=n_layers`,
/// and optionally `mid[position]` holds `[block - 1][hidden]` for blocks `1..=n_layers`. The
/// rows of a position are shared (`Arc`), so a prompt extended from a cached prefix holds the
/// prefix's positions without copying them. Shapes are checked once on construction; every
/// accessor after that is infallible for in-range indices.
#[derive(Clone)]
pub struct HiddenStates {
    n_layers: usize,
    hidden: usize,
    tokens: Vec<u32>,
    resid: Vec<Arc<[f32]>>,
    mid: Option<Vec<Arc<[f32]>>>,
    /// Opaque per-prompt state a backend keeps to extend this prompt cheaply (its KV cache).
    backend_state: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for HiddenStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HiddenStates")
            .field("n_layers", &self.n_layers)
            .field("n_positions", &self.tokens.len())
            .field("hidden", &self.hidden)
            .field("mid", &self.mid.is_some())
            .field("backend_state", &self.backend_state.is_some())
            .finish()
    }
}

/// Per-position rows of a layer-major `[rows][positions][hidden]` array.
fn by_position(data: &[f32], rows: usize, positions: usize, hidden: usize) -> Vec<Arc<[f32]>> {
    (0..positions)
        .map(|p| {
            let mut v = Vec::with_capacity(rows * hidden);
            for r in 0..rows {
                let start = (r * positions + p) * hidden;
                v.extend_from_slice(&data[start..start + hidden]);
            }
            Arc::from(v)
        })
        .collect()
}

impl HiddenStates {
    /// Validate and wrap captured activations given layer-major:
    /// `resid[layer][position][hidden]` and `mid[block - 1][position][hidden]`.
    pub fn new(
        info: &ModelInfo,
        tokens: Vec<u32>,
        resid: Vec<f32>,
        mid: Option<Vec<f32>>,
    ) -> Result<Self, Error> {
        let (n_layers, hidden, n) = (info.n_layers, info.hidden_size, tokens.len());
        let want = (n_layers + 1) * n * hidden;
        if resid.len() != want {
            return Err(Error::Shape(format!(
                "residual stream has {} values, expected {} layers x {} positions x {} = {want}",
                resid.len(),
                n_layers + 1,
                n,
                hidden
            )));
        }
        if let Some(mid) = &mid {
            let want = n_layers * n * hidden;
            if mid.len() != want {
                return Err(Error::Shape(format!(
                    "mid-block stream has {} values, expected {want}",
                    mid.len()
                )));
            }
        }
        let resid = by_position(&resid, n_layers + 1, n, hidden);
        let mid = mid.map(|m| by_position(&m, n_layers, n, hidden));
        Self::from_positions(info, tokens, resid, mid)
    }

    /// Validate and wrap per-position rows: `resid[position]` = `[layer][hidden]` for layers
    /// `0..=n_layers`, `mid[position]` = `[block - 1][hidden]`. Rows may be shared with other
    /// states (see [`HiddenStates::position_rows`]).
    pub fn from_positions(
        info: &ModelInfo,
        tokens: Vec<u32>,
        resid: Vec<Arc<[f32]>>,
        mid: Option<Vec<Arc<[f32]>>>,
    ) -> Result<Self, Error> {
        let (n_layers, hidden, n) = (info.n_layers, info.hidden_size, tokens.len());
        if n == 0 {
            return Err(Error::EmptyPrompt);
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab: info.vocab_size,
            });
        }
        let bad = |what: &str, rows: &[Arc<[f32]>], per: usize| {
            if rows.len() != n {
                return Some(format!("{what}: {} positions, expected {n}", rows.len()));
            }
            rows.iter().position(|r| r.len() != per).map(|p| {
                format!(
                    "{what}: position {p} has {} values, expected {per}",
                    rows[p].len()
                )
            })
        };
        if let Some(m) = bad("residual stream", &resid, (n_layers + 1) * hidden) {
            return Err(Error::Shape(m));
        }
        if let Some(m) = mid
            .as_ref()
            .and_then(|m| bad("mid-block stream", m, n_layers * hidden))
        {
            return Err(Error::Shape(m));
        }
        Ok(HiddenStates {
            n_layers,
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
        self.tokens.len()
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

    /// The per-position rows (layer boundaries), for a backend that extends this prompt.
    pub fn position_rows(&self) -> &[Arc<[f32]>] {
        &self.resid
    }

    /// The per-position mid-block rows, when captured.
    pub fn mid_position_rows(&self) -> Option<&[Arc<[f32]>]> {
        self.mid.as_deref()
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
        if !self.contains(site) {
            return None;
        }
        let (rows, index) = match site {
            Site::Layer(l) => (&self.resid, l),
            Site::MidBlock(b) => (self.mid.as_ref()?, b - 1),
        };
        let start = index * self.hidden;
        rows.get(position)?.get(start..start + self.hidden)
    }

    /// Bytes held by the captured activations (not counting backend state). Rows shared with
    /// other states count in full here, so a sum over states is an upper bound.
    pub fn activation_bytes(&self) -> usize {
        let rows = |v: &[Arc<[f32]>]| v.iter().map(|r| r.len()).sum::<usize>();
        (rows(&self.resid) + self.mid.as_deref().map_or(0, rows)) * std::mem::size_of::<f32>()
    }
}
