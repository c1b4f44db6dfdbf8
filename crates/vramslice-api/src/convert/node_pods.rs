//! A node's pods as the device plugin's GetPreferredAllocation reads them: the requests of a
//! size among the containers of the pods bound to it, the GPU the extender assigned each pod and
//! the GPU the kubelet allocated each container ([`placements`], for
//! `vramslice_core::owed_gpus`), how many requests still wait ([`waiting_requests`]), the pods'
//! UIDs ([`uids_by_name`]), what plain init containers may hold ([`plain_init_holds`], for the
//! accounting sweeper) and the pods one of whose plain init containers may still run
//! ([`init_phase_pods`], for their limit). Pods come as the API server's objects, owned or behind
//! `Arc` (a watch cache holds them so).
//!
//! The kubelet asks for one container at a time, and every VRAM container of a pod shares the
//! pod's GPU(s), so the count is per container: a pod with two containers of 2 units is owed two
//! 2-unit allocations on its GPU, and is still owed the second once the first is made.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use vramslice_core::PodPlacement;
use vramslice_core::cluster::placement::{InitUnits, plain_init_allocated};

mod init;

pub use init::{init_phase_pods, plain_init_holds};

use super::{container_units, container_vram};
use crate::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID};
use vramslice_core::DeviceId;
use vramslice_core::node::publish::ContainerAllocationRecord;

/// Whether none of the pod's containers has started yet.
fn not_started(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    if status.phase.as_deref().is_some_and(|p| p != "Pending") {
        return false;
    }
    status
        .container_statuses
        .iter()
        .flatten()
        .all(|cs| !started(cs))
}

