//! The `--format json` report: a stable, documented schema (`docs/json-schema.md`).
//!
//! Schema `logit-lens/run/v1`. Fields are only ever added; a breaking change bumps the version.

use lens_core::{Backend, Cell, LensKind, PositionView, Site, Token};
use serde::Serialize;

pub const SCHEMA: &str = "logit-lens/run/v1";

#[derive(Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub model: ModelJson,
    pub lens: &'static str,
    pub top_k: usize,
    pub tokens: Vec<TokenJson>,
    /// Lens layers included, ascending (0 = embeddings, N = last block).
    pub layers: Vec<usize>,
    /// One entry per analysed position, ascending.
    pub positions: Vec<PositionJson>,
}

#[derive(Serialize)]
pub struct ModelJson {
    pub name: String,
    pub architecture: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub precision: String,
}

#[derive(Serialize)]
pub struct TokenJson {
    pub index: usize,
    pub id: u32,
    pub text: String,
    /// Byte offsets into the prompt (UTF-8), end exclusive.
    pub start: usize,
    pub end: usize,
}

#[derive(Serialize)]
pub struct PositionJson {
    pub position: usize,
    pub token_id: u32,
    /// The prompt's next token, `null` at the last position.
    pub next_token_id: Option<u32>,
    /// The model's own prediction here (norm lens at the last layer).
    pub final_top1: PredictionJson,
    /// First layer from which the final top-1 stays top-1 through the last layer.
    pub decided_at: Option<usize>,
    /// One cell per entry of `layers`, in the same order.
    pub cells: Vec<CellJson>,
}

#[derive(Serialize)]
pub struct PredictionJson {
    pub id: u32,
    pub text: String,
    pub prob: f32,
    pub logit: f32,
}

#[derive(Serialize)]
pub struct CellJson {
    pub layer: usize,
    pub top: Vec<PredictionJson>,
    /// Nats.
    pub entropy: f64,
    /// KL(model output ‖ this layer), nats.
    pub kl_to_final: f64,
    /// Rank (0-based) and probability of the prompt's next token; `null` at the last position.
    pub next: Option<NextJson>,
    /// Rank of the final top-1 token in this layer.
    pub final_top1_rank: usize,
}

#[derive(Serialize)]
pub struct NextJson {
    pub id: u32,
    pub rank: usize,
    pub prob: f32,
}

pub fn build(
    backend: &dyn Backend,
    tokens: &[Token],
    views: &[PositionView],
    lens: LensKind,
    top_k: usize,
    layers: &[usize],
) -> Report {
    let info = backend.info();
    let pred = |id: u32, logit: f32, prob: f32| PredictionJson { id, text: backend.decode(id), prob, logit };
    let cell = |c: &Cell| CellJson {
        layer: match c.site {
            Site::Layer(l) | Site::MidBlock(l) => l,
        },
        top: c.top.iter().map(|p| pred(p.id, p.logit, p.prob)).collect(),
        entropy: c.entropy,
        kl_to_final: c.kl_to_final,
        next: c.next.map(|n| NextJson { id: n.id, rank: n.rank, prob: n.prob }),
        final_top1_rank: c.final_top1_rank,
    };
    Report {
        schema: SCHEMA,
        model: ModelJson {
            name: info.name.clone(),
            architecture: info.architecture.clone(),
            n_layers: info.n_layers,
            hidden_size: info.hidden_size,
            vocab_size: info.vocab_size,
            context_length: info.context_length,
            precision: info.precision.clone(),
        },
        lens: lens.as_str(),
        top_k,
        tokens: tokens
            .iter()
            .enumerate()
            .map(|(index, t)| TokenJson { index, id: t.id, text: t.text.clone(), start: t.start, end: t.end })
            .collect(),
        layers: layers.to_vec(),
        positions: views
            .iter()
            .map(|v| PositionJson {
                position: v.position,
                token_id: v.token,
                next_token_id: tokens.get(v.position + 1).map(|t| t.id),
                final_top1: pred(v.final_top1.id, v.final_top1.logit, v.final_top1.prob),
                decided_at: v.decided_at,
                cells: v.cells.iter().map(cell).collect(),
            })
            .collect(),
    }
}
