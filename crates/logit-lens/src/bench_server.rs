//! `logit-lens bench-server`: the daemon's latencies, measured in-process on its engine (the
//! same code the LSP and TCP doors call, without the transport and the LSP door's settle delay,
//! `lens_server::lsp::SETTLE`): cold analyze of a 256-token document, hover after a one-character edit at its end (prefix
//! reuse), hover after an edit in the middle, warm hover, and the cache's bytes after many
//! documents against its budget.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lens_core::{Backend, Lens, LensKind, Stop};
use lens_server::{AnalyzeParams, Engine, HoverOptions};

use crate::cli::{self, ModelArgs};

#[derive(clap::Args)]
pub struct BenchServerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Activation cache budget in MiB.
    #[arg(long, default_value_t = 512)]
    pub cache_mb: usize,
    /// Document length in tokens.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Edits (and hovers) per latency figure.
    #[arg(long, default_value_t = 100)]
    pub edits: usize,
    /// Different documents for the memory figure.
    #[arg(long, default_value_t = 100)]
    pub documents: usize,
    /// Instead of the editor's latencies: this many clients at once against a real daemon
    /// over TCP (see `--requests`).
    #[arg(long, value_name = "N")]
    pub clients: Option<usize>,
    /// Requests per client in the `--clients` mode.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub requests: usize,
    /// Instead of timing the engine in-process: the editor's cases by name, against a real
    /// `serve --stdio` driven over LSP from outside.
    #[arg(long, conflicts_with = "clients")]
    pub lsp: bool,
}

const PROSE: &str = "The logit lens reads the residual stream of a transformer at every layer \
through the model's own unembedding, and shows which next token each layer would predict. \
Early layers tend to echo the current token; middle layers sketch plausible continuations; the \
last layers settle on the answer. Watching a prediction form, layer by layer, tells you where \
in the network a fact is recalled, where a pattern is copied, and where the model changes its mind. ";

