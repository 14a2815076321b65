//! `logit-lens generate`: the model writes, and every new token comes with its lens: the top-1
//! of each layer at the step that chose it, the first layer where the chosen token was top-1,
//! and its probability there. A live heatmap in the terminal (one column per generated token,
//! redrawn as it grows), or one JSON line per token.

use std::io::{IsTerminal, Write};

use anstyle::Style;
use anyhow::Result;
use lens_core::{GenerateRequest, IndexSpec, Sampling, Stop};
use lens_server::wire::{self, GenerateStepJson};

use crate::cli::{load, read_prompt, ModelArgs, PromptArgs};
use crate::render::{cell_style, fit};

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum StreamFormat {
    Text,
    Jsonl,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// How many tokens to write at most (fewer when the model writes a stop token).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_tokens: usize,
    /// 0: always the most likely token; above, sample from softmax(logits / T).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "T",
        allow_hyphen_values = true
    )]
    pub temperature: f32,
    /// Sample from the smallest set of most likely tokens whose probability reaches P.
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub top_p: f32,
    /// The sampler's seed (the candle backend; mistral.rs 0.8.1's engine seeds its sampler
    /// once, with its own fixed seed).
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Wrap the prompt in the model's chat template as one user turn.
    #[arg(long)]
    pub chat: bool,
    /// Layers to show (see `run --layers`).
    #[arg(long, default_value = "all", allow_hyphen_values = true)]
    pub layers: IndexSpec,
    #[arg(long, value_enum, default_value = "text")]
    pub format: StreamFormat,
}

fn jsonl(out: &mut dyn Write, step: &GenerateStepJson) -> Result<()> {
    writeln!(out, "{}", serde_json::to_string(step)?)?;
    out.flush()?;
    Ok(())
}

const LABEL: usize = 6;
const CELL: usize = 9;

/// The heatmap of the last columns that fit: one row per layer (last on top), one column per
/// generated token; a cell is the layer's top-1, coloured by its probability, `*` where it is
/// the token chosen. Returns the number of lines written.
/// `live`: redrawn in place, each line ends by clearing the rest of the terminal's line.
fn heatmap(
    out: &mut dyn Write,
    columns: &[GenerateStepJson],
    width: usize,
    live: bool,
) -> Result<usize> {
    let eol = if live { "\x1b[K" } else { "" };
    let fits = (width.saturating_sub(LABEL) / CELL).max(1);
    let shown = &columns[columns.len().saturating_sub(fits)..];
    let Some(first) = shown.first() else {
        return Ok(0);
    };
    let dim = Style::new().dimmed();
    let mut lines = 0;
    for row in (0..first.layers.len()).rev() {
        write!(
            out,
            "{dim}{:>w$} {dim:#}",
            first.layers[row].layer,
            w = LABEL - 1
        )?;
        for c in shown {
            let l = &c.layers[row];
            let mark = if l.top1 == c.token { "*" } else { " " };
            let s = cell_style(l.top1_prob);
            write!(
                out,
                "{s}{}{mark}{s:#}",
                fit(&lens_plot::visible(&l.top1_text), CELL - 1)
            )?;
        }
        writeln!(out, "{eol}")?;
        lines += 1;
    }
    write!(out, "{:>w$}", "", w = LABEL)?;
    for c in shown {
        write!(out, "{}", fit(&lens_plot::visible(&c.text), CELL))?;
    }
    writeln!(out, "{eol}")?;
    write!(out, "{:>w$}", "", w = LABEL)?;
    for c in shown {
        let first = match (c.first_top1_layer, c.first_top1_prob) {
            (Some(l), Some(p)) => format!("L{l} {p:.2}"),
            _ => "never".to_string(),
        };
        write!(out, "{dim}{}{dim:#}", fit(&first, CELL))?;
    }
    writeln!(out, "{eol}")?;
    Ok(lines + 2)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    let text = read_prompt(&a.prompt)?;
    if text.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let backend = load(&a.model)?;
    let name = a.model.backend.clone();
    let generator = backend.generator().ok_or_else(|| {
        lens_core::Error::Unsupported(format!(
            "the {} backend cannot generate (use --backend candle or mistralrs)",
            match name.as_str() {
                "auto" => "chosen",
                n => n,
            }
        ))
    })?;
    let info = backend.info();
    let layers = a
        .layers
        .layers(info.n_layers)
        .map_err(lens_core::Error::Layers)?;
    let prompt: Vec<u32> = match a.chat {
        true => generator.chat_prompt(&text)?,
        false => backend.tokenize(&text)?.iter().map(|t| t.id).collect(),
    };
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    let stop_tokens = generator.stop_tokens();
    let request = GenerateRequest {
        prompt: &prompt,
        max_tokens: a.max_tokens,
        sampling,
    };
    let mut out = anstream::stdout();
    let live = a.format == StreamFormat::Text && std::io::stdout().is_terminal();
    let width = crate::render::terminal_width();
    let mut columns: Vec<GenerateStepJson> = Vec::new();
    let mut drawn = 0;
    if a.format == StreamFormat::Text {
        writeln!(
            out,
            "{} · {} prompt tokens · up to {} new · temperature {} · layers {}..={}",
            info.name,
            prompt.len(),
            a.max_tokens,
            a.temperature,
            layers.first().copied().unwrap_or(0),
            layers.last().copied().unwrap_or(0),
        )?;
    }
    let mut failed: Option<anyhow::Error> = None;
    let finish = generator.generate(&request, &Stop::never(), &mut |step| {
        let result = (|| -> Result<()> {
            let c = wire::generate_step(&*backend, &step, &layers)?
                .with_finish(a.max_tokens, &stop_tokens);
            match a.format {
                StreamFormat::Jsonl => jsonl(&mut out, &c)?,
                StreamFormat::Text if live => {
                    columns.push(c);
                    if drawn > 0 {
                        write!(out, "\x1b[{drawn}A\r")?;
                    }
                    drawn = heatmap(&mut out, &columns, width, true)?;
                    out.flush()?;
                }
                StreamFormat::Text => columns.push(c),
            }
            Ok(())
        })();
        result.map_err(|e| {
            let msg = format!("{e:#}");
            failed = Some(e);
            lens_core::Error::Backend(msg)
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let finish = finish?;
    if a.format == StreamFormat::Text {
        if !live {
            heatmap(&mut out, &columns, width, false)?;
        }
        let written: String = columns.iter().map(|c| c.text.as_str()).collect();
        writeln!(
            out,
            "{} tokens ({}): {written:?}",
            columns.len(),
            finish.as_str()
        )?;
    }
    Ok(())
}
