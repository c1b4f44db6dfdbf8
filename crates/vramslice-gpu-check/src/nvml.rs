//! One reading of every GPU through the NVML backend, in a shape the check program prints.

use std::path::Path;

use serde::Serialize;
use vramslice_gpu::{BackendError, GpuBackend, NvmlBackend};

/// What NVML said about the node.
#[derive(Debug, Serialize)]
pub struct NvmlReport {
    /// Every GPU, in index order.
    pub gpus: Vec<GpuReport>,
    /// Per GPU UUID: whether its health events (critical XID, double-bit ECC) are subscribed.
    pub health_events: std::collections::BTreeMap<String, bool>,
    /// How long the reading took, milliseconds.
    pub read_ms: f64,
}

/// One GPU.
#[derive(Debug, Serialize)]
pub struct GpuReport {
    /// NVML index.
    pub index: u32,
    /// `GPU-...`.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Bytes.
    pub total_bytes: u64,
    /// Bytes (total − free).
    pub used_bytes: u64,
    /// Bytes.
    pub free_bytes: u64,
    /// Healthy, or why not.
    pub health: String,
    /// Compute and graphics processes: (pid, bytes).
    pub processes: Vec<ProcessReport>,
}

/// One process on a GPU.
#[derive(Debug, Serialize)]
pub struct ProcessReport {
    /// Host PID.
    pub pid: u32,
    /// Bytes NVML charges it (0 when NVML cannot say).
    pub used_bytes: u64,
}

/// Open NVML (from `library` when given) and read every GPU once.
pub fn read(library: Option<&Path>) -> Result<NvmlReport, BackendError> {
    let backend = match library {
        Some(path) => NvmlBackend::with_library_path(path.as_os_str())?,
        None => NvmlBackend::new()?,
    };
    let started = std::time::Instant::now();
    let readings = backend.read()?;
    let read_ms = started.elapsed().as_secs_f64() * 1e3;
    let gpus = readings
        .into_iter()
        .map(|r| GpuReport {
            index: r.index,
            uuid: r.uuid,
            model: r.model,
            total_bytes: r.total_bytes,
            used_bytes: r.used_bytes,
            free_bytes: r.free_bytes,
            health: match r.health {
                vramslice_gpu::Health::Healthy => "healthy".to_string(),
                vramslice_gpu::Health::Unhealthy { reason } => reason,
            },
            processes: r
                .processes
                .into_iter()
                .map(|p| ProcessReport {
                    pid: p.pid,
                    used_bytes: p.used_bytes,
                })
                .collect(),
        })
        .collect();
    Ok(NvmlReport {
        gpus,
        health_events: backend.health_events_subscribed().into_iter().collect(),
        read_ms,
    })
}
