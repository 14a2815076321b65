//! `logit-lens bench`: forward-with-capture, full-lens and one-position-lens times on prompts
//! of several lengths, peak memory, and the same measured for HF transformers in the same run
//! when a Python with torch and transformers is available.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lens_core::{Backend, CaptureOptions, Lens, LensKind};
use serde::Deserialize;

use crate::cli::{model_path, ModelArgs};

/// The HF transformers reference, run by the Python given with `--python`.
const HF_SCRIPT: &str = include_str!("../bench/hf_lens.py");

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub sizes: Vec<usize>,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// A Python interpreter with torch, transformers and gguf, for the reference figures.
    #[arg(long, env = "LOGIT_LENS_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
}

#[derive(Deserialize)]
struct HfResult {
    n: usize,
    forward_s: f64,
    full_lens_s: f64,
    one_position_s: f64,
    /// One greedy generation step after the prompt: a token's forward on the KV cache with
    /// every hidden state, and the final layer's argmax.
    step_s: f64,
}

/// What one backend measured on one prompt length.
#[derive(Debug, Clone, Copy)]
struct Row {
    n: usize,
    forward: f64,
    full: f64,
    one: f64,
    /// The median generation step (`NaN` where the backend cannot generate).
    step: f64,
    peak_mib: f64,
    /// The one position's readout alone (its logits, no reductions), and its rows (sites).
    readout: f64,
    sites: usize,
}

/// Tokens generated to time a step (the first step, which includes the prompt, is not
/// counted).
const STEPS: usize = 8;

/// The median time of a greedy generation step after `ids` (the prompt's own forward, in the
/// first step, not counted); `NaN` when `backend` does not generate.
fn step_time(backend: &dyn Backend, ids: &[u32]) -> Result<f64> {
    let Some(generator) = backend.generator() else {
        return Ok(f64::NAN);
    };
    let request = lens_core::GenerateRequest {
        prompt: ids,
        max_tokens: STEPS + 1,
        sampling: lens_core::Sampling::default(),
    };
    let mut times = Vec::new();
    let mut last = Instant::now();
    generator.generate(&request, &lens_core::Stop::never(), &mut |_| {
        times.push(last.elapsed());
        last = Instant::now();
        Ok(())
    })?;
    // A stop token may end it early; the first step holds the prompt's forward.
    Ok(median(times.into_iter().skip(1).collect()))
}

/// Forward, full lens, one position, its readout alone and a generation step of `backend` on
/// the first `n` of `all`.
fn measure(backend: &dyn Backend, all: &[u32], n: usize, repeats: usize) -> Result<Row> {
    let ids = &all[..n.min(all.len())];
    let (forward, states) = time(repeats, || {
        Ok(backend.forward(ids, CaptureOptions::default())?)
    })?;
    let lens = Lens::new(backend, &states, LensKind::Norm, 5);
    let sites = lens.all_layers();
    let (full, _) = time(repeats, || Ok(lens.grid(&sites)?))?;
    let (one, _) = time(repeats.max(5), || Ok(lens.position(ids.len() - 1, &sites)?))?;
    // The one position's readout alone (its logits, no reductions): the product the floor
    // bounds.
    let last: Vec<f32> = sites
        .iter()
        .flat_map(|&s| states.row(s, ids.len() - 1).unwrap_or(&[]).to_vec())
        .collect();
    let (readout, _) = time(repeats.max(5), || {
        Ok(backend.readout(&last, LensKind::Norm)?)
    })?;
    let step = step_time(backend, ids)?;
    Ok(Row {
        n: ids.len(),
        forward,
        full,
        one,
        step,
        peak_mib: peak_rss_mib().unwrap_or(f64::NAN),
        readout,
        sites: sites.len(),
    })
}

const TEXT: &str = "We train GPT-3, an autoregressive language model with 175 billion parameters, \
10x more than any previous non-sparse language model, and test its performance in the few-shot setting. \
For all tasks, GPT-3 is applied without any gradient updates or fine-tuning, with tasks and few-shot \
demonstrations specified purely via text interaction with the model. GPT-3 achieves strong performance \
on many NLP datasets, including translation, question-answering, and cloze tasks, as well as several \
tasks that require on-the-fly reasoning or domain adaptation, such as unscrambling words, using a novel \
word in a sentence, or performing 3-digit arithmetic. At the same time, we also identify some datasets \
where GPT-3's few-shot learning still struggles, as well as some datasets where GPT-3 faces methodological \
issues related to training on large web corpora. Finally, we find that GPT-3 can generate samples of news \
articles which human evaluators have difficulty distinguishing from articles written by humans.";

