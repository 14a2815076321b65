//! The logit-lens daemon: one process, one loaded model (`Arc<dyn Backend>`) and one
//! activation cache behind two doors — LSP on stdio (hover, inlay hints, the `lens/*`
//! methods) and JSON-RPC 2.0 over TCP or a Unix socket (the `lens/*` methods, many clients).
//!
//! No method takes a path: nothing a client sends can make the server read a file. The
//! protocol is documented in `docs/protocol.md`.

mod cache;
mod engine;
mod error;
pub mod hover;
pub mod lsp;
pub mod rpc;
pub mod text;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

pub use cache::CacheStats;
pub use engine::{
    AnalyzeParams, Engine, HoverOptions, HoverOut, LayersParam, LensParams, PositionParams,
};
pub use error::RpcError;

/// The turns model work takes: one request at a time, in arrival order. A value the server
/// owns (one per [`Engine`]), not a process-wide lock, so two engines in one process (tests,
/// several models) do not serialise each other.
///
/// Each computation already uses every core; and a rayon worker waiting inside one request's
/// parallel section may pick up another request's job, which must then never wait for the
/// first (the activation cache's single flight would wait on its own thread).
#[derive(Clone, Default)]
pub struct Turns(Arc<tokio::sync::Mutex<()>>);

impl Turns {
    /// Run model work off the async runtime, on a blocking thread that enters rayon's pool:
    /// the work's serial parts then run on a pool worker, where candle's kernels and the lens
    /// run their parallel parts, instead of competing with the pool's idle workers for the
    /// cores (a one-token forward pass: 20 ms from outside the pool, 12 ms inside, on 2
    /// cores). Requests take turns; one dropped while waiting (cancelled) never runs, and one
    /// dropped while running raises the [`Stop`] that `f` is given, so the work ends at its
    /// next step (a layer, a block of the vocabulary), and keeps its turn until then. A panic
    /// becomes an internal error.
    pub async fn compute<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Stop) -> T + Send + 'static,
    ) -> Result<T, RpcError> {
        self.compute_until(Stop::new(), f).await
    }

    /// [`Turns::compute`] with a [`Stop`] the caller can also raise (speculative work that
    /// newer requests make useless).
    pub async fn compute_until<T: Send + 'static>(
        &self,
        stop: Stop,
        f: impl FnOnce(&Stop) -> T + Send + 'static,
    ) -> Result<T, RpcError> {
        /// Raises the stop if the future is dropped before the work has ended.
        struct StopOnDrop(Option<Stop>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                if let Some(stop) = self.0.take() {
                    stop.stop();
                }
            }
        }
        let mut on_drop = StopOnDrop(Some(stop.clone()));
        let turn = self.0.clone().lock_owned().await;
        let out = tokio::task::spawn_blocking(move || {
            let out = in_pool(|| f(&stop));
            drop(turn);
            out
        })
        .await
        .map_err(|e| RpcError::internal(format!("worker failed: {e}")));
        on_drop.0 = None;
        out
    }
}

/// Run `f` on a worker of rayon's global pool (see [`compute`]) and wait for it.
pub fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| f())
}
use lens_core::{Backend, Stop};

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Door {
    /// LSP on stdin/stdout.
    Stdio,
    /// JSON-RPC over TCP, e.g. `127.0.0.1:0`.
    Listen(String),
    /// JSON-RPC over a Unix socket.
    Socket(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub door: Door,
    /// Activation cache budget.
    pub cache_bytes: usize,
    /// Allow a non-loopback listen address (requires `token`).
    pub allow_remote: bool,
    /// When set, every request's params must carry `"token": <this>`.
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Check a listen address: loopback only, unless remote access is allowed with a token.
pub fn check_listen(
    addr: &str,
    allow_remote: bool,
    token: Option<&str>,
) -> Result<Vec<SocketAddr>, ServeError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            ServeError::Config(format!("cannot resolve the listen address `{addr}`: {e}"))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ServeError::Config(format!(
            "the listen address `{addr}` resolves to nothing"
        )));
    }
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        if !allow_remote {
            return Err(ServeError::Config(format!(
                "refusing to listen on the non-loopback address `{addr}`: pass --allow-remote --token T to serve other machines"
            )));
        }
        if token.is_none_or(str::is_empty) {
            return Err(ServeError::Config(
                "--allow-remote needs --token T (clients pass \"token\": T in every params)".into(),
            ));
        }
    }
    Ok(addrs)
}

/// Run the server until its door closes (stdio: end of input) — blocks the calling thread.
pub fn run(backend: Arc<dyn Backend>, config: ServeConfig) -> Result<(), ServeError> {
    let addrs = match &config.door {
        Door::Listen(a) => Some(check_listen(
            a,
            config.allow_remote,
            config.token.as_deref(),
        )?),
        _ => None,
    };
    let engine = Arc::new(Engine::new(backend, config.cache_bytes));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let token: Option<Arc<str>> = config
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        match config.door {
            Door::Stdio => {
                lsp::serve_stdio(engine).await;
                Ok(())
            }
            Door::Listen(_) => {
                let listener =
                    tokio::net::TcpListener::bind(addrs.as_deref().unwrap_or_default()).await?;
                let local = listener.local_addr()?;
                announce(&format!("listening on {local}"));
                loop {
                    let (stream, peer) = listener.accept().await?;
                    tracing::info!("client {peer} connected");
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    let engine = engine.clone();
                    let token = token.clone();
                    tokio::spawn(async move {
                        rpc::serve_connection(engine, tokio::io::BufReader::new(r), w, token).await;
                        tracing::info!("client {peer} disconnected");
                    });
                }
            }
            #[cfg(unix)]
            Door::Socket(path) => {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)?;
                announce(&format!("listening on {}", path.display()));
                loop {
                    let (stream, _) = listener.accept().await?;
                    let (r, w) = stream.into_split();
                    let engine = engine.clone();
                    let token = token.clone();
                    tokio::spawn(rpc::serve_connection(
                        engine,
                        tokio::io::BufReader::new(r),
                        w,
                        token,
                    ));
                }
            }
            #[cfg(not(unix))]
            Door::Socket(_) => Err(ServeError::Config("--socket needs a Unix system".into())),
        }
    });
    // Do not wait for the thread blocked reading stdin (the client may keep it open after
    // `exit`).
    runtime.shutdown_background();
    result
}

/// The bound address goes to stderr whatever the log level (clients parse it).
fn announce(line: &str) {
    use std::io::Write;
    tracing::info!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
}