/// Whether the pod is bound and not finished (phase neither Succeeded nor Failed): its
/// requests hold or wait for units.
fn bound_and_unfinished(pod: &Pod) -> bool {
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    bound && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The pods (namespace, name) that run with a container asking for `resource` (an app
/// container or a sidecar: what the kubelet's PodResources record lists): phase Running and not
/// being deleted. The accounting sweeper trusts the kubelet's record only when it lists them all
/// (`vramslice_core::node::sweep::unlisted_running_pods`).
pub fn running_pods_using<P: Borrow<Pod>>(pods: &[P], resource: &str) -> Vec<(String, String)> {
    pods.iter()
        .map(Borrow::borrow)
        .filter(|pod| {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let asks = pod.spec.as_ref().is_some_and(|spec| {
                let sidecars = spec
                    .init_containers
                    .iter()
                    .flatten()
                    .filter(|c| container_vram(c).sidecar);
                spec.containers
                    .iter()
                    .chain(sidecars)
                    .any(|c| container_units(c, resource).is_some_and(|u| u > 0))
            });
            running && asks && pod.metadata.deletion_timestamp.is_none()
        })
        .map(pod_key)
        .collect()
}

/// (namespace, name) of a pod.
fn pod_key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// What the kubelet's PodResources record says each pod's containers hold: per (namespace,
/// pod), one entry per container holding units of the resource, its unit count and its GPUs
/// (in [`canonical_gpus`] form). Made by [`held_units`].
pub type HeldUnits = BTreeMap<(String, String), Vec<(u64, String)>>;

/// The [`HeldUnits`] of the kubelet's PodResources records (IDs that are not vramslice units
/// are skipped; a container holding none is left out).
pub fn held_units(records: &[ContainerAllocationRecord]) -> HeldUnits {
    let mut held = HeldUnits::new();
    for r in records {
        let ids: Vec<DeviceId> = r
            .device_ids
            .iter()
            .filter_map(|id| id.parse().ok())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let gpus = canonical_form(ids.iter().map(|id| id.gpu_uuid.as_str()));
        held.entry((r.namespace.clone(), r.pod.clone()))
            .or_default()
            .push((ids.len() as u64, gpus));
    }
    held
}

/// A pod's containers asking exactly one size: how many, the GPUs of those the kubelet
/// allocated as its record lists them, and how many more it allocated that the record does not
/// list.
struct SizeRequests {
    asked: usize,
    listed: Vec<String>,
    unlisted: usize,
}

impl SizeRequests {
    fn waiting(&self) -> usize {
        self.asked
            .saturating_sub(self.listed.len().saturating_add(self.unlisted))
    }
}

/// Whether a container status shows the container started (running or finished).
fn started(status: &ContainerStatus) -> bool {
    status
        .state
        .as_ref()
        .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
}

/// The pod's requests of exactly `size` units. With the kubelet's record (`allocated`), a
/// container counts as allocated when the record lists it, or when its status shows it started:
/// the record never lists plain init containers (only app and sidecar ones), and a started
/// container was allocated whatever the record says; a plain init container counts as allocated
/// too once the record lists a container the kubelet allocates after it. Without the record,
/// every request of a pod that has started counts as allocated.
fn size_requests(
    pod: &Pod,
    resource: &str,
    size: u64,
    allocated: Option<&HeldUnits>,
) -> SizeRequests {
    let none = SizeRequests {
        asked: 0,
        listed: Vec::new(),
        unlisted: 0,
    };
    let Some(spec) = pod.spec.as_ref() else {
        return none;
    };
    let asking = |c: &&Container| container_units(c, resource) == Some(size);
    // Containers the record may list (app and sidecar init containers), and plain init ones.
    let sidecar = |c: &&Container| container_vram(c).sidecar;
    let init = spec.init_containers.iter().flatten().filter(asking);
    let listable: Vec<&str> = spec
        .containers
        .iter()
        .filter(asking)
        .chain(init.clone().filter(sidecar))
        .map(|c| c.name.as_str())
        .collect();
    let plain_init: Vec<&str> = init
        .filter(|c| !sidecar(c))
        .map(|c| c.name.as_str())
        .collect();
    let asked = listable.len() + plain_init.len();
    let Some(map) = allocated else {
        let unlisted = if not_started(pod) { 0 } else { asked };
        return SizeRequests {
            unlisted,
            asked,
            ..none
        };
    };
    let listed: Vec<String> = map
        .get(&pod_key(pod))
        .into_iter()
        .flatten()
        .filter(|(units, _)| *units == size)
        .map(|(_, gpus)| gpus.clone())
        .take(listable.len())
        .collect();
    let status = pod.status.as_ref();
    let started_among = |names: &[&str]| {
        status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .chain(
                status
                    .and_then(|s| s.init_container_statuses.as_ref())
                    .into_iter()
                    .flatten(),
            )
            .filter(|cs| names.contains(&cs.name.as_str()) && started(cs))
            .count()
    };
    // Allocated before its status says so: the record lists a container after it
    // (`plain_init_allocated`; its status may lag behind a pod admitted next).
    let listed_total = map.get(&pod_key(pod)).map_or(0, Vec::len);
    let units: Vec<InitUnits> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| InitUnits {
            units: container_units(c, resource).unwrap_or(0),
            sidecar: container_vram(c).sidecar,
        })
        .collect();
    let allocated_in_order = plain_init_allocated(&units, listed_total)
        .into_iter()
        .zip(&units)
        .filter(|(allocated, c)| *allocated && c.units == size)
        .count();
    let plain_allocated = allocated_in_order.max(started_among(&plain_init));
    SizeRequests {
        asked,
        unlisted: plain_allocated + started_among(&listable).saturating_sub(listed.len()),
        listed,
    }
}

/// How many requests of exactly `size` units, of pods annotated or not, wait: containers of
/// bound, unfinished pods asking for that size, not allocated yet. GetPreferredAllocation is
/// asked for one of them, so when the cached pods hold none, the cache is behind the kubelet
/// and a LIST must answer instead.
pub fn waiting_requests<P: Borrow<Pod>>(
    pods: &[P],
    resource: &str,
    size: u64,
    allocated: Option<&HeldUnits>,
) -> usize {
    pods.iter()
        .map(Borrow::borrow)
        .filter(|pod| bound_and_unfinished(pod))
        .map(|pod| size_requests(pod, resource, size, allocated).waiting())
        .sum()
}

/// The requests of exactly `size` units of `resource` on this node, one per container asking
/// that size, with the GPU the extender assigned its pod (`vramslice.io/gpu-uuid`) and the GPU
/// the kubelet allocated it, for `vramslice_core::owed_gpus` (a pod spanning several GPUs: all
/// of them, in [`canonical_gpus`] form, so it is owed its set of GPUs as one). A pod counts when
/// it is bound, not finished (phase neither Succeeded nor Failed) and annotated. `allocated` is
/// the kubelet's PodResources record ([`HeldUnits`]); without it (`None`: PodResources
/// unavailable) the requests of a pod that has started are taken to hold its annotated GPU.
pub fn placements<P: Borrow<Pod>>(
    pods: &[P],
    resource: &str,
    size: u64,
    allocated: Option<&HeldUnits>,
) -> Vec<PodPlacement> {
    pods.iter()
        .map(Borrow::borrow)
        .filter(|pod| bound_and_unfinished(pod))
        .filter_map(|pod| {
            let annotations = pod.metadata.annotations.as_ref()?;
            let gpu = canonical_gpus(annotations.get(ANNOTATION_GPU_UUID)?);
            if gpu.is_empty() {
                return None;
            }
            let assigned = annotations
                .get(ANNOTATION_ASSIGNED_AT)
                .and_then(|t| t.trim().parse::<Timestamp>().ok());
            let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let order_key = format!(
                "{}\u{1f}{}\u{1f}{}",
                sortable(assigned),
                sortable(created),
                pod_key(pod).1
            );
            let requests = size_requests(pod, resource, size, allocated);
            let waiting = requests.waiting();
            let allocated_gpus = requests
                .listed
                .into_iter()
                .map(Some)
                .chain(std::iter::repeat_n(Some(gpu.clone()), requests.unlisted))
                .chain(std::iter::repeat_n(None, waiting));
            Some(
                allocated_gpus
                    .map(|allocated_gpu| PodPlacement {
                        annotated_gpu: gpu.clone(),
                        allocated_gpu,
                        order_key: order_key.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

/// A `vramslice.io/gpu-uuid` value (one UUID, or several comma-separated for a pod spanning
/// GPUs) in the canonical form `vramslice_core::owed_gpus` compares: UUIDs sorted, joined by
/// commas. The device plugin writes the GPUs the kubelet allocated a pod in the same form.
pub fn canonical_gpus(list: &str) -> String {
    canonical_form(vramslice_core::cluster::placement::gpu_uuids(list))
}

/// UUIDs sorted, repeats dropped, joined by commas.
fn canonical_form<'a>(uuids: impl IntoIterator<Item = &'a str>) -> String {
    let mut gpus: Vec<&str> = uuids.into_iter().collect();
    gpus.sort_unstable();
    gpus.dedup();
    gpus.join(",")
}

/// A time as text that sorts like the time (RFC 3339 text does not: `…58.1577Z` sorts after
/// `…58.157734Z`); no time sorts last.
fn sortable(t: Option<Timestamp>) -> String {
    t.map_or_else(
        || "~".to_string(),
        // Timestamps span ±10,000 years (< 2^69 ns): shifted, they are all positive.
        |t| format!("{:030}", t.as_nanosecond().saturating_add(1 << 80)),
    )
}

/// (namespace, name) → UID of the given pods.
pub fn uids_by_name<P: Borrow<Pod>>(pods: &[P]) -> BTreeMap<(String, String), String> {
    pods.iter()
        .map(Borrow::borrow)
        .filter_map(|p| {
            Some((
                (p.metadata.namespace.clone()?, p.metadata.name.clone()?),
                p.metadata.uid.clone()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
