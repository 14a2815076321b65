//! `logit-lens doctor`: the model loaded by every backend of this build (or those named), run
//! on a fixed set of prompts and any given, checked side by side: the token ids each backend
//! makes, each capture's last layer against its engine's own final logits, every layer's
//! top-1 and probabilities between backends, and a golden file. Exits non-zero when a
//! comparison is beyond its bound (the bounds are documented on [`Bounds`] and in
//! docs/models-and-backends.md).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lens_core::{
    engine_check, math, Backend, CaptureOptions, HiddenStates, Lens, LensKind, Precision, Site,
};

use crate::backends;
use crate::cli::{model_path, ModelArgs};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// More prompts to check, besides the fixed ones.
    pub prompts: Vec<String>,
    /// A GGUF file or an HF-style folder (default: the default model).
    #[arg(long, env = "LOGIT_LENS_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// A backend to check (repeatable; default: every backend of this build that can load the
    /// model with these options). The first one is the one the others are compared with.
    #[arg(long = "backend", value_name = "NAME")]
    pub backends: Vec<String>,
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    #[arg(long, default_value = "cpu")]
    pub device: lens_core::Device,
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Quantize an HF folder as it loads (backends that can: mistralrs).
    #[arg(long, value_name = "TYPE")]
    pub isq: Option<lens_core::Isq>,
    /// A golden file (the `tests/data/oracle` format: prompts with token ids and each layer's
    /// top-5 ids and probabilities) to check every backend against.
    #[arg(long, value_name = "FILE")]
    pub golden: Option<PathBuf>,
}

/// The prompts every doctor run checks.
pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "1, 2, 3, 4, 5,",
];

/// How far two correct implementations may be apart.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Largest |Δp| of any token at any cell.
    pub prob: f32,
    /// Cells whose top-1 leads by more than this (in probability) must agree on it.
    pub clear_margin: f32,
}

/// f32 paths are the same arithmetic up to the order of sums (the conformance suite holds each
/// within 1e-4 of HF transformers); anything quantized is compared more loosely.
pub fn bounds(precision: Precision) -> Bounds {
    match precision {
        Precision::F32 => Bounds {
            prob: 1e-3,
            clear_margin: 0.05,
        },
        _ => Bounds {
            prob: 0.1,
            clear_margin: 0.2,
        },
    }
}

/// Agreement of two sets of cells.
#[derive(Debug, Default, Clone, Copy)]
struct Agreement {
    cells: usize,
    top1_agree: usize,
    clear: usize,
    clear_agree: usize,
    max_dp: f32,
}

impl Agreement {
    fn passed(&self, b: Bounds) -> bool {
        self.max_dp <= b.prob && self.clear == self.clear_agree
    }

    fn add(&mut self, top_a: u32, top_b: u32, margin: f32, dp: f32, b: Bounds) {
        self.cells += 1;
        let agree = top_a == top_b;
        self.top1_agree += usize::from(agree);
        if margin > b.clear_margin {
            self.clear += 1;
            self.clear_agree += usize::from(agree);
        }
        self.max_dp = if dp.is_nan() {
            f32::INFINITY
        } else {
            self.max_dp.max(dp)
        };
    }

    fn show(&self) -> String {
        format!(
            "top-1 {}/{} cells ({}/{} clear), max |Δp| {:.2e}",
            self.top1_agree, self.cells, self.clear_agree, self.clear, self.max_dp
        )
    }
}

/// Every layer at every position: the probabilities (full rows) and top-1 with its margin.
struct Grid {
    probs: Vec<Vec<f32>>,
    top: Vec<(u32, f32)>,
}

fn grid(backend: &dyn Backend, states: &HiddenStates) -> Result<Grid> {
    let lens = Lens::new(backend, states, LensKind::Norm, 2);
    let sites: Vec<Site> = lens.all_layers();
    let positions: Vec<usize> = (0..states.n_positions()).collect();
    let mut probs = Vec::new();
    let mut top = Vec::new();
    for (view, logits) in lens.positions_with_logits(&positions, &sites)? {
        for (i, cell) in view.cells.iter().enumerate() {
            let row = logits.row(i).context("a row of logits")?;
            let log_z = logits.log_z[i];
            probs.push(row.iter().map(|&l| math::exp(l - log_z)).collect());
            let margin = match &cell.top[..] {
                [a, b, ..] => a.prob - b.prob,
                _ => 1.0,
            };
            top.push((cell.top.first().map_or(0, |t| t.id), margin));
        }
    }
    Ok(Grid { probs, top })
}

