//! `logit-lens plot`: the lens as an SVG, PNG or interactive HTML heatmap (crate `lens-plot`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use lens_core::{Backend, CaptureOptions, Lens, LensKind, Site};
use lens_plot::{Metric, Options, Plot};

use crate::cli::{self, LensArg, ModelArgs, PromptArgs};
use crate::layers::LayerSpec;

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
    #[arg(long, value_enum, default_value = "prob")]
    pub metric: MetricArg,
    #[arg(long, value_enum, default_value = "norm")]
    pub lens: LensArg,
    /// Layers to show: `all`, `A..B`, `A..`, `..B`, `:STEP`, `A..B:STEP`, or a list `0,10,30`.
    #[arg(long, default_value = "all")]
    pub layers: LayerSpec,
    /// Token positions to show: `A..B` (inclusive), `A..`, `..B`, or one position; negative
    /// numbers count from the end (`-8..` = the last eight tokens).
    #[arg(long, value_name = "A..B", allow_hyphen_values = true)]
    pub tokens: Option<TokenRange>,
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

#[derive(Clone, Copy, ValueEnum)]
pub enum MetricArg {
    Prob,
    NextProb,
    Entropy,
    Kl,
    Rank,
}

impl From<MetricArg> for Metric {
    fn from(m: MetricArg) -> Metric {
        match m {
            MetricArg::Prob => Metric::Prob,
            MetricArg::NextProb => Metric::NextProb,
            MetricArg::Entropy => Metric::Entropy,
            MetricArg::Kl => Metric::Kl,
            MetricArg::Rank => Metric::Rank,
        }
    }
}

/// `--tokens`: an inclusive range of positions, ends possibly counted from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    start: Option<i64>,
    end: Option<i64>,
}

impl FromStr for TokenRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| -> Result<Option<i64>, String> {
            let t = t.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse()
                .map(Some)
                .map_err(|_| format!("`{t}` is not a token position in `{s}`"))
        };
        match s.split_once("..") {
            Some((a, b)) => Ok(TokenRange {
                start: num(a)?,
                end: num(b)?,
            }),
            None => {
                let p = num(s)?.ok_or("expected `A..B`, `A..`, `..B` or a position")?;
                Ok(TokenRange {
                    start: Some(p),
                    end: Some(p),
                })
            }
        }
    }
}

impl TokenRange {
    /// The positions of a prompt of `n` tokens, ascending.
    pub fn resolve(self, n: usize) -> Result<Vec<usize>, String> {
        let n_i = n as i64;
        let at = |p: i64| -> Result<usize, String> {
            let idx = if p < 0 { n_i + p } else { p };
            if idx < 0 || idx >= n_i {
                Err(format!(
                    "token position {p} is outside the prompt of {n} tokens"
                ))
            } else {
                Ok(idx as usize)
            }
        };
        let start = at(self.start.unwrap_or(0))?;
        let end = at(self.end.unwrap_or(n_i - 1))?;
        if start > end {
            return Err(format!("empty token range {start}..{end}"));
        }
        Ok((start..=end).collect())
    }
}

fn format_of(out: &Path, format: Option<PlotFormat>) -> Result<PlotFormat> {
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
    let (backend, tokens) = cli::load_prompt(&a.prompt, &a.model)?;
    let info = backend.info().clone();
    let layers = a
        .layers
        .resolve(info.n_layers)
        .map_err(anyhow::Error::msg)?;
    let positions: Vec<usize> = match a.tokens {
        Some(r) => r.resolve(tokens.len()).map_err(anyhow::Error::msg)?,
        None => (0..tokens.len()).collect(),
    };
    let kind = LensKind::from(a.lens);
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let states = backend.forward(&ids, CaptureOptions::default())?;
    let lens = Lens::new(&backend, &states, kind, usize::from(a.top_k));
    let sites: Vec<Site> = layers.iter().map(|&l| Site::Layer(l)).collect();
    let views = lens.positions(&positions, &sites)?;
    let tracks = if format == PlotFormat::Html {
        lens_plot::tracks(&backend, &states, kind, &views, &layers)?
    } else {
        Vec::new()
    };
    let decode = |id: u32| backend.decode(id);
    let plot = Plot {
        views: &views,
        tokens: &tokens,
        layers: &layers,
        decode: &decode,
        model: &info.name,
        lens: kind,
        tracks: &tracks,
    };
    let options = Options {
        metric: a.metric.into(),
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

    #[track_caller]
    fn check(spec: &str, n: usize, expect: &str) {
        let got = match spec.parse::<TokenRange>().and_then(|r| r.resolve(n)) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "spec `{spec}`");
    }

    #[test]
    fn token_ranges() {
        check("1..3", 5, "[1, 2, 3]");
        check("3..", 5, "[3, 4]");
        check("..1", 5, "[0, 1]");
        check("-2..", 5, "[3, 4]");
        check("2", 5, "[2]");
        check("..", 3, "[0, 1, 2]");
        check(
            "0..5",
            5,
            "error: token position 5 is outside the prompt of 5 tokens",
        );
        check("3..1", 5, "error: empty token range 3..1");
        check("a..", 5, "error: `a` is not a token position in `a..`");
    }

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
