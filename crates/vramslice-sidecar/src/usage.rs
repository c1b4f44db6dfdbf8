//! Where live memory usage comes from: the guard's accounting file, the CUDA driver's
//! `cuMemGetInfo`, or a value the embedder (or a test) sets.

use std::fmt;
use std::path::{Path, PathBuf};
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
}

/// A usage source that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The accounting file could not be read or parsed.
    #[error("accounting file {path}: {reason}")]
    Accounting {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The CUDA driver could not be loaded or answered with an error.
    #[error("CUDA driver: {0}")]
    Cuda(String),
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
        })
    }
}

/// The guard's per-container accounting file in `VRAMSLICE_ACCOUNTING_DIR`, read through the
/// parser in `vramslice_core::accounting`. A directory with no file yet (nothing allocated so
/// far) reads as zero.
#[derive(Debug, Clone)]
pub struct AccountingFile {
    path: PathBuf,
}

impl AccountingFile {
    /// The accounting file inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(crate::accounting::FILE_NAME),
        }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl UsageSource for AccountingFile {
    fn read(&self) -> Result<UsageReading, UsageError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(UsageReading::default());
            }
            Err(e) => {
                return Err(UsageError::Accounting {
                    path: self.path.clone(),
                    reason: e.to_string(),
                });
            }
        };
        crate::accounting::reading(&bytes).map_err(|reason| UsageError::Accounting {
            path: self.path.clone(),
            reason,
        })
    }
}
