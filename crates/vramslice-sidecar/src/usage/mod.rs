//! Where live memory usage comes from: the guard's accounting file ([`accounting`]), the CUDA
//! driver's `cuMemGetInfo` ([`cuda`], over the driver calls in `ffi::cuda`), or a value the
//! embedder (or a test) sets ([`ManualUsage`]).

pub mod accounting;
pub mod cuda;

pub use accounting::AccountingFile;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One reading of the GPU memory this container uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageReading {
    /// Bytes in use now (the whole container's, across its processes, when the source knows).
    pub used: u64,
    /// Total bytes the source says exist (the GPU's size, or the limit under the guard).
    pub total: Option<u64>,
    /// The highest usage since the previous read of this source, when it keeps one (so that
    /// allocations freed between two samples still count toward a job's peak).
    pub peak: Option<u64>,
    /// Bytes this process holds, when the source tells the container's processes apart (the
    /// guard's accounting file: 0 before this process has a slot, or when there is no file).
    /// A job's peak is measured from it when known ([`crate::config::PeakScope`]), so that
    /// what the container's other processes allocate meanwhile is not counted.
    pub own: Option<u64>,
    /// The most this process held since the previous read, when the source knows it reached
    /// more than it holds now (the guard's per-process high-water mark rose meanwhile): an
    /// allocation made and freed between two samples still counts toward the job's peak.
    pub own_peak: Option<u64>,
}

/// A usage source that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The accounting file could not be read.
    #[error("accounting file {path}: {source}")]
    AccountingRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The accounting file's content is not the guard's layout.
    #[error("accounting file {path}: {source}")]
    AccountingContent {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: vramslice_core::container::accounting::AccountingError,
    },
    /// The CUDA driver could not be loaded or answered with an error.
    #[error("CUDA driver: {0}")]
    Cuda(#[from] crate::ffi::cuda::CudaDriverError),
}

/// Anything that reports live usage. Implementations must be cheap: the runtime reads them on
/// every admission and every sampling tick while jobs run.
pub trait UsageSource: Send + Sync + fmt::Debug {
    /// Read the usage now.
    fn read(&self) -> Result<UsageReading, UsageError>;
}

/// A usage value set by hand: for tests, and for embedders that measure memory themselves
/// (for example from `torch.cuda.memory_reserved()`). Clones share the value.
#[derive(Debug, Clone, Default)]
pub struct ManualUsage {
    used: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    window_peak: Arc<AtomicU64>,
}

impl ManualUsage {
    /// Start at `used` bytes of a GPU of `total` bytes (0 = unknown).
    pub fn new(used: u64, total: u64) -> Self {
        Self {
            used: Arc::new(AtomicU64::new(used)),
            total: Arc::new(AtomicU64::new(total)),
            window_peak: Arc::new(AtomicU64::new(used)),
        }
    }

    /// Set the bytes in use.
    pub fn set(&self, used: u64) {
        self.used.store(used, Ordering::SeqCst);
        self.window_peak.fetch_max(used, Ordering::SeqCst);
    }

    /// Add to the bytes in use (an allocation).
    pub fn add(&self, bytes: u64) {
        let now = self
            .used
            .fetch_add(bytes, Ordering::SeqCst)
            .saturating_add(bytes);
        self.window_peak.fetch_max(now, Ordering::SeqCst);
    }

    /// Subtract from the bytes in use (a free), saturating at zero.
    pub fn sub(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(bytes))
            });
    }

    /// The bytes in use.
    pub fn get(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

impl UsageSource for ManualUsage {
    fn read(&self) -> Result<UsageReading, UsageError> {
        let total = self.total.load(Ordering::SeqCst);
        let used = self.get();
        // The highest value since the previous read, so short spikes between samples count.
        let peak = self.window_peak.swap(used, Ordering::SeqCst).max(used);
        Ok(UsageReading {
            used,
            total: (total > 0).then_some(total),
            peak: Some(peak),
            own: None,
            own_peak: None,
        })
    }
}
