//! One rank of the job (`logit-lens mpi-worker`, started by `mpirun`). Rank r runs the blocks
//! of stage r; rank 0 also talks to the daemon over a local socket and hands each forward and
//! lens request to every rank. Per forward, the rows of the new positions cross each stage
//! boundary once (`t × hidden` floats), then the last stage sends the final layer's rows to
//! the others (each reads its cells' KL and final-token ranks against them); per lens
//! request, only the cells travel to rank 0.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use lens_candle::{Precision, Stage, StageInput};
use lens_core::{
    decided_at, host_lens, Backend, Error as LensError, HiddenStates, LensRequest, ModelInfo,
    PositionView, Site, Stop,
};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, Destination, Source};

use crate::wire::{read_frame, write_frame, Reply, Request};
use crate::Error;

const TAG_REQUEST: i32 = 1;
const TAG_ROWS: i32 = 2;
const TAG_FINAL: i32 = 3;
const TAG_REPLY: i32 = 4;
const TAG_STAGE: i32 = 5;

/// The largest frame rank 0 reads from the daemon.
const MAX_FRAME: usize = 1 << 30;

/// How a rank is started (the arguments of `logit-lens mpi-worker`).
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub model: PathBuf,
    pub precision: Precision,
    /// The daemon's socket, which rank 0 connects to.
    pub connect: PathBuf,
    /// Threads of this rank's pool (rayon's, which candle's kernels use).
    pub threads: Option<usize>,
}

/// The states one rank keeps for one prompt: the rows of its own layers (and the final
/// layer's), as a [`HiddenStates`] of "local" layers, and the keys and values of its blocks.
struct Kept {
    states: HiddenStates,
    kv: Vec<Arc<[f32]>>,
}

struct Rank {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    stage: Stage,
    /// The global layers whose rows this rank keeps: `start..=end`.
    own: (usize, usize),
    /// `info` with `n_layers` = the number of local layers - 1.
    local_info: ModelInfo,
    kept: HashMap<u64, Kept>,
}

/// Run one rank until the daemon hangs up or asks it to stop.
pub fn run(args: WorkerArgs) -> Result<(), Error> {
    if let Some(n) = args.threads {
        lens_candle::set_threads(n).map_err(|e| Error::Load(e.to_string()))?;
    }
    let universe =
        mpi::initialize().ok_or_else(|| Error::Mpi("MPI is already initialised".into()))?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let stage = Stage::load(&args.model, args.precision, size, rank)
        .map_err(|e| Error::Load(format!("rank {rank}: {e}")))?;
    let blocks = stage.blocks();
    let n = stage.info().n_layers;
    let first = if rank == 0 { 0 } else { blocks.start + 1 };
    let own = (first, blocks.end);
    // Local layers: the own layers, then the final layer when another rank owns it.
    let local_layers = own.1 - own.0 + 1 + usize::from(own.1 != n);
    let local_info = ModelInfo {
        n_layers: local_layers - 1,
        ..stage.info().clone()
    };
    let mut me = Rank {
        world,
        rank,
        size,
        stage,
        own,
        local_info,
        kept: HashMap::new(),
    };
    if rank == 0 {
        me.lead(&args.connect)
    } else {
        me.world
            .process_at_rank(0)
            .send_with_tag(&[blocks.start as u64, blocks.end as u64][..], TAG_STAGE);
        me.follow();
        Ok(())
    }
}

