//! `logit-lens serve`: the daemon (LSP on stdio, or JSON-RPC on a TCP/Unix socket), see
//! `docs/protocol.md`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lens_core::Backend;
use lens_server::{Door, ServeConfig};

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
    /// Allow a non-loopback --listen address (requires --token).
    #[arg(long, requires = "token")]
    pub allow_remote: bool,
    /// Require `"token": T` in every request's params.
    #[arg(long, value_name = "T")]
    pub token: Option<String>,
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
    let config = ServeConfig {
        door,
        cache_bytes: a.cache_mb.saturating_mul(1 << 20),
        allow_remote: a.allow_remote,
        token: a.token,
    };
    // Refuse a bad address before loading the model.
    if let Door::Listen(addr) = &config.door {
        lens_server::check_listen(addr, config.allow_remote, config.token.as_deref())?;
    }
    let backend = cli::load(&a.model)?;
    tracing::info!(
        "model loaded: {} ({})",
        backend.info().name,
        backend.info().precision
    );
    let backend: Arc<dyn Backend> = Arc::from(backend);
    lens_server::run(backend, config).context("the server stopped")
}
