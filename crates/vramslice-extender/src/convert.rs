//! Kubernetes objects to the core's plain values: a pod's VRAM request and policy, a bound pod's
//! ledger record, and a `GpuNode`'s readings.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;
use vramslice_api::GpuNode;
use vramslice_api::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID, ANNOTATION_POLICY};
use vramslice_core::ledger::{GpuReading, ListedPod, NodeReading, PodRecord};
use vramslice_core::placement::{InitUnits, PodRequest, Policy, pod_units};
use vramslice_core::{RESOURCE_PREFIX, VramUnit, parse_bytes};

use crate::wire::{WireContainer, WirePod};

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

/// One container's VRAM-relevant resources.
struct ContainerVram<'a> {
    name: &'a str,
    limits: Option<&'a BTreeMap<String, Quantity>>,
    requests: Option<&'a BTreeMap<String, Quantity>>,
    sidecar: bool,
}

fn from_wire(c: &WireContainer) -> ContainerVram<'_> {
    let res = c.resources.as_ref();
    ContainerVram {
        name: &c.name,
        limits: res.and_then(|r| r.limits.as_ref()),
        requests: res.and_then(|r| r.requests.as_ref()),
        sidecar: c.restart_policy.as_deref() == Some("Always"),
    }
}

fn from_k8s(c: &Container) -> ContainerVram<'_> {
    let res = c.resources.as_ref();
    ContainerVram {
        name: &c.name,
        limits: res.and_then(|r| r.limits.as_ref()),
        requests: res.and_then(|r| r.requests.as_ref()),
        sidecar: c.restart_policy.as_deref() == Some("Always"),
    }
}

/// The VRAM request of a pod as kube-scheduler sends it; `None` when it asks for no VRAM.
pub fn wire_pod_request(
    pod: &WirePod,
    accepted: &[VramUnit],
) -> Result<Option<PodRequest>, RequestError> {
    let spec = pod.spec.as_ref();
    let app: Vec<ContainerVram<'_>> = spec
        .and_then(|s| s.containers.as_ref())
        .map(|cs| cs.iter().map(from_wire).collect())
        .unwrap_or_default();
    let init: Vec<ContainerVram<'_>> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|cs| cs.iter().map(from_wire).collect())
        .unwrap_or_default();
    let who = format!("{}/{}", pod.metadata.namespace, pod.metadata.name);
    request(&who, &app, &init, accepted)
}

/// The VRAM request of a pod from the API server; `None` when it asks for no VRAM.
pub fn pod_request(pod: &Pod, accepted: &[VramUnit]) -> Result<Option<PodRequest>, RequestError> {
    let spec = pod.spec.as_ref();
    let app: Vec<ContainerVram<'_>> = spec
        .map(|s| s.containers.iter().map(from_k8s).collect())
        .unwrap_or_default();
    let init: Vec<ContainerVram<'_>> = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|cs| cs.iter().map(from_k8s).collect())
        .unwrap_or_default();
    request(&pod_name(pod), &app, &init, accepted)
}

/// `namespace/name` of a pod.
pub fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn request(
    who: &str,
    app: &[ContainerVram<'_>],
    init: &[ContainerVram<'_>],
    accepted: &[VramUnit],
) -> Result<Option<PodRequest>, RequestError> {
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
    let total = pod_units(&app_units, &init_units);
    Ok(unit
        .filter(|_| total > 0)
        .map(|u| PodRequest::new(u, total)))
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
    let Ok(Some(request)) = pod_request(pod, accepted) else {
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
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    let ts: Timestamp = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an RFC 3339 time"))?;
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
pub fn node_reading(gpunode: &GpuNode) -> (String, Result<NodeReading, String>) {
    let name = gpunode.metadata.name.clone().unwrap_or_default();
    let Some(status) = gpunode.status.as_ref() else {
        return (name, Err("it has no status yet".into()));
    };
    let observed_at = match parse_time(&status.observed_at) {
        Ok(t) => t,
        Err(e) => return (name, Err(format!("observedAt {e}"))),
    };
    let unit = match status.unit.parse::<VramUnit>() {
        Ok(u) => u,
        Err(e) => match VramUnit::from_resource_name(&status.resource_name) {
            Ok(u) => u,
            Err(_) => return (name, Err(e.to_string())),
        },
    };
    let gpus = status
        .gpus
        .iter()
        .map(|g| GpuReading {
            index: g.index,
            uuid: g.uuid.clone(),
            free_bytes: g.free_bytes,
            units: g.units,
            healthy: g.healthy,
            health_reason: g.health_reason.clone(),
            pods: g
                .pods
                .iter()
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
