//! A pipeline stage: the model's blocks `a..b` run on residual rows, for a lens spread over
//! several processes (`lens-mpi`). A stage is the same [`Model`] as a whole model, holding only
//! its blocks (and the embeddings only on the first stage); its forward is the one forward pass
//! ([`Model::forward_from`]) started from rows instead of token ids. The final norm and the
//! unembedding are kept on every stage, so each reads the lens of its own layers where their
//! rows are ([`Backend::readout`]).

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use lens_core::{Backend, CaptureOptions, HiddenStates, LensKind, ModelInfo, Stop, Token};

use crate::model::{Input, Model};
use crate::tokenizer::ModelTokenizer;
use crate::{CandleBackend, Error, Precision};

/// What a stage starts from: token ids (the first stage) or the previous stage's rows.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    Tokens(&'a [u32]),
    /// `[t][hidden]`, row-major.
    Rows(&'a [f32]),
}

/// What a stage computed for its new positions.
#[derive(Debug)]
pub struct StageRun {
    /// Per new position, `[layer][hidden]` for the stage's layers `a..=b`: its input row (layer
    /// `a`), then the row after each of its blocks. The last row is the next stage's input.
    pub rows: Vec<Arc<[f32]>>,
    /// Per new position, the keys and values of the stage's blocks (opaque: hand them back as
    /// `past` to extend the prompt).
    pub kv: Vec<Arc<[f32]>>,
}

/// Blocks `blocks` of a model, with its final norm, unembedding and tokenizer.
pub struct Stage {
    info: ModelInfo,
    model: Model,
    tokenizer: ModelTokenizer,
    blocks: Range<usize>,
}

impl Stage {
    /// Load the model at `path` and keep stage `index` of `stages`: a contiguous range of
    /// blocks, the ranges balanced by the bytes of their weights (the embeddings count on the
    /// first stage). Every stage of the same file and count computes the same split.
    pub fn load(
        path: &Path,
        precision: Precision,
        stages: usize,
        index: usize,
    ) -> Result<Stage, Error> {
        let CandleBackend {
            info,
            mut model,
            tokenizer,
        } = CandleBackend::load(path, precision)?;
        let costs: Vec<usize> = model.blocks.iter().map(|b| b.bytes()).collect();
        let split = split_blocks(&costs, model.embed_bytes(), stages).ok_or_else(|| {
            Error::Option(format!(
                "{stages} pipeline stages for a model of {} blocks: each stage needs a block",
                costs.len()
            ))
        })?;
        let blocks = split
            .get(index)
            .cloned()
            .ok_or_else(|| Error::Option(format!("stage {index} of {stages} does not exist")))?;
        model.keep_blocks(blocks.clone())?;
        tracing::info!(?blocks, stages, index, "pipeline stage loaded");
        Ok(Stage {
            info,
            model,
            tokenizer,
            blocks,
        })
    }

    /// The blocks this stage runs (0-based; its layers are `start..=end`, layer `l` being the
    /// residual stream after block `l - 1`).
    pub fn blocks(&self) -> Range<usize> {
        self.blocks.clone()
    }

    /// Run the stage's blocks on `input`, the positions after `past` (the `kv` of earlier
    /// runs of this stage for the same prompt's first positions). Stops between blocks.
    pub fn run(
        &self,
        input: StageInput<'_>,
        past: &[Arc<[f32]>],
        stop: &Stop,
    ) -> Result<StageRun, lens_core::Error> {
        stop.check()?;
        let input = match input {
            StageInput::Tokens(ids) => {
                if self.blocks.start != 0 {
                    return Err(lens_core::Error::Backend(format!(
                        "the stage of blocks {:?} does not hold the embeddings",
                        self.blocks
                    )));
                }
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    return Err(lens_core::Error::TokenOutOfRange {
                        id,
                        vocab: self.info.vocab_size,
                    });
                }
                Input::Tokens(ids)
            }
            StageInput::Rows(rows) => Input::Rows(rows),
        };
        let capture = lens_core::in_pool(|| self.model.forward_from(input, past, false, stop))?;
        Ok(StageRun {
            rows: capture.resid,
            kv: capture.kv,
        })
    }
}

/// A stage reads the lens of the rows it holds: [`Backend::readout`] (and so
/// [`lens_core::host_lens`]) work on it; it cannot run a whole forward pass.
impl Backend for Stage {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, lens_core::Error> {
        self.tokenizer.tokenize(text)
    }

    fn decode(&self, id: u32) -> String {
        self.tokenizer.decode(id)
    }

    fn forward(&self, _: &[u32], _: CaptureOptions) -> Result<HiddenStates, lens_core::Error> {
        Err(lens_core::Error::Unsupported(format!(
            "a pipeline stage runs blocks {:?} on rows (Stage::run), not a whole forward pass",
            self.blocks
        )))
    }

    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, lens_core::Error> {
        self.readout_until(rows, lens, &Stop::never())
    }

    fn readout_until(
        &self,
        rows: &[f32],
        lens: LensKind,
        stop: &Stop,
    ) -> Result<Vec<f32>, lens_core::Error> {
        crate::readout(&self.model, &self.info, rows, lens, stop)
    }
}

/// Split blocks of `costs` bytes into `stages` contiguous non-empty ranges minimising the
/// largest stage (`first_extra`, the embeddings, counts on the first). `None` when there are
/// fewer blocks than stages (or no stage).
pub fn split_blocks(
    costs: &[usize],
    first_extra: usize,
    stages: usize,
) -> Option<Vec<Range<usize>>> {
    let n = costs.len();
    if stages == 0 || stages > n {
        return None;
    }
    let mut prefix = vec![0usize; n + 1];
    for (i, c) in costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    let cost =
        |s: usize, a: usize, b: usize| prefix[b] - prefix[a] + if s == 0 { first_extra } else { 0 };
    // best[s][i]: the smallest largest stage when stages 0..=s hold blocks 0..i; from[s][i]
    // where stage s starts.
    let mut best = vec![vec![usize::MAX; n + 1]; stages];
    let mut from = vec![vec![0usize; n + 1]; stages];
    for (i, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = cost(0, 0, i);
    }
    for s in 1..stages {
        for i in s + 1..=n {
            for j in s..i {
                let m = best[s - 1][j].max(cost(s, j, i));
                if m < best[s][i] {
                    best[s][i] = m;
                    from[s][i] = j;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(stages);
    let mut end = n;
    for s in (0..stages).rev() {
        let start = if s == 0 { 0 } else { from[s][end] };
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    Some(ranges)
}

#[cfg(test)]
mod tests {
    use super::split_blocks;

    #[track_caller]
    fn check(costs: &[usize], first_extra: usize, stages: usize, expect: &str) {
        assert_eq!(
            format!("{:?}", split_blocks(costs, first_extra, stages)),
            expect
        );
    }

    #[test]
    fn splits_balance_bytes_with_the_embeddings_on_the_first_stage() {
        check(&[1, 1, 1, 1], 0, 2, "Some([0..2, 2..4])");
        check(&[1, 1, 1, 1], 2, 2, "Some([0..1, 1..4])");
        check(&[5, 1, 1, 1, 1, 1], 0, 2, "Some([0..1, 1..6])");
        check(&[1, 1, 1], 0, 3, "Some([0..1, 1..2, 2..3])");
        check(&[1, 1, 1], 0, 1, "Some([0..3])");
        check(&[1, 1], 0, 3, "None");
        check(&[1, 1], 0, 0, "None");
    }
}
