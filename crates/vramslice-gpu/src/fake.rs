//! The fake backend: GPUs described in a small YAML file that is re-read on every
//! [`GpuBackend::read`], so tests and the demo script live usage, a GPU going unhealthy, or a
//! GPU disappearing by rewriting the file (atomically, with [`write_fake_file`]).
//!
//! The file:
//!
//! ```yaml
//! driverVersion: 580.65.06           # optional; what NVML's system driver version would say
//! gpus:
//!   - uuid: GPU-11111111-2222-3333-4444-555555555555
//!     index: 0                       # optional; default = position in the list
//!     model: NVIDIA H100 80GB HBM3   # optional; default "Fake GPU"
//!     total: 80Gi                    # quantity string or integer bytes
//!     used: 2Gi                      # optional; default = sum of the processes' used
//!     healthy: true                  # optional; default true
//!     unhealthyReason: XID 79        # optional; only with healthy: false
//!     processes:                     # optional
//!       - pid: 4242
//!         used: 1Gi                  # optional; absent: the driver does not say (as NVML on MIG)
//!         podUid: 0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0   # optional
//!     processesUnreadable: true      # optional; the process list fails to read (as NVML's can):
//!                                    # the processes above still count in `used`
//! ```

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vramslice_core::{DeviceId, QuantityError, format_bytes, parse_bytes};

use crate::{BackendError, GpuBackend, GpuSample, Health, ProcessSample};

/// Model name of a GPU whose `model` is not given.
pub const DEFAULT_FAKE_MODEL: &str = "Fake GPU";

/// Reason reported for a GPU with `healthy: false` and no `unhealthyReason`.
pub const DEFAULT_UNHEALTHY_REASON: &str = "marked unhealthy in the fake-GPU file";

/// Largest fake-GPU file read; anything bigger is surely not a GPU description.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The whole fake-GPU file: the GPUs of one node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FakeNode {
    /// The node's GPUs (may be empty: a node without GPUs).
    pub gpus: Vec<FakeGpu>,
    /// The driver version the node reports (NVML's `nvmlSystemGetDriverVersion`); none when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
}

/// One fake GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FakeGpu {
    /// UUID (`GPU-...`), unique on the node.
    pub uuid: String,
    /// NVML-style index; defaults to the GPU's position in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Product name; defaults to [`DEFAULT_FAKE_MODEL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Total memory.
    pub total: FakeBytes,
    /// Used memory; defaults to the sum of the processes' usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<FakeBytes>,
    /// Health; defaults to healthy.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub healthy: bool,
    /// Why the GPU is unhealthy (only with `healthy: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    /// Processes using the GPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<FakeProcess>,
    /// Plays a driver whose process list cannot be read: the reading has no processes (unknown,
    /// not none), while `processes` still count in the used memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub processes_unreadable: bool,
}

/// One process on a fake GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FakeProcess {
    /// Host PID (not 0; unique per GPU).
    pub pid: u32,
    /// Device memory the process uses; `None` plays a driver that does not say
    /// (`NVML_VALUE_NOT_AVAILABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<FakeBytes>,
    /// The pod the process belongs to; when absent, the device plugin may map the PID to a pod
    /// through /proc cgroups like it does for NVML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// A byte amount in the fake file: integer bytes or a Kubernetes quantity string (`80Gi`).
/// The string is checked by [`FakeBytes::bytes`] (during [`FakeNode::readings`]), so its error
/// can name the GPU and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FakeBytes {
    /// Plain bytes.
    Bytes(u64),
    /// A quantity such as `80Gi`, `512Mi`, `1.5Gi`.
    Quantity(String),
}

/// Why a fake-GPU file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeFileError {
    /// The file has no content.
    #[error("the file is empty: expected a `gpus:` list")]
    Empty,
    /// Not YAML of the expected shape (syntax, an unknown or a missing key).
    #[error("{0}")]
    Yaml(String),
    /// A value is wrong.
    #[error("{at}: {problem}")]
    Value {
        /// The GPU (list position and UUID) and the field.
        at: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn value_err(at: impl Into<String>, problem: impl Into<String>) -> FakeFileError {
    FakeFileError::Value {
        at: at.into(),
        problem: problem.into(),
    }
}

impl FakeBytes {
    /// The amount in bytes.
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        match self {
            FakeBytes::Bytes(b) => Ok(*b),
            FakeBytes::Quantity(q) => parse_bytes(q),
        }
    }
}

