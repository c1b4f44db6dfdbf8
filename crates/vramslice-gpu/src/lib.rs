//! How vramslice reads GPUs: the [`GpuBackend`] trait, with an NVML implementation (real cards,
//! loaded at run time so the crate builds and starts without a GPU) and a fake implementation
//! driven by a YAML file that tests and the demo rewrite to script live usage and health.
//!
//! Data enters from NVML or the fake file and leaves as plain [`GpuReading`]s; nothing here
//! knows about Kubernetes or units. [`open`] builds the configured backend; [`procfs::ProcRoot`]
//! maps the host PIDs in a reading to pods through `/proc/<pid>/cgroup`.

pub mod fake;
pub mod nvml;
pub mod procfs;

use std::path::PathBuf;

pub use fake::{FakeBackend, FakeBytes, FakeGpu, FakeNode, FakeProcess, write_fake_file};
pub use nvml::NvmlBackend;
pub use procfs::ProcRoot;
pub use vramslice_core::cgroup::PodCgroup;

/// A point-in-time reading of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuReading {
    /// NVML index on the node.
    pub index: u32,
    /// NVML UUID (`GPU-...`).
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Total memory, bytes.
    pub total_bytes: u64,
    /// Used memory, bytes.
    pub used_bytes: u64,
    /// Free memory, bytes.
    pub free_bytes: u64,
    /// Health as of this reading.
    pub health: Health,
    /// Compute processes running on the GPU.
    pub processes: Vec<GpuProcess>,
}

/// Whether a GPU may take work.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Working.
    Healthy,
    /// Not to be used; the reason names the event (XID, ECC, lost).
    Unhealthy {
        /// Why.
        reason: String,
    },
}

impl Health {
    /// True when healthy.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// One compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuProcess {
    /// Host PID.
    pub pid: u32,
    /// Device memory the process uses, bytes.
    pub used_bytes: u64,
    /// The pod the process belongs to, when the backend knows it directly (the fake backend
    /// does; for NVML the device plugin maps PIDs to pods through /proc cgroups).
    pub pod_uid: Option<String>,
}

/// Why a backend could not produce readings.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// NVML could not be loaded or initialised (no driver, no GPU).
    #[error(
        "NVML is not available: {0} (is the NVIDIA driver installed and libnvidia-ml.so.1 on the library path?)"
    )]
    NvmlUnavailable(String),
    /// An NVML call failed.
    #[error("NVML call {call} failed: {message}")]
    Nvml {
        /// The NVML function.
        call: &'static str,
        /// NVML's message.
        message: String,
    },
    /// The fake-GPU file could not be read.
    #[error("cannot read fake-GPU file {path}: {message}")]
    FakeFileRead {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The fake-GPU file is not valid.
    #[error("fake-GPU file {path} is invalid: {message}")]
    FakeFileInvalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// A source of GPU readings.
pub trait GpuBackend: Send + Sync {
    /// Short name for logs (`nvml`, `fake`).
    fn name(&self) -> &'static str;

    /// Read every GPU now. GPUs that vanished are simply absent; GPUs hit by a critical event
    /// since the last call are reported unhealthy.
    fn read(&self) -> Result<Vec<GpuReading>, BackendError>;
}

/// Which backend to open (the device plugin's `backend` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// Real GPUs through NVML.
    Nvml,
    /// GPUs described in a fake-GPU YAML file (see [`fake`]).
    Fake {
        /// The file.
        path: PathBuf,
    },
}

/// Open the backend `kind` names. NVML fails with [`BackendError::NvmlUnavailable`] when the
/// library or driver is absent; the fake backend reads and validates its file once here, so a
/// wrong path or a broken file is reported at start-up rather than on the first poll.
pub fn open(kind: &BackendKind) -> Result<Box<dyn GpuBackend>, BackendError> {
    match kind {
        BackendKind::Nvml => Ok(Box::new(NvmlBackend::new()?)),
        BackendKind::Fake { path } => {
            let backend = FakeBackend::new(path.clone());
            backend.read()?;
            Ok(Box::new(backend))
        }
    }
}
