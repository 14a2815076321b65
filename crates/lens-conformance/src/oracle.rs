//! Comparing a backend's lens with golden files computed by an independent implementation
//! (HF transformers for the real models: `tests/data/oracle/PROVENANCE.md`; plain Python for
//! the reference backend).
//!
//! A golden file has `prompts`, each with `text`, `n_tokens`, `token_ids` and `layers[L]` for
//! `L = 0..=N`: per position `top5_ids`, `top5_probs`, `entropy`, `kl_final_layer`,
//! `next_rank`, `next_prob` (`null` at the last position). `header.architecture` may give
//! `n_layers` and `vocab`.

use std::fmt::Write;
use std::path::Path;

use lens_core::{Backend, CaptureOptions, Lens, LensKind, Source, Token};
use serde_json::Value;

use crate::Subject;

/// A JSON file, parsed; panics naming the file when it cannot be read or parsed.
pub fn load_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `d > bound`, or `d` is not a number.
fn beyond(d: f64, bound: f64) -> bool {
    d.is_nan() || d > bound
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Largest deviations seen while comparing, for the report.
#[derive(Default, Debug)]
pub struct Deviations {
    pub cells: usize,
    pub prob: f64,
    pub entropy: f64,
    pub kl_rel: f64,
    pub rank_off: usize,
    pub top5_mismatches: usize,
    /// Cells with a clear top-1 (oracle margin > 0.05) and how many of them agree.
    pub clear_cells: usize,
    pub clear_agree: usize,
    pub failures: Vec<String>,
}

impl Deviations {
    pub fn top1_agreement(&self) -> f64 {
        self.clear_agree as f64 / self.clear_cells.max(1) as f64
    }
}

/// Bounds a comparison enforces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// On probabilities (top-5 and next token) and on the entropy.
    pub prob: f64,
    /// Allowed rank difference above rank 10 (below, ranks must be exact): an absolute number
    /// or a fraction of the rank, whichever is larger.
    pub rank_abs: usize,
    pub rank_rel: f64,
}

/// The bounds for an f32 implementation: 1e-4 on probabilities and entropy, KL within 2e-3
/// relative (1e-4 absolute below 0.05), ranks exact below 10 and ±1 above.
pub const F32: Tolerance = Tolerance {
    prob: 1e-4,
    rank_abs: 1,
    rank_rel: 0.0,
};

/// The raw lens has no final norm, so its logits scale with the residual stream (hundreds):
/// float32 rounding in *either* implementation moves them about 100× more than the norm lens's,
/// and the order of the f32 sums depends on the SIMD width the CPU dispatches to (on an
/// AVX-512 machine SmolLM2's raw lens deviates from HF by up to 2.4e-4 in probability and
/// 3.1e-4 in entropy, at two near-tied cells; on AVX2 machines under 2e-4). Same bounds as
/// [`F32`] otherwise, with 5e-4 on probabilities and entropy and ranks above 10 within 1e-4
/// relative.
pub const F32_RAW: Tolerance = Tolerance {
    prob: 5e-4,
    rank_abs: 1,
    rank_rel: 1e-4,
};

/// A golden prompt's text and its tokens by `backend`, whose ids must be the golden's
/// (`what` names the golden in the message).
pub fn golden_tokens<'g>(
    backend: &dyn Backend,
    prompt: &'g Value,
    what: &str,
) -> (&'g str, Vec<Token>) {
    let text = prompt["text"]
        .as_str()
        .expect("golden prompt without `text`");
    let want: Vec<u32> = prompt["token_ids"]
        .as_array()
        .expect("golden prompt without `token_ids`")
        .iter()
        .map(|v| v.as_u64().unwrap_or(u64::MAX) as u32)
        .collect();
    let tokens = backend
        .tokenize(text)
        .unwrap_or_else(|e| panic!("tokenize {text:?}: {e}"));
    let got: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, want, "{what}: token ids of {text:?}");
    (text, tokens)
}