fn compare(a: &Grid, b: &Grid, bounds: Bounds) -> Agreement {
    let mut agreement = Agreement::default();
    for ((pa, ta), (pb, tb)) in a.probs.iter().zip(&a.top).zip(b.probs.iter().zip(&b.top)) {
        let dp = pa
            .iter()
            .zip(pb)
            .map(|(x, y)| (x - y).abs())
            .fold(
                0f32,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        agreement.add(ta.0, tb.0, ta.1, dp, bounds);
    }
    agreement
}

/// A prompt to check: its text, and with a golden's its token ids and cells.
type Prompt<'g> = (String, Option<Vec<u32>>, Option<&'g serde_json::Value>);

pub fn run(a: DoctorArgs) -> Result<()> {
    let model = ModelArgs {
        model: a.model.clone(),
        backend: "auto".into(),
        precision: a.precision,
        device: a.device,
        threads: a.threads,
        isq: a.isq,
    };
    let path = model_path(&model)?;
    let options = model.options();
    let source = backends::source(&path)?;
    let registry = backends::registry();
    let names: Vec<String> = match a.backends.is_empty() {
        false => a.backends.clone(),
        true => registry
            .loaders()
            .iter()
            .filter(|l| l.supports(&source, &options).is_ok())
            // Backends in this process; a pipeline is held to one process by its own tests
            // (it reads cells on its ranks, not the logits the doctor compares).
            .filter(|l| l.mode() == lens_core::ONE_PROCESS)
            .map(|l| l.name().to_string())
            .collect(),
    };
    if names.is_empty() {
        bail!(lens_core::Error::Unsupported(format!(
            "no backend of this build can load {source} with these options"
        )));
    }
    let bounds = bounds(options.precision);
    let mut out = anstream::stdout();
    let mut loaded: Vec<(String, Box<dyn Backend>)> = Vec::new();
    for name in &names {
        let backend = backends::load(&path, name, &options)?;
        writeln!(
            out,
            "{name}: {} ({})",
            backend.info().name,
            backend.info().precision
        )?;
        loaded.push((name.clone(), backend));
    }
    let mut failures: Vec<String> = Vec::new();
    let mut prompts: Vec<Prompt<'_>> = PROMPTS
        .iter()
        .map(|p| (p.to_string(), None, None))
        .chain(a.prompts.iter().map(|p| (p.clone(), None, None)))
        .collect();
    let golden = match &a.golden {
        Some(g) => Some(
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(g)
                    .with_context(|| format!("cannot read {}", g.display()))?,
            )
            .with_context(|| format!("{} is not JSON", g.display()))?,
        ),
        None => None,
    };
    if let Some(golden) = &golden {
        for p in golden["prompts"]
            .as_array()
            .context("the golden has no prompts")?
        {
            let text = p["text"].as_str().context("a golden prompt without text")?;
            let ids = p["token_ids"]
                .as_array()
                .context("a golden prompt without token_ids")?
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).context("a token id"))
                .collect::<Result<Vec<u32>>>()?;
            prompts.push((text.to_string(), Some(ids), Some(p)));
        }
    }
    for (text, golden_ids, golden_prompt) in &prompts {
        writeln!(out, "\nprompt {text:?}")?;
        let mut ids: Vec<Vec<u32>> = Vec::new();
        for (name, backend) in &loaded {
            ids.push(backend.tokenize(text)?.iter().map(|t| t.id).collect());
            let same = ids[0] == ids[ids.len() - 1];
            let golden_same = golden_ids.as_ref().is_none_or(|g| *g == ids[ids.len() - 1]);
            writeln!(
                out,
                "  {name:<10} {} tokens, ids {}{}",
                ids[ids.len() - 1].len(),
                if same { "equal" } else { "DIFFERENT" },
                match golden_ids {
                    Some(_) if golden_same => ", equal to the golden's",
                    Some(_) => ", DIFFERENT from the golden's",
                    None => "",
                }
            )?;
            if !same || !golden_same {
                failures.push(format!("{name}: token ids of {text:?}"));
            }
        }
        let reference = golden_ids.clone().unwrap_or_else(|| ids[0].clone());
        let mut grids = Vec::new();
        for (name, backend) in &loaded {
            match engine_check(&**backend, &reference)? {
                Some(c) => {
                    writeln!(
                        out,
                        "  {name:<10} last layer vs its engine's own logits: max |Δlogit| {:.2e} (bound {}), top-1 {}/{} ({}/{} clear) {}",
                        c.max_abs_logit,
                        c.bound,
                        c.top1_agree,
                        c.positions,
                        c.clear_agree,
                        c.clear,
                        if c.passed() { "ok" } else { "BEYOND THE BOUND" }
                    )?;
                    if !c.passed() {
                        failures.push(format!("{name}: its engine's logits on {text:?}"));
                    }
                }
                None => writeln!(out, "  {name:<10} last layer: its capture is its engine")?,
            }
            let states = backend.forward(&reference, CaptureOptions::default())?;
            grids.push(grid(&**backend, &states)?);
        }
        for (i, (name, _)) in loaded.iter().enumerate().skip(1) {
            let agreement = compare(&grids[0], &grids[i], bounds);
            let ok = agreement.passed(bounds);
            writeln!(
                out,
                "  {name} vs {}: every layer: {} {}",
                loaded[0].0,
                agreement.show(),
                if ok { "ok" } else { "BEYOND THE BOUNDS" }
            )?;
            if !ok {
                failures.push(format!("{name} vs {} on {text:?}", loaded[0].0));
            }
        }
        if let Some(golden) = golden_prompt {
            for ((name, _), grid) in loaded.iter().zip(&grids) {
                let agreement = against_golden(grid, golden, bounds)?;
                let ok = agreement.passed(bounds);
                writeln!(
                    out,
                    "  {name} vs the golden: every layer: {} {}",
                    agreement.show(),
                    if ok { "ok" } else { "BEYOND THE BOUNDS" }
                )?;
                if !ok {
                    failures.push(format!("{name} vs the golden on {text:?}"));
                }
            }
        }
    }
    writeln!(
        out,
        "\nbounds ({}): |Δp| ≤ {}, the same top-1 where it leads by more than {}",
        options.precision, bounds.prob, bounds.clear_margin
    )?;
    match failures.is_empty() {
        true => {
            writeln!(out, "all checks passed")?;
            Ok(())
        }
        false => bail!(
            "{} checks beyond their bounds: {}",
            failures.len(),
            failures.join("; ")
        ),
    }
}

