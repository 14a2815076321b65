//! The tuned lens in the CLI: `--lens tuned:PATH`, `logit-lens tune` and `logit-lens
//! eval-lens` (the files and the training live in `lens-tuned`).

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lens_core::{Backend, CaptureOptions, LensKind, Query, Stop, Translators};
use lens_tuned::{Batch, LensStats, Meta, TrainOptions, Trainer};

use crate::cli::{self, ModelArgs};

/// A lens as the command line names it: `norm`, `raw` or `tuned:PATH` (a lens file of ours,
/// or a folder the `tuned-lens` Python package saved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LensArg {
    pub kind: LensKind,
    pub path: Option<PathBuf>,
}

impl Default for LensArg {
    fn default() -> Self {
        LensArg {
            kind: LensKind::Norm,
            path: None,
        }
    }
}

impl FromStr for LensArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("tuned:") {
            Some("") => Err("tuned:PATH needs the lens file's path".into()),
            Some(path) => Ok(LensArg {
                kind: LensKind::Tuned,
                path: Some(PathBuf::from(path)),
            }),
            None if s == "tuned" => Err("the tuned lens needs its file: tuned:PATH".into()),
            None => Ok(LensArg {
                kind: s.parse()?,
                path: None,
            }),
        }
    }
}

impl LensArg {
    /// The translators of a tuned lens, loaded and checked against the model.
    pub fn translators(&self, backend: &dyn Backend) -> Result<Option<Arc<Translators>>> {
        match &self.path {
            None => Ok(None),
            Some(path) => {
                let file = lens_tuned::load(path, backend)
                    .with_context(|| format!("cannot use the tuned lens {}", path.display()))?;
                Ok(Some(Arc::new(file.translators)))
            }
        }
    }

    /// The name a table or a plot shows.
    pub fn label(&self) -> String {
        match &self.path {
            Some(p) => format!("tuned:{}", p.display()),
            None => self.kind.to_string(),
        }
    }
}

#[derive(clap::Args)]
pub struct TuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training text files (UTF-8).
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    pub text: Vec<PathBuf>,
    /// The lens file to write; if it exists, training resumes from it.
    #[arg(long, value_name = "LENS.safetensors")]
    pub out: PathBuf,
    /// Optimisation steps in all (a resumed lens counts the steps it already did).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Peak learning rate of AdamW (linear warm-up over the first fifth, then linear decay).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Tokens per step.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Tokens per sequence the model reads (the context of each training token).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Save the lens every N steps (and always at the end or on Ctrl-C).
    #[arg(long, default_value_t = 10)]
    pub save_every: usize,
}

/// The texts' token ids cut into sequences of `seq`.
fn sequences(backend: &dyn Backend, files: &[PathBuf], seq: usize) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let ids: Vec<u32> = backend.tokenize(&text)?.iter().map(|t| t.id).collect();
        out.extend(
            ids.chunks(seq)
                .filter(|c| c.len() >= 2)
                .map(<[u32]>::to_vec),
        );
    }
    if out.is_empty() {
        bail!("the texts hold no tokens");
    }
    Ok(out)
}

