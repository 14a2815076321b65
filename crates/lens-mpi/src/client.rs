//! The daemon's side: [`MpiBackend`], a [`Backend`] whose forward and lens run in an `mpirun`
//! job of `logit-lens mpi-worker` ranks that it starts, talks to (rank 0, over a Unix socket
//! in a private folder) and supervises. MPI ends the whole job when one rank dies; the daemon
//! is not part of the job, so it lives on: a job that dies, hangs past the timeout or never
//! starts is killed, the request gets an error saying so, and the next request starts a new
//! job (states kept by the old one are computed again on the new one when asked for).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lens_core::{
    Backend, Capabilities, CaptureOptions, Error as LensError, HiddenStates, LensKind, LensRequest,
    LoadOptions, Loader, ModelInfo, PositionView, Precision, Site, Source, Stop, Token,
};

use crate::wire::{read_frame, write_frame, Reply, Request};

/// Replies larger than this are refused (a full lens of 2,048 positions × 31 layers at top-5
/// is ~40 MB).
const MAX_REPLY: usize = 1 << 30;

/// How the job is started: from the environment of the daemon (see docs/distributed.md).
#[derive(Debug, Clone)]
pub struct Launch {
    /// `LOGIT_LENS_MPIRUN`, default `mpirun`.
    pub mpirun: String,
    /// `LOGIT_LENS_MPI_ARGS`: extra arguments of mpirun, split at whitespace (a hostfile,
    /// `--allow-run-as-root`, `--mca ...`).
    pub args: Vec<String>,
    /// `LOGIT_LENS_MPI_RANKS`, default 2: the number of pipeline stages.
    pub ranks: usize,
    /// `LOGIT_LENS_MPI_TIMEOUT` (seconds), default 300: how long the job may take to start, or
    /// to answer one request, before it is declared hung and killed.
    pub timeout: Duration,
    /// The program the ranks run (`logit-lens`, with its `mpi-worker` subcommand).
    pub worker: PathBuf,
    pub model: PathBuf,
    pub precision: Precision,
    pub threads: Option<usize>,
}

impl Launch {
    fn from_env(model: &Path, options: &LoadOptions) -> Result<Launch, LensError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let number = |k: &str, default: u64| -> Result<u64, LensError> {
            match var(k) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| LensError::Unsupported(format!("{k}={v} is not a whole number"))),
            }
        };
        let ranks = number("LOGIT_LENS_MPI_RANKS", 2)? as usize;
        if ranks == 0 {
            return Err(LensError::Unsupported(
                "LOGIT_LENS_MPI_RANKS must be at least 1".into(),
            ));
        }
        let timeout = Duration::from_secs(number("LOGIT_LENS_MPI_TIMEOUT", 300)?.max(1));
        let worker = std::env::current_exe()
            .map_err(|e| LensError::Load(format!("cannot find this program's path: {e}")))?;
        Ok(Launch {
            mpirun: var("LOGIT_LENS_MPIRUN").unwrap_or_else(|| "mpirun".into()),
            args: var("LOGIT_LENS_MPI_ARGS")
                .map(|a| a.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            ranks,
            timeout,
            worker,
            model: model.to_path_buf(),
            precision: options.precision,
            threads: options.threads,
        })
    }

    fn command_line(&self, socket: &Path) -> Vec<String> {
        let mut c = vec![self.mpirun.clone()];
        c.extend(self.args.iter().cloned());
        c.extend(["-np".into(), self.ranks.to_string()]);
        c.push(self.worker.display().to_string());
        c.extend(["mpi-worker".into(), "--model".into()]);
        c.push(self.model.display().to_string());
        c.extend(["--precision".into(), self.precision.as_str().into()]);
        c.push("--connect".into());
        c.push(socket.display().to_string());
        if let Some(n) = self.threads {
            c.extend(["--threads".into(), n.to_string()]);
        }
        c
    }
}

/// A running job: `mpirun` (in its own process group) and the socket to rank 0.
struct Job {
    child: Child,
    stream: UnixStream,
    dir: PathBuf,
    generation: u64,
    timeout: Duration,
    /// Whether it still answers: a healthy job is asked to shut down before it is ended.
    healthy: bool,
}

static JOBS: AtomicU64 = AtomicU64::new(0);

/// The last lines of the job's log (mpirun's and the ranks' output).
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("mpirun.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n");
    match tail.is_empty() {
        true => String::new(),
        false => format!("; its output ends:\n{tail}"),
    }
}

