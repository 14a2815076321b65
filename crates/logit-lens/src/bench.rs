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
    let all = backend.tokenize(&TEXT.repeat(8))?;
    let mut rows = Vec::new();
    let mut readouts = Vec::new();
    for &n in &args.sizes {
        let ids: Vec<u32> = all.iter().take(n).map(|t| t.id).collect();
        let (fwd, states) = time(args.repeats, || {
            Ok(backend.forward(&ids, CaptureOptions::default())?)
        })?;
        let lens = Lens::new(&*backend, &states, LensKind::Norm, 5);
        let sites = lens.all_layers();
        let (full, _) = time(args.repeats, || Ok(lens.grid(&sites)?))?;
        let (one, _) = time(args.repeats.max(5), || {
            Ok(lens.position(ids.len() - 1, &sites)?)
        })?;
        // The one position's readout alone (its logits, no reductions): the product the floor
        // below bounds.
        let last: Vec<f32> = sites
            .iter()
            .flat_map(|&s| states.row(s, ids.len() - 1).unwrap_or(&[]).to_vec())
            .collect();
        let (readout, _) = time(args.repeats.max(5), || {
            Ok(backend.readout(&last, LensKind::Norm)?)
        })?;
        rows.push((
            ids.len(),
            fwd,
            full,
            one,
            peak_rss_mib().unwrap_or(f64::NAN),
        ));
        readouts.push((readout, sites.len()));
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
        "{:>6} {:>11} {:>11} {:>11} {:>9} | {:>11} {:>11} {:>11} | {:>8} {:>8}",
        "tokens",
        "forward ms",
        "full ms",
        "1-pos ms",
        "peak MiB",
        "HF fwd ms",
        "HF full ms",
        "HF 1-pos ms",
        "full ×",
        "1-pos ×"
    )?;
    for (n, fwd, full, one, mem) in &rows {
        let h = hf.as_ref().and_then(|v| v.iter().find(|r| r.n == *n));
        let ms = |x: f64| format!("{:.1}", x * 1e3);
        let (hf_fwd, hf_full, hf_one, r_full, r_one) = match h {
            Some(h) => (
                ms(h.forward_s),
                ms(h.full_lens_s),
                ms(h.one_position_s),
                format!("{:.2}", h.full_lens_s / full),
                format!("{:.2}", h.one_position_s / one),
            ),
            None => ("—".into(), "—".into(), "—".into(), "—".into(), "—".into()),
        };
        writeln!(out, "{n:>6} {:>11} {:>11} {:>11} {:>9.0} | {hf_fwd:>11} {hf_full:>11} {hf_one:>11} | {r_full:>8} {r_one:>8}", ms(*fwd), ms(*full), ms(*one), mem)?;
    }
    writeln!(out, "× = HF time / logit-lens time (higher is better for logit-lens; target for the full lens ≥ 3)")?;
    floor(&info, &rows, &readouts, args.repeats, &mut out)?;
    #[cfg(feature = "mpi")]
    if args.model.backend != "mpi" {
        pipeline(&args, &path, &rows, &mut out)?;
    }
    Ok(())
}

/// The same forward and full lens on the `mpi` backend (a pipeline of
/// `LOGIT_LENS_MPI_RANKS` ranks on this machine unless `LOGIT_LENS_MPI_ARGS` names hosts),
/// beside the figures above, measured in the same run.
#[cfg(feature = "mpi")]
fn pipeline(
    args: &BenchArgs,
    path: &std::path::Path,
    one: &[(usize, f64, f64, f64, f64)],
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
    for &(n, fwd, full, _, _) in one {
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

/// The lens's products against the floor measured in this run: their FLOPs (`2 · rows ·
/// hidden · vocab`, the readout; the forward is not counted) over the f32 GEMM rate candle
/// reaches here on a large product of the readout's shape.
fn floor(
    info: &lens_core::ModelInfo,
    rows: &[(usize, f64, f64, f64, f64)],
    readouts: &[(f64, usize)],
    repeats: usize,
    out: &mut impl Write,
) -> Result<()> {
    #[cfg(feature = "candle")]
    let rate = lens_candle::gemm_rate(512, info.hidden_size, info.vocab_size, repeats)?;
    #[cfg(not(feature = "candle"))]
    let rate = {
        let _ = (info, rows, readouts, repeats);
        return Ok(writeln!(
            out,
            "GEMM floor not measured: a build without candle"
        )?);
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
    for ((n, _, full, one, _), (readout, sites)) in rows.iter().zip(readouts) {
        let (one_floor, full_floor) = (product(*sites), product(*sites * n));
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
         ≤ 11 ms, the full lens within 1.3× of its floor)"
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