pub(crate) fn percentile(xs: &mut [Duration], p: f64) -> f64 {
    xs.sort();
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// A document of exactly `n` tokens (cut at a token boundary of repeated prose).
fn document(backend: &dyn Backend, n: usize) -> Result<String> {
    let mut text = String::new();
    loop {
        text.push_str(PROSE);
        let tokens = backend.tokenize(&text)?;
        if tokens.len() > n {
            return Ok(text[..tokens[n - 1].end].to_string());
        }
    }
}

fn hover_end(engine: &Engine, text: &str, opts: &HoverOptions) -> Result<Duration> {
    hover_at(engine, text, text.len().saturating_sub(1), opts)
}

fn hover_at(engine: &Engine, text: &str, byte: usize, opts: &HoverOptions) -> Result<Duration> {
    let t = Instant::now();
    // As the server does (`lens_server::Turns::compute`): the work runs on a rayon worker.
    let out = lens_core::in_pool(|| engine.hover(text, byte, opts, None, &Stop::never()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let took = t.elapsed();
    anyhow::ensure!(
        out.is_some_and(|h| h.markdown.contains("| layer |")),
        "no hover"
    );
    Ok(took)
}

pub fn run(a: BenchServerArgs) -> Result<()> {
    if let Some(clients) = a.clients {
        anyhow::ensure!(
            clients > 0 && a.requests > 0,
            "--clients and --requests must be at least 1"
        );
        return crate::bench_load::run(&a.model, clients, a.requests);
    }
    if a.lsp {
        return crate::bench_lsp::run(&a.model, a.tokens, a.edits.min(40));
    }
    let backend = cli::load(&a.model)?;
    let precision = backend.info().precision.clone();
    let backend: Arc<dyn Backend> = Arc::from(backend);
    let budget = a.cache_mb << 20;
    let engine = Engine::new(backend.clone(), budget);
    let opts = HoverOptions::default();
    let mut out = anstream::stdout();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    writeln!(
        out,
        "model precision {precision}, {threads} threads, cache budget {} MiB",
        a.cache_mb
    )?;

    let doc = document(&*backend, a.tokens)?;
    let t = Instant::now();
    let report = engine
        .analyze(
            &AnalyzeParams {
                text: doc.clone(),
                positions: None,
                lens: Default::default(),
            },
            &Stop::never(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cold = t.elapsed();
    writeln!(
        out,
        "cold analyze, {} tokens x {} layers: {:.0} ms",
        report.tokens.len(),
        report.layers.len(),
        cold.as_secs_f64() * 1e3
    )?;

    // One-character edits at the end, each followed by a hover at the end.
    let mut text = doc.clone();
    hover_end(&engine, &text, &opts)?;
    let mut times = Vec::with_capacity(a.edits);
    for i in 0..a.edits {
        text.push(char::from(b'a' + (i % 26) as u8));
        times.push(hover_end(&engine, &text, &opts)?);
    }
    let (p50, p95) = (percentile(&mut times, 0.5), percentile(&mut times, 0.95));
    writeln!(
        out,
        "hover after a one-char edit at the end: p50 {p50:.1} ms, p95 {p95:.1} ms ({} edits)",
        a.edits
    )?;

    // Typing before the last word, then hovering it (the editor's case): the tokens from the
    // edit on are recomputed, and both the hovered position and the one before it (whose
    // prediction is the written word's probability) are read out.
    let mut times = Vec::with_capacity(a.edits);
    let mut text3 = doc.clone();
    let word = text3.rfind(' ').unwrap_or(0);
    for i in 0..a.edits {
        let at = text3.rfind(' ').unwrap_or(0);
        text3.insert(at, char::from(b'a' + (i % 26) as u8));
        if i % 6 == 5 {
            text3.insert(at + 1, ' ');
        }
        let byte = text3.rfind(' ').unwrap_or(word) + 1;
        times.push(hover_at(&engine, &text3, byte, &opts)?);
    }
    let (p50t, p95t) = (percentile(&mut times, 0.5), percentile(&mut times, 0.95));
    writeln!(
        out,
        "hover on the last word after typing before it: p50 {p50t:.1} ms, p95 {p95t:.1} ms ({} edits)",
        a.edits
    )?;

    // Where an end-edit hover's time goes: the forward pass reusing the prefix, and the lens
    // at the hovered position (all layers); the previous position's readout is cached while
    // the edits stay inside the last token.
    let (mut fwd, mut lens_t) = (Vec::new(), Vec::new());
    let mut text2 = doc.clone();
    for i in 0..a.edits.min(20) {
        text2.push(char::from(b'A' + (i % 26) as u8));
        let ids: Vec<u32> = backend.tokenize(&text2)?.iter().map(|t| t.id).collect();
        let (t0, t1, t2) = lens_core::in_pool(|| -> Result<_> {
            let t0 = Instant::now();
            let states = engine
                .states(&ids, &Stop::never())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let t1 = Instant::now();
            let lens = Lens::new(&*backend, &states, LensKind::Norm, 5);
            lens.position(ids.len() - 1, &lens.all_layers())?;
            Ok((t0, t1, Instant::now()))
        })?;
        fwd.push(t1 - t0);
        lens_t.push(t2 - t1);
    }
    writeln!(
        out,
        "  of which: forward reusing the prefix p50 {:.1} ms, lens at the hovered position x {} layers p50 {:.1} ms",
        percentile(&mut fwd, 0.5),
        backend.info().n_layers + 1,
        percentile(&mut lens_t, 0.5)
    )?;

    // Edits in the middle: everything after the edit is recomputed.
    let mut times = Vec::new();
    let mut text = doc.clone();
    for i in 0..a.edits.min(20) {
        let mid = text.len() / 2;
        let mid = (mid..text.len())
            .find(|&b| text.is_char_boundary(b))
            .unwrap_or(text.len());
        text.insert(mid, char::from(b'a' + (i % 26) as u8));
        times.push(hover_end(&engine, &text, &opts)?);
    }
    let (p50m, p95m) = (percentile(&mut times, 0.5), percentile(&mut times, 0.95));
    writeln!(
        out,
        "hover after an edit in the middle: p50 {p50m:.1} ms, p95 {p95m:.1} ms ({} edits)",
        times.len()
    )?;

    // Warm: the same hover again.
    let mut times = Vec::with_capacity(a.edits);
    for _ in 0..a.edits {
        times.push(hover_end(&engine, &text, &opts)?);
    }
    let (p50w, p95w) = (percentile(&mut times, 0.5), percentile(&mut times, 0.95));
    writeln!(out, "warm hover: p50 {p50w:.2} ms, p95 {p95w:.2} ms")?;

    // Memory: many different documents.
    let mut peak = 0;
    for i in 0..a.documents {
        let text = format!("Document {i}. {}", &doc[..doc.len() / 2]);
        hover_end(&engine, &text, &opts)?;
        peak = peak.max(engine.stats().bytes);
    }
    let s = engine.stats();
    writeln!(
        out,
        "cache after {} documents: {} entries, {:.1} MiB (peak {:.1} MiB) of a {} MiB budget{}",
        a.documents,
        s.entries,
        s.bytes as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        a.cache_mb,
        if peak <= budget {
            ""
        } else {
            " -- OVER BUDGET"
        }
    )?;
    writeln!(
        out,
        "cache totals: hits {}, misses {}, tokens reused {}, tokens computed {}",
        s.hits, s.misses, s.tokens_reused, s.tokens_computed
    )?;
    out.flush().context("stdout")?;
    Ok(())
}
