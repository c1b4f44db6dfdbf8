//! Kubernetes objects to the core's plain values, in one place: a pod's VRAM request and
//! placement policy, a bound pod's ledger record, a pod's view for the admission decision, one
//! container's units of a resource, and a `GpuNode`'s readings; and the one conversion the other
//! way, the device plugin's report to the `GpuNode` status it writes. [`node_pods`] reads a
//! node's pods for the device plugin's GetPreferredAllocation; [`dra`] reads a claim's
//! allocation and writes the node's ResourceSlice in DRA mode; [`pod_claims`] says which claims a
//! pod and each of its containers use. The extender, the device plugin,
//! the webhook and `kubectl vramslice` all read pods through these functions.

pub mod dra;
pub mod node_pods;
pub mod pod_claims;
mod request;

pub use request::{
    ContainerVram, ReadFor, RequestError, bound_pod_request, container_units, container_vram,
    containers_request, gpus_of, pod_name, pod_request, policy_of,
};

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use vramslice_core::cluster::admission::PodAdmissionView;
use vramslice_core::cluster::ledger::{ListedPod, NodeReading, PodRecord, PublishedGpu};
use vramslice_core::node::publish::NodeReport;
use vramslice_core::node::watchdog::{PodOnGpu, SelfReport};
use vramslice_core::{UnitError, VramUnit};

use crate::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID, ANNOTATION_KEEP_SCHEDULER};
use crate::{GpuNode, GpuNodeStatus, GpuNodeSummary, GpuStatus, PodUsage, ProcessUsage};

/// A time that is not RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an RFC 3339 time")]
pub struct TimeError(pub String);

/// Why a `GpuNode`'s readings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadingError {
    /// The device plugin has not published a status yet.
    #[error("it has no status yet")]
    NoStatus,
    /// `status.observedAt` is not a time.
    #[error("observedAt {0}")]
    ObservedAt(TimeError),
    /// Neither `status.unit` nor `status.resourceName` names a unit.
    #[error(transparent)]
    Unit(UnitError),
    /// Two GPUs share an index or a UUID: a pod checked against one could be placed on the
    /// other.
    #[error("GPU {what} {value} appears twice")]
    DuplicateGpu {
        /// `index` or `UUID`.
        what: &'static str,
        /// The repeated value.
        value: String,
    },
}

/// What the admission decision (`vramslice_core::cluster::admission`) reads of a pod: its scheduler and
/// node names, the keep-scheduler annotation, and every container's resources.
pub fn admission_view(pod: &Pod) -> PodAdmissionView {
    let spec = pod.spec.as_ref();
    let mut resources = Vec::new();
    for c in spec
        .into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .map(container_vram)
    {
        for map in [c.limits, c.requests].into_iter().flatten() {
            resources.extend(map.iter().map(|(k, v)| (k.clone(), v.0.clone())));
        }
    }
    PodAdmissionView {
        scheduler_name: spec.and_then(|s| s.scheduler_name.clone()),
        node_name: spec.and_then(|s| s.node_name.clone()),
        keep_scheduler_annotation: pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_KEEP_SCHEDULER).cloned()),
        resources,
    }
}

/// What the pod watch should do with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodFate {
    /// Bound to a node and holding VRAM: record it.
    Bound(PodRecord),
    /// Finished, or asks for no VRAM: forget its UID.
    Gone(String),
    /// Not bound yet: nothing to record.
    Pending,
}

/// Classify a pod from the API server.
pub fn pod_fate(pod: &Pod, accepted: &[VramUnit]) -> PodFate {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return PodFate::Gone(uid);
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return PodFate::Pending;
    };
    let Ok(Some(request)) = bound_pod_request(pod, accepted) else {
        return PodFate::Gone(uid);
    };
    let annotations = pod.metadata.annotations.as_ref();
    PodFate::Bound(PodRecord {
        uid,
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        node,
        gpu_uuid: annotations
            .and_then(|a| a.get(ANNOTATION_GPU_UUID))
            .cloned(),
        assigned_at: annotations
            .and_then(|a| a.get(ANNOTATION_ASSIGNED_AT))
            .and_then(|t| parse_time(t).ok()),
        request,
    })
}

/// Parse an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<SystemTime, TimeError> {
    let ts: Timestamp = text
        .trim()
        .parse()
        .map_err(|_| TimeError(text.to_string()))?;
    let nanos = ts.as_nanosecond();
    let magnitude = Duration::from_nanos(u64::try_from(nanos.unsigned_abs()).unwrap_or(u64::MAX));
    Ok(if nanos >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    })
}

