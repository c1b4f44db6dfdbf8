//! One GPU as its backend measured it, the one sample type from the backend to the report: the
//! NVML and fake backends (`vramslice-gpu`) return it, the device plugin's poller keeps it, and
//! the report ([`crate::node::publish`]), the inventory and the watchdog read it.

use std::time::Duration;

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

/// The least time without a successful backend read after which the plugin calls itself
/// unhealthy ([`backend_stalled`]), however short the poll interval.
pub const BACKEND_STALLED_FLOOR: Duration = Duration::from_secs(60);

/// Whether the GPU backend, last read successfully `since_last_read` ago (its reads failing or
/// hung since), is stalled: more than ten poll intervals and at least
/// [`BACKEND_STALLED_FLOOR`]. The plugin's `/healthz` then fails, so the kubelet's liveness
/// probe restarts it: a fresh process opens the driver library anew, and a read hung in the
/// driver cannot be got back any other way. A few failed reads (a driver hiccup) are not a stall.
pub fn backend_stalled(poll_interval: Duration, since_last_read: Duration) -> bool {
    since_last_read > poll_interval.saturating_mul(10).max(BACKEND_STALLED_FLOOR)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_stalled_after_ten_intervals_and_at_least_a_minute() {
        let fast = Duration::from_millis(500);
        assert!(!backend_stalled(fast, Duration::from_secs(60)));
        assert!(backend_stalled(fast, Duration::from_millis(60_001)));
        let slow = Duration::from_secs(30);
        assert!(!backend_stalled(slow, Duration::from_secs(300)));
        assert!(backend_stalled(slow, Duration::from_secs(301)));
        assert!(!backend_stalled(Duration::MAX, Duration::MAX));
        assert!(!backend_stalled(Duration::ZERO, Duration::ZERO));
    }
}