impl<'de> Deserialize<'de> for FakeBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FakeBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte amount: integer bytes or a quantity such as 80Gi")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FakeBytes, E> {
                Ok(FakeBytes::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FakeBytes, E> {
                u64::try_from(v).map(FakeBytes::Bytes).map_err(|_| {
                    E::custom(format!(
                        "{v} is negative: a byte amount must be zero or more"
                    ))
                })
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<FakeBytes, E> {
                Err(E::custom(format!(
                    "{v} is not a whole number of bytes (write a quantity such as 1.5Gi)"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FakeBytes, E> {
                Ok(FakeBytes::Quantity(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl From<u64> for FakeBytes {
    fn from(bytes: u64) -> Self {
        FakeBytes::Bytes(bytes)
    }
}

impl From<&str> for FakeBytes {
    fn from(quantity: &str) -> Self {
        FakeBytes::Quantity(quantity.to_string())
    }
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl FakeGpu {
    /// A healthy GPU with no processes, no explicit index, model or used amount.
    pub fn new(uuid: impl Into<String>, total: impl Into<FakeBytes>) -> Self {
        FakeGpu {
            uuid: uuid.into(),
            index: None,
            model: None,
            total: total.into(),
            used: None,
            healthy: true,
            unhealthy_reason: None,
            processes: Vec::new(),
            processes_unreadable: false,
        }
    }
}

impl FakeNode {
    /// Parse the YAML text of a fake-GPU file (syntax and unknown keys only; see
    /// [`FakeNode::readings`] for the checks on values).
    pub fn from_yaml(text: &str) -> Result<FakeNode, FakeFileError> {
        if text.trim().is_empty() {
            return Err(FakeFileError::Empty);
        }
        serde_saphyr::from_str(text).map_err(|e| FakeFileError::Yaml(e.to_string()))
    }

    /// Validate the node and turn it into readings, sorted by index. The error names the GPU
    /// (by list position and UUID) and the field at fault.
    pub fn readings(&self) -> Result<Vec<GpuSample>, FakeFileError> {
        let mut uuids = HashSet::new();
        let mut indices = HashSet::new();
        let mut out = Vec::with_capacity(self.gpus.len());
        for (position, gpu) in self.gpus.iter().enumerate() {
            let at = format!("gpus[{position}] ({})", gpu.uuid);
            if !DeviceId::valid_uuid(&gpu.uuid) {
                return Err(value_err(
                    format!("gpus[{position}].uuid"),
                    format!(
                        "{:?} is not a valid GPU UUID (non-empty, no whitespace, no \"::\")",
                        gpu.uuid
                    ),
                ));
            }
            if !uuids.insert(gpu.uuid.as_str()) {
                return Err(value_err(at, "duplicate uuid"));
            }
            let index = match gpu.index {
                Some(i) => i,
                None => u32::try_from(position)
                    .map_err(|_| value_err(&at, "too many GPUs to number"))?,
            };
            if !indices.insert(index) {
                return Err(value_err(
                    at,
                    format!(
                        "duplicate index {index} (an index defaults to the GPU's position in the list)"
                    ),
                ));
            }
            out.push(gpu_reading(gpu, index, &at)?);
        }
        out.sort_by_key(|r| r.index);
        Ok(out)
    }
}

fn gpu_reading(gpu: &FakeGpu, index: u32, at: &str) -> Result<GpuSample, FakeFileError> {
    let total = gpu
        .total
        .bytes()
        .map_err(|e| value_err(format!("{at}.total"), e.to_string()))?;
    let mut pids = HashSet::new();
    let mut processes = Vec::with_capacity(gpu.processes.len());
    let mut process_sum: u64 = 0;
    for (i, p) in gpu.processes.iter().enumerate() {
        let pat = format!("{at}.processes[{i}]");
        if p.pid == 0 {
            return Err(value_err(format!("{pat}.pid"), "0 is not a process ID"));
        }
        if !pids.insert(p.pid) {
            return Err(value_err(
                format!("{pat}.pid"),
                format!("duplicate pid {} on this GPU", p.pid),
            ));
        }
        if p.pod_uid.as_deref().is_some_and(|u| u.trim().is_empty()) {
            return Err(value_err(
                format!("{pat}.podUid"),
                "empty (leave it out instead)",
            ));
        }
        let used = p
            .used
            .as_ref()
            .map(FakeBytes::bytes)
            .transpose()
            .map_err(|e| value_err(format!("{pat}.used"), e.to_string()))?;
        process_sum = process_sum.checked_add(used.unwrap_or(0)).ok_or_else(|| {
            value_err(
                format!("{at}.processes"),
                "usage adds up to more than 16 EiB",
            )
        })?;
        processes.push(ProcessSample {
            pid: p.pid,
            used_bytes: used,
            pod_uid: p.pod_uid.clone(),
        });
    }
    let used = match &gpu.used {
        Some(u) => {
            let used = u
                .bytes()
                .map_err(|e| value_err(format!("{at}.used"), e.to_string()))?;
            if process_sum > used {
                return Err(value_err(
                    at,
                    format!(
                        "the processes use {}, more than used ({})",
                        show(process_sum),
                        show(used)
                    ),
                ));
            }
            used
        }
        None => process_sum,
    };
    if used > total {
        return Err(value_err(
            at,
            format!("used ({}) is more than total ({})", show(used), show(total)),
        ));
    }
    let health = match (gpu.healthy, &gpu.unhealthy_reason) {
        (true, None) => Health::Healthy,
        (true, Some(_)) => {
            return Err(value_err(
                format!("{at}.unhealthyReason"),
                "is set but healthy is true (set healthy: false, or drop the reason)",
            ));
        }
        (false, reason) => Health::Unhealthy {
            reason: reason
                .as_deref()
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .unwrap_or(DEFAULT_UNHEALTHY_REASON)
                .to_string(),
        },
    };
    Ok(GpuSample {
        index,
        uuid: gpu.uuid.clone(),
        model: gpu
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_FAKE_MODEL.to_string()),
        total_bytes: total,
        used_bytes: used,
        free_bytes: total - used,
        health,
        processes: (!gpu.processes_unreadable).then_some(processes),
    })
}

/// Bytes for an error message: `2 GiB (2147483648 bytes)`.
fn show(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_bytes(bytes))
}

/// A [`GpuBackend`] reading a fake-GPU YAML file, afresh on every call.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    path: PathBuf,
}

impl FakeBackend {
    /// A backend over the file at `path`. Nothing is read yet: the first [`GpuBackend::read`]
    /// reports a missing or invalid file.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FakeBackend { path: path.into() }
    }

    /// The file this backend reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and parse the file without validating values.
    pub fn load(&self) -> Result<FakeNode, BackendError> {
        let display = self.path.display().to_string();
        let read_err = |message: String| BackendError::FakeFileRead {
            path: display.clone(),
            message,
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| read_err(e.to_string()))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(read_err(format!(
                "{} bytes is too large for a fake-GPU file (limit {MAX_FILE_BYTES})",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(&self.path).map_err(|e| read_err(e.to_string()))?;
        FakeNode::from_yaml(&text).map_err(|source| BackendError::FakeFileInvalid {
            path: display.clone(),
            source,
        })
    }
}

impl GpuBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn read(&self) -> Result<Vec<GpuSample>, BackendError> {
        self.load()?
            .readings()
            .map_err(|source| BackendError::FakeFileInvalid {
                path: self.path.display().to_string(),
                source,
            })
    }

    fn driver_version(&self) -> Result<Option<String>, BackendError> {
        Ok(self.load()?.driver_version)
    }
}

/// Write `node` to `path` atomically: a temporary file in the same directory, flushed, then
/// renamed over the target, so a concurrent [`FakeBackend::read`] sees the old or the new file,
/// never half of one.
pub fn write_fake_file(path: &Path, node: &FakeNode) -> std::io::Result<()> {
    let text = serde_saphyr::to_string(node).map_err(std::io::Error::other)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fake-gpus".to_string());
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{unique}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
#[path = "fake_tests.rs"]
mod tests;
