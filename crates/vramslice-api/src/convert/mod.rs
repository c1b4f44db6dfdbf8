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

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;
use vramslice_core::cluster::admission::PodAdmissionView;
use vramslice_core::cluster::ledger::{ListedPod, NodeReading, PodRecord, PublishedGpu};
use vramslice_core::cluster::placement::{
    ContainerAt, InitUnits, MAX_GPUS_PER_POD, PodRequest, Policy, partial_reuse, pod_units,
};
use vramslice_core::node::publish::NodeReport;
use vramslice_core::node::watchdog::{PodOnGpu, SelfReport};
use vramslice_core::{RESOURCE_PREFIX, UnitError, VramUnit, parse_bytes};

use crate::names::{
    ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID, ANNOTATION_GPUS, ANNOTATION_KEEP_SCHEDULER,
    ANNOTATION_POLICY,
};
use crate::{GpuNode, GpuNodeStatus, GpuNodeSummary, GpuStatus, PodUsage, ProcessUsage};

/// A pod whose VRAM request cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A VRAM resource this extender is not configured for.
    #[error(
        "pod {pod} requests {resource}, which this extender does not accept (accepted: {accepted})"
    )]
    NotAccepted {
        /// `namespace/name`.
        pod: String,
        /// The resource.
        resource: String,
        /// The accepted resources.
        accepted: String,
    },
    /// Two different VRAM resources in one pod.
    #[error("pod {pod} requests both {first} and {second}; a pod's VRAM must use one resource")]
    Mixed {
        /// `namespace/name`.
        pod: String,
        /// One resource.
        first: String,
        /// The other.
        second: String,
    },
    /// The quantity is not a whole number of units.
    #[error(
        "pod {pod} container {container}: {resource} = {value:?} is not a whole number of units"
    )]
    BadQuantity {
        /// `namespace/name`.
        pod: String,
        /// Container name.
        container: String,
        /// The resource.
        resource: String,
        /// The value.
        value: String,
    },
    /// The GPU-count annotation is not a whole number in range.
    #[error(
        "pod {pod}: annotation {ANNOTATION_GPUS}={value:?} is invalid: expected a whole number of GPUs from 1 to {MAX_GPUS_PER_POD}"
    )]
    BadGpuCount {
        /// `namespace/name`.
        pod: String,
        /// The value.
        value: String,
    },
    /// A container's units do not split evenly over the pod's GPUs.
    #[error(
        "pod {pod} container {container}: {units} units of {resource} do not split evenly over {gpus} GPUs ({ANNOTATION_GPUS}); each container's VRAM must be a multiple of the GPU count"
    )]
    UnevenSplit {
        /// `namespace/name`.
        pod: String,
        /// Container name.
        container: String,
        /// The resource.
        resource: String,
        /// The container's units.
        units: u64,
        /// The pod's GPU count.
        gpus: u32,
    },
    /// A container of a pod spanning GPUs would get an arbitrary part of the devices earlier
    /// plain init containers hand on, which need not split evenly over the GPUs.
    #[error(
        "pod {pod} container {container}: its {units} units of {resource} would be taken from the {reusable} its init containers hand on, which the kubelet picks at random, so they need not split evenly over the pod's {gpus} GPUs ({ANNOTATION_GPUS}); give it 0 or at least {reusable} units, or run the pod on one GPU"
    )]
    PartialReuse {
        /// `namespace/name`.
        pod: String,
        /// Container name.
        container: String,
        /// The resource.
        resource: String,
        /// The container's units.
        units: u64,
        /// The units on offer when its turn comes.
        reusable: u64,
        /// The pod's GPU count.
        gpus: u32,
    },
    /// The policy annotation names no policy.
    #[error(
        "pod {pod}: annotation {ANNOTATION_POLICY}={value:?} is invalid: expected binpack or spread"
    )]
    BadPolicy {
        /// `namespace/name`.
        pod: String,
        /// The value.
        value: String,
    },
}

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

/// One container's VRAM-relevant resources, whatever type the container came in (the API
/// server's `Container`, or the extender's wire form of what kube-scheduler sends).
#[derive(Debug, Clone, Copy)]
pub struct ContainerVram<'a> {
    /// Container name.
    pub name: &'a str,
    /// `resources.limits`.
    pub limits: Option<&'a BTreeMap<String, Quantity>>,
    /// `resources.requests`.
    pub requests: Option<&'a BTreeMap<String, Quantity>>,
    /// A sidecar init container (`restartPolicy: Always`).
    pub sidecar: bool,
}

