//! `logit-lens serve`: the daemon (LSP on stdio, or JSON-RPC on a TCP/Unix socket), see
//! `docs/protocol.md`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lens_core::Backend;
use std::time::Duration;

use lens_server::{Door, Limits, ServeConfig, TlsFiles};

use crate::cli::{self, ModelArgs};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("door").required(true).args(["stdio", "listen", "socket"])))]
pub struct ServeArgs {
    /// Speak LSP on standard input/output (what editors start).
    #[arg(long)]
    pub stdio: bool,
    /// Serve the `lens/*` JSON-RPC methods on a TCP address, e.g. 127.0.0.1:7420 (port 0 picks
    /// one; the bound address is printed on stderr as `listening on ADDR`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Serve the `lens/*` JSON-RPC methods on a Unix socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Activation cache budget in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub cache_mb: usize,
    /// Allow a non-loopback --listen address (requires a token, and TLS or --insecure).
    #[arg(long)]
    pub allow_remote: bool,
    /// Require `"token": T` in every request's params, T read from this file (its first
    /// line; the file must not be readable by group or others).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The token itself. Visible to every local user in `ps`: prefer --token-file or the
    /// LOGIT_LENS_TOKEN environment variable.
    #[arg(
        long,
        value_name = "T",
        env = "LOGIT_LENS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Serve TLS on --listen with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow --allow-remote without TLS: the token and every prompt cross the network in
    /// clear text.
    #[arg(long)]
    pub insecure: bool,
    /// Largest JSON-RPC/LSP message accepted, in MiB.
    #[arg(long, default_value_t = 4, value_name = "MIB")]
    pub max_message_mb: usize,
    /// Socket connections served at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_connections: usize,
    /// Close a socket connection idle (no message, nothing in flight) for this many seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub idle_timeout: u64,
    /// A tuned lens (a file of `logit-lens tune`, or a tuned-lens package folder) that the
    /// methods' `"lens": "tuned"` reads through.
    #[arg(long, value_name = "PATH")]
    pub tuned_lens: Option<PathBuf>,
    /// Write logs to this file instead of stderr.
    #[arg(long, value_name = "FILE", env = "LOGIT_LENS_LOG_FILE")]
    pub log_file: Option<PathBuf>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let door = match (a.stdio, a.listen, a.socket) {
        (true, _, _) => Door::Stdio,
        (_, Some(addr), _) => Door::Listen(addr),
        (_, _, Some(path)) => Door::Socket(path),
        _ => anyhow::bail!("choose --stdio, --listen ADDR or --socket PATH"),
    };
    let token = match (&a.token_file, a.token) {
        (Some(path), _) => Some(read_token(path)?),
        (None, Some(t))
            if std::env::args().any(|x| x == "--token" || x.starts_with("--token=")) =>
        {
            tracing::warn!(
                "--token on the command line is visible to every local user (ps); use --token-file or LOGIT_LENS_TOKEN"
            );
            Some(t)
        }
        (None, t) => t,
    };
    anyhow::ensure!(
        a.max_message_mb > 0 && a.max_connections > 0 && a.idle_timeout > 0,
        "--max-message-mb, --max-connections and --idle-timeout must be at least 1"
    );
    let mut config = ServeConfig {
        door,
        cache_bytes: a.cache_mb.saturating_mul(1 << 20),
        allow_remote: a.allow_remote,
        token,
        tls: match (a.tls_cert, a.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        },
        insecure: a.insecure,
        limits: Limits {
            max_message: a.max_message_mb.saturating_mul(1 << 20),
            max_connections: a.max_connections,
            idle_timeout: Duration::from_secs(a.idle_timeout),
        },
        tuned: None,
    };
    // Refuse a bad address or option before loading the model.
    if let Door::Listen(addr) = &config.door {
        lens_server::check_listen(
            addr,
            config.allow_remote,
            config.token.as_deref(),
            config.tls.is_some(),
            config.insecure,
        )?;
    } else if config.tls.is_some() {
        anyhow::bail!("--tls-cert and --tls-key serve TLS on --listen only");
    }
    let backend = cli::load(&a.model)?;
    tracing::info!(
        "model loaded: {} ({})",
        backend.info().name,
        backend.info().precision
    );
    config.tuned = a
        .tuned_lens
        .map(|path| crate::tuned::LensArg {
            kind: lens_core::LensKind::Tuned,
            path: Some(path),
        })
        .map(|lens| lens.translators(&*backend))
        .transpose()?
        .flatten();
    let backend: Arc<dyn Backend> = Arc::from(backend);
    lens_server::run(backend, config).context("the server stopped")
}

/// The token in `path`: its first line, trimmed. The file must be a regular file that only
/// its owner can read.
fn read_token(path: &std::path::Path) -> Result<String> {
    let shown = path.display();
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read --token-file {shown}"))?;
    anyhow::ensure!(meta.is_file(), "--token-file {shown} is not a regular file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "--token-file {shown} is readable by others (mode {:o}): chmod 600 it",
            mode & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --token-file {shown}"))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(!token.is_empty(), "--token-file {shown} is empty");
    Ok(token)
}
