//! Why a node or a GPU cannot take a pod, worded for `kubectl describe pod` and the scheduler's
//! FailedNodes map. Reasons are built only for nodes that fail, and rendered only when shown.

use std::fmt;

use crate::quantity::format_bytes;

/// Why one node cannot take a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The device plugin has published no `GpuNode` for the node.
    #[error("no GpuNode reading for node {node}")]
    NoReading {
        /// Node name.
        node: String,
    },
    /// The node's `GpuNode` exists but cannot be used.
    #[error("GpuNode {node} is unusable: {reason}")]
    InvalidReading {
        /// Node name.
        node: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node's `GpuNode` lists no GPUs.
    #[error("node {node} reports no GPUs")]
    NoGpus {
        /// Node name.
        node: String,
    },
    /// The node counts VRAM in another unit than the pod's resource.
    #[error("node {node} advertises {node_resource}, the pod requests {pod_resource}")]
    UnitMismatch {
        /// Node name.
        node: String,
        /// Resource the node advertises.
        node_resource: &'static str,
        /// Resource the pod requests.
        pod_resource: &'static str,
    },
    /// The pod needs more than the largest GPU of the node advertises: no preemption can help.
    #[error(
        "pod needs {}, more than any GPU on node {node} advertises (largest {})",
        format_bytes(*need),
        format_bytes(*largest)
    )]
    TooLarge {
        /// Node name.
        node: String,
        /// Bytes the pod needs.
        need: u64,
        /// Bytes the node's largest GPU advertises.
        largest: u64,
    },
    /// Each GPU of the node, and why it cannot take the pod.
    #[error("{}", GpuList(.0))]
    Gpus(Vec<GpuRejection>),
}

impl Rejection {
    /// Whether preempting pods on the node could never make room (kube-scheduler's
    /// `FailedAndUnresolvableNodes`).
    pub fn is_unresolvable(&self) -> bool {
        matches!(
            self,
            Rejection::UnitMismatch { .. } | Rejection::TooLarge { .. }
        )
    }
}

struct GpuList<'a>(&'a [GpuRejection]);

impl fmt::Display for GpuList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, gpu) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{gpu}")?;
        }
        Ok(())
    }
}

/// Why one GPU cannot take a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRejection {
    /// The node's reading is older than the staleness bound.
    Stale {
        /// GPU index.
        index: u32,
        /// Age of the reading, whole seconds.
        age_secs: u64,
    },
    /// The device plugin marked the GPU unhealthy.
    Unhealthy {
        /// GPU index.
        index: u32,
        /// The plugin's reason (XID, ECC, missing), when given.
        reason: Option<String>,
    },
    /// Not enough effective free memory.
    Short {
        /// GPU index.
        index: u32,
        /// Effective free bytes.
        effective: u64,
        /// Live free bytes (the reading).
        live: u64,
        /// Bytes assigned pods may still take that the reading cannot show.
        unobserved: u64,
        /// Configured safety margin, bytes.
        headroom: u64,
        /// Bytes of the GPU's advertised units assigned to pods.
        assigned: u64,
        /// Bytes the GPU advertises.
        advertised: u64,
        /// Bytes the pod needs.
        need: u64,
    },
}

impl fmt::Display for GpuRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRejection::Stale { index, age_secs } => {
                write!(f, "GPU {index}: reading {age_secs} s old")
            }
            GpuRejection::Unhealthy {
                index,
                reason: Some(reason),
            } => write!(f, "GPU {index}: unhealthy ({reason})"),
            GpuRejection::Unhealthy {
                index,
                reason: None,
            } => {
                write!(f, "GPU {index}: unhealthy")
            }
            GpuRejection::Short {
                index,
                effective,
                live,
                unobserved,
                headroom,
                assigned,
                advertised,
                need,
            } => {
                write!(
                    f,
                    "GPU {index}: {} effective free (",
                    format_bytes(*effective)
                )?;
                let declared_free = advertised.saturating_sub(*assigned);
                let live_part = live.saturating_sub(*unobserved).saturating_sub(*headroom);
                if declared_free < live_part {
                    write!(
                        f,
                        "{} of {} assigned",
                        format_bytes(*assigned),
                        format_bytes(*advertised)
                    )?;
                } else {
                    write!(
                        f,
                        "live {}, {} reserved by pods not yet running",
                        format_bytes(*live),
                        format_bytes(*unobserved)
                    )?;
                    if *headroom > 0 {
                        write!(f, ", {} headroom", format_bytes(*headroom))?;
                    }
                }
                write!(f, "), need {}", format_bytes(*need))
            }
        }
    }
}
