//! Pod requests, policies, times and GpuNode readings from Kubernetes objects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use vramslice_api::{GpuNode, GpuNodeSpec, GpuNodeStatus, GpuStatus, PodUsage};
use vramslice_core::VramUnit;
use vramslice_core::cluster::placement::{PodRequest, Policy};
use vramslice_extender::convert::*;
use vramslice_extender::wire::WirePod;

const GIB_ONLY: &[VramUnit] = &[VramUnit::Gib1];

fn pod(spec: serde_json::Value) -> Pod {
    serde_json::from_value(
        json!({ "metadata": { "name": "p", "namespace": "ns", "uid": "u" }, "spec": spec }),
    )
    .unwrap()
}

fn c(name: &str, limits: serde_json::Value, requests: serde_json::Value) -> serde_json::Value {
    json!({ "name": name, "resources": { "limits": limits, "requests": requests } })
}

#[test]
fn requests_sum_containers_and_respect_init_containers() {
    let k = "vramslice.io/vram-gib";
    let p = pod(json!({
        "containers": [c("a", json!({ k: "2" }), json!({})), c("b", json!({}), json!({ k: "3" })), c("cpu", json!({"cpu": "1"}), json!({}))],
        "initContainers": [c("warm", json!({ k: "8" }), json!({}))]
    }));
    assert_eq!(
        pod_request(&p, GIB_ONLY),
        Ok(Some(PodRequest::new(VramUnit::Gib1, 8)))
    );
    let p = pod(json!({
        "containers": [c("a", json!({ k: "2" }), json!({ k: "2" }))],
        "initContainers": [
            { "name": "side", "restartPolicy": "Always", "resources": { "limits": { k: "1" } } },
            c("small", json!({ k: "2" }), json!({}))
        ]
    }));
    assert_eq!(
        pod_request(&p, GIB_ONLY),
        Ok(Some(PodRequest::new(VramUnit::Gib1, 3)))
    );
    // The wire form (as kube-scheduler sends it) agrees.
    let wire: WirePod = serde_json::to_value(&p)
        .and_then(serde_json::from_value)
        .unwrap();
    assert_eq!(
        wire_pod_request(&wire, GIB_ONLY),
        Ok(Some(PodRequest::new(VramUnit::Gib1, 3)))
    );
    let none = pod(json!({ "containers": [c("a", json!({"cpu": "1"}), json!({}))] }));
    assert_eq!(pod_request(&none, GIB_ONLY), Ok(None));
    let zero = pod(json!({ "containers": [c("a", json!({ k: "0" }), json!({}))] }));
    assert_eq!(pod_request(&zero, GIB_ONLY), Ok(None));
}

#[test]
fn unusable_requests_are_named() {
    let p = pod(
        json!({ "containers": [c("a", json!({ "vramslice.io/vram-128mib": "2" }), json!({}))] }),
    );
    assert_eq!(
        pod_request(&p, GIB_ONLY).unwrap_err().to_string(),
        "pod ns/p requests vramslice.io/vram-128mib, which this extender does not accept (accepted: vramslice.io/vram-gib)"
    );
    let both = &[VramUnit::Gib1, VramUnit::Mib512];
    let p = pod(json!({ "containers": [
        c("a", json!({ "vramslice.io/vram-gib": "2" }), json!({})),
        c("b", json!({ "vramslice.io/vram-512mib": "2" }), json!({}))
    ] }));
    assert_eq!(
        pod_request(&p, both).unwrap_err().to_string(),
        "pod ns/p requests both vramslice.io/vram-gib and vramslice.io/vram-512mib; a pod's VRAM must use one resource"
    );
    let p = pod(
        json!({ "containers": [c("a", json!({ "vramslice.io/vram-gib": "lots" }), json!({}))] }),
    );
    assert_eq!(
        pod_request(&p, GIB_ONLY).unwrap_err().to_string(),
        "pod ns/p container a: vramslice.io/vram-gib: \"lots\" is not a quantity: expected a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E); expected a whole number of units"
    );
    let p = pod(
        json!({ "containers": [c("a", json!({ "vramslice.io/vram-512mib": "3" }), json!({}))] }),
    );
    assert_eq!(
        pod_request(&p, both),
        Ok(Some(PodRequest::new(VramUnit::Mib512, 3)))
    );
}

