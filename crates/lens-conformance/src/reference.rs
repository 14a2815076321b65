//! A tiny model in plain Rust whose every number can be checked by hand: the backend the
//! suite is tested on, and a template for what a backend must do.
//!
//! - Vocabulary: the 12 words of [`VOCAB`]. A prompt is split at whitespace; each word is one
//!   token covering exactly its bytes, a word outside the list is `<unk>` (id 0).
//! - Layer 0: `h = EMBED[token]` (hidden size 4).
//! - Block `b` (1..=3), at position `t`: `mid_t = h_t + MIX[b]·mean(h_0..=h_t)` (a causal mean:
//!   the "attention", captured as the mid-block row), then
//!   `out_t = mid_t + BLOCK_W[b]·rmsnorm(mid_t)` (the "MLP").
//! - Norm lens: `UNEMBED · (NORM_W ⊙ rmsnorm(h))`; raw lens: `UNEMBED · h`;
//!   `rmsnorm(x) = x / sqrt(mean(x²) + EPS)`. All arithmetic is f32.
//!
//! `"big"` and `"large"` share their unembedding row, so their logits always tie: top-k must
//! list `"big"` (the lower id) first. `tests/data/make_reference_golden.py` is an independent
//! implementation of the same model that wrote the goldens the suite compares it with.
//!
//! The per-prompt state (its "KV cache") is the running sum of each block's input, per
//! position: [`Backend::forward_reusing`] takes the sums at the last shared position and
//! computes only the positions after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use lens_core::{
    host_generate, host_lens, Backend, Capabilities, CaptureOptions, Cell, Device, Error, Finish,
    GenerateRequest, Generator, HiddenStates, LensKind, LensRequest, LoadOptions, Loader,
    ModelInfo, NextToken, PositionView, Precision, Prediction, Site, Source, SourceKind, Step,
    Stop, Token,
};

pub const VOCAB: [&str; 12] = [
    "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "big", "large",
];
pub const HIDDEN: usize = 4;
pub const N_BLOCKS: usize = 3;
pub const EPS: f32 = 1e-5;
/// Tokens a prompt may have (large, so that a long prompt takes measurable time to run).
pub const CONTEXT: usize = 1 << 20;

pub const EMBED: [[f32; HIDDEN]; 12] = [
    [0.2, -0.1, -0.1, 0.1],
    [0.0, -0.7, -0.5, -0.8],
    [0.5, -0.7, 0.9, 0.4],
    [0.1, 0.9, 0.2, -0.8],
    [0.1, -0.4, -0.1, -0.7],
    [0.8, -0.5, 0.8, 0.2],
    [-0.6, -0.2, 0.3, -0.6],
    [-0.5, 0.7, -0.6, 0.9],
    [0.6, -1.0, -0.7, 0.9],
    [-0.7, 0.4, -0.4, 0.6],
    [0.7, 0.9, 1.0, -0.5],
    [-0.3, 0.1, -1.0, 1.0],
];
/// Weight of the causal mean in each block.
pub const MIX: [f32; N_BLOCKS] = [0.5, -0.25, 0.5];
pub const BLOCK_W: [[[f32; HIDDEN]; HIDDEN]; N_BLOCKS] = [
    [
        [0.4, 0.3, 0.3, 0.6],
        [-0.3, -0.3, -0.4, -0.5],
        [-0.3, 0.2, 0.5, 0.5],
        [0.6, 0.2, 0.2, -0.3],
    ],
    [
        [0.2, 0.4, 0.4, 0.3],
        [-0.5, 0.3, 0.5, 0.2],
        [0.2, 0.2, -0.6, 0.4],
        [-0.6, 0.6, -0.3, -0.5],
    ],
    [
        [0.3, 0.4, 0.1, -0.6],
        [-0.1, 0.4, 0.3, 0.3],
        [-0.2, -0.6, -0.2, -0.5],
        [0.5, 0.3, -0.2, -0.4],
    ],
];
pub const NORM_W: [f32; HIDDEN] = [1.2, 0.8, 1.5, 1.0];
pub const UNEMBED: [[f32; HIDDEN]; 12] = [
    [-0.1, 0.8, 0.6, 0.7],
    [0.7, 0.1, -1.5, 1.2],
    [1.5, -1.1, 0.8, 0.2],
    [-1.1, 1.4, -1.5, 0.8],
    [0.3, -0.6, -0.9, 1.2],
    [-0.8, 1.1, -1.5, -1.4],
    [0.3, 0.9, 0.8, 1.5],
    [-1.4, 0.4, 1.3, -1.4],
    [-0.8, -0.8, -1.2, -0.2],
    [-1.2, 1.3, 0.8, -0.6],
    [-1.3, -1.0, 0.5, -0.6],
    [-1.3, -1.0, 0.5, -0.6],
];

