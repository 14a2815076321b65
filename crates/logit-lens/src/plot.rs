//! `logit-lens plot`: the lens as an SVG, PNG or interactive HTML heatmap (crate `lens-plot`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use lens_core::{IndexSpec, Query};
use lens_plot::{Metric, Options, Plot};

use crate::cli::{self, ModelArgs, PromptArgs};

#[derive(clap::Args)]
pub struct PlotArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write the plot; the format follows the extension (.svg, .png, .html).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// The output format, when the extension does not say it.
    #[arg(long, value_enum)]
    pub format: Option<PlotFormat>,
    /// What colours the cells: top-1 probability, the actual next token's probability, the
    /// entropy, the KL divergence to the model's output, or the next token's rank (log scale).
    #[arg(long, default_value = "prob")]
    pub metric: Metric,
    /// norm (the final norm, then the unembedding), raw (the unembedding alone) or
    /// tuned:PATH (a tuned lens's translators, then the norm lens).
    #[arg(long, default_value = "norm")]
    pub lens: crate::tuned::LensArg,
    /// Layers to show: `all`, `A..B`, `A..`, `..B`, `:STEP`, `A..B:STEP`, or a list `0,10,30`.
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: IndexSpec,
    /// Token positions to show: `A..B` (inclusive), `A..`, `..B`, one position or a list;
    /// negative numbers count from the end (`-8..` = the last eight tokens).
    #[arg(
        long,
        value_name = "A..B",
        allow_hyphen_values = true,
        default_value = "all"
    )]
    pub tokens: IndexSpec,
    /// Embeddings at the top, the last layer at the bottom.
    #[arg(long)]
    pub flip: bool,
    /// PNG pixels per SVG unit.
    #[arg(long, default_value_t = 2.0)]
    pub scale: f32,
    /// Predictions per cell shown when hovering in the HTML page.
    #[arg(long, short = 'k', default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub top_k: u16,
    /// Columns per panel in SVG/PNG; longer prompts wrap into several panels.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_columns: u16,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum PlotFormat {
    Svg,
    Png,
    Html,
}

pub(crate) fn format_of(out: &Path, format: Option<PlotFormat>) -> Result<PlotFormat> {
    if let Some(f) = format {
        return Ok(f);
    }
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => Ok(PlotFormat::Svg),
        Some("png") => Ok(PlotFormat::Png),
        Some("html" | "htm") => Ok(PlotFormat::Html),
        _ => bail!(
            "cannot tell the format of {}: use a .svg, .png or .html name, or --format",
            out.display()
        ),
    }
}

pub fn run(a: PlotArgs) -> Result<()> {
    let format = format_of(&a.out, a.format)?;
    if format == PlotFormat::Png && !(a.scale.is_finite() && a.scale > 0.0 && a.scale <= 16.0) {
        bail!("--scale must be in (0, 16], not {}", a.scale);
    }
    let mut query = Query {
        layers: a.layers.clone(),
        positions: a.tokens.clone(),
        kind: a.lens.kind,
        tuned: None,
        top_k: usize::from(a.top_k),
    };
    let (backend, tokens) = cli::load_prompt(&a.prompt, &a.model, &query)?;
    query.tuned = a.lens.translators(&*backend)?;
    let answer = cli::answer(&*backend, &tokens, &query)?;
    let decode = |id: u32| backend.decode(id);
    let plot = Plot {
        answer: &answer,
        tokens: &tokens,
        decode: &decode,
        model: &backend.info().name,
    };
    let options = Options {
        metric: a.metric,
        flip: a.flip,
        max_columns: usize::from(a.max_columns),
    };
    let bytes = match format {
        PlotFormat::Svg => lens_plot::svg(&plot, &options).into_bytes(),
        PlotFormat::Png => lens_plot::png(&plot, &options, a.scale)?,
        PlotFormat::Html => lens_plot::html(&plot, &options).into_bytes(),
    };
    std::fs::write(&a.out, &bytes).with_context(|| format!("cannot write {}", a.out.display()))?;
    tracing::info!("wrote {} ({} bytes)", a.out.display(), bytes.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(
            format_of(Path::new("a.SVG"), None).ok(),
            Some(PlotFormat::Svg)
        );
        assert_eq!(
            format_of(Path::new("a.htm"), None).ok(),
            Some(PlotFormat::Html)
        );
        assert_eq!(
            format_of(Path::new("a.out"), Some(PlotFormat::Png)).ok(),
            Some(PlotFormat::Png)
        );
        assert!(format_of(Path::new("a.jpg"), None).is_err());
    }
}
