//! Unit tests of `convert`.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::names::ANNOTATION_GPUS;
use serde_json::json;

fn pod(spec: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
        "spec": spec
    }))
    .unwrap()
}

#[test]
fn a_containers_units_are_its_limit_else_its_request() {
    let k = "vramslice.io/vram-gib";
    let p = pod(
        json!({"containers": [
            {"name": "both", "resources": {"limits": {k: "4"}, "requests": {k: "2"}}},
            {"name": "request-only", "resources": {"requests": {k: "3"}}},
            {"name": "none", "resources": {"limits": {"cpu": "1"}}},
            {"name": "bad", "resources": {"limits": {k: "lots"}}}
        ]}),
        json!({}),
    );
    let units: Vec<Option<u64>> = p
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| container_units(c, k))
        .collect();
    assert_eq!(units, vec![Some(4), Some(3), None, None]);
}

#[test]
fn the_admission_view_has_every_containers_resources_and_the_keep_annotation() {
    let p = pod(
        json!({
            "schedulerName": "default-scheduler",
            "containers": [{"name": "a", "resources": {"limits": {"vramslice.io/vram-gib": "2"}}}],
            "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}]
        }),
        json!({ANNOTATION_KEEP_SCHEDULER: "true"}),
    );
    let view = admission_view(&p);
    assert_eq!(view.scheduler_name.as_deref(), Some("default-scheduler"));
    assert_eq!(view.node_name, None);
    assert_eq!(view.keep_scheduler_annotation.as_deref(), Some("true"));
    assert_eq!(
        view.resources,
        vec![
            ("vramslice.io/vram-gib".to_string(), "2".to_string()),
            ("cpu".to_string(), "1".to_string())
        ]
    );
}

#[test]
fn the_gpus_annotation_spreads_the_request_evenly() {
    let k = "vramslice.io/vram-gib";
    let one = |units: &str, gpus: Option<&str>| {
        let annotations = match gpus {
            Some(g) => json!({ANNOTATION_GPUS: g}),
            None => json!({}),
        };
        pod(
            json!({"containers": [{"name": "llm", "resources": {"limits": {k: units}}}]}),
            annotations,
        )
    };
    let accepted = [VramUnit::Gib1];
    let r = pod_request(&one("40", Some("2")), &accepted)
        .unwrap()
        .unwrap();
    assert_eq!((r.units, r.gpus, r.share_units()), (40, 2, 20));
    let r = pod_request(&one("40", None), &accepted).unwrap().unwrap();
    assert_eq!((r.units, r.gpus), (40, 1));
    let r = pod_request(&one("24", Some(" 8 ")), &accepted)
        .unwrap()
        .unwrap();
    assert_eq!(r.gpus, 8);
    for bad in ["0", "9", "two", "-2", "+2", "1.5", ""] {
        let err = pod_request(&one("40", Some(bad)), &accepted).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "pod ns/p: annotation vramslice.io/gpus={bad:?} is invalid: expected a whole number of GPUs from 1 to 8"
            )
        );
    }
    let err = pod_request(&one("5", Some("2")), &accepted).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod ns/p container llm: 5 units of vramslice.io/vram-gib do not split evenly over 2 GPUs (vramslice.io/gpus); each container's VRAM must be a multiple of the GPU count"
    );
    // A pod that asks for no VRAM passes whatever its GPU count says.
    for units in ["0", "0.0"] {
        assert_eq!(pod_request(&one(units, Some("two")), &accepted), Ok(None));
    }
    let cpu_only = pod(
        json!({"containers": [{"name": "web", "resources": {"limits": {"cpu": "1"}}}]}),
        json!({ANNOTATION_GPUS: "two"}),
    );
    assert_eq!(pod_request(&cpu_only, &accepted), Ok(None));
}

#[test]
fn vram_quantities_are_whole_numbers_of_units_never_rounded() {
    let k = "vramslice.io/vram-gib";
    let one = |units: &str| {
        pod(
            json!({"containers": [{"name": "llm", "resources": {"limits": {k: units}}}]}),
            json!({}),
        )
    };
    let accepted = [VramUnit::Gib1];
    for (units, want) in [("6", 6), ("6000m", 6), ("1k", 1000)] {
        let r = pod_request(&one(units), &accepted).unwrap().unwrap();
        assert_eq!(r.units, want, "{units}");
    }
    for (units, why) in [
        ("1.5", "\"1.5\" is not a whole number"),
        ("500m", "\"500m\" is not a whole number"),
        ("-1", "\"-1\" is negative"),
        ("999999999999999Ei", "\"999999999999999Ei\" is too large"),
    ] {
        let err = pod_request(&one(units), &accepted).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "pod ns/p container llm: vramslice.io/vram-gib: {why}"
            )),
            "{units}: {err}"
        );
        assert!(err.ends_with("; expected a whole number of units"), "{err}");
    }
}