#[test]
fn policies_come_from_the_annotation() {
    let ann = |v: &str| {
        Some(
            [("vramslice.io/policy".to_string(), v.to_string())]
                .into_iter()
                .collect(),
        )
    };
    assert_eq!(
        policy_of("ns/p", None, Policy::Binpack),
        Ok(Policy::Binpack)
    );
    assert_eq!(
        policy_of("ns/p", ann("spread").as_ref(), Policy::Binpack),
        Ok(Policy::Spread)
    );
    assert_eq!(
        policy_of("ns/p", ann("fifo").as_ref(), Policy::Binpack)
            .unwrap_err()
            .to_string(),
        "pod ns/p: annotation vramslice.io/policy=\"fifo\" is invalid: expected binpack or spread"
    );
}

#[test]
fn times_round_trip_in_utc() {
    assert_eq!(format_time(now()), "2026-11-18T11:06:40Z");
    assert_eq!(parse_time("2026-11-18T11:06:40Z"), Ok(now()));
    assert_eq!(parse_time("2026-11-18T12:06:40+01:00"), Ok(now()));
    assert_eq!(
        parse_time("last tuesday").unwrap_err().to_string(),
        "\"last tuesday\" is not an RFC 3339 time"
    );
}

#[test]
fn gpunodes_without_usable_status_are_named() {
    let mut gn = GpuNode::new(
        "n1",
        GpuNodeSpec {
            node_name: "n1".into(),
        },
    );
    assert_eq!(
        node_reading(&gn),
        ("n1".into(), Err(ReadingError::NoStatus))
    );
    gn.status = Some(GpuNodeStatus {
        unit: "3Gi".into(),
        observed_at: "2026-11-18T11:06:40Z".into(),
        ..Default::default()
    });
    let (_, r) = node_reading(&gn);
    assert!(r.unwrap_err().to_string().contains("\"3Gi\""));
    gn.status = Some(GpuNodeStatus {
        unit: String::new(),
        resource_name: "vramslice.io/vram-512mib".into(),
        observed_at: "2026-11-18T11:06:40Z".into(),
        ..Default::default()
    });
    let (_, r) = node_reading(&gn);
    let r = r.unwrap();
    assert_eq!((r.unit, r.observed_at), (VramUnit::Mib512, now()));
    // Two GPUs with one index (or one UUID): a pod checked against one could land on the other.
    let gpu = |index: u32, uuid: &str| GpuStatus {
        index,
        uuid: uuid.into(),
        units: 16,
        healthy: true,
        ..Default::default()
    };
    for (gpus, want) in [
        (
            vec![gpu(0, "GPU-a"), gpu(0, "GPU-b")],
            "GPU index 0 appears twice",
        ),
        (
            vec![gpu(0, "GPU-a"), gpu(1, "GPU-a")],
            "GPU UUID GPU-a appears twice",
        ),
    ] {
        gn.status.as_mut().unwrap().gpus = gpus;
        let (_, r) = node_reading(&gn);
        assert_eq!(r.unwrap_err().to_string(), want);
    }
}

#[test]
fn a_pod_listed_with_no_units_is_not_a_placement() {
    // The device plugin lists a pod with no units on its annotated GPU while its plain init
    // container runs (its limit raised there); the kubelet recorded nothing there, so the
    // ledger must not take it as where the pod is.
    let pod = |name: &str, units: u64, initialising: bool| PodUsage {
        namespace: "ns".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        allocated_units: units,
        limit_bytes: 8 << 30,
        used_bytes: Some(1 << 30),
        self_report_trusted: None,
        initialising,
    };
    let mut gn = GpuNode::new(
        "n1",
        GpuNodeSpec {
            node_name: "n1".into(),
        },
    );
    gn.status = Some(GpuNodeStatus {
        unit: "1Gi".into(),
        observed_at: "2026-11-18T11:06:40Z".into(),
        gpus: vec![GpuStatus {
            index: 0,
            uuid: "GPU-a".into(),
            units: 16,
            healthy: true,
            // A DRA claim smaller than one unit is listed with none, and is a holding.
            pods: vec![
                pod("holds", 4, true),
                pod("initialising", 0, true),
                pod("small-claim", 0, false),
            ],
            ..Default::default()
        }],
        ..Default::default()
    });
    let (_, r) = node_reading(&gn);
    let listed: Vec<(String, u64)> = r.unwrap().gpus[0]
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.limit_bytes >> 30))
        .collect();
    // An initialising pod counts for the units the kubelet recorded there, not its limit raised
    // for the watchdog: listed for 8 GiB on a GPU one of its containers took from another pod,
    // it would read as wholly placed there and its units on its own GPU would go uncounted.
    // A claim keeps its grant.
    assert_eq!(
        listed,
        [("holds".to_string(), 4), ("small-claim".to_string(), 8)]
    );
}
