//! Kubernetes objects to the core's plain values: `vramslice_api::convert` (the one home of those
//! conversions, re-exported here), plus the pod as kube-scheduler sends it to the extender.

pub use vramslice_api::convert::*;
use vramslice_core::VramUnit;
use vramslice_core::cluster::placement::PodRequest;

use crate::wire::{WireContainer, WirePod};

fn from_wire(c: &WireContainer) -> ContainerVram<'_> {
    let res = c.resources.as_ref();
    ContainerVram::new(
        &c.name,
        res.and_then(|r| r.limits.as_ref()),
        res.and_then(|r| r.requests.as_ref()),
        c.restart_policy.as_deref(),
    )
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
    containers_request(
        &who,
        &app,
        &init,
        accepted,
        pod.metadata.annotations.as_ref(),
        ReadFor::Placement,
    )
}