pub fn tune(a: TuneArgs) -> Result<()> {
    if a.seq == 0 || a.tokens == 0 || a.steps == 0 {
        bail!("--steps, --tokens and --seq must be positive");
    }
    let backend = cli::load(&a.model)?;
    let info = backend.info().clone();
    let seq = a.seq.min(info.context_length);
    let texts = sequences(&*backend, &a.text, seq)?;
    let weights = lens_tuned::readout_weights(&*backend)?;
    let (start, mut meta) = match a.out.exists() {
        true => {
            let file = lens_tuned::load(&a.out, &*backend)
                .with_context(|| format!("cannot resume from {}", a.out.display()))?;
            let meta = file
                .meta
                .context("cannot resume from a lens of the Python package")?;
            tracing::warn!(steps = meta.steps, tokens = meta.tokens, "resuming");
            (file.translators, meta)
        }
        false => (
            Translators::identity(a.out.display().to_string(), info.hidden_size, info.n_layers),
            Meta::of(&info, &weights),
        ),
    };
    let options = TrainOptions {
        steps: a.steps,
        lr: a.lr,
        ..TrainOptions::default()
    };
    let mut trainer = Trainer::new(&start, &weights, options, meta.steps)?;
    drop(weights);
    // The optimiser's moments go on where they stopped when they were saved with the lens's
    // last save; otherwise (a lens whose run was killed between the two files, or copied
    // without them) they start again and say so.
    let adam = lens_tuned::adam_path(&a.out);
    if meta.steps > 0 {
        match lens_tuned::read_adam(&adam, info.hidden_size, info.n_layers) {
            Ok((state, steps)) if steps == meta.steps => trainer.restore(&state)?,
            Ok((_, steps)) => tracing::warn!(
                "{} was saved at step {steps}, the lens at step {}: the optimiser's moments \
                 start again",
                adam.display(),
                meta.steps
            ),
            Err(e) => tracing::warn!("{e}: the optimiser's moments start again"),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("cannot catch Ctrl-C")?;
    let label = a.out.display().to_string();
    let save = |trainer: &Trainer, meta: &Meta| -> Result<()> {
        lens_tuned::save(&a.out, &trainer.translators(&label)?, meta)?;
        lens_tuned::save_adam(&adam, &trainer.adam_state()?, meta.steps)?;
        Ok(())
    };
    let mut err = anstream::stderr();
    let total: usize = texts.iter().map(Vec::len).sum();
    writeln!(
        err,
        "tune: {} blocks, {} training tokens in {} sequences of ≤{seq}; steps {}..{} of {} \
         tokens, AdamW lr {}",
        info.n_layers,
        total,
        texts.len(),
        meta.steps,
        a.steps,
        a.tokens,
        a.lr
    )?;
    let started = Instant::now();
    // Sequences are taken in order, cycling; a resumed run goes on where the tokens stopped.
    let mut cursor = (meta.tokens / seq) % texts.len();
    while meta.steps < a.steps && !stop.load(Ordering::Relaxed) {
        let mut states = Vec::new();
        let mut n = 0;
        while n < a.tokens {
            let ids = &texts[cursor];
            cursor = (cursor + 1) % texts.len();
            let take = ids.len().min(a.tokens - n);
            states.push(backend.forward(&ids[..take], CaptureOptions::default())?);
            n += take;
        }
        let batch = Batch::of(&states.iter().collect::<Vec<_>>());
        let losses = trainer.step(&batch)?;
        meta.steps = trainer.step;
        meta.tokens += batch.tokens();
        let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
        let per_layer: Vec<String> = losses.iter().map(|l| format!("{l:.2}")).collect();
        writeln!(
            err,
            "step {}/{} tokens {} {:.0}s  mean KL {mean:.3}  per layer [{}]",
            meta.steps,
            a.steps,
            meta.tokens,
            started.elapsed().as_secs_f64(),
            per_layer.join(" ")
        )?;
        if meta.steps % a.save_every.max(1) == 0 {
            save(&trainer, &meta)?;
        }
    }
    save(&trainer, &meta)?;
    let how = match stop.load(Ordering::Relaxed) {
        true => "stopped (run again to resume)",
        false => "done",
    };
    writeln!(
        err,
        "{how}: {} steps, {} tokens, saved {}",
        meta.steps,
        meta.tokens,
        a.out.display()
    )?;
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalLensArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Held-out text (UTF-8).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Lenses besides norm and raw (`tuned:PATH`), each its own column.
    #[arg(long, value_name = "LENS")]
    pub lens: Vec<LensArg>,
    /// At most this many tokens of the text.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Tokens per sequence the model reads.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Also draw the per-layer KL, one line per lens (`.svg` or `.png`).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

pub fn eval_lens(a: EvalLensArgs) -> Result<()> {
    let backend = cli::load(&a.model)?;
    let seq = a.seq.clamp(2, backend.info().context_length);
    let mut lenses = vec![
        LensArg::default(),
        LensArg {
            kind: LensKind::Raw,
            path: None,
        },
    ];
    for l in &a.lens {
        if !lenses.contains(l) {
            lenses.push(l.clone());
        }
    }
    let queries = lenses
        .iter()
        .map(|l| {
            Ok(Query {
                kind: l.kind,
                tuned: l.translators(&*backend)?,
                top_k: 1,
                ..Query::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stats: Vec<LensStats> = lenses.iter().map(|l| LensStats::new(l.label())).collect();
    let mut left = a.tokens;
    for ids in sequences(&*backend, std::slice::from_ref(&a.text), seq)? {
        if left == 0 {
            break;
        }
        let ids = &ids[..ids.len().min(left)];
        left -= ids.len();
        let states = backend.forward(ids, CaptureOptions::default())?;
        for (q, s) in queries.iter().zip(&mut stats) {
            s.add(&q.run(&*backend, &states, &Stop::never())?);
        }
    }
    let mut out = anstream::stdout();
    let per: Vec<_> = stats.iter().map(LensStats::layers).collect();
    writeln!(
        out,
        "{} tokens of {}; per layer: mean KL to the output (nats) | top-1 agreement | \
         next-token perplexity",
        a.tokens - left,
        a.text.display()
    )?;
    for s in &stats {
        writeln!(out, "  lens {}", s.label)?;
    }
    let names: Vec<String> = (0..stats.len()).map(|i| format!("L{i}")).collect();
    let head = |what: &str, w: usize| {
        names
            .iter()
            .map(|n| format!("{:>w$}", format!("{what} {n}")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    writeln!(
        out,
        "layer  {}  {}  {}",
        head("KL", 8),
        head("top1", 8),
        head("ppl", 10)
    )?;
    // Perplexities of early layers run to astronomical values: those in scientific notation.
    let ppl = |p: f64| match p < 1e6 {
        true => format!("{p:>10.1}"),
        false => format!("{p:>10.2e}"),
    };
    for l in 0..per[0].len() {
        let col = |f: &dyn Fn(&lens_tuned::LayerStats) -> String| {
            per.iter().map(|p| f(&p[l])).collect::<Vec<_>>().join(" ")
        };
        writeln!(
            out,
            "{l:>5}  {}  {}  {}",
            col(&|s| format!("{:>8.3}", s.kl)),
            col(&|s| format!("{:>8.3}", s.top1_agreement)),
            col(&|s| ppl(s.perplexity)),
        )?;
    }
    for s in &stats {
        writeln!(
            out,
            "mean KL over layers 1..N-1, {}: {:.4}",
            s.label,
            s.mean_kl_inner()
        )?;
    }
    if let Some(path) = &a.plot {
        let series: Vec<lens_plot::Series> = stats
            .iter()
            .map(|s| lens_plot::Series {
                label: s.label.clone(),
                points: s.layers().iter().map(|l| (l.layer as f64, l.kl)).collect(),
            })
            .collect();
        let svg = lens_plot::line_chart(
            &format!(
                "{}: mean KL to the model output per layer",
                backend.info().name
            ),
            "layer",
            "KL (nats)",
            &series,
        );
        let bytes = match path.extension().and_then(|e| e.to_str()) {
            Some("png") => lens_plot::rasterize(&svg, 2.0)?,
            _ => svg.into_bytes(),
        };
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
