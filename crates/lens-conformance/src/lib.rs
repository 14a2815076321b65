//! The conformance suite every lens backend's tests run, and a tiny reference backend.
//!
//! A backend's tests name their loader and options in a [`Subject`] and call the checks with
//! the models and goldens they have; each check panics with a clear message on failure and
//! returns what it measured. [`all`] runs every check for one model.
//!
//! - [`oracle_goldens`] / [`check_golden`]: the lens against golden files of an independent
//!   implementation ([`oracle`]).
//! - [`tokenization`]: token ids equal the golden's; offsets in order, on character
//!   boundaries, covering the text.
//! - [`prefix_reuse`]: `forward_reusing` equals a fresh forward.
//! - [`mid_block`]: mid-block capture is present, complete and consistent.
//! - [`stop_between_layers`]: a raised [`lens_core::Stop`] ends the work soon; one never raised
//!   changes nothing.
//! - [`reduce_matches_host`]: `Backend::lens` equals the core's host math.
//! - [`bad_inputs`]: bad prompts, positions, layers and rows are errors of the right kind.
//! - [`registry`]: a `Registry` picks the loader, and refuses what it does not offer.
//! - [`generation`]: a backend that generates picks the final layer's argmax at temperature 0,
//!   one token's forward per step equal to a fresh forward, and honours a stop.
//!
//! [`ReferenceBackend`] is a 12-word, 3-block model whose numbers can be checked by hand; the
//! suite's own tests run it through every check.

// Test support: failures are panics, measurements go to stderr.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod checks;
mod generation;
pub mod oracle;
mod reference;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lens_core::{Backend, LensKind, LoadOptions, Loader, Source};

pub use checks::{
    assert_bit_identical, assert_states_close, bad_inputs, check_offsets, ids, mid_block,
    prefix_reuse, reduce_matches_host, registry, stop_between_layers, tokenization, StopTimings,
    REDUCE_BOUND, REUSE_BOUND,
};
pub use generation::{generation, Generated};
pub use oracle::{check_golden, oracle_goldens, Deviations, Tolerance, F32, F32_RAW};
pub use reference::{
    Flaw, Reduce, ReferenceBackend, ReferenceLoader, BLOCK_W, CONTEXT, EMBED, EPS, HIDDEN, MIX,
    NORM_W, N_BLOCKS, REFERENCE, UNEMBED, VOCAB,
};

/// A backend under test: its loader and the options it is loaded with.
#[derive(Clone, Copy)]
pub struct Subject {
    pub loader: &'static dyn Loader,
    pub options: LoadOptions,
}

type Slot = Arc<OnceLock<Arc<dyn Backend>>>;

/// Models loaded so far in this process, by loader name, source and options.
static MODELS: Mutex<Vec<(&'static str, Source, LoadOptions, Slot)>> = Mutex::new(Vec::new());

impl Subject {
    /// `source` loaded by this subject's loader, once per process: tests running in parallel
    /// threads share it (the first one loads, the others wait for it).
    pub fn backend(&self, source: &Source) -> Arc<dyn Backend> {
        let name = self.loader.name();
        let slot = {
            let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
            let found = models
                .iter()
                .find(|(l, s, o, _)| *l == name && s == source && *o == self.options)
                .map(|(.., slot)| slot.clone());
            found.unwrap_or_else(|| {
                let slot = Slot::default();
                models.push((name, source.clone(), self.options, slot.clone()));
                slot
            })
        };
        slot.get_or_init(|| {
            let t = Instant::now();
            let backend = self
                .loader
                .load(source, &self.options)
                .unwrap_or_else(|e| panic!("the {name} backend loading {source}: {e}"));
            eprintln!("{name}: loaded {source} in {:?}", t.elapsed());
            Arc::from(backend)
        })
        .clone()
    }
}

/// A golden file and how to compare with it.
#[derive(Debug, Clone)]
pub struct Golden {
    pub path: PathBuf,
    pub kind: LensKind,
    pub tolerance: Tolerance,
}

/// What [`all`] needs for one model.
#[derive(Debug, Clone)]
pub struct Fixtures {
    pub source: Source,
    /// Goldens of this model (their prompts also check tokenization).
    pub goldens: Vec<Golden>,
    /// A prompt of 4 tokens or more (reuse, mid-block capture, reduce, bad input).
    pub prompt: String,
    /// A prompt whose forward pass takes tens of milliseconds or more (stop).
    pub long_prompt: String,
    /// Sources and options the loader must refuse, each with a word the refusal must contain
    /// (besides the devices, precisions and source kinds it does not list).
    pub refused: Vec<(Source, LoadOptions, String)>,
}

/// What [`all`] measured.
#[derive(Debug)]
pub struct Report {
    pub goldens: Vec<Deviations>,
    pub tokens: usize,
    pub reuse: f64,
    pub stop: StopTimings,
    pub reduce_cells: usize,
    /// Each check's wall time, in the order run.
    pub times: Vec<(&'static str, Duration)>,
}

/// Every check on one model.
pub fn all(subject: &Subject, fixtures: &Fixtures) -> Report {
    let mut times = Vec::new();
    let mut timed = |name: &'static str, t: Instant| times.push((name, t.elapsed()));
    let t = Instant::now();
    let refused: Vec<(Source, LoadOptions, &str)> = fixtures
        .refused
        .iter()
        .map(|(s, o, w)| (s.clone(), *o, w.as_str()))
        .collect();
    registry(subject.loader, &fixtures.source, &subject.options, &refused);
    timed("registry", t);
    let t = Instant::now();
    let backend = subject.backend(&fixtures.source);
    let backend = &*backend;
    timed("load", t);
    let t = Instant::now();
    let mut goldens = Vec::new();
    let mut tokens = 0;
    for g in &fixtures.goldens {
        tokens += tokenization(backend, &g.path);
        goldens.push(check_golden(backend, &g.path, g.kind, g.tolerance));
    }
    timed("goldens", t);
    let prompt = ids(backend, &fixtures.prompt);
    let t = Instant::now();
    let reuse = prefix_reuse(backend, &prompt);
    timed("prefix reuse", t);
    let t = Instant::now();
    mid_block(backend, &prompt);
    timed("mid-block", t);
    let t = Instant::now();
    let stop = stop_between_layers(backend, &ids(backend, &fixtures.long_prompt));
    timed("stop", t);
    let t = Instant::now();
    let reduce_cells = reduce_matches_host(backend, &prompt);
    timed("reduce", t);
    let t = Instant::now();
    bad_inputs(backend, &prompt);
    timed("bad inputs", t);
    Report {
        goldens,
        tokens,
        reuse,
        stop,
        reduce_cells,
        times,
    }
}
