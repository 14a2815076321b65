//! The logit-lens daemon: one process, one loaded model (`Arc<dyn Backend>`) and one
//! activation cache behind two doors — LSP on stdio (hover, inlay hints, the `lens/*`
//! methods) and JSON-RPC 2.0 over TCP or a Unix socket (the `lens/*` methods, many clients).
//!
//! No method takes a path: nothing a client sends can make the server read a file. The
//! protocol is documented in `docs/protocol.md`.

mod cache;
mod engine;
mod error;
pub mod framing;
pub mod hover;
pub mod lsp;
pub mod rpc;
#[cfg(unix)]
mod socket;
pub mod text;
mod tls;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

pub use cache::CacheStats;
pub use engine::{
    AnalyzeParams, Engine, HoverOptions, HoverOut, LayersParam, LensParams, PositionParams,
};
pub use error::RpcError;

/// Who asks: each socket connection is a client, the LSP session is one (id 0).
pub type ClientId = u64;

/// The turns model work takes: one computation at a time, handed out fairly: round-robin
/// between the clients that are waiting, in arrival order within a client, so one busy client
/// cannot starve the others. A value the server owns (one per [`Engine`]), not a process-wide
/// lock, so two engines in one process (tests, several models) do not serialise each other.
///
/// Each computation already uses every core; and a rayon worker waiting inside one request's
/// parallel section may pick up another request's job, which must then never wait for the
/// first (the activation cache's single flight would wait on its own thread).
#[derive(Clone, Default)]
pub struct Turns(Arc<std::sync::Mutex<Queue>>);

#[derive(Default)]
struct Queue {
    busy: bool,
    /// Clients with waiters, in the order they are served next.
    order: std::collections::VecDeque<ClientId>,
    waiting: std::collections::HashMap<ClientId, std::collections::VecDeque<Waiter>>,
}

type Waiter = tokio::sync::oneshot::Sender<Turn>;

/// The right to run model work; the next waiter gets it when this is dropped.
pub struct Turn {
    queue: Option<Arc<std::sync::Mutex<Queue>>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        loop {
            let next = {
                let Ok(mut guard) = queue.lock() else { return };
                let q = &mut *guard;
                let mut next = None;
                while let Some(client) = q.order.pop_front() {
                    let Some(waiters) = q.waiting.get_mut(&client) else {
                        continue;
                    };
                    let w = waiters.pop_front();
                    if waiters.is_empty() {
                        q.waiting.remove(&client);
                    } else {
                        q.order.push_back(client);
                    }
                    if let Some(w) = w {
                        next = Some(w);
                        break;
                    }
                }
                if next.is_none() {
                    q.busy = false;
                }
                next
            };
            let Some(waiter) = next else { return };
            let turn = Turn {
                queue: Some(queue.clone()),
            };
            match waiter.send(turn) {
                Ok(()) => return,
                // The waiter gave up (its request was cancelled): the next one.
                Err(mut turn) => turn.queue = None,
            }
        }
    }
}

impl Turns {
    /// Wait for `client`'s turn.
    pub async fn take(&self, client: ClientId) -> Turn {
        let rx = {
            let Ok(mut q) = self.0.lock() else {
                // A poisoned queue (a panic while holding its lock, which never runs user
                // code): serve without turns rather than never.
                return Turn { queue: None };
            };
            if !q.busy {
                q.busy = true;
                return Turn {
                    queue: Some(self.0.clone()),
                };
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let q = &mut *q;
            let waiters = q.waiting.entry(client).or_default();
            if waiters.is_empty() {
                q.order.push_back(client);
            }
            waiters.push_back(tx);
            rx
        };
        rx.await.unwrap_or(Turn { queue: None })
    }

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
        self.compute_for(0, Stop::new(), f).await
    }

