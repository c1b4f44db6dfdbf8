//! A pod's VRAM request, as the extender places it and as the books hold it once bound: its
//! containers' units of one accepted resource (init containers counted as kube-scheduler counts
//! them), the GPUs it spans (`vramslice.io/gpus`), and its placement policy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vramslice_core::cluster::placement::{
    ContainerAt, InitUnits, MAX_GPUS_PER_POD, PodRequest, Policy, partial_reuse, pod_units,
};
use vramslice_core::{RESOURCE_PREFIX, VramUnit, parse_whole};

use crate::names::{ANNOTATION_GPU_UUID, ANNOTATION_GPUS, ANNOTATION_POLICY};

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
        "pod {pod} container {container}: {resource}: {reason}; expected a whole number of units"
    )]
    BadQuantity {
        /// `namespace/name`.
        pod: String,
        /// Container name.
        container: String,
        /// The resource.
        resource: String,
        /// What is wrong with the value (it names the value).
        reason: String,
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

impl<'a> ContainerVram<'a> {
    /// A container's VRAM-relevant resources from its parts, whatever type it came in; a
    /// `restartPolicy` of `Always` makes it a sidecar (as Kubernetes reads an init container).
    pub fn new(
        name: &'a str,
        limits: Option<&'a BTreeMap<String, Quantity>>,
        requests: Option<&'a BTreeMap<String, Quantity>>,
        restart_policy: Option<&str>,
    ) -> Self {
        ContainerVram {
            name,
            limits,
            requests,
            sidecar: restart_policy == Some("Always"),
        }
    }
}

/// The VRAM-relevant resources of an API-server container.
pub fn container_vram(c: &Container) -> ContainerVram<'_> {
    let res = c.resources.as_ref();
    ContainerVram::new(
        &c.name,
        res.and_then(|r| r.limits.as_ref()),
        res.and_then(|r| r.requests.as_ref()),
        c.restart_policy.as_deref(),
    )
}

/// Units of `resource` one container asks for (its limit, else its request), or `None` when it
/// asks for none or the quantity is not a whole number.
pub fn container_units(c: &Container, resource: &str) -> Option<u64> {
    let c = container_vram(c);
    let quantity = c
        .limits
        .and_then(|l| l.get(resource))
        .or_else(|| c.requests.and_then(|r| r.get(resource)))?;
    parse_whole(&quantity.0).ok()
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
    // A bound pod holds its memory whatever its annotations say: the books count a GPU count
    // they cannot read, or one its containers do not split over (a pod vramslice did not place),
    // as one GPU, rather than forget the pod.
    let gpus = match read_for {
        ReadFor::Placement => match gpus_of(who, annotations) {
            Ok(gpus) => gpus,
            // The GPU count matters only to a pod that asks for VRAM: one that does not passes
            // whatever its annotation says.
            Err(e) => {
                return match containers_request(who, app, init, accepted, None, read_for) {
                    Ok(None) => Ok(None),
                    _ => Err(e),
                };
            }
        },
        ReadFor::Books => bound_gpu_count(who, annotations).unwrap_or(1),
    };
    let mut uneven = false;
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
            let n = parse_whole(&q.0).map_err(|e| RequestError::BadQuantity {
                pod: who.to_string(),
                container: c.name.to_string(),
                resource: name.to_string(),
                reason: e.to_string(),
            })?;
            if !n.is_multiple_of(u64::from(gpus)) && read_for == ReadFor::Books {
                uneven = true;
            } else if !n.is_multiple_of(u64::from(gpus)) {
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
    let gpus = if uneven { 1 } else { gpus };
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