#[test]
fn every_vram_container_must_split_evenly() {
    let k = "vramslice.io/vram-gib";
    let p = pod(
        json!({
            "containers": [
                {"name": "a", "resources": {"limits": {k: "8"}}},
                {"name": "b", "resources": {"limits": {"cpu": "1"}}}
            ],
            "initContainers": [{"name": "warm", "resources": {"limits": {k: "6"}}}]
        }),
        json!({ANNOTATION_GPUS: "2"}),
    );
    let r = pod_request(&p, &[VramUnit::Gib1]).unwrap().unwrap();
    assert_eq!((r.units, r.gpus, r.share_units()), (8, 2, 4));
    let p = pod(
        json!({
            "containers": [
                {"name": "a", "resources": {"limits": {k: "4"}}},
                {"name": "b", "resources": {"limits": {k: "3"}}}
            ]
        }),
        json!({ANNOTATION_GPUS: "2"}),
    );
    let err = pod_request(&p, &[VramUnit::Gib1]).unwrap_err();
    assert!(
        matches!(err, RequestError::UnevenSplit { ref container, units: 3, gpus: 2, .. } if container == "b"),
        "{err}"
    );
}

#[test]
fn a_spanning_container_given_part_of_an_init_containers_devices_is_refused() {
    let k = "vramslice.io/vram-gib";
    let spanning = |app: &str, gpus: &str| {
        pod(
            json!({
                "containers": [{"name": "serve", "resources": {"limits": {k: app}}}],
                "initContainers": [{"name": "build", "resources": {"limits": {k: "8"}}}]
            }),
            json!({ANNOTATION_GPUS: gpus}),
        )
    };
    let err = pod_request(&spanning("4", "2"), &[VramUnit::Gib1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod ns/p container serve: its 4 units of vramslice.io/vram-gib would be taken from the 8 its init containers hand on, which the kubelet picks at random, so they need not split evenly over the pod's 2 GPUs (vramslice.io/gpus); give it 0 or at least 8 units, or run the pod on one GPU"
    );
    // All of them (or more), or one GPU, is fine.
    for (app, gpus) in [("8", "2"), ("12", "2"), ("4", "1")] {
        assert!(pod_request(&spanning(app, gpus), &[VramUnit::Gib1]).is_ok());
    }
    // A pod already bound (before the rule) keeps its books.
    let mut bound = spanning("4", "2");
    bound.spec.as_mut().unwrap().node_name = Some("n1".into());
    let r = bound_pod_request(&bound, &[VramUnit::Gib1])
        .unwrap()
        .unwrap();
    assert_eq!((r.units, r.gpus), (8, 2));
    assert!(matches!(
        pod_fate(&bound, &[VramUnit::Gib1]),
        PodFate::Bound(_)
    ));
}

#[test]
fn editing_a_bound_pods_gpu_count_does_not_drop_it_from_the_books() {
    // Regression: `kubectl annotate pod … vramslice.io/gpus=3 --overwrite` on a bound pod of
    // 4 units (or any bad value) made its request unreadable, and the extender forgot a pod
    // that still held its memory.
    let k = "vramslice.io/vram-gib";
    let bound = |gpus: &str, assigned: &str| {
        let mut p = pod(
            json!({"containers": [{"name": "serve", "resources": {"limits": {k: "4"}}}]}),
            json!({ANNOTATION_GPUS: gpus, ANNOTATION_GPU_UUID: assigned}),
        );
        p.spec.as_mut().unwrap().node_name = Some("n1".into());
        p
    };
    for (gpus, assigned, want) in [
        ("3", "GPU-a", 1),
        ("many", "GPU-a", 1),
        ("1", "GPU-a,GPU-b", 2),
        ("3", "GPU-b, GPU-a,GPU-b", 2),
    ] {
        let p = bound(gpus, assigned);
        match pod_fate(&p, &[VramUnit::Gib1]) {
            PodFate::Bound(record) => {
                assert_eq!((record.request.units, record.request.gpus), (4, want));
            }
            other => panic!("gpus {gpus:?}, assigned {assigned:?}: {other:?}"),
        }
        // Placement still reads the annotation as written.
        assert!(pod_request(&p, &[VramUnit::Gib1]).is_err() || gpus == "1");
    }
    // Bound some other way (no assignment): the annotation is all there is, and when the
    // containers do not split over it, or it is no count at all, the pod still holds its
    // memory: counted as on one GPU, never forgotten.
    for (gpus, want) in [("3", 1), ("many", 1), ("0", 1), ("2", 2)] {
        let mut other = bound(gpus, "");
        other
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(ANNOTATION_GPU_UUID);
        match pod_fate(&other, &[VramUnit::Gib1]) {
            PodFate::Bound(record) => {
                assert_eq!((record.request.units, record.request.gpus), (4, want));
            }
            got => panic!("gpus {gpus:?}: {got:?}"),
        }
    }
}
