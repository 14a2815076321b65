//! The wire types: the `--format json` report (a stable, documented schema,
//! `docs/json-schema.md`), shared by the CLI's `run --format json` and the daemon's
//! `lens/analyze`, so both print the same bytes for the same request.
//!
//! Schema `logit-lens/run/v1`. Fields are only ever added; a breaking change bumps the version.
//!
//! Probabilities and logits are `f32`; they are written with the shortest decimal that
//! round-trips the `f32` (as `ryu` does for `f32`), also when the report goes through a
//! `serde_json::Value` (which holds `f64`): see [`f32_shortest`].

use lens_core::{Answer, Backend, Cell, Diff, ModelInfo, Site, Token};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

pub const SCHEMA: &str = "logit-lens/run/v1";

#[derive(Serialize, Clone, Debug)]
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

/// The model as the report and `lens/modelInfo` write it: [`ModelInfo`]'s fields, by name.
#[derive(Clone, Debug)]
pub struct ModelJson(pub ModelInfo);

impl Serialize for ModelJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let i = &self.0;
        let mut m = s.serialize_struct("Model", 7)?;
        m.serialize_field("name", &i.name)?;
        m.serialize_field("architecture", &i.architecture)?;
        m.serialize_field("n_layers", &i.n_layers)?;
        m.serialize_field("hidden_size", &i.hidden_size)?;
        m.serialize_field("vocab_size", &i.vocab_size)?;
        m.serialize_field("context_length", &i.context_length)?;
        m.serialize_field("precision", &i.precision)?;
        m.end()
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct TokenJson {
    pub index: usize,
    pub id: u32,
    pub text: String,
    /// Byte offsets into the prompt (UTF-8), end exclusive.
    pub start: usize,
    pub end: usize,
}

#[derive(Serialize, Clone, Debug)]
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

#[derive(Serialize, Clone, Debug)]
pub struct PredictionJson {
    pub id: u32,
    pub text: String,
    #[serde(serialize_with = "f32_shortest")]
    pub prob: f32,
    #[serde(serialize_with = "f32_shortest")]
    pub logit: f32,
}

#[derive(Serialize, Clone, Debug)]
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

#[derive(Serialize, Clone, Debug)]
pub struct NextJson {
    pub id: u32,
    pub rank: usize,
    #[serde(serialize_with = "f32_shortest")]
    pub prob: f32,
}

