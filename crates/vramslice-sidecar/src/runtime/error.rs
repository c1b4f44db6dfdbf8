//! Why a runtime could not be built, and why a job was not admitted.

use std::time::Duration;

use crate::policy::human;
use crate::profile::ProfileError;
use crate::queue::Refusal;
use crate::usage::UsageError;

/// A runtime that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Neither `VRAMSLICE_VRAM_LIMIT_BYTES` nor the usage source gives a limit.
    #[error(
        "no memory limit: set VRAMSLICE_VRAM_LIMIT_BYTES or use a usage source that reports the GPU's total"
    )]
    NoLimit,
    /// The usage source failed on first read.
    #[error("reading GPU memory usage: {0}")]
    Usage(#[from] UsageError),
    /// The profile directory is unusable.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The usage sampling thread could not be started.
    #[error("starting the usage sampler thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The metrics port could not be opened.
    #[error("metrics address {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// A job that was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Refused at once: it can never fit, or the queue is full.
    #[error("job {key:?} refused: {refusal}")]
    Refused {
        /// The job's key.
        key: String,
        /// Why.
        refusal: Refusal,
    },
    /// It waited the configured timeout without memory freeing.
    #[error(
        "job {key:?} timed out after {waited:?} waiting for memory: needs {}, {} free, {queued} jobs queued, {running} running",
        human(*need),
        human(*free)
    )]
    Timeout {
        /// The job's key.
        key: String,
        /// Bytes it needed.
        need: u64,
        /// Bytes free when it gave up.
        free: u64,
        /// Jobs still waiting.
        queued: usize,
        /// Jobs running (0: what is in use is held outside this runtime's jobs).
        running: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The caller gave up waiting ([`Runtime::admit_blocking_unless`](crate::Runtime::admit_blocking_unless)).
    #[error("job {key:?} gave up waiting for memory: cancelled")]
    Cancelled {
        /// The job's key.
        key: String,
    },
    /// Live usage could not be read.
    #[error("job {key:?}: {source}")]
    Usage {
        /// The job's key.
        key: String,
        /// The source's error.
        #[source]
        source: UsageError,
    },
}