/// Positions computed between two looks at a [`Stop`] within a layer.
const STOP_EVERY: usize = 1024;

type Row = [f32; HIDDEN];

fn dot(a: &Row, b: &Row) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2] + a[3] * b[3]
}

fn rmsnorm(x: &Row) -> Row {
    let r = (dot(x, x) / HIDDEN as f32 + EPS).sqrt();
    x.map(|v| v / r)
}

/// Block `b` (0-based) at position `t`, given the row entering it and the running sum of the
/// rows entering it at positions `0..=t`: (mid-block row, output row).
fn block(b: usize, h: &Row, sum: &Row, t: usize) -> (Row, Row) {
    let count = (t + 1) as f32;
    let mid: Row = std::array::from_fn(|j| h[j] + MIX[b] * (sum[j] / count));
    let n = rmsnorm(&mid);
    let out: Row = std::array::from_fn(|i| mid[i] + dot(&BLOCK_W[b][i], &n));
    (mid, out)
}

fn logits_of(h: &Row, kind: LensKind, out: &mut Vec<f32>) {
    let x = match kind {
        LensKind::Norm | LensKind::Tuned => {
            let n = rmsnorm(h);
            std::array::from_fn(|j| NORM_W[j] * n[j])
        }
        LensKind::Raw => *h,
    };
    out.extend(UNEMBED.iter().map(|u| dot(u, &x)));
}

/// How [`Backend::lens`] reduces rows to cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduce {
    /// The default: [`lens_core::host_lens`].
    #[default]
    Host,
    /// Its own f64 implementation, as a backend that reduces on its device would have.
    Device,
    /// [`Reduce::Device`] with one deliberate mistake, to show the suite catches it.
    Flawed(Flaw),
}

/// Mistakes a device-side reduce can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// Equal logits ranked with the higher id first.
    TiesToHigherId,
    /// The entropy off by 1e-4 nats.
    EntropyOff,
    /// `final_top1_prob` taken from the cell's own top-1 rather than the model's.
    FinalTop1ProbOfCellTop1,
}

/// The per-prompt state kept with the hidden states: the tokens and, per position and block,
/// the sum of the rows entering the block at positions `0..=t`.
struct State {
    tokens: Vec<u32>,
    sums: Vec<[Row; N_BLOCKS]>,
}

impl State {
    fn bytes(&self) -> usize {
        self.tokens.len() * std::mem::size_of::<u32>()
            + self.sums.len() * std::mem::size_of::<[Row; N_BLOCKS]>()
    }
}

/// The reference model (see the module documentation).
pub struct ReferenceBackend {
    info: ModelInfo,
    reduce: Reduce,
    computed: AtomicUsize,
}

impl Default for ReferenceBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl ReferenceBackend {
    pub fn new() -> Self {
        Self::with_reduce(Reduce::Host)
    }

    pub fn with_reduce(reduce: Reduce) -> Self {
        ReferenceBackend {
            info: ModelInfo {
                name: "reference".into(),
                architecture: "reference".into(),
                n_layers: N_BLOCKS,
                hidden_size: HIDDEN,
                vocab_size: VOCAB.len(),
                context_length: CONTEXT,
                precision: "f32".into(),
            },
            reduce,
            computed: AtomicUsize::new(0),
        }
    }

    /// (position, block) steps computed since this backend was made: shows what
    /// [`Backend::forward_reusing`] actually recomputed.
    pub fn blocks_computed(&self) -> usize {
        self.computed.load(Ordering::Relaxed)
    }