    /// [`Turns::compute`] with a [`Stop`] the caller can also raise (speculative work that
    /// newer requests make useless).
    pub async fn compute_until<T: Send + 'static>(
        &self,
        stop: Stop,
        f: impl FnOnce(&Stop) -> T + Send + 'static,
    ) -> Result<T, RpcError> {
        self.compute_for(0, stop, f).await
    }

    /// [`Turns::compute_until`] in `client`'s turn.
    pub async fn compute_for<T: Send + 'static>(
        &self,
        client: ClientId,
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
        let turn = self.take(client).await;
        let out = tokio::task::spawn_blocking(move || {
            let out = lens_core::in_pool(|| f(&stop));
            drop(turn);
            out
        })
        .await
        .map_err(|e| RpcError::internal(format!("worker failed: {e}")));
        on_drop.0 = None;
        out
    }
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

/// What one client can take from the server (`docs/protocol.md`, "Limits").
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message body, in bytes; a larger `Content-Length` is refused before its body
    /// is read.
    pub max_message: usize,
    /// Socket connections served at once; one more is answered -32016 and closed.
    pub max_connections: usize,
    /// A socket connection with no message arriving and no request in flight for this long is
    /// closed.
    pub idle_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: framing::DEFAULT_MAX_MESSAGE,
            max_connections: 64,
            idle_timeout: std::time::Duration::from_secs(300),
        }
    }
}

/// A certificate chain and its private key (PEM files) for serving TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub door: Door,
    /// Activation cache budget.
    pub cache_bytes: usize,
    /// Allow a non-loopback listen address (requires `token`, and `tls` or `insecure`).
    pub allow_remote: bool,
    /// When set, every request's params must carry `"token": <this>`.
    pub token: Option<String>,
    /// Serve TLS on the TCP door.
    pub tls: Option<TlsFiles>,
    /// Allow a non-loopback listener without TLS (the token and every prompt in clear text).
    pub insecure: bool,
    pub limits: Limits,
    /// The tuned lens `"lens": "tuned"` reads through.
    pub tuned: Option<Arc<lens_core::Translators>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Check a listen address: loopback only, unless remote access is allowed with a token and
/// either TLS or an explicit `insecure`.
pub fn check_listen(
    addr: &str,
    allow_remote: bool,
    token: Option<&str>,
    tls: bool,
    insecure: bool,
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
                "refusing to listen on the non-loopback address `{addr}`: pass --allow-remote --token-file F --tls-cert C --tls-key K to serve other machines"
            )));
        }
        if token.is_none_or(str::is_empty) {
            return Err(ServeError::Config(
                "--allow-remote needs a token (--token-file F or LOGIT_LENS_TOKEN; clients pass \"token\": T in every params)".into(),
            ));
        }
        if !tls && !insecure {
            return Err(ServeError::Config(
                "--allow-remote needs TLS (--tls-cert C --tls-key K): without it the token and every prompt cross the network in clear text; pass --insecure to do that anyway".into(),
            ));
        }
    }
    Ok(addrs)
}

