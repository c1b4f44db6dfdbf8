//! One GPU as its backend measured it, the one sample type from the backend to the report: the
//! NVML and fake backends (`vramslice-gpu`) return it, the device plugin's poller keeps it, and
//! the report ([`crate::node::publish`]), the inventory and the watchdog read it.

use serde::Serialize;

/// A point-in-time reading of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuSample {
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
    /// Processes running on the GPU; `None` when the driver's process list could not be read
    /// this time, which is not "no processes": their usage is unknown, not 0.
    pub processes: Option<Vec<ProcessSample>>,
}

impl GpuSample {
    /// The processes the driver listed; empty when the list could not be read.
    pub fn listed_processes(&self) -> &[ProcessSample] {
        self.processes.as_deref().unwrap_or_default()
    }

    /// The memory the processes matching `is_theirs` use together: `None` when the process
    /// list could not be read or the driver gave no figure for one of them.
    pub fn used_by(&self, is_theirs: impl Fn(&ProcessSample) -> bool) -> Option<u64> {
        total_used(self.processes.as_deref()?.iter().filter(|p| is_theirs(p)))
    }
}

/// Whether a GPU may take work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

    /// Why not healthy, when not.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Health::Healthy => None,
            Health::Unhealthy { reason } => Some(reason),
        }
    }
}

/// The memory `processes` use together: `None` when the driver did not say for one of them
/// (an unknown figure is not 0); `Some(0)` for none.
pub fn total_used<'a>(processes: impl IntoIterator<Item = &'a ProcessSample>) -> Option<u64> {
    processes
        .into_iter()
        .try_fold(0u64, |sum, p| Some(sum.saturating_add(p.used_bytes?)))
}

/// One compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessSample {
    /// Host PID.
    pub pid: u32,
    /// Device memory the process uses, bytes; `None` when the driver does not say (NVML's
    /// `NVML_VALUE_NOT_AVAILABLE`: MIG, some virtualised GPUs), which is not 0.
    pub used_bytes: Option<u64>,
    /// The pod the process belongs to, when known (the fake backend knows it directly; for
    /// NVML the device plugin maps PIDs to pods through /proc cgroups).
    pub pod_uid: Option<String>,
}