impl Rank {
    /// Rank 0: connect to the daemon, say hello, then serve its requests.
    fn lead(&mut self, connect: &std::path::Path) -> Result<(), Error> {
        let mut stream = UnixStream::connect(connect).map_err(|e| {
            Error::Io(format!(
                "rank 0 cannot connect to {}: {e}",
                connect.display()
            ))
        })?;
        let mut stages = vec![(self.stage.blocks().start, self.stage.blocks().end)];
        for r in 1..self.size {
            let (b, _) = self
                .world
                .process_at_rank(r as i32)
                .receive_vec_with_tag::<u64>(TAG_STAGE);
            stages.push((b[0] as usize, b[1] as usize));
        }
        let info = self.stage.info().clone();
        let vocab = (0..info.vocab_size as u32)
            .map(|id| self.stage.decode(id))
            .collect();
        tracing::info!(?stages, "pipeline ready");
        let hello = Reply::Hello {
            info,
            stages,
            vocab,
        };
        write_frame(&mut stream, &hello.encode()).map_err(|e| Error::Io(e.to_string()))?;
        loop {
            let request = match read_frame(&mut stream, MAX_FRAME)
                .map_err(|e| Error::Io(e.to_string()))
                .and_then(|b| Request::decode(&b))
            {
                Ok(r) => r,
                Err(e) => {
                    // The daemon hung up (or spoke nonsense): stop every rank.
                    tracing::info!("rank 0 stops: {e}");
                    self.broadcast(&Request::Shutdown);
                    return Ok(());
                }
            };
            let reply = match &request {
                Request::Tokenize(text) => match self.stage.tokenize(text) {
                    Ok(t) => Reply::Tokens(t),
                    Err(e) => Reply::Failed(e.to_string()),
                },
                Request::Forward { tokens, .. } => match self.check_tokens(tokens) {
                    Err(e) => Reply::Failed(e),
                    Ok(()) => {
                        self.broadcast(&request);
                        self.serve(&request)
                    }
                },
                Request::Lens { .. } => {
                    self.broadcast(&request);
                    self.serve(&request)
                }
                Request::Shutdown => {
                    self.broadcast(&request);
                    return Ok(());
                }
            };
            write_frame(&mut stream, &reply.encode()).map_err(|e| Error::Io(e.to_string()))?;
        }
    }

