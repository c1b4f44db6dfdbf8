//! Unit tests of `node_pods`.

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

#[test]
fn running_pods_using_lists_running_vram_pods_not_being_deleted() {
    let mut deleting = pod("deleting", Some("GPU-a"), "2026-01-01T00:00:00Z", 2, true);
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:01:00Z".parse().unwrap(),
        ));
    let pods = vec![
        pod("runs", Some("GPU-a"), "2026-01-01T00:00:00Z", 2, true),
        pod("waits", Some("GPU-a"), "2026-01-01T00:00:00Z", 2, false),
        pod("no-vram", None, "", 0, true),
        deleting,
    ];
    assert_eq!(
        running_pods_using(&pods, RES),
        [("default".to_string(), "runs".to_string())]
    );
    assert!(running_pods_using(&pods, "vramslice.io/vram-512mib").is_empty());
}