/// Format a time as RFC 3339 in UTC (`2026-11-22T09:30:00Z`, sub-second digits when present).
pub fn format_time(t: SystemTime) -> String {
    let nanos = t
        .duration_since(UNIX_EPOCH)
        .map(|d| i128::try_from(d.as_nanos()).unwrap_or(0))
        .unwrap_or(0);
    Timestamp::from_nanosecond(nanos)
        .map(|ts| ts.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// A `GpuNode`'s name and readings, or why they cannot be used.
pub fn node_reading(gpunode: &GpuNode) -> (String, Result<NodeReading, ReadingError>) {
    let name = gpunode.metadata.name.clone().unwrap_or_default();
    let Some(status) = gpunode.status.as_ref() else {
        return (name, Err(ReadingError::NoStatus));
    };
    let observed_at = match parse_time(&status.observed_at) {
        Ok(t) => t,
        Err(e) => return (name, Err(ReadingError::ObservedAt(e))),
    };
    let unit = match status.unit.parse::<VramUnit>() {
        Ok(u) => u,
        Err(e) => match VramUnit::from_resource_name(&status.resource_name) {
            Ok(u) => u,
            Err(_) => return (name, Err(ReadingError::Unit(e))),
        },
    };
    for (i, g) in status.gpus.iter().enumerate() {
        let earlier = &status.gpus[..i];
        let repeated = if earlier.iter().any(|e| e.index == g.index) {
            Some(("index", g.index.to_string()))
        } else if earlier.iter().any(|e| e.uuid == g.uuid) {
            Some(("UUID", g.uuid.clone()))
        } else {
            None
        };
        if let Some((what, value)) = repeated {
            return (name, Err(ReadingError::DuplicateGpu { what, value }));
        }
    }
    let gpus = status
        .gpus
        .iter()
        .map(|g| PublishedGpu {
            index: g.index,
            uuid: g.uuid.clone(),
            free_bytes: g.free_bytes,
            units: g.units,
            healthy: g.healthy,
            health_reason: g.health_reason.clone(),
            // An initialising pod's limit is raised for its plain init container
            // (`vramslice_core::node::init_limit`), on every GPU it is listed on, for the
            // watchdog; the books take what the kubelet recorded there. Listed with no units it
            // holds nothing the kubelet recorded, and taken as a placement it would move the
            // pod in the books; listed for its raised limit on a GPU one of its containers took
            // from another pod, it would read as wholly placed there and the rest of its units
            // (on the GPU it was given) would go uncounted. Listed for its units, it reads as
            // partly listed, and the ledger counts the rest where it was assigned.
            pods: g
                .pods
                .iter()
                .filter(|p| !(p.initialising && p.allocated_units == 0))
                .map(|p| ListedPod {
                    uid: p.uid.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    limit_bytes: if p.initialising {
                        unit.bytes_for(p.allocated_units)
                    } else {
                        p.limit_bytes.max(unit.bytes_for(p.allocated_units))
                    },
                    used_bytes: p.used_bytes,
                })
                .collect(),
        })
        .collect();
    (
        name,
        Ok(NodeReading {
            observed_at,
            unit,
            gpus,
        }),
    )
}

/// The GpuNode status for a report observed at `observed_at` (RFC 3339), with each pod's
/// self-report verdict from the watchdog.
pub fn gpunode_status(
    report: &NodeReport,
    observed_at: String,
    self_reports: &BTreeMap<PodOnGpu, SelfReport>,
) -> GpuNodeStatus {
    GpuNodeStatus {
        unit: report.unit.as_str().to_string(),
        resource_name: report.unit.resource_name().to_string(),
        observed_at,
        gpus: report
            .gpus
            .iter()
            .map(|g| GpuStatus {
                index: g.index,
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                total_bytes: g.total_bytes,
                used_bytes: g.used_bytes,
                free_bytes: g.free_bytes,
                units: g.units,
                allocated_units: g.allocated_units,
                healthy: g.healthy,
                health_reason: g.health_reason.clone(),
                pods: g
                    .pods
                    .iter()
                    .map(|p| PodUsage {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        uid: p.uid.clone(),
                        allocated_units: p.allocated_units,
                        limit_bytes: p.limit_bytes,
                        used_bytes: p.used_bytes,
                        self_report_trusted: p.uid.as_ref().and_then(|uid| {
                            self_reports
                                .get(&PodOnGpu {
                                    gpu_uuid: g.uuid.clone(),
                                    pod_uid: uid.clone(),
                                })
                                .map(|s| s.trusted)
                        }),
                        initialising: p.initialising,
                    })
                    .collect(),
                processes_without_pod: g
                    .processes_without_pod
                    .iter()
                    .map(|p| ProcessUsage {
                        pid: p.pid,
                        used_bytes: p.used_bytes,
                    })
                    .collect(),
            })
            .collect(),
        summary: GpuNodeSummary {
            gpus: report.summary.gpus,
            total: report.summary.total.clone(),
            live_free: report.summary.live_free.clone(),
            allocated: report.summary.allocated.clone(),
            healthy: report.summary.healthy.clone(),
        },
    }
}

#[cfg(test)]
mod tests;