/// The report of a query's answer over the tokenized prompt.
pub fn build(backend: &dyn Backend, tokens: &[Token], answer: &Answer) -> Report {
    let pred = |id: u32, logit: f32, prob: f32| PredictionJson {
        id,
        text: backend.decode(id),
        prob,
        logit,
    };
    let cell = |c: &Cell| CellJson {
        layer: match c.site {
            Site::Layer(l) | Site::MidBlock(l) => l,
        },
        top: c.top.iter().map(|p| pred(p.id, p.logit, p.prob)).collect(),
        entropy: c.entropy,
        kl_to_final: c.kl_to_final,
        next: c.next.map(|n| NextJson {
            id: n.id,
            rank: n.rank,
            prob: n.prob,
        }),
        final_top1_rank: c.final_top1_rank,
    };
    Report {
        schema: SCHEMA,
        model: model_json(backend),
        lens: answer.kind.as_str(),
        top_k: answer.top_k,
        tokens: token_json(tokens),
        layers: answer.layers.clone(),
        positions: answer
            .views
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

pub const DIFF_SCHEMA: &str = "logit-lens/diff/v1";

/// The diff lens of two texts (`logit-lens diff --format json`, `lens/diff`).
#[derive(Serialize, Clone, Debug)]
pub struct DiffReport {
    pub schema: &'static str,
    pub model: ModelJson,
    pub lens: &'static str,
    pub top_k: usize,
    pub layers: Vec<usize>,
    pub before: Vec<TokenJson>,
    pub after: Vec<TokenJson>,
    pub alignment: AlignmentJson,
    /// One entry per compared pair of positions, in order.
    pub pairs: Vec<PairJson>,
}

#[derive(Serialize, Clone, Debug)]
pub struct AlignmentJson {
    /// Tokens shared at the start.
    pub prefix: usize,
    /// Tokens shared at the end (never overlapping the prefix).
    pub suffix: usize,
    /// The changed span of each version, `[start, end)` token indices.
    pub before_changed: [usize; 2],
    pub after_changed: [usize; 2],
}

#[derive(Serialize, Clone, Debug)]
pub struct PairJson {
    /// Token indices in each version.
    pub before: usize,
    pub after: usize,
    /// `prefix`, `changed` (a same-length changed span, paired in order) or `suffix`.
    pub part: &'static str,
    pub before_token_id: u32,
    pub after_token_id: u32,
    /// One per entry of `layers`.
    pub cells: Vec<DiffCellJson>,
}

#[derive(Serialize, Clone, Debug)]
pub struct DiffCellJson {
    pub layer: usize,
    /// KL(before ‖ after), nats.
    pub kl: f64,
    pub top1_changed: bool,
    pub before: Vec<PredictionJson>,
    pub after: Vec<PredictionJson>,
    /// Every token of either top-k (the after version's first) with its probability in both.
    pub changes: Vec<ChangeJson>,
}

#[derive(Serialize, Clone, Debug)]
pub struct ChangeJson {
    pub id: u32,
    pub text: String,
    #[serde(serialize_with = "f32_shortest")]
    pub before: f32,
    #[serde(serialize_with = "f32_shortest")]
    pub after: f32,
}

/// The report of a diff over both tokenized versions.
pub fn build_diff(
    backend: &dyn Backend,
    before: &[Token],
    after: &[Token],
    diff: &Diff,
) -> DiffReport {
    let preds = |top: &[lens_core::Prediction]| -> Vec<PredictionJson> {
        top.iter()
            .map(|p| PredictionJson {
                id: p.id,
                text: backend.decode(p.id),
                prob: p.prob,
                logit: p.logit,
            })
            .collect()
    };
    let al = &diff.alignment;
    let span = |r: std::ops::Range<usize>| [r.start, r.end];
    DiffReport {
        schema: DIFF_SCHEMA,
        model: model_json(backend),
        lens: diff.kind.as_str(),
        top_k: diff.top_k,
        layers: diff.layers.clone(),
        before: token_json(before),
        after: token_json(after),
        alignment: AlignmentJson {
            prefix: al.prefix,
            suffix: al.suffix,
            before_changed: span(al.before_changed()),
            after_changed: span(al.after_changed()),
        },
        pairs: diff
            .pairs
            .iter()
            .map(|p| PairJson {
                before: p.pair.before,
                after: p.pair.after,
                part: p.pair.part.as_str(),
                before_token_id: p.before_token,
                after_token_id: p.after_token,
                cells: p
                    .cells
                    .iter()
                    .map(|c| DiffCellJson {
                        layer: c.layer,
                        kl: c.kl,
                        top1_changed: c.top1_changed,
                        before: preds(&c.before),
                        after: preds(&c.after),
                        changes: c
                            .changes
                            .iter()
                            .map(|ch| ChangeJson {
                                id: ch.id,
                                text: backend.decode(ch.id),
                                before: ch.before,
                                after: ch.after,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// One generated token and its lens: a line of `logit-lens generate --format jsonl` and the
/// params of the daemon's `lens/generateStep` notification (schema in docs/protocol.md).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateStepJson {
    /// 0-based index among the generated tokens.
    pub step: usize,
    pub token: u32,
    pub text: String,
    /// The first shown layer whose top-1 is the chosen token, and its probability there.
    pub first_top1_layer: Option<usize>,
    #[serde(serialize_with = "opt_f32_shortest")]
    pub first_top1_prob: Option<f32>,
    pub layers: Vec<GenerateLayerJson>,
    /// On the last step: `"length"`, `"stop"` (a stop token) or `"context"`.
    pub finish: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateLayerJson {
    pub layer: usize,
    pub top1: u32,
    pub top1_text: String,
    #[serde(serialize_with = "f32_shortest")]
    pub top1_prob: f32,
    /// The chosen token's probability and rank (0 = top-1) at this layer.
    #[serde(serialize_with = "f32_shortest")]
    pub token_prob: f32,
    pub token_rank: usize,
}

/// The lens of one generation step at `layers` (norm lens, the step's last position).
pub fn generate_step(
    backend: &dyn Backend,
    step: &lens_core::Step<'_>,
    layers: &[usize],
) -> Result<GenerateStepJson, lens_core::Error> {
    let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
    let lens = lens_core::Lens::new(backend, step.states, lens_core::LensKind::Norm, 1);
    let last = step.states.n_positions().saturating_sub(1);
    let (view, logits) = lens.position_with_logits(last, &sites)?;
    let mut rows = Vec::with_capacity(layers.len());
    let mut first = None;
    for (i, (cell, &layer)) in view.cells.iter().zip(layers).enumerate() {
        let top = cell
            .top
            .first()
            .ok_or_else(|| lens_core::Error::Shape("an empty cell".into()))?;
        let (prob, rank) = logits
            .prob_and_rank(i, step.token)
            .unwrap_or((0.0, usize::MAX));
        if first.is_none() && top.id == step.token {
            first = Some((layer, prob));
        }
        rows.push(GenerateLayerJson {
            layer,
            top1: top.id,
            top1_text: backend.decode(top.id),
            top1_prob: top.prob,
            token_prob: prob,
            token_rank: rank,
        });
    }
    Ok(GenerateStepJson {
        step: step.index,
        token: step.token,
        text: backend.decode(step.token),
        first_top1_layer: first.map(|f| f.0),
        first_top1_prob: first.map(|f| f.1),
        layers: rows,
        finish: None,
    })
}

impl GenerateStepJson {
    /// Mark the step that ends generation: the `max_tokens`-th, or a stop token. (A prompt
    /// that reaches the context ends without a marked step; the stream's end says so.)
    pub fn with_finish(mut self, max_tokens: usize, stop_tokens: &[u32]) -> Self {
        self.finish = match (
            stop_tokens.contains(&self.token),
            self.step + 1 >= max_tokens,
        ) {
            (true, _) => Some("stop"),
            (false, true) => Some("length"),
            (false, false) => None,
        };
        self
    }
}

fn opt_f32_shortest<S: Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => f32_shortest(v, s),
        None => s.serialize_none(),
    }
}

/// Write an `f32` as the `f64` with the same shortest decimal digits, so a report printed
/// directly and one that went through `serde_json::Value` (an `f64` inside) print alike:
/// `0.1f32` is written `0.1`, never `0.10000000149011612`.
pub fn f32_shortest<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(lens_core::math::shortest(*v))
}

/// One token of a tokenized text (`lens/tokenize`, and the report's `tokens`).
pub fn token_json(tokens: &[Token]) -> Vec<TokenJson> {
    tokens
        .iter()
        .enumerate()
        .map(|(index, t)| TokenJson {
            index,
            id: t.id,
            text: t.text.clone(),
            start: t.start,
            end: t.end,
        })
        .collect()
}

pub fn model_json(backend: &dyn Backend) -> ModelJson {
    ModelJson(backend.info().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(v: f32, expect: &str) {
        #[derive(Serialize)]
        struct W(#[serde(serialize_with = "f32_shortest")] f32);
        let direct = serde_json::to_string(&W(v)).expect("serialize");
        let via_value = serde_json::to_string(&serde_json::to_value(W(v)).expect("to value"))
            .expect("serialize");
        assert_eq!(direct, expect);
        assert_eq!(via_value, expect);
    }

    #[test]
    fn f32_is_written_with_its_shortest_digits() {
        check(0.1, "0.1");
        check(0.92, "0.92");
        check(1.0, "1.0");
        check(-13.37, "-13.37");
        check(1.2e-7, "1.2e-7");
        check(3.4028235e38, "3.4028235e+38");
        check(f32::NAN, "null");
    }
}