    /// The other ranks: serve what rank 0 hands on until it says stop.
    fn follow(&mut self) {
        loop {
            let (bytes, _) = self
                .world
                .process_at_rank(0)
                .receive_vec_with_tag::<u8>(TAG_REQUEST);
            let request = match Request::decode(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("rank {}: {e}", self.rank);
                    return;
                }
            };
            if request == Request::Shutdown {
                return;
            }
            let reply = self.serve(&request);
            self.world
                .process_at_rank(0)
                .send_with_tag(&reply.encode()[..], TAG_REPLY);
        }
    }

    fn broadcast(&self, request: &Request) {
        let bytes = request.encode();
        for r in 1..self.size {
            self.world
                .process_at_rank(r as i32)
                .send_with_tag(&bytes[..], TAG_REQUEST);
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), String> {
        let info = self.stage.info();
        if tokens.is_empty() {
            return Err(LensError::EmptyPrompt.to_string());
        }
        if tokens.len() > info.context_length {
            return Err(LensError::PromptTooLong {
                tokens: tokens.len(),
                context: info.context_length,
            }
            .to_string());
        }
        match tokens.iter().find(|&&id| id as usize >= info.vocab_size) {
            Some(&id) => Err(LensError::TokenOutOfRange {
                id,
                vocab: info.vocab_size,
            }
            .to_string()),
            None => Ok(()),
        }
    }

    /// This rank's part of a forward or lens request; on rank 0, joined with the others'.
    fn serve(&mut self, request: &Request) -> Reply {
        let mine = match request {
            Request::Forward {
                id,
                prefix,
                tokens,
                free,
            } => {
                for f in free {
                    self.kept.remove(f);
                }
                self.forward(*id, *prefix, tokens)
            }
            Request::Lens {
                id,
                positions,
                sites,
                kind,
                top_k,
            } => self.lens(*id, positions, sites, *kind, *top_k),
            Request::Tokenize(_) | Request::Shutdown => {
                Reply::Failed("not a request for every rank".into())
            }
        };
        if self.rank != 0 {
            return mine;
        }
        // Rank 0 joins every rank's reply: the first failure, or the sum, or the cells.
        let mut replies = vec![mine];
        for r in 1..self.size {
            let (bytes, _) = self
                .world
                .process_at_rank(r as i32)
                .receive_vec_with_tag::<u8>(TAG_REPLY);
            replies.push(
                Reply::decode(&bytes).unwrap_or_else(|e| Reply::Failed(format!("rank {r}: {e}"))),
            );
        }
        join(replies, request)
    }

    fn forward(&mut self, id: u64, prefix: Option<u64>, tokens: &[u32]) -> Reply {
        let hidden = self.stage.info().hidden_size;
        let last = self.size - 1;
        let prev = prefix.and_then(|p| self.kept.get(&p));
        let common = prev.map_or(0, |k| {
            k.states
                .tokens()
                .iter()
                .zip(tokens)
                .take_while(|(a, b)| a == b)
                .count()
        });
        if let (Some(prev), true) = (prev, common == tokens.len()) {
            // A prefix of the kept prompt: its first positions, on every rank, with nothing
            // to send.
            let n = tokens.len();
            let rows = prev.states.position_rows()[..n].to_vec();
            let kv = prev.kv[..n].to_vec();
            return self.keep(id, tokens, rows, kv);
        }
        // Recompute from the first changed token (at least the last one), on every stage.
        let keep = match prev {
            Some(_) => common.min(tokens.len() - 1),
            None => 0,
        };
        let past: Vec<Arc<[f32]>> = prev.map_or(Vec::new(), |p| p.kv[..keep].to_vec());
        let old_rows: Vec<Arc<[f32]>> =
            prev.map_or(Vec::new(), |p| p.states.position_rows()[..keep].to_vec());
        let new = &tokens[keep..];
        let from_prev: Option<Vec<f32>> = match self.rank {
            0 => None,
            r => Some(
                self.world
                    .process_at_rank(r as i32 - 1)
                    .receive_vec_with_tag::<f32>(TAG_ROWS)
                    .0,
            ),
        };
        let run = match &from_prev {
            None => self
                .stage
                .run(StageInput::Tokens(new), &past, &Stop::never()),
            // An empty message: an earlier stage failed.
            Some(rows) if rows.is_empty() => {
                Err(LensError::Backend("an earlier stage failed".into()))
            }
            Some(rows) => self
                .stage
                .run(StageInput::Rows(rows), &past, &Stop::never()),
        };
        // The last row of each new position goes on (empty on failure, so nobody waits).
        let out: Vec<f32> = match &run {
            Ok(run) => run
                .rows
                .iter()
                .flat_map(|r| r[r.len() - hidden..].iter().copied())
                .collect(),
            Err(_) => Vec::new(),
        };
        if self.rank < last {
            self.world
                .process_at_rank(self.rank as i32 + 1)
                .send_with_tag(&out[..], TAG_ROWS);
        }
        // The model output's rows, from the last stage to every other.
        let finals: Vec<f32> = if self.rank == last {
            for r in 0..last {
                self.world
                    .process_at_rank(r as i32)
                    .send_with_tag(&out[..], TAG_FINAL);
            }
            out
        } else {
            self.world
                .process_at_rank(last as i32)
                .receive_vec_with_tag::<f32>(TAG_FINAL)
                .0
        };
        let run = match run {
            Ok(run) if finals.len() == new.len() * hidden => run,
            Ok(_) => return Reply::Failed("the last stage failed".into()),
            Err(e) => return Reply::Failed(format!("rank {}: {e}", self.rank)),
        };
        // Local rows: the own layers (not the input row, which the previous stage owns),
        // then the final layer's row if another rank owns it.
        let skip = if self.rank == 0 { 0 } else { hidden };
        let mut rows = old_rows;
        for (p, r) in run.rows.iter().enumerate() {
            let mut row = r[skip..].to_vec();
            if self.rank != last {
                row.extend_from_slice(&finals[p * hidden..(p + 1) * hidden]);
            }
            rows.push(Arc::from(row));
        }
        let mut kv = past;
        kv.extend(run.kv);
        self.keep(id, tokens, rows, kv)
    }

    fn keep(
        &mut self,
        id: u64,
        tokens: &[u32],
        rows: Vec<Arc<[f32]>>,
        kv: Vec<Arc<[f32]>>,
    ) -> Reply {
        match HiddenStates::from_positions(&self.local_info, tokens.to_vec(), rows, None) {
            Ok(states) => {
                let kv_bytes = kv.iter().map(|r| r.len() as u64 * 4).sum();
                self.kept.insert(id, Kept { states, kv });
                Reply::Forwarded { kv_bytes }
            }
            Err(e) => Reply::Failed(format!("rank {}: {e}", self.rank)),
        }
    }

    /// The cells of this rank's layers among `sites` (every position, for rank 0: its views
    /// carry each position's token and final top-1 even when it owns no requested layer).
    fn lens(
        &self,
        id: u64,
        positions: &[usize],
        sites: &[usize],
        kind: lens_core::LensKind,
        top_k: usize,
    ) -> Reply {
        let Some(kept) = self.kept.get(&id) else {
            return Reply::Failed(format!("rank {} keeps no states {id}", self.rank));
        };
        let (a, b) = self.own;
        let local: Vec<Site> = sites
            .iter()
            .filter(|&&l| (a..=b).contains(&l))
            .map(|&l| Site::Layer(l - a))
            .collect();
        if local.is_empty() && self.rank != 0 {
            return Reply::Views(Vec::new());
        }
        let request = LensRequest {
            states: &kept.states,
            positions,
            sites: &local,
            kind,
            top_k,
            translators: None,
        };
        // A local layer past the own ones is the final layer.
        let n = self.stage.info().n_layers;
        let global = |l: usize| if a + l <= b { a + l } else { n };
        match host_lens(&self.stage, &request, &Stop::never()) {
            Ok(mut views) => {
                for v in &mut views {
                    for c in &mut v.cells {
                        if let Site::Layer(l) = c.site {
                            c.site = Site::Layer(global(l));
                        }
                    }
                }
                Reply::Views(views)
            }
            Err(LensError::NonFinite {
                layer,
                position,
                residual,
            }) => Reply::Failed(
                LensError::NonFinite {
                    layer: global(layer),
                    position,
                    residual,
                }
                .to_string(),
            ),
            Err(e) => Reply::Failed(format!("rank {}: {e}", self.rank)),
        }
    }
}