fn median(mut xs: Vec<Duration>) -> f64 {
    xs.sort();
    xs.get(xs.len() / 2).map_or(f64::NAN, Duration::as_secs_f64)
}

fn time<T>(repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut times = Vec::with_capacity(repeats);
    let mut last = None;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    Ok((median(times), last.context("no repetition ran")?))
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let path = model_path(&args.model)?;
    let mut out = anstream::stdout();
    let t = Instant::now();
    let backend = crate::backends::load(&path, &args.model.backend, &args.model.options())?;
    let info = backend.info().clone();
    writeln!(
        out,
        "model: {} ({}), {} threads, load {:.2} s",
        info.name,
        info.precision,
        rayon_threads(),
        t.elapsed().as_secs_f64()
    )?;
    let all: Vec<u32> = backend
        .tokenize(&TEXT.repeat(8))?
        .iter()
        .map(|t| t.id)
        .collect();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        rows.push(measure(&*backend, &all, n, args.repeats)?);
    }

    let hf = match &args.python {
        Some(py) => match run_hf(py, &path, &*backend, &args) {
            Ok(r) => Some(r),
            Err(e) => {
                writeln!(out, "HF transformers reference not run: {e:#}")?;
                None
            }
        },
        None => {
            writeln!(out, "HF transformers reference not run: pass --python (or LOGIT_LENS_BENCH_PYTHON) with torch, transformers and gguf")?;
            None
        }
    };

    writeln!(out)?;
    writeln!(
        out,
        "{:>6} {:>11} {:>11} {:>11} {:>9} {:>9} | {:>11} {:>11} {:>11} {:>11} | {:>8} {:>8} {:>8}",
        "tokens",
        "forward ms",
        "full ms",
        "1-pos ms",
        "step ms",
        "peak MiB",
        "HF fwd ms",
        "HF full ms",
        "HF 1-pos ms",
        "HF step ms",
        "full ×",
        "1-pos ×",
        "step ×"
    )?;
    let ms = |x: f64| match x.is_nan() {
        true => "—".to_string(),
        false => format!("{:.1}", x * 1e3),
    };
    let ratio = |a: f64, b: f64| match (a / b).is_nan() {
        true => "—".to_string(),
        false => format!("{:.2}", a / b),
    };
    for r in &rows {
        let h = hf.as_ref().and_then(|v| v.iter().find(|h| h.n == r.n));
        let (hf_fwd, hf_full, hf_one, hf_step, r_full, r_one, r_step) = match h {
            Some(h) => (
                ms(h.forward_s),
                ms(h.full_lens_s),
                ms(h.one_position_s),
                ms(h.step_s),
                ratio(h.full_lens_s, r.full),
                ratio(h.one_position_s, r.one),
                ratio(h.step_s, r.step),
            ),
            None => {
                let none = || "—".to_string();
                (none(), none(), none(), none(), none(), none(), none())
            }
        };
        writeln!(
            out,
            "{:>6} {:>11} {:>11} {:>11} {:>9} {:>9.0} | {hf_fwd:>11} {hf_full:>11} {hf_one:>11} {hf_step:>11} | {r_full:>8} {r_one:>8} {r_step:>8}",
            r.n,
            ms(r.forward),
            ms(r.full),
            ms(r.one),
            ms(r.step),
            r.peak_mib
        )?;
    }
    writeln!(out, "× = HF time / logit-lens time (higher is better for logit-lens; target for the full lens ≥ 3); step = one greedy generation step after the prompt ({STEPS} steps, median)")?;
    floor(&info, &rows, args.repeats, &mut out)?;
    #[cfg(feature = "mistralrs")]
    {
        let name = crate::backends::picked(&path, &args.model.backend, &args.model.options())?;
        if name != "mistralrs" {
            beside(&args, &path, name, &rows, hf.as_deref(), &mut out)?;
        }
    }
    #[cfg(feature = "mpi")]
    if args.model.backend != "mpi" {
        pipeline(&args, &path, &rows, &mut out)?;
    }
    Ok(())
}

