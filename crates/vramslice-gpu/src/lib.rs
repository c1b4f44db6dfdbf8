//! How vramslice reads GPUs: the [`GpuBackend`] trait, with an NVML implementation (real cards,
//! loaded at run time so the crate builds and starts without a GPU) and a fake implementation
//! driven by a YAML file that tests and the demo rewrite to script live usage and health.
//!
//! Data enters from NVML or the fake file and leaves as `vramslice_core::node::sample::GpuSample`s (the one sample type); nothing here
//! knows about Kubernetes or units. [`open`] builds the configured backend; [`procfs::ProcRoot`]
//! maps the host PIDs in a reading to pods through `/proc/<pid>/cgroup`.

pub mod fake;
pub mod nvml;
pub mod procfs;

use std::path::PathBuf;

pub use fake::{
    FakeBackend, FakeBytes, FakeFileError, FakeGpu, FakeNode, FakeProcess, write_fake_file,
};
pub use nvml::NvmlBackend;
pub use procfs::ProcRoot;
pub use vramslice_core::node::cgroup::PodCgroup;
pub use vramslice_core::node::sample::{GpuSample, Health, ProcessSample};

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
    #[error("fake-GPU file {path} is invalid: {source}")]
    FakeFileInvalid {
        /// The file.
        path: String,
        /// What is wrong.
        source: fake::FakeFileError,
    },
}

/// A source of GPU readings.
pub trait GpuBackend: Send + Sync {
    /// Short name for logs (`nvml`, `fake`).
    fn name(&self) -> &'static str;

    /// Read every GPU now. GPUs that vanished are simply absent; GPUs hit by a critical event
    /// since the last call are reported unhealthy.
    fn read(&self) -> Result<Vec<GpuSample>, BackendError>;

    /// The GPU driver's version as the driver reports it (`580.65.06`); `None` when the
    /// backend has none to report.
    fn driver_version(&self) -> Result<Option<String>, BackendError>;
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