/// Run the lens on one golden prompt and compare every cell. With `Some(tolerance)`, bounds are
/// enforced (failures collected in `dev`); with `None` only measured. Panics when the prompt
/// does not tokenize to the golden's ids or the golden's layers do not match the model.
pub fn compare_prompt(
    backend: &dyn Backend,
    golden: &Value,
    lens: LensKind,
    tol: Option<Tolerance>,
    dev: &mut Deviations,
) {
    let strict = tol.is_some();
    let tol = tol.unwrap_or(F32);
    let (text, tokens) = golden_tokens(backend, golden, "golden");
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = backend
        .forward(&ids, CaptureOptions::default())
        .unwrap_or_else(|e| panic!("forward {text:?}: {e}"));
    let lens = Lens::new(backend, &states, lens, 5);
    let grid = lens
        .grid(&lens.all_layers())
        .unwrap_or_else(|e| panic!("lens of {text:?}: {e}"));
    let layers = golden["layers"]
        .as_array()
        .expect("golden without `layers`");
    assert_eq!(
        layers.len(),
        backend.info().n_layers + 1,
        "the golden's layers for {text:?} against the model's {} blocks",
        backend.info().n_layers
    );
    assert_eq!(grid.len(), ids.len(), "positions of {text:?}");
    for (l, layer) in layers.iter().enumerate() {
        for (p, view) in grid.iter().enumerate() {
            let cell = &view.cells[l];
            let at = format!("{text:?} layer {l} position {p}");
            dev.cells += 1;
            let ids: Vec<u64> = layer["top5_ids"][p]
                .as_array()
                .expect("top5_ids")
                .iter()
                .filter_map(Value::as_u64)
                .collect();
            let probs: Vec<f64> = layer["top5_probs"][p]
                .as_array()
                .expect("top5_probs")
                .iter()
                .map(f)
                .collect();
            assert_eq!(
                cell.top.len(),
                5,
                "{at}: top-5 has {} entries",
                cell.top.len()
            );
            for i in 0..5 {
                let got_p = f64::from(cell.top[i].prob);
                let d = (got_p - probs[i]).abs();
                dev.prob = dev.prob.max(d);
                if strict && beyond(d, tol.prob) {
                    dev.failures
                        .push(format!("{at}: top-{i} prob {got_p} vs {}", probs[i]));
                }
                let separated = (i == 0 || (probs[i - 1] - probs[i]).abs() > 1e-5)
                    && (i == 4 || (probs[i] - probs[i + 1]).abs() > 1e-5);
                if u64::from(cell.top[i].id) != ids[i] && separated {
                    dev.top5_mismatches += 1;
                    if strict {
                        dev.failures
                            .push(format!("{at}: top-{i} id {} vs {}", cell.top[i].id, ids[i]));
                    }
                }
            }
            if probs[0] - probs[1] > 0.05 {
                dev.clear_cells += 1;
                dev.clear_agree += usize::from(u64::from(cell.top[0].id) == ids[0]);
            }
            let (ent, want_ent) = (cell.entropy, f(&layer["entropy"][p]));
            dev.entropy = dev.entropy.max((ent - want_ent).abs());
            if strict && beyond((ent - want_ent).abs(), tol.prob) {
                dev.failures
                    .push(format!("{at}: entropy {ent} vs {want_ent}"));
            }
            let (kl, want_kl) = (cell.kl_to_final, f(&layer["kl_final_layer"][p]));
            let kl_ok = if want_kl < 0.05 {
                !beyond((kl - want_kl).abs(), 1e-4)
            } else {
                !beyond((kl - want_kl).abs(), 2e-3 * want_kl)
            };
            if want_kl >= 0.05 {
                dev.kl_rel = dev.kl_rel.max((kl - want_kl).abs() / want_kl);
            }
            if strict && !kl_ok {
                dev.failures.push(format!("{at}: KL {kl} vs {want_kl}"));
            }
            match (cell.next, layer["next_rank"][p].as_u64()) {
                (Some(n), Some(want)) => {
                    let want = want as usize;
                    let off = n.rank.abs_diff(want);
                    dev.rank_off = dev.rank_off.max(off);
                    let allowed = tol.rank_abs.max((tol.rank_rel * want as f64) as usize);
                    if strict && ((want < 10 && off != 0) || off > allowed) {
                        dev.failures
                            .push(format!("{at}: next rank {} vs {want}", n.rank));
                    }
                    let want_p = f(&layer["next_prob"][p]);
                    if strict && beyond((f64::from(n.prob) - want_p).abs(), tol.prob) {
                        dev.failures
                            .push(format!("{at}: next prob {} vs {want_p}", n.prob));
                    }
                }
                (None, None) => {}
                (got, want) => dev.failures.push(format!("{at}: next {got:?} vs {want:?}")),
            }
        }
    }
}

/// Compare `backend`'s `lens` with every prompt of the golden file at `path`, enforcing `tol`.
/// Panics listing the first 20 deviations beyond it, or when the golden's model (layers,
/// vocabulary) is not the backend's; otherwise returns what it measured (every cell of the
/// golden is compared).
pub fn check_golden(
    backend: &dyn Backend,
    path: &Path,
    lens: LensKind,
    tol: Tolerance,
) -> Deviations {
    let golden = load_json(path);
    let name = path.display();
    let arch = &golden["header"]["architecture"];
    let info = backend.info();
    if let Some(n) = arch["n_layers"].as_u64() {
        assert_eq!(n as usize, info.n_layers, "{name}: the golden's n_layers");
    }
    if let Some(v) = arch["vocab"].as_u64() {
        assert_eq!(
            v as usize, info.vocab_size,
            "{name}: the golden's vocabulary"
        );
    }
    let prompts = golden["prompts"]
        .as_array()
        .expect("golden without `prompts`");
    assert!(!prompts.is_empty(), "{name} has no prompts");
    let mut dev = Deviations::default();
    for prompt in prompts {
        compare_prompt(backend, prompt, lens, Some(tol), &mut dev);
    }
    let want_cells: usize = prompts
        .iter()
        .map(|p| p["token_ids"].as_array().map_or(0, Vec::len) * (info.n_layers + 1))
        .sum();
    assert_eq!(dev.cells, want_cells, "{name}: cells compared");
    eprintln!("{name} ({lens} lens): {dev:?}");
    if !dev.failures.is_empty() {
        let mut msg = format!(
            "{} of {} cells deviate from {name}:\n",
            dev.failures.len(),
            dev.cells
        );
        for f in dev.failures.iter().take(20) {
            let _ = writeln!(msg, "  {f}");
        }
        panic!("{msg}");
    }
    dev
}

/// [`check_golden`] on `source` loaded by `subject` (once per process).
pub fn oracle_goldens(
    subject: &Subject,
    source: &Source,
    golden: &Path,
    lens: LensKind,
    tol: Tolerance,
) -> Deviations {
    check_golden(&*subject.backend(source), golden, lens, tol)
}