/// The same measures on the mistralrs backend (mistral.rs's engine generates; the lens follows
/// it with its capture forward), beside the backend above and HF transformers, in the same run.
#[cfg(feature = "mistralrs")]
fn beside(
    args: &BenchArgs,
    path: &std::path::Path,
    name: &str,
    first: &[Row],
    hf: Option<&[HfResult]>,
    out: &mut impl Write,
) -> Result<()> {
    writeln!(out)?;
    let backend = match crate::backends::load(path, "mistralrs", &args.model.options()) {
        Ok(b) => b,
        Err(e) => {
            writeln!(out, "mistralrs backend not measured: {e:#}")?;
            return Ok(());
        }
    };
    let all: Vec<u32> = backend
        .tokenize(&TEXT.repeat(8))?
        .iter()
        .map(|t| t.id)
        .collect();
    writeln!(
        out,
        "{:>6} | {:>22} | {:>22} | {:>22} | {:>22}",
        "tokens", "forward ms", "full lens ms", "generation step ms", "step ×"
    )?;
    writeln!(
        out,
        "{:>6} | {:>6} {:>9} {:>5} | {:>6} {:>9} {:>5} | {:>6} {:>9} {:>5} | {:>10} {:>11}",
        "",
        name,
        "mistralrs",
        "HF",
        name,
        "mistralrs",
        "HF",
        name,
        "mistralrs",
        "HF",
        "mistralrs/",
        "HF/mistralrs"
    )?;
    let ms = |x: Option<f64>| match x.filter(|x| !x.is_nan()) {
        Some(x) => format!("{:.0}", x * 1e3),
        None => "—".to_string(),
    };
    for f in first {
        let r = measure(&*backend, &all, f.n, args.repeats)?;
        let h = hf.and_then(|v| v.iter().find(|h| h.n == f.n));
        writeln!(
            out,
            "{:>6} | {:>6} {:>9} {:>5} | {:>6} {:>9} {:>5} | {:>6} {:>9} {:>5} | {:>10.2} {:>11.2}",
            f.n,
            ms(Some(f.forward)),
            ms(Some(r.forward)),
            ms(h.map(|h| h.forward_s)),
            ms(Some(f.full)),
            ms(Some(r.full)),
            ms(h.map(|h| h.full_lens_s)),
            ms(Some(f.step)),
            ms(Some(r.step)),
            ms(h.map(|h| h.step_s)),
            r.step / f.step,
            h.map_or(f64::NAN, |h| h.step_s / r.step),
        )?;
    }
    writeln!(
        out,
        "mistralrs: its capture forward for the lens; a generation step = mistral.rs's engine \
         drawing the token and the capture extending its cache by it, at the same time; \
         step × = mistralrs's step over the first backend's, and HF's over mistralrs's"
    )?;
    Ok(())
}

/// The same forward and full lens on the `mpi` backend (a pipeline of
/// `LOGIT_LENS_MPI_RANKS` ranks on this machine unless `LOGIT_LENS_MPI_ARGS` names hosts),
/// beside the figures above, measured in the same run.
#[cfg(feature = "mpi")]
fn pipeline(
    args: &BenchArgs,
    path: &std::path::Path,
    one: &[Row],
    out: &mut impl Write,
) -> Result<()> {
    let ranks = std::env::var("LOGIT_LENS_MPI_RANKS").unwrap_or_else(|_| "2".into());
    writeln!(out)?;
    let backend = match crate::backends::load(path, "mpi", &args.model.options()) {
        Ok(b) => b,
        Err(e) => {
            writeln!(out, "pipeline (mpi backend) not measured: {e:#}")?;
            return Ok(());
        }
    };
    writeln!(
        out,
        "{:>6} {:>15} {:>15} {:>8} | {:>15} {:>8}",
        "tokens",
        "1-proc fwd ms",
        format!("{ranks}-rank fwd ms"),
        "fwd ×",
        format!("{ranks}-rank full ms"),
        "full ×"
    )?;
    let all = backend.tokenize(&TEXT.repeat(8))?;
    for &Row {
        n,
        forward: fwd,
        full,
        ..
    } in one
    {
        let ids: Vec<u32> = all.iter().take(n).map(|t| t.id).collect();
        let (p_fwd, states) = time(args.repeats, || {
            Ok(backend.forward(&ids, CaptureOptions::default())?)
        })?;
        let lens = Lens::new(&*backend, &states, LensKind::Norm, 5);
        let sites = lens.all_layers();
        let (p_full, _) = time(args.repeats, || Ok(lens.grid(&sites)?))?;
        let ms = |x: f64| format!("{:.1}", x * 1e3);
        writeln!(
            out,
            "{n:>6} {:>15} {:>15} {:>8.2} | {:>15} {:>8.2}",
            ms(fwd),
            ms(p_fwd),
            fwd / p_fwd,
            ms(p_full),
            full / p_full
        )?;
    }
    writeln!(
        out,
        "× = one-process time / pipeline time (the pipeline's full lens includes the cells' trip \
         to rank 0 and the daemon; on one machine its ranks share the cores)"
    )?;
    Ok(())
}