/// A golden prompt's cells (`layers[L].top5_ids[p]`, `top5_probs[p]`) against a grid: the
/// top-1 and the probabilities of the golden's top-5.
fn against_golden(grid: &Grid, golden: &serde_json::Value, bounds: Bounds) -> Result<Agreement> {
    let layers = golden["layers"]
        .as_array()
        .context("a golden prompt without layers")?;
    let n = golden["token_ids"].as_array().map_or(0, Vec::len);
    if layers.len() * n != grid.top.len() {
        bail!(
            "the golden has {} layers × {n} positions, the model {} cells",
            layers.len(),
            grid.top.len()
        );
    }
    let mut agreement = Agreement::default();
    for p in 0..n {
        for (l, layer) in layers.iter().enumerate() {
            let cell = p * layers.len() + l;
            let ids = layer["top5_ids"][p].as_array().context("top5_ids")?;
            let probs = layer["top5_probs"][p].as_array().context("top5_probs")?;
            let id = |i: usize| ids.get(i).and_then(|v| v.as_u64()).map(|x| x as usize);
            let prob = |i: usize| probs.get(i).and_then(|v| v.as_f64()).map(|x| x as f32);
            let mut dp = 0f32;
            for i in 0..ids.len() {
                let (Some(id), Some(p_gold)) = (id(i), prob(i)) else {
                    bail!("a malformed golden cell");
                };
                let ours = grid.probs[cell].get(id).copied().unwrap_or(f32::NAN);
                dp = if (ours - p_gold).is_nan() {
                    f32::INFINITY
                } else {
                    dp.max((ours - p_gold).abs())
                };
            }
            let margin = prob(0).unwrap_or(0.0) - prob(1).unwrap_or(0.0);
            let top_gold = id(0).unwrap_or(usize::MAX) as u32;
            agreement.add(top_gold, grid.top[cell].0, margin, dp, bounds);
        }
    }
    Ok(agreement)
}
