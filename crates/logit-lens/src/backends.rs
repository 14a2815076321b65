//! The one place that names backend crates: the loaders compiled into this build (one cargo
//! feature each), and `logit-lens backends`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use lens_core::{Backend, LoadOptions, Registry, Source};

/// The loaders of this build, in order of preference for `--backend auto`.
pub fn registry() -> Registry {
    Registry::new(vec![
        #[cfg(feature = "candle")]
        &lens_candle::LOADER,
        #[cfg(feature = "mistralrs")]
        &lens_mistralrs::LOADER,
        #[cfg(feature = "mpi")]
        &lens_mpi::LOADER,
    ])
}

/// `logit-lens mpi-worker`: one rank of the `mpi` backend's job (started by `mpirun`, which
/// the backend runs; not for people).
#[cfg(feature = "mpi")]
#[derive(clap::Args)]
pub struct MpiWorkerArgs {
    #[arg(long)]
    pub model: std::path::PathBuf,
    #[arg(long, default_value = "f32")]
    pub precision: lens_core::Precision,
    /// The daemon's socket, which rank 0 connects to.
    #[arg(long)]
    pub connect: std::path::PathBuf,
    #[arg(long)]
    pub threads: Option<usize>,
}

#[cfg(feature = "mpi")]
pub fn mpi_worker(a: MpiWorkerArgs) -> Result<()> {
    lens_mpi::run_worker(lens_mpi::WorkerArgs {
        model: a.model,
        precision: a.precision,
        connect: a.connect,
        threads: a.threads,
    })?;
    Ok(())
}

/// What `path` holds: a GGUF file (by its magic) or an HF-style folder. Only regular files and
/// folders are opened (a FIFO or a device would block or never end).
pub fn source(path: &Path) -> Result<Source> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
    if meta.is_dir() {
        return Ok(Source::HfFolder(path.to_path_buf()));
    }
    if !meta.is_file() {
        anyhow::bail!("{shown} is not a regular file or a folder");
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot read {shown}"))?;
    match &magic[..n] {
        b"GGUF" => Ok(Source::Gguf(path.to_path_buf())),
        _ => anyhow::bail!(
            "{shown} is not a GGUF file or an HF model folder (config.json + *.safetensors + tokenizer.json)"
        ),
    }
}

/// Load `path` with the backend named `backend` (`auto`: the first that can).
pub fn load(path: &Path, backend: &str, options: &LoadOptions) -> Result<Box<dyn Backend>> {
    let source = source(path)?;
    let registry = registry();
    let loader = registry.pick(Some(backend), &source, options)?;
    tracing::info!(backend = loader.name(), "loading {source}");
    loader
        .load(&source, options)
        .with_context(|| format!("cannot load the model {}", path.display()))
}

/// The name of the backend [`load`] would use for these arguments (the bench names the one
/// it compares mistralrs with).
#[cfg(feature = "mistralrs")]
pub fn picked(path: &Path, backend: &str, options: &LoadOptions) -> Result<&'static str> {
    Ok(registry()
        .pick(Some(backend), &source(path)?, options)?
        .name())
}

#[derive(clap::Args)]
pub struct BackendsArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub format: crate::cli::Format,
}

/// `logit-lens backends`: what this build can run.
pub fn list(a: BackendsArgs) -> Result<()> {
    let registry = registry();
    let mut out = anstream::stdout();
    let rows: Vec<serde_json::Value> = registry
        .loaders()
        .iter()
        .map(|l| {
            let c = l.capabilities();
            let strings = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
            serde_json::json!({
                "name": l.name(),
                "mode": l.mode(),
                "sources": strings(c.sources.iter().map(|s| s.as_str()).collect()),
                "devices": strings(c.devices.iter().map(|d| d.family()).collect()),
                "precisions": strings(c.precisions.iter().map(|p| p.as_str()).collect()),
                "architectures": strings(c.architectures.clone()),
                "isq": c.isq,
            })
        })
        .collect();
    if a.format == crate::cli::Format::Json {
        writeln!(out, "{}", serde_json::json!({ "backends": rows }))?;
        return Ok(());
    }
    const FIELDS: [&str; 6] = [
        "name",
        "mode",
        "sources",
        "devices",
        "precisions",
        "architectures",
    ];
    let cell = |row: &serde_json::Value, field: &str| {
        let mut text = match &row[field] {
            serde_json::Value::Array(v) => v
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            v => v.as_str().unwrap_or_default().to_string(),
        };
        // In-situ quantization of HF folders (`--isq`) goes with the precisions.
        if field == "precisions" && row["isq"] == true {
            text.push_str(", --isq");
        }
        text
    };
    let table: Vec<Vec<String>> = std::iter::once(
        [
            "backend",
            "mode",
            "sources",
            "devices",
            "precisions",
            "architectures",
        ]
        .map(String::from)
        .to_vec(),
    )
    .chain(rows.iter().map(|r| FIELDS.map(|f| cell(r, f)).to_vec()))
    .collect();
    let widths: Vec<usize> = (0..FIELDS.len())
        .map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", cells.join("  ").trim_end())?;
    }
    if rows.is_empty() {
        writeln!(
            out,
            "(no backend in this build: enable a feature such as `candle`)"
        )?;
    }
    Ok(())
}
