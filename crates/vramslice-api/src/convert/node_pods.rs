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
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, gpu: Option<&str>, assigned_at: &str, units: u64, started: bool) -> Pod {
        let mut annotations = serde_json::Map::new();
        if let Some(gpu) = gpu {
            annotations.insert(ANNOTATION_GPU_UUID.into(), json!(gpu));
            annotations.insert(ANNOTATION_ASSIGNED_AT.into(), json!(assigned_at));
        }
        let state = if started {
            json!({"running": {}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "side", "image": "x"},
                {"name": "main", "image": "x", "resources": {"limits": {"vramslice.io/vram-gib": units.to_string()}}}
            ]},
            "status": {"phase": if started { "Running" } else { "Pending" },
                       "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}
        }))
        .unwrap()
    }

    pub(super) const RES: &str = "vramslice.io/vram-gib";

    fn gpus_of(placements: &[PodPlacement]) -> Vec<(&str, Option<&str>)> {
        placements
            .iter()
            .map(|p| (p.annotated_gpu.as_str(), p.allocated_gpu.as_deref()))
            .collect()
    }

    #[test]
    fn counts_annotated_pods_of_the_right_size() {
        let mut done = pod("done", Some("GPU-e"), "2026-01-01T00:00:00Z", 6, true);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let pods = vec![
            pod("late", Some("GPU-b"), "2026-01-01T00:00:05Z", 6, false),
            pod("early", Some("GPU-a"), "2026-01-01T00:00:01Z", 6, false),
            pod(
                "other-size",
                Some("GPU-c"),
                "2026-01-01T00:00:00Z",
                4,
                false,
            ),
            pod("running", Some("GPU-d"), "2026-01-01T00:00:00Z", 6, true),
            pod("unassigned", None, "", 6, false),
            done,
        ];
        // Without PodResources a started pod holds its annotated GPU.
        let got = placements(&pods, RES, 6, None);
        assert_eq!(
            gpus_of(&got),
            vec![("GPU-b", None), ("GPU-a", None), ("GPU-d", Some("GPU-d"))]
        );
        assert_eq!(vramslice_core::owed_gpus(&got), vec!["GPU-a", "GPU-b"]);
        assert_eq!(
            gpus_of(&placements(&pods, RES, 4, None)),
            vec![("GPU-c", None)]
        );
        assert!(placements(&pods, RES, 5, None).is_empty());
        assert!(placements(&pods, "vramslice.io/vram-512mib", 6, None).is_empty());
        // With PodResources, the kubelet's record wins: "early" got GPU-b's units.
        let allocated = BTreeMap::from([
            (
                ("default".to_string(), "early".to_string()),
                vec![(6, "GPU-b".to_string())],
            ),
            (
                ("default".to_string(), "running".to_string()),
                vec![(6, "GPU-d".to_string())],
            ),
        ]);
        let got = placements(&pods, RES, 6, Some(&allocated));
        assert_eq!(vramslice_core::owed_gpus(&got), vec!["GPU-a"]);
    }

    #[test]
    fn waiting_requests_count_annotated_or_not_until_allocated() {
        let mut plain = pod("plain", None, "", 6, false);
        plain.metadata.annotations = None;
        let pods = vec![
            pod("a", Some("GPU-a"), "2026-01-01T00:00:01Z", 6, false),
            plain,
            pod("running", Some("GPU-b"), "2026-01-01T00:00:00Z", 6, true),
            pod(
                "other-size",
                Some("GPU-c"),
                "2026-01-01T00:00:00Z",
                4,
                false,
            ),
        ];
        // Without PodResources, started pods are allocated; unannotated pods still wait.
        assert_eq!(waiting_requests(&pods, RES, 6, None), 2);
        assert_eq!(waiting_requests(&pods, RES, 4, None), 1);
        assert_eq!(waiting_requests(&pods, RES, 5, None), 0);
        assert_eq!(
            waiting_requests(&pods, "vramslice.io/vram-512mib", 6, None),
            0
        );
        // With PodResources: "a" is listed, so allocated; "running" is not listed but has
        // started, so its devices were allocated (the record omits plain init containers);
        // "plain" still waits.
        let allocated = BTreeMap::from([(
            ("default".to_string(), "a".to_string()),
            vec![(6, "GPU-a".to_string())],
        )]);
        assert_eq!(waiting_requests(&pods, RES, 6, Some(&allocated)), 1);
        // Arcs, as the watch cache holds them, read the same.
        let cached: Vec<std::sync::Arc<Pod>> = pods.into_iter().map(std::sync::Arc::new).collect();
        assert_eq!(waiting_requests(&cached, RES, 6, None), 2);
    }

    /// A pod whose containers `a` and `b` (app) and `init` (plain init container) each ask for
    /// 2 units on GPU-a, with the given containers started.
    pub(super) fn three_containers(started: &[&str]) -> Pod {
        let mut p = pod("three", Some("GPU-a"), "2026-01-01T00:00:01Z", 2, false);
        let spec = p.spec.as_mut().unwrap();
        spec.containers = serde_json::from_value(json!([
            {"name": "a", "image": "x", "resources": {"limits": {"vramslice.io/vram-gib": "2"}}},
            {"name": "b", "image": "x", "resources": {"limits": {"vramslice.io/vram-gib": "2"}}}
        ]))
        .unwrap();
        spec.init_containers = Some(
            serde_json::from_value(json!([
                {"name": "init", "image": "x", "resources": {"limits": {"vramslice.io/vram-gib": "2"}}}
            ]))
            .unwrap(),
        );
        let status = |name: &str| {
            let state = if started.contains(&name) {
                json!({"terminated": {"exitCode": 0}})
            } else {
                json!({"waiting": {"reason": "PodInitializing"}})
            };
            json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state})
        };
        let st = p.status.as_mut().unwrap();
        st.container_statuses = serde_json::from_value(json!([status("a"), status("b")])).unwrap();
        st.init_container_statuses = serde_json::from_value(json!([status("init")])).unwrap();
        p
    }

    #[test]
    fn every_vram_container_of_a_pod_is_owed_its_gpu_until_it_is_allocated() {
        let key = ("default".to_string(), "three".to_string());
        // The init container ran (PodResources never lists plain init containers) and app
        // container a holds its units: b is still owed GPU-a.
        let pods = vec![three_containers(&["init"])];
        let held = BTreeMap::from([(key.clone(), vec![(2, "GPU-a".to_string())])]);
        assert_eq!(waiting_requests(&pods, RES, 2, Some(&held)), 1);
        let got = placements(&pods, RES, 2, Some(&held));
        assert_eq!(
            gpus_of(&got),
            vec![
                ("GPU-a", Some("GPU-a")),
                ("GPU-a", Some("GPU-a")),
                ("GPU-a", None)
            ]
        );
        assert_eq!(vramslice_core::owed_gpus(&got), vec!["GPU-a"]);
        // Nothing allocated yet: three requests wait, all owed GPU-a.
        let none = HeldUnits::new();
        assert_eq!(waiting_requests(&pods[..0], RES, 2, Some(&none)), 0);
        assert_eq!(
            waiting_requests(&[three_containers(&[])], RES, 2, Some(&none)),
            3
        );
        // Both app containers listed and the init container finished: nothing is owed.
        let both = BTreeMap::from([(key, vec![(2, "GPU-a".into()), (2, "GPU-a".into())])]);
        assert_eq!(waiting_requests(&pods, RES, 2, Some(&both)), 0);
        assert!(vramslice_core::owed_gpus(&placements(&pods, RES, 2, Some(&both))).is_empty());
        // Another size is not this pod's.
        assert_eq!(waiting_requests(&pods, RES, 4, Some(&both)), 0);
        // Admitted (the record lists app container a) but the init container's status not
        // updated yet: it was allocated at admission, before a; only b is owed.
        let fresh = vec![three_containers(&[])];
        assert_eq!(waiting_requests(&fresh, RES, 2, Some(&held)), 1);
        assert_eq!(
            vramslice_core::owed_gpus(&placements(&fresh, RES, 2, Some(&held))),
            vec!["GPU-a"]
        );
        // A sidecar before the init container is listed while the init container's own
        // allocation is asked for: the init container still waits (with a and b).
        let mut with_sidecar = three_containers(&[]);
        let inits = with_sidecar.spec.as_mut().unwrap().init_containers.as_mut();
        let proxy = json!({"name": "proxy", "image": "x", "restartPolicy": "Always",
            "resources": {"limits": {RES: "1"}}});
        inits
            .unwrap()
            .insert(0, serde_json::from_value(proxy).unwrap());
        let pod_key = ("default".to_string(), "three".to_string());
        let proxy_listed = BTreeMap::from([(pod_key, vec![(1, "GPU-a".to_string())])]);
        assert_eq!(
            waiting_requests(&[with_sidecar], RES, 2, Some(&proxy_listed)),
            3
        );
    }

    #[test]
    fn assignment_order_follows_the_time_not_its_text() {
        // RFC 3339 text drops trailing zeros: "…58.1577Z" is earlier than "…58.157734Z" but
        // sorts after it as text. Unreadable or missing times go last.
        let pods = vec![
            pod("b", Some("GPU-b"), "2026-01-01T00:00:58.157734Z", 2, false),
            pod("a", Some("GPU-a"), "2026-01-01T00:00:58.1577Z", 2, false),
            pod("z", Some("GPU-z"), "not a time", 2, false),
            pod("c", Some("GPU-c"), "2026-01-01T00:00:59Z", 2, false),
        ];
        let got = placements(&pods, RES, 2, None);
        assert_eq!(
            vramslice_core::owed_gpus(&got),
            vec!["GPU-a", "GPU-b", "GPU-c", "GPU-z"]
        );
    }

    #[test]
    fn unbound_pods_do_not_count() {
        let mut p = pod("x", Some("GPU-a"), "t", 1, false);
        p.spec.as_mut().unwrap().node_name = None;
        assert!(placements(&[p], RES, 1, None).is_empty());
    }

    #[test]
    fn uids_are_keyed_by_namespace_and_name() {
        let pods = vec![pod("a", None, "", 1, true)];
        assert_eq!(
            uids_by_name(&pods)
                .get(&("default".to_string(), "a".to_string()))
                .map(String::as_str),
            Some("uid-a")
        );
    }

    #[test]
    fn a_spanning_pod_is_owed_its_set_of_gpus() {
        let pods = vec![
            pod("tp", Some("GPU-b, GPU-a"), "2026-01-01T00:00:01Z", 8, false),
            pod("one", Some("GPU-c"), "2026-01-01T00:00:02Z", 8, false),
        ];
        let got = placements(&pods, RES, 8, None);
        assert_eq!(gpus_of(&got), vec![("GPU-a,GPU-b", None), ("GPU-c", None)]);
        assert_eq!(
            vramslice_core::owed_gpus(&got),
            vec!["GPU-a,GPU-b", "GPU-c"]
        );
        // The single pod took the spanning pod's shape: the spanning one is owed GPU-c.
        let allocated = BTreeMap::from([(
            ("default".to_string(), "one".to_string()),
            vec![(8, "GPU-a,GPU-b".to_string())],
        )]);
        let got = placements(&pods, RES, 8, Some(&allocated));
        assert_eq!(vramslice_core::owed_gpus(&got), vec!["GPU-c"]);
        assert_eq!(canonical_gpus(" GPU-b,GPU-a ,GPU-b"), "GPU-a,GPU-b");
    }

    #[test]
    fn held_units_lists_each_container_with_its_units_and_gpus() {
        use vramslice_core::node::publish::ContainerAllocationRecord;
        let rec = |pod: &str, ids: &[&str]| ContainerAllocationRecord {
            namespace: "ns".into(),
            pod: pod.into(),
            pod_uid: None,
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        let held = held_units(&[
            rec("tp", &["GPU-b::0", "GPU-a::0"]),
            rec("tp", &["GPU-c::1", "GPU-a::3"]),
            rec("one", &["GPU-b::4"]),
            rec("other", &["not-a-unit"]),
        ]);
        assert_eq!(
            held[&("ns".to_string(), "tp".to_string())],
            vec![
                (2, "GPU-a,GPU-b".to_string()),
                (2, "GPU-a,GPU-c".to_string())
            ]
        );
        assert_eq!(
            held[&("ns".to_string(), "one".to_string())],
            vec![(1, "GPU-b".to_string())]
        );
        assert!(!held.contains_key(&("ns".to_string(), "other".to_string())));
    }
}