    /// The id of a word (`<unk>` for one outside the vocabulary).
    pub fn id_of(word: &str) -> u32 {
        VOCAB.iter().position(|w| *w == word).unwrap_or(0) as u32
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), Error> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if tokens.len() > CONTEXT {
            return Err(Error::PromptTooLong {
                tokens: tokens.len(),
                context: CONTEXT,
            });
        }
        match tokens.iter().find(|&&id| id as usize >= VOCAB.len()) {
            Some(&id) => Err(Error::TokenOutOfRange {
                id,
                vocab: VOCAB.len(),
            }),
            None => Ok(()),
        }
    }

    /// Run `tokens`, computing positions from `keep` on: the first `keep` positions' rows and
    /// sums come from `from` (states and their state), or there are none (`keep` = 0).
    fn run(
        &self,
        tokens: &[u32],
        from: Option<(&HiddenStates, &State, usize)>,
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, Error> {
        self.check_tokens(tokens)?;
        stop.check()?;
        let keep = from.map_or(0, |(_, _, k)| k);
        let new = &tokens[keep..];
        let mut resid: Vec<Vec<f32>> = new
            .iter()
            .map(|&id| {
                let mut v = Vec::with_capacity((N_BLOCKS + 1) * HIDDEN);
                v.extend_from_slice(&EMBED[id as usize]);
                v
            })
            .collect();
        let mut mid: Option<Vec<Vec<f32>>> = options
            .mid_block
            .then(|| vec![Vec::with_capacity(N_BLOCKS * HIDDEN); new.len()]);
        let mut sums = vec![[[0f32; HIDDEN]; N_BLOCKS]; new.len()];
        for b in 0..N_BLOCKS {
            let mut sum = from.map_or([0.0; HIDDEN], |(_, s, k)| s.sums[k - 1][b]);
            for (i, row) in resid.iter_mut().enumerate() {
                if i % STOP_EVERY == 0 {
                    stop.check()?;
                }
                let h: Row = std::array::from_fn(|j| row[b * HIDDEN + j]);
                for (s, v) in sum.iter_mut().zip(h) {
                    *s += v;
                }
                sums[i][b] = sum;
                let (m, out) = block(b, &h, &sum, keep + i);
                if let Some(mid) = &mut mid {
                    mid[i].extend_from_slice(&m);
                }
                row.extend_from_slice(&out);
            }
            self.computed.fetch_add(new.len(), Ordering::Relaxed);
        }
        stop.check()?;
        // The shared positions' rows are the prefix's own, not copies.
        let join = |old: Option<&[Arc<[f32]>]>, new: Vec<Vec<f32>>| {
            let mut all: Vec<Arc<[f32]>> = Vec::with_capacity(tokens.len());
            all.extend_from_slice(&old.unwrap_or(&[])[..keep]);
            all.extend(new.into_iter().map(Arc::from));
            all
        };
        let prefix = from.map(|(p, _, _)| p);
        let resid = join(prefix.map(HiddenStates::position_rows), resid);
        let mid = mid.map(|m| join(prefix.and_then(HiddenStates::mid_position_rows), m));
        let mut all_sums = from.map_or_else(Vec::new, |(_, s, k)| s.sums[..k].to_vec());
        all_sums.extend(sums);
        let state = State {
            tokens: tokens.to_vec(),
            sums: all_sums,
        };
        Ok(
            HiddenStates::from_positions(&self.info, tokens.to_vec(), resid, mid)?
                .with_backend_state(Arc::new(state)),
        )
    }

    fn run_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, Error> {
        self.check_tokens(tokens)?;
        let state = prefix
            .backend_state()
            .and_then(|s| s.downcast_ref::<State>());
        let Some(state) = state.filter(|_| !options.mid_block || prefix.has_mid_block()) else {
            return self.run(tokens, None, options, stop);
        };
        let common = state
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let n = tokens.len();
        if common == n {
            // A prefix of the cached prompt: its first positions, shared; nothing to compute.
            stop.check()?;
            let rows = prefix.position_rows()[..n].to_vec();
            let mid = match options.mid_block {
                true => prefix.mid_position_rows().map(|m| m[..n].to_vec()),
                false => None,
            };
            let state = State {
                tokens: tokens.to_vec(),
                sums: state.sums[..n].to_vec(),
            };
            return Ok(
                HiddenStates::from_positions(&self.info, tokens.to_vec(), rows, mid)?
                    .with_backend_state(Arc::new(state)),
            );
        }
        match common {
            0 => self.run(tokens, None, options, stop),
            keep => self.run(tokens, Some((prefix, state, keep)), options, stop),
        }
    }

    /// [`Backend::lens`] reduced here, in f64, without [`lens_core::math`].
    fn device_lens(
        &self,
        request: &LensRequest<'_>,
        stop: &Stop,
        flaw: Option<Flaw>,
    ) -> Result<Vec<PositionView>, Error> {
        let st = request.states;
        let last = Site::Layer(st.n_layers());
        let row = |site: Site, p: usize| {
            st.row(site, p).ok_or(Error::PositionOutOfRange {
                position: p,
                len: st.n_positions(),
            })
        };
        let mut views = Vec::with_capacity(request.positions.len());
        for &p in request.positions {
            stop.check()?;
            let output = Dist::new(self.readout_until(row(last, p)?, LensKind::Norm, stop)?);
            let final_id = output.top(1, flaw)[0];
            let next_id = st.tokens().get(p + 1).copied();
            let mut cells = Vec::with_capacity(request.sites.len());
            for &site in request.sites {
                let d = Dist::new(self.readout_until(row(site, p)?, request.kind, stop)?);
                let top: Vec<Prediction> = d
                    .top(request.top_k, flaw)
                    .into_iter()
                    .map(|id| d.prediction(id))
                    .collect();
                let final_top1_prob = match (flaw, top.first()) {
                    (Some(Flaw::FinalTop1ProbOfCellTop1), Some(t)) => t.prob,
                    _ => d.prob(final_id),
                };
                cells.push(Cell {
                    site,
                    entropy: d.entropy()
                        + match flaw {
                            Some(Flaw::EntropyOff) => 1e-4,
                            _ => 0.0,
                        },
                    kl_to_final: output.kl_to(&d),
                    next: next_id.map(|id| NextToken {
                        id,
                        rank: d.rank(id),
                        prob: d.prob(id),
                    }),
                    final_top1_rank: d.rank(final_id),
                    final_top1_prob,
                    top,
                });
            }
            let mut layers: Vec<&Cell> = cells
                .iter()
                .filter(|c| matches!(c.site, Site::Layer(_)))
                .collect();
            layers.sort_by_key(|c| std::cmp::Reverse(c.site));
            let decided_at = layers
                .iter()
                .take_while(|c| c.final_top1_rank == 0)
                .last()
                .and_then(|c| match c.site {
                    Site::Layer(l) => Some(l),
                    Site::MidBlock(_) => None,
                });
            views.push(PositionView {
                position: p,
                token: st.tokens()[p],
                final_top1: output.prediction(final_id),
                decided_at,
                cells,
            });
        }
        Ok(views)
    }
}