/// The f32 GEMM rate (FLOP/s) candle reaches here on `[512, hidden] · [hidden, vocab]`, the
/// floor's rate; `None`, said on `out`, in a build without candle.
pub(crate) fn gemm_rate(
    hidden: usize,
    vocab: usize,
    repeats: usize,
    out: &mut impl Write,
) -> Result<Option<f64>> {
    #[cfg(feature = "candle")]
    {
        let _ = &out;
        Ok(Some(lens_candle::gemm_rate(512, hidden, vocab, repeats)?))
    }
    #[cfg(not(feature = "candle"))]
    {
        let _ = (hidden, vocab, repeats);
        writeln!(out, "GEMM floor not measured: a build without candle")?;
        Ok(None)
    }
}

/// The lens's products against the floor measured in this run: their FLOPs (`2 · rows ·
/// hidden · vocab`, the readout; the forward is not counted) over the f32 GEMM rate candle
/// reaches here on a large product of the readout's shape.
fn floor(
    info: &lens_core::ModelInfo,
    rows: &[Row],
    repeats: usize,
    out: &mut impl Write,
) -> Result<()> {
    let Some(rate) = gemm_rate(info.hidden_size, info.vocab_size, repeats, out)? else {
        return Ok(());
    };
    writeln!(out)?;
    writeln!(
        out,
        "f32 GEMM rate here ([512, {}] · [{}, {}], candle): {:.1} GFLOP/s",
        info.hidden_size,
        info.hidden_size,
        info.vocab_size,
        rate / 1e9
    )?;
    writeln!(
        out,
        "{:>6} {:>11} {:>14} {:>13} {:>9} | {:>11} {:>13} {:>9}",
        "tokens",
        "1-pos ms",
        "1-pos readout",
        "1-pos floor",
        "1-pos/fl",
        "full ms",
        "full floor",
        "full/fl"
    )?;
    let product = |r: usize| 2.0 * (r * info.hidden_size * info.vocab_size) as f64 / rate;
    for &Row {
        n,
        full,
        one,
        readout,
        sites,
        ..
    } in rows
    {
        let (one_floor, full_floor) = (product(sites), product(sites * n));
        writeln!(
            out,
            "{n:>6} {:>11.1} {:>14.1} {:>13.1} {:>9.2} | {:>11.1} {:>13.1} {:>9.2}",
            one * 1e3,
            readout * 1e3,
            one_floor * 1e3,
            one / one_floor,
            full * 1e3,
            full_floor * 1e3,
            full / full_floor
        )?;
    }
    writeln!(
        out,
        "floor = the readout's FLOPs / that rate; /fl = time / floor (targets: one position \
         ≤ 11 ms on SmolLM2, ≤ 40 ms on Gemma 3; the full lens within 1.3× of its floor)"
    )?;
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run_hf(
    python: &PathBuf,
    model: &PathBuf,
    backend: &dyn Backend,
    args: &BenchArgs,
) -> Result<Vec<HfResult>> {
    let dir = tempfile_dir()?;
    let script = dir.join("hf_lens.py");
    std::fs::write(&script, HF_SCRIPT)?;
    let all = backend.tokenize(&TEXT.repeat(8))?;
    let prompts: Vec<Vec<u32>> = args
        .sizes
        .iter()
        .map(|&n| all.iter().take(n).map(|t| t.id).collect())
        .collect();
    let input = serde_json::json!({ "model": model, "prompts": prompts, "repeats": args.repeats });
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.to_string().as_bytes())?;
    }
    let output = child.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        output.status.success(),
        "the reference script failed ({})",
        output.status
    );
    serde_json::from_slice(&output.stdout).context("unreadable output from the reference script")
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("logit-lens-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