/// Run the server until its door closes (stdio: end of input; a socket: SIGTERM or Ctrl-C)
/// — blocks the calling thread.
pub fn run(backend: Arc<dyn Backend>, config: ServeConfig) -> Result<(), ServeError> {
    let addrs = match &config.door {
        Door::Listen(a) => Some(check_listen(
            a,
            config.allow_remote,
            config.token.as_deref(),
            config.tls.is_some(),
            config.insecure,
        )?),
        _ => None,
    };
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let engine =
        Arc::new(Engine::new(backend, config.cache_bytes).with_tuned(config.tuned.clone()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let limits = config.limits;
    let result = runtime.block_on(async move {
        let token: Option<Arc<str>> = config
            .token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let doors = Doors {
            engine,
            token,
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
        };
        match config.door {
            Door::Stdio => {
                lsp::serve_stdio(doors.engine, limits).await;
                Ok(())
            }
            Door::Listen(_) => {
                let listener =
                    tokio::net::TcpListener::bind(addrs.as_deref().unwrap_or_default()).await?;
                let local = listener.local_addr()?;
                // Clients parse this line: the address only.
                announce(&format!("listening on {local}"));
                if tls.is_some() {
                    tracing::info!("serving TLS on {local}");
                }
                let accept = async {
                    loop {
                        let (stream, peer) = listener.accept().await?;
                        tracing::info!("client {peer} connected");
                        let _ = stream.set_nodelay(true);
                        match &tls {
                            Some(acceptor) => {
                                let acceptor = acceptor.clone();
                                doors.serve(async move {
                                    let shake = tokio::time::timeout(
                                        limits.idle_timeout,
                                        acceptor.accept(stream),
                                    );
                                    match shake.await {
                                        Ok(Ok(stream)) => Some(tokio::io::split(stream)),
                                        Ok(Err(e)) => {
                                            tracing::info!("TLS handshake with {peer} failed: {e}");
                                            None
                                        }
                                        Err(_) => None,
                                    }
                                });
                            }
                            None => doors.serve(async move { Some(stream.into_split()) }),
                        }
                    }
                };
                tokio::select! {
                    r = accept => r,
                    () = shutdown_signal() => Ok(()),
                }
            }
            #[cfg(unix)]
            Door::Socket(path) => {
                let listener = socket::bind(&path).await?;
                announce(&format!("listening on {}", path.display()));
                let accept = async {
                    loop {
                        let (stream, _) = listener.accept().await?;
                        doors.serve(async move { Some(stream.into_split()) });
                    }
                };
                let out = tokio::select! {
                    r = accept => r,
                    () = shutdown_signal() => Ok(()),
                };
                socket::remove(&path, &listener);
                out
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

/// What every socket connection shares.
struct Doors {
    engine: Arc<Engine>,
    token: Option<Arc<str>>,
    limits: Limits,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Doors {
    /// Serve a connection (once `open` has made its two halves) in a task of its own, if a
    /// slot is free; else answer -32016 and close it.
    fn serve<R, W>(&self, open: impl std::future::Future<Output = Option<(R, W)>> + Send + 'static)
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let slot = self.slots.clone().try_acquire_owned().ok();
        let (engine, token, limits) = (self.engine.clone(), self.token.clone(), self.limits);
        tokio::spawn(async move {
            let Some((r, mut w)) = open.await else { return };
            let Some(slot) = slot else {
                use tokio::io::AsyncWriteExt;
                tracing::warn!(
                    "refusing a connection: {} are open (--max-connections)",
                    limits.max_connections
                );
                let busy = RpcError::busy(format!(
                    "the server has {} connections open, its limit; try again later",
                    limits.max_connections
                ));
                let refusal = rpc::frame(&rpc::response(serde_json::Value::Null, Err(busy)));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let _ = w.write_all(&refusal).await;
                    let _ = w.shutdown().await;
                })
                .await;
                return;
            };
            let closed = move || {
                drop(slot);
                tracing::info!("a client disconnected");
            };
            rpc::serve_connection(
                engine,
                tokio::io::BufReader::new(r),
                w,
                token,
                limits,
                closed,
            )
            .await;
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

/// The bound address goes to stderr whatever the log level (clients parse it).
fn announce(line: &str) {
    use std::io::Write;
    tracing::info!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Turns go round-robin between waiting clients: a client with many queued requests
    /// delays another client's request by one turn, not by all of its own; a waiter that gave
    /// up is skipped.
    #[test]
    fn turns_are_fair_between_clients() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let turns = Turns::default();
            let order = Arc::new(std::sync::Mutex::new(Vec::new()));
            let held = turns.take(1).await;
            let mut tasks = Vec::new();
            for (client, name) in [
                (1, "a2"),
                (1, "a3"),
                (1, "a4"),
                (3, "gone"),
                (2, "b1"),
                (1, "a5"),
            ] {
                let (turns, order) = (turns.clone(), order.clone());
                let task = tokio::spawn(async move {
                    let turn = turns.take(client).await;
                    order.lock().expect("order").push(name);
                    drop(turn);
                });
                // Let it queue before the next one.
                tokio::task::yield_now().await;
                tasks.push((name, task));
            }
            for (name, task) in &tasks {
                if *name == "gone" {
                    task.abort();
                }
            }
            tokio::task::yield_now().await;
            drop(held);
            for (_, task) in tasks {
                let _ = task.await;
            }
            let order = order.lock().expect("order").clone();
            assert_eq!(order, ["a2", "b1", "a3", "a4", "a5"]);
        });
    }
}