/// One row's distribution, in f64.
struct Dist {
    logits: Vec<f32>,
    log_p: Vec<f64>,
}

impl Dist {
    fn new(logits: Vec<f32>) -> Dist {
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let z: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
        let log_z = max + z.ln();
        let log_p = logits.iter().map(|&x| f64::from(x) - log_z).collect();
        Dist { logits, log_p }
    }

    fn prob(&self, id: u32) -> f32 {
        self.log_p[id as usize].exp() as f32
    }

    fn prediction(&self, id: u32) -> Prediction {
        Prediction {
            id,
            logit: self.logits[id as usize],
            prob: self.prob(id),
        }
    }

    /// The `k` largest logits' ids, ties to the lower id (unless flawed).
    fn top(&self, k: usize, flaw: Option<Flaw>) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..self.logits.len() as u32).collect();
        ids.sort_by(|&a, &b| {
            let by_logit = self.logits[b as usize].total_cmp(&self.logits[a as usize]);
            by_logit.then(match flaw {
                Some(Flaw::TiesToHigherId) => b.cmp(&a),
                _ => a.cmp(&b),
            })
        });
        ids.truncate(k);
        ids
    }

    fn rank(&self, id: u32) -> usize {
        let x = self.logits[id as usize];
        self.logits.iter().filter(|&&v| v > x).count()
    }

    fn entropy(&self) -> f64 {
        -self.log_p.iter().map(|&l| l.exp() * l).sum::<f64>()
    }

    /// `KL(self ‖ other)`.
    fn kl_to(&self, other: &Dist) -> f64 {
        let kl: f64 = self
            .log_p
            .iter()
            .zip(&other.log_p)
            .map(|(&q, &p)| q.exp() * (q - p))
            .sum();
        kl.max(0.0)
    }
}

