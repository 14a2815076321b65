//! `logit-lens diff`: what an edit changed, layer by layer (the diff lens of lens-core).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lens_core::{Backend, CaptureOptions, IndexSpec, Query, Stop, Token};
use lens_plot::{DiffPlot, Options};

use crate::cli::{self, Format, ModelArgs, PromptArgs};
use crate::plot::{format_of, PlotFormat};
use crate::render;

#[derive(clap::Args)]
pub struct DiffArgs {
    /// The two versions, before then after (or give them with --file, twice).
    #[arg(num_args = 0..=2, value_names = ["BEFORE", "AFTER"])]
    pub prompts: Vec<String>,
    /// Read a version from a file: `--file BEFORE --file AFTER`.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "prompts")]
    pub file: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Layers to compare: `all`, `A..B`, `A..`, `..B`, `:STEP`, `A..B:STEP`, or a list.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: IndexSpec,
    /// Positions of the *after* version to compare (those aligned with the before version).
    #[arg(
        long,
        value_name = "A..B",
        allow_hyphen_values = true,
        default_value = "all"
    )]
    pub tokens: IndexSpec,
    /// Show one position of the after version in detail, layer by layer (default: the last).
    #[arg(long, short = 'p', allow_hyphen_values = true)]
    pub position: Option<i64>,
    /// Predictions per version and cell.
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub top_k: u16,
    /// norm (the final norm, then the unembedding), raw (the unembedding alone) or
    /// tuned:PATH (a tuned lens's translators, then the norm lens).
    #[arg(long, default_value = "norm")]
    pub lens: crate::tuned::LensArg,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Also draw the diff heatmap here (.svg, .png or .html).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// PNG pixels per SVG unit.
    #[arg(long, default_value_t = 2.0)]
    pub scale: f32,
}

/// The two texts, from the arguments or the files.
fn versions(a: &DiffArgs) -> Result<[String; 2]> {
    let texts: Vec<String> = match (a.prompts.len(), a.file.len()) {
        (2, 0) => a.prompts.clone(),
        (0, 2) => a
            .file
            .iter()
            .map(|f| {
                cli::read_prompt(&PromptArgs {
                    prompt: None,
                    file: Some(f.clone()),
                })
            })
            .collect::<Result<_>>()?,
        _ => bail!("give two versions: `diff BEFORE AFTER` or `diff --file BEFORE --file AFTER`"),
    };
    let [before, after]: [String; 2] = texts
        .try_into()
        .map_err(|_| anyhow::anyhow!("two versions are needed"))?;
    Ok([before, after])
}

fn tokenize(backend: &dyn Backend, text: &str, which: &str) -> Result<Vec<Token>> {
    let tokens = backend.tokenize(text)?;
    if tokens.is_empty() {
        bail!("the {which} version is empty");
    }
    let context = backend.info().context_length;
    if tokens.len() > context {
        bail!(
            "the {which} version has {} tokens, more than the model's context of {context}",
            tokens.len()
        );
    }
    Ok(tokens)
}

pub fn run(a: DiffArgs) -> Result<()> {
    let [before_text, after_text] = versions(&a)?;
    let plot_format = a.out.as_deref().map(|o| format_of(o, None)).transpose()?;
    if plot_format == Some(PlotFormat::Png)
        && !(a.scale.is_finite() && a.scale > 0.0 && a.scale <= 16.0)
    {
        bail!("--scale must be in (0, 16], not {}", a.scale);
    }
    let mut query = Query {
        layers: a.layers.clone(),
        positions: a.tokens.clone(),
        kind: a.lens.kind,
        tuned: None,
        top_k: usize::from(a.top_k),
    };
    let backend = cli::load(&a.model)?;
    query.tuned = a.lens.translators(&*backend)?;
    query.layers_of(backend.info().n_layers)?;
    let before = tokenize(&*backend, &before_text, "before")?;
    let after = tokenize(&*backend, &after_text, "after")?;
    query.positions_of(after.len())?;
    let detail = match a.position {
        None => after.len() - 1,
        Some(p) => IndexSpec::List(vec![p])
            .positions(after.len())
            .map_err(anyhow::Error::msg)?
            .first()
            .copied()
            .context("no position")?,
    };
    // The after version reuses the before version's states where they agree, as the daemon
    // does after an edit: the shared prefix is the same rows.
    let ids = |t: &[Token]| -> Vec<u32> { t.iter().map(|t| t.id).collect() };
    let states_before = backend.forward(&ids(&before), CaptureOptions::default())?;
    let states_after =
        backend.forward_reusing(&states_before, &ids(&after), CaptureOptions::default())?;
    let diff = query.diff(&*backend, &states_before, &states_after, &Stop::never())?;
    let mut out = anstream::stdout();
    match a.format {
        Format::Json => {
            let report = lens_server::wire::build_diff(&*backend, &before, &after, &diff);
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Text => {
            render::diff_grid(&mut out, &*backend, &before, &after, &diff)?;
            render::diff_table(&mut out, &*backend, &before, &after, &diff, detail)?;
        }
    }
    if let (Some(path), Some(format)) = (&a.out, plot_format) {
        let decode = |id: u32| backend.decode(id);
        let plot = DiffPlot {
            diff: &diff,
            before: &before,
            after: &after,
            decode: &decode,
            model: &backend.info().name,
        };
        let options = Options::default();
        let bytes = match format {
            PlotFormat::Svg => lens_plot::diff_svg(&plot, &options).into_bytes(),
            PlotFormat::Png => lens_plot::diff_png(&plot, &options, a.scale)?,
            PlotFormat::Html => lens_plot::diff_html(&plot, &options).into_bytes(),
        };
        std::fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
        tracing::info!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