/// The VRAM-relevant resources of an API-server container.
pub fn container_vram(c: &Container) -> ContainerVram<'_> {
    let res = c.resources.as_ref();
    ContainerVram {
        name: &c.name,
        limits: res.and_then(|r| r.limits.as_ref()),
        requests: res.and_then(|r| r.requests.as_ref()),
        sidecar: c.restart_policy.as_deref() == Some("Always"),
    }
}

/// Units of `resource` one container asks for (its limit, else its request), or `None` when it
/// asks for none or the quantity is not a byte count.
pub fn container_units(c: &Container, resource: &str) -> Option<u64> {
    let c = container_vram(c);
    let quantity = c
        .limits
        .and_then(|l| l.get(resource))
        .or_else(|| c.requests.and_then(|r| r.get(resource)))?;
    parse_bytes(&quantity.0).ok()
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

/// What a pod's request is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFor {
    /// Placing a pod not bound yet: also refuse what would fail on the node
    /// ([`RequestError::PartialReuse`]).
    Placement,
    /// The books of a pod already bound: what it holds, whatever placement would refuse now (a
    /// pod bound before a rule was added still holds its memory).
    Books,
}

/// The VRAM request of a pod from the API server, to place it; `None` when it asks for no VRAM.
pub fn pod_request(pod: &Pod, accepted: &[VramUnit]) -> Result<Option<PodRequest>, RequestError> {
    read_pod_request(pod, accepted, ReadFor::Placement)
}

/// The VRAM request of a pod already bound, for the books ([`ReadFor::Books`]).
pub fn bound_pod_request(
    pod: &Pod,
    accepted: &[VramUnit],
) -> Result<Option<PodRequest>, RequestError> {
    read_pod_request(pod, accepted, ReadFor::Books)
}

fn read_pod_request(
    pod: &Pod,
    accepted: &[VramUnit],
    read_for: ReadFor,
) -> Result<Option<PodRequest>, RequestError> {
    let spec = pod.spec.as_ref();
    let app: Vec<ContainerVram<'_>> = spec
        .map(|s| s.containers.iter().map(container_vram).collect())
        .unwrap_or_default();
    let init: Vec<ContainerVram<'_>> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|cs| cs.iter().map(container_vram).collect())
        .unwrap_or_default();
    containers_request(
        &pod_name(pod),
        &app,
        &init,
        accepted,
        pod.metadata.annotations.as_ref(),
        read_for,
    )
}

/// The GPU count a pod asks to spread its VRAM over (`vramslice.io/gpus`): 1 when absent;
/// otherwise a whole number from 1 to [`MAX_GPUS_PER_POD`] (surrounding blanks allowed).
pub fn gpus_of(
    who: &str,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<u32, RequestError> {
    let Some(value) = annotations.and_then(|a| a.get(ANNOTATION_GPUS)) else {
        return Ok(1);
    };
    let text = value.trim();
    text.parse::<u32>()
        .ok()
        .filter(|n| text.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_GPUS_PER_POD).contains(n))
        .ok_or_else(|| RequestError::BadGpuCount {
            pod: who.to_string(),
            value: value.clone(),
        })
}

/// The GPU count of a bound pod: as many as the extender assigned it at bind
/// (`vramslice.io/gpu-uuid`), whatever `vramslice.io/gpus` says now (annotations stay editable
/// after binding, and an edit must not drop a pod that holds memory from the books); without
/// that annotation (a pod bound some other way), [`gpus_of`].
fn bound_gpu_count(
    who: &str,
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<u32, RequestError> {
    let assigned = annotations
        .and_then(|a| a.get(ANNOTATION_GPU_UUID))
        .map(|list| {
            let uuids = vramslice_core::cluster::placement::gpu_uuids(list);
            uuids
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        })
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (1..=MAX_GPUS_PER_POD).contains(n));
    match assigned {
        Some(n) => Ok(n),
        None => gpus_of(who, annotations),
    }
}