impl Backend for ReferenceBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, Error> {
        let mut tokens = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
            match (start, c.is_whitespace()) {
                (None, false) => start = Some(i),
                (Some(s), true) => {
                    let id = Self::id_of(&text[s..i]);
                    tokens.push(Token {
                        id,
                        text: self.decode(id),
                        start: s,
                        end: i,
                    });
                    start = None;
                }
                _ => {}
            }
        }
        Ok(tokens)
    }

    fn decode(&self, id: u32) -> String {
        VOCAB
            .get(id as usize)
            .copied()
            .unwrap_or("<unk>")
            .to_string()
    }

    fn forward(&self, tokens: &[u32], options: CaptureOptions) -> Result<HiddenStates, Error> {
        self.run(tokens, None, options, &Stop::never())
    }

    fn forward_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, Error> {
        self.run_reusing(prefix, tokens, options, &Stop::never())
    }

    fn readout(&self, rows: &[f32], lens: LensKind) -> Result<Vec<f32>, Error> {
        self.readout_until(rows, lens, &Stop::never())
    }

    /// Looks at `stop` before each layer and every 1024 positions within one.
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, Error> {
        stop.check()?;
        match prefix {
            Some(prefix) => self.run_reusing(prefix, tokens, options, stop),
            None => self.run(tokens, None, options, stop),
        }
    }

    /// Looks at `stop` every 1024 rows.
    fn readout_until(&self, rows: &[f32], lens: LensKind, stop: &Stop) -> Result<Vec<f32>, Error> {
        if !rows.len().is_multiple_of(HIDDEN) {
            return Err(Error::Shape(format!(
                "{} values is not a whole number of rows of {HIDDEN}",
                rows.len()
            )));
        }
        let mut out = Vec::with_capacity(rows.len() / HIDDEN * VOCAB.len());
        for (i, row) in rows.chunks_exact(HIDDEN).enumerate() {
            if i % STOP_EVERY == 0 {
                stop.check()?;
            }
            logits_of(&std::array::from_fn(|j| row[j]), lens, &mut out);
        }
        Ok(out)
    }

    fn lens(&self, request: &LensRequest<'_>, stop: &Stop) -> Result<Vec<PositionView>, Error> {
        match self.reduce {
            Reduce::Host => host_lens(self, request, stop),
            Reduce::Device => self.device_lens(request, stop, None),
            Reduce::Flawed(flaw) => self.device_lens(request, stop, Some(flaw)),
        }
    }

    fn state_bytes(&self, states: &HiddenStates) -> usize {
        states
            .backend_state()
            .and_then(|s| s.downcast_ref::<State>())
            .map_or(0, State::bytes)
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

/// Generation by the host loop on the reference model; `<unk>` ends it.
impl Generator for ReferenceBackend {
    fn chat_prompt(&self, _text: &str) -> Result<Vec<u32>, Error> {
        Err(Error::Unsupported(
            "the reference model has no chat template".into(),
        ))
    }

    fn stop_tokens(&self) -> Vec<u32> {
        vec![0]
    }

    fn generate(
        &self,
        request: &GenerateRequest<'_>,
        stop: &Stop,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<(), Error>,
    ) -> Result<Finish, Error> {
        host_generate(self, request, &self.stop_tokens(), stop, on_step)
    }
}

/// The reference backend's loader: source `Named("reference")`, cpu, f32, one thread.
pub struct ReferenceLoader;

/// The loader a test registers.
pub static REFERENCE: ReferenceLoader = ReferenceLoader;

impl Loader for ReferenceLoader {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sources: vec![SourceKind::Named],
            devices: vec![Device::Cpu],
            precisions: vec![Precision::F32],
            architectures: vec!["reference"],
            isq: false,
        }
    }

    fn supports(&self, source: &Source, options: &LoadOptions) -> Result<(), Error> {
        if let Some(why) = self.capabilities().refuse(self.name(), source, options) {
            return Err(Error::Unsupported(why));
        }
        if let Source::Named(name) = source {
            if name != "reference" {
                return Err(Error::Unsupported(format!(
                    "the reference backend has no model `{name}`: it knows only `reference`"
                )));
            }
        }
        match options.threads {
            Some(n) if n != 1 => Err(Error::Unsupported(format!(
                "the reference backend runs on one thread, not {n}"
            ))),
            _ => Ok(()),
        }
    }

    fn load(&self, source: &Source, options: &LoadOptions) -> Result<Box<dyn Backend>, Error> {
        self.supports(source, options)?;
        Ok(Box::new(ReferenceBackend::new()))
    }
}