/// Signal mpirun's process group (mpirun and the ranks it started on this host).
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Job {
    fn start(launch: &Launch, generation: u64) -> Result<(Job, Reply), String> {
        let dir = std::env::temp_dir().join(format!(
            "logit-lens-mpi-{}-{}",
            std::process::id(),
            JOBS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let socket = dir.join("rank0.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let log = std::fs::File::create(dir.join("mpirun.log"))
            .map_err(|e| format!("cannot write the job's log: {e}"))?;
        let line = launch.command_line(&socket);
        tracing::info!(command = line.join(" "), "starting the MPI job");
        let spawned = Command::new(&line[0])
            .args(&line[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(format!(
                    "cannot start `{}`: {e} (is Open MPI installed?)",
                    line[0]
                ));
            }
        };
        let mut job = Job {
            child,
            // Replaced once rank 0 connects.
            stream: UnixStream::pair().map_err(|e| e.to_string())?.0,
            dir,
            generation,
            timeout: launch.timeout,
            healthy: false,
        };
        job.stream = job.accept(&listener)?;
        let hello = job.read()?;
        job.healthy = true;
        Ok((job, hello))
    }

    /// Wait for rank 0 while mpirun runs, at most the timeout.
    fn accept(&mut self, listener: &UnixListener) -> Result<UnixStream, String> {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accepting rank 0: {e}")),
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "mpirun exited ({status}) before rank 0 connected{}",
                    log_tail(&self.dir)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rank 0 did not connect within {} s{}",
                    self.timeout.as_secs(),
                    log_tail(&self.dir)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read(&mut self) -> Result<Reply, String> {
        self.stream
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        let bytes = read_frame(&mut self.stream, MAX_REPLY).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "no answer within {} s (a rank hangs?)",
                self.timeout.as_secs()
            ),
            std::io::ErrorKind::UnexpectedEof => "rank 0 hung up (a rank died?)".into(),
            _ => e.to_string(),
        })?;
        Reply::decode(&bytes).map_err(|e| e.to_string())
    }

    /// One request and its reply; `Err` when the job is broken.
    fn ask(&mut self, request: &Request) -> Result<Reply, String> {
        write_frame(&mut self.stream, &request.encode())
            .map_err(|e| format!("cannot write to rank 0 ({e}): a rank died?"))?;
        self.read()
    }
}

/// Whether `child` exits within `secs` seconds.
fn wait_exit(child: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for Job {
    fn drop(&mut self) {
        // A healthy job is asked to shut down; then (or at once for a broken one) mpirun gets
        // SIGTERM, which it passes to the ranks, and finally the process group is killed.
        let mut ended = false;
        if self.healthy {
            let _ = write_frame(&mut self.stream, &Request::Shutdown.encode());
            ended = wait_exit(&mut self.child, 5);
        }
        if !ended {
            signal_group(&self.child, "-TERM");
            wait_exit(&mut self.child, 2);
        }
        signal_group(&self.child, "-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a [`HiddenStates`] of this backend carries: where the job keeps its rows.
struct Handle {
    /// (job generation, states id) — updated when a restarted job computes them again.
    slot: Mutex<(u64, u64)>,
    kv_bytes: AtomicU64,
    free: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let slot = *self.slot.lock().unwrap_or_else(|p| p.into_inner());
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot);
    }
}

/// The lens over a pipeline of MPI ranks (see the module docs).
pub struct MpiBackend {
    info: ModelInfo,
    stages: Vec<(usize, usize)>,
    vocab: Vec<String>,
    launch: Launch,
    job: Mutex<Option<Job>>,
    generations: AtomicU64,
    next_id: AtomicU64,
    free: Arc<Mutex<Vec<(u64, u64)>>>,
    /// The daemon holds no rows: every position of its states shares this row of zeros.
    zeros: Arc<[f32]>,
}

fn broken(why: String) -> LensError {
    LensError::Backend(format!(
        "the MPI job failed: {why}; it was stopped, and the next request starts a new one"
    ))
}

impl MpiBackend {
    /// Start the job and learn the model from rank 0.
    pub fn start(launch: Launch) -> Result<MpiBackend, LensError> {
        let (job, hello) = Job::start(&launch, 1)
            .map_err(|e| LensError::Load(format!("the MPI job did not start: {e}")))?;
        let Reply::Hello {
            info,
            stages,
            vocab,
        } = hello
        else {
            return Err(LensError::Load(format!(
                "rank 0 said {hello:?} instead of hello"
            )));
        };
        let zeros = Arc::from(vec![0f32; (info.n_layers + 1) * info.hidden_size]);
        Ok(MpiBackend {
            info,
            stages,
            vocab,
            launch,
            job: Mutex::new(Some(job)),
            generations: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            free: Arc::default(),
            zeros,
        })
    }

    /// Each rank's blocks, `[start, end)`.
    pub fn stages(&self) -> &[(usize, usize)] {
        &self.stages
    }

    /// Run `f` on the job (started first if there is none). A broken job is stopped and
    /// dropped: the error says so, and the next call starts a new one.
    fn with_job<T>(
        &self,
        f: impl FnOnce(&mut Job, &Self) -> Result<Result<T, LensError>, String>,
    ) -> Result<T, LensError> {
        let mut guard = self.job.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
            let (job, _hello) = Job::start(&self.launch, generation)
                .map_err(|e| broken(format!("it did not start again: {e}")))?;
            *guard = Some(job);
        }
        let Some(job) = guard.as_mut() else {
            return Err(broken("no job".into()));
        };
        match f(job, self) {
            Ok(result) => result,
            Err(why) => {
                let why = format!("{why}{}", log_tail(&job.dir));
                tracing::warn!("{why}");
                job.healthy = false;
                *guard = None;
                Err(broken(why))
            }
        }
    }

    /// Forward `tokens` on `job` under a new id, reusing the states `prefix` keeps there.
    fn forward_on(
        &self,
        job: &mut Job,
        prefix: Option<u64>,
        tokens: &[u32],
    ) -> Result<Result<(u64, u64), LensError>, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let free: Vec<u64> = {
            let mut f = self.free.lock().unwrap_or_else(|p| p.into_inner());
            f.drain(..)
                .filter(|(g, _)| *g == job.generation)
                .map(|(_, id)| id)
                .collect()
        };
        match job.ask(&Request::Forward {
            id,
            prefix,
            tokens: tokens.to_vec(),
            free,
        })? {
            Reply::Forwarded { kv_bytes } => Ok(Ok((id, kv_bytes))),
            Reply::Failed(why) => Ok(Err(LensError::Backend(why))),
            other => Err(format!("rank 0 answered a forward with {other:?}")),
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), LensError> {
        if tokens.is_empty() {
            return Err(LensError::EmptyPrompt);
        }
        if tokens.len() > self.info.context_length {
            return Err(LensError::PromptTooLong {
                tokens: tokens.len(),
                context: self.info.context_length,
            });
        }
        match tokens
            .iter()
            .find(|&&id| id as usize >= self.info.vocab_size)
        {
            Some(&id) => Err(LensError::TokenOutOfRange {
                id,
                vocab: self.info.vocab_size,
            }),
            None => Ok(()),
        }
    }
}

fn handle(states: &HiddenStates) -> Option<&Handle> {
    states.backend_state()?.downcast_ref::<Handle>()
}

fn no_mid_block() -> LensError {
    LensError::Unsupported("the mpi backend captures no mid-block rows".into())
}

impl Backend for MpiBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str) -> Result<Vec<Token>, LensError> {
        self.with_job(
            |job, _| match job.ask(&Request::Tokenize(text.to_string()))? {
                Reply::Tokens(t) => Ok(Ok(t)),
                Reply::Failed(why) => Ok(Err(LensError::Tokenizer(why))),
                other => Err(format!("rank 0 answered tokenize with {other:?}")),
            },
        )
    }

    fn decode(&self, id: u32) -> String {
        self.vocab.get(id as usize).cloned().unwrap_or_default()
    }

    fn forward(&self, tokens: &[u32], options: CaptureOptions) -> Result<HiddenStates, LensError> {
        self.forward_until(None, tokens, options, &Stop::never())
    }

    fn forward_reusing(
        &self,
        prefix: &HiddenStates,
        tokens: &[u32],
        options: CaptureOptions,
    ) -> Result<HiddenStates, LensError> {
        self.forward_until(Some(prefix), tokens, options, &Stop::never())
    }

    /// Looks at `stop` before it starts; a forward under way on the ranks runs to its end.
    fn forward_until(
        &self,
        prefix: Option<&HiddenStates>,
        tokens: &[u32],
        options: CaptureOptions,
        stop: &Stop,
    ) -> Result<HiddenStates, LensError> {
        if options.mid_block {
            return Err(no_mid_block());
        }
        self.check_tokens(tokens)?;
        stop.check()?;
        let prefix = prefix
            .and_then(handle)
            .map(|h| *h.slot.lock().unwrap_or_else(|p| p.into_inner()));
        let (generation, id, kv_bytes) = self.with_job(|job, me| {
            let prefix = prefix
                .filter(|(g, _)| *g == job.generation)
                .map(|(_, id)| id);
            Ok(me
                .forward_on(job, prefix, tokens)?
                .map(|(id, kv)| (job.generation, id, kv)))
        })?;
        let handle = Handle {
            slot: Mutex::new((generation, id)),
            kv_bytes: AtomicU64::new(kv_bytes),
            free: self.free.clone(),
        };
        let rows = vec![self.zeros.clone(); tokens.len()];
        Ok(
            HiddenStates::from_positions(&self.info, tokens.to_vec(), rows, None)?
                .with_backend_state(Arc::new(handle)),
        )
    }

    /// The rows live on the ranks: [`Backend::lens`] reads them there. A readout of rows
    /// handed in (hovers that keep a position's logits) is not offered.
    fn readout(&self, _: &[f32], _: LensKind) -> Result<Vec<f32>, LensError> {
        Err(LensError::Unsupported(
            "the mpi backend reads the lens where the rows are, on its ranks: it hands back \
             cells, not logits"
                .into(),
        ))
    }

    /// Each rank reduces the cells of its own layers; rank 0 joins them.
    fn lens(&self, request: &LensRequest<'_>, stop: &Stop) -> Result<Vec<PositionView>, LensError> {
        stop.check()?;
        if request.kind == LensKind::Tuned {
            return Err(LensError::Unsupported(
                "the mpi backend has no tuned lens yet (its ranks hold no translators)".into(),
            ));
        }
        let sites: Vec<usize> = request
            .sites
            .iter()
            .map(|s| match s {
                Site::Layer(l) => Ok(*l),
                Site::MidBlock(_) => Err(no_mid_block()),
            })
            .collect::<Result<_, _>>()?;
        let Some(handle) = handle(request.states) else {
            return Err(LensError::Backend(
                "these states were not computed by the mpi backend".into(),
            ));
        };
        let tokens = request.states.tokens();
        self.with_job(|job, me| {
            let mut slot = handle.slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.0 != job.generation {
                // Kept by a job that has since been replaced: compute them again here.
                match me.forward_on(job, None, tokens)? {
                    Ok((id, kv)) => {
                        *slot = (job.generation, id);
                        handle.kv_bytes.store(kv, Ordering::Relaxed);
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
            match job.ask(&Request::Lens {
                id: slot.1,
                positions: request.positions.to_vec(),
                sites: sites.clone(),
                kind: request.kind,
                top_k: request.top_k,
            })? {
                Reply::Views(v) => Ok(Ok(v)),
                Reply::Failed(why) => Ok(Err(LensError::Backend(why))),
                other => Err(format!("rank 0 answered a lens request with {other:?}")),
            }
        })
    }

    fn state_bytes(&self, states: &HiddenStates) -> usize {
        handle(states).map_or(0, |h| h.kv_bytes.load(Ordering::Relaxed) as usize)
    }
}

/// The pipeline backend's entry in a registry (name `mpi`).
pub struct MpiLoader;

/// The loader the binary registers (behind its `mpi` feature).
pub static LOADER: MpiLoader = MpiLoader;

impl Loader for MpiLoader {
    fn name(&self) -> &'static str {
        "mpi"
    }

    fn mode(&self) -> &'static str {
        "pipeline: blocks split over MPI ranks (LOGIT_LENS_MPI_RANKS, default 2)"
    }

    /// The candle backend's, run as a pipeline of ranks.
    fn capabilities(&self) -> Capabilities {
        lens_candle::LOADER.capabilities()
    }

    fn supports(&self, source: &Source, options: &LoadOptions) -> Result<(), LensError> {
        lens_candle::LOADER
            .supports(source, options)
            .map_err(|e| match e {
                LensError::Unsupported(why) => LensError::Unsupported(why.replace("candle", "mpi")),
                e => e,
            })
    }

    fn load(&self, source: &Source, options: &LoadOptions) -> Result<Box<dyn Backend>, LensError> {
        self.supports(source, options)?;
        let (Source::Gguf(path) | Source::HfFolder(path)) = source else {
            return Err(LensError::Unsupported(format!(
                "the mpi backend cannot load {source}"
            )));
        };
        let launch = Launch::from_env(path, options)?;
        Ok(Box::new(MpiBackend::start(launch)?))
    }
}
