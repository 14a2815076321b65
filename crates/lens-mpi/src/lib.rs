//! A pipeline-parallel lens over MPI (docs/distributed.md).
//!
//! Rank r of an `mpirun` job holds a contiguous range of the model's blocks (a
//! [`lens_candle::Stage`], balanced by the bytes of their weights; the embeddings on rank 0),
//! runs them on the residual rows the previous rank sends, and sends its output on. Each rank
//! keeps the rows and the KV cache of its own blocks per prompt (an edit recomputes from the
//! first changed token on every stage) and reads the lens of its own layers with its own copy
//! of the final norm and unembedding; only the cells travel to rank 0. The daemon is not a
//! rank: [`MpiBackend`] starts and supervises the job and talks to rank 0 over a local socket
//! ([`worker`] is the ranks' side, [`wire`] the messages).

mod client;
pub mod wire;
#[cfg(feature = "worker")]
pub mod worker;

pub use client::{Launch, MpiBackend, MpiLoader, LOADER};
#[cfg(feature = "worker")]
pub use worker::{run as run_worker, WorkerArgs};

/// What can go wrong in a rank or between the daemon and the job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MPI: {0}")]
    Mpi(String),
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Io(String),
    #[error("a malformed message: {0}")]
    Protocol(String),
}