/// Rank 0's answer from every rank's reply (its own first).
fn join(replies: Vec<Reply>, request: &Request) -> Reply {
    if let Some(failed) = replies.iter().find(|r| matches!(r, Reply::Failed(_))) {
        return failed.clone();
    }
    match request {
        Request::Forward { .. } => Reply::Forwarded {
            kv_bytes: replies
                .iter()
                .map(|r| match r {
                    Reply::Forwarded { kv_bytes } => *kv_bytes,
                    _ => 0,
                })
                .sum(),
        },
        Request::Lens { sites, .. } => {
            let mut all = replies.into_iter().map(|r| match r {
                Reply::Views(v) => v,
                _ => Vec::new(),
            });
            let mut views: Vec<PositionView> = all.next().unwrap_or_default();
            for other in all {
                for (v, o) in views.iter_mut().zip(other) {
                    v.cells.extend(o.cells);
                }
            }
            // The cells in the order of the request's sites.
            for v in &mut views {
                let cells = std::mem::take(&mut v.cells);
                v.cells = sites
                    .iter()
                    .filter_map(|&l| cells.iter().find(|c| c.site == Site::Layer(l)).cloned())
                    .collect();
                v.decided_at = decided_at(&v.cells);
            }
            Reply::Views(views)
        }
        _ => Reply::Failed("nothing to join".into()),
    }
}
