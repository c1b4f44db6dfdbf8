//! One reading of every GPU through the NVML backend, in a shape the check program prints.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use vramslice_gpu::{BackendError, GpuBackend, GpuSample, NvmlBackend};

/// What NVML said about the node.
#[derive(Debug, Serialize)]
pub struct NvmlReport {
    /// Every GPU, in index order, as the backend reads it (`used_bytes` is total − free).
    pub gpus: Vec<GpuSample>,
    /// Per GPU UUID: whether its health events (critical XID, double-bit ECC) are subscribed.
    pub health_events: BTreeMap<String, bool>,
    /// How long the reading took, milliseconds.
    pub read_ms: f64,
}

/// Open NVML (from `library` when given) and read every GPU once.
pub fn read(library: Option<&Path>) -> Result<NvmlReport, BackendError> {
    let backend = match library {
        Some(path) => NvmlBackend::with_library_path(path.as_os_str())?,
        None => NvmlBackend::new()?,
    };
    let started = std::time::Instant::now();
    let gpus = backend.read()?;
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(NvmlReport {
        gpus,
        health_events: backend.health_events_subscribed().into_iter().collect(),
        read_ms,
    })
}