/// `namespace/name` of a pod.
pub fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The VRAM request of a pod's app and init containers (`who` names the pod in errors, the
/// pod's `annotations` give its GPU count); `None` when it asks for no VRAM. Every resource
/// must be one of `accepted`, one kind per pod, whole units; init containers count as
/// kube-scheduler counts them (`pod_units`).
///
/// With `vramslice.io/gpus: N` the request spans N GPUs of one node: every container that asks
/// for VRAM (app, init or sidecar) takes `units / N` from each of the pod's N GPUs, so each
/// such container's units must divide by N (else [`RequestError::UnevenSplit`]), and the pod
/// takes `total / N` on each GPU. For [`ReadFor::Placement`], a container that would get an
/// arbitrary part of an init container's devices is refused too
/// ([`RequestError::PartialReuse`]).
pub fn containers_request(
    who: &str,
    app: &[ContainerVram<'_>],
    init: &[ContainerVram<'_>],
    accepted: &[VramUnit],
    annotations: Option<&BTreeMap<String, String>>,
    read_for: ReadFor,
) -> Result<Option<PodRequest>, RequestError> {
    let gpus = match read_for {
        ReadFor::Placement => gpus_of(who, annotations)?,
        ReadFor::Books => bound_gpu_count(who, annotations)?,
    };
    let mut unit: Option<VramUnit> = None;
    let mut units_of = |c: &ContainerVram<'_>| -> Result<u64, RequestError> {
        let mut total = 0u64;
        // Limits win; a resource only in requests counts too (extended resources must match).
        let mut seen: BTreeMap<&str, &Quantity> = BTreeMap::new();
        for map in [c.requests, c.limits].into_iter().flatten() {
            for (name, q) in map {
                if name.starts_with(RESOURCE_PREFIX) {
                    seen.insert(name, q);
                }
            }
        }
        for (name, q) in seen {
            let this = VramUnit::from_resource_name(name)
                .ok()
                .filter(|u| accepted.contains(u))
                .ok_or_else(|| RequestError::NotAccepted {
                    pod: who.to_string(),
                    resource: name.to_string(),
                    accepted: accepted
                        .iter()
                        .map(|u| u.resource_name())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            match unit {
                Some(u) if u != this => {
                    return Err(RequestError::Mixed {
                        pod: who.to_string(),
                        first: u.resource_name().to_string(),
                        second: name.to_string(),
                    });
                }
                _ => unit = Some(this),
            }
            let bad = || RequestError::BadQuantity {
                pod: who.to_string(),
                container: c.name.to_string(),
                resource: name.to_string(),
                value: q.0.clone(),
            };
            let n = parse_bytes(&q.0).map_err(|_| bad())?;
            if !n.is_multiple_of(u64::from(gpus)) {
                return Err(RequestError::UnevenSplit {
                    pod: who.to_string(),
                    container: c.name.to_string(),
                    resource: name.to_string(),
                    units: n,
                    gpus,
                });
            }
            total = total.saturating_add(n);
        }
        Ok(total)
    };
    let app_units = app
        .iter()
        .map(&mut units_of)
        .collect::<Result<Vec<_>, _>>()?;
    let init_units = init
        .iter()
        .map(|c| {
            units_of(c).map(|units| InitUnits {
                units,
                sidecar: c.sidecar,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if gpus > 1
        && read_for == ReadFor::Placement
        && let Some(part) = partial_reuse(&app_units, &init_units)
    {
        let container = match part.container {
            ContainerAt::Init(i) => init.get(i).map(|c| c.name),
            ContainerAt::App(i) => app.get(i).map(|c| c.name),
        };
        return Err(RequestError::PartialReuse {
            pod: who.to_string(),
            container: container.unwrap_or_default().to_string(),
            resource: unit
                .map(|u| u.resource_name().to_string())
                .unwrap_or_default(),
            units: part.units,
            reusable: part.reusable,
            gpus,
        });
    }
    let total = pod_units(&app_units, &init_units);
    Ok(unit
        .filter(|_| total > 0)
        .map(|u| PodRequest::spanning(u, total, gpus)))
}

/// The placement policy for a pod: its annotation, else `default`.
pub fn policy_of(
    who: &str,
    annotations: Option<&BTreeMap<String, String>>,
    default: Policy,
) -> Result<Policy, RequestError> {
    match annotations.and_then(|a| a.get(ANNOTATION_POLICY)) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| RequestError::BadPolicy {
            pod: who.to_string(),
            value: v.clone(),
        }),
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
            // An initialising pod listed with no units holds nothing the kubelet recorded: it
            // is its plain init container's limit alone, on the GPU its annotation names
            // (`vramslice_core::node::init_limit`). Taken as a placement it would move the pod
            // in the books.
            pods: g
                .pods
                .iter()
                .filter(|p| !(p.initialising && p.allocated_units == 0))
                .map(|p| ListedPod {
                    uid: p.uid.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    limit_bytes: p.limit_bytes.max(unit.bytes_for(p.allocated_units)),
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
