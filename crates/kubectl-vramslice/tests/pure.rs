//! The plugin's pure parts without a server: explanations of unusual pods, rows from objects,
//! table rendering with and without colour.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kubectl_vramslice::explain::{PodState, explain};
use kubectl_vramslice::model::{build_ledger, node_rows, pod_rows, pod_rows_and_unreadable};
use kubectl_vramslice::render::{Style, explanation_text, nodes_table, pods_table};
use serde_json::json;
use vramslice_api::GpuNode;
use vramslice_core::cluster::ledger::LedgerConfig;

const CFG: LedgerConfig = LedgerConfig {
    headroom_bytes: 0,
    staleness: Duration::from_secs(90),
};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn pod(limits: serde_json::Value, node: Option<&str>) -> Pod {
    let mut spec = json!({"schedulerName": "vramslice-scheduler",
        "containers": [{"name": "a", "image": "x", "resources": {"limits": limits}}]});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    serde_json::from_value(
        json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}, "spec": spec,
        "status": {"phase": if node.is_some() { "Running" } else { "Pending" }}}),
    )
    .unwrap()
}

fn gpunode(observed_at: &str, free_gib: u64) -> GpuNode {
    serde_json::from_value(json!({
        "apiVersion": "vramslice.io/v1alpha1", "kind": "GpuNode",
        "metadata": {"name": "n1"}, "spec": {"nodeName": "n1"},
        "status": {"unit": "1Gi", "resourceName": "vramslice.io/vram-gib", "observedAt": observed_at,
            "gpus": [{"index": 0, "uuid": "GPU-11111111-2222-3333-4444-555555555555", "model": "H100",
                "totalBytes": 80u64 << 30, "usedBytes": (80 - free_gib) << 30, "freeBytes": free_gib << 30,
                "units": 80, "allocatedUnits": 0, "healthy": true, "pods": []}],
            "summary": {"gpus": 1, "total": "80 GiB", "liveFree": "", "allocated": "", "healthy": "1/1"}}
    }))
    .unwrap()
}

// 2026-11-22T10:00:00Z
const T: u64 = 1_795_341_600;

#[test]
fn a_pod_mixing_two_units_is_an_invalid_request_not_a_crash() {
    let p = pod(
        json!({"vramslice.io/vram-gib": "2", "vramslice.io/vram-512mib": "1"}),
        None,
    );
    let ledger = build_ledger(&[], &[], CFG);
    let e = explain(&p, &[], &ledger, &[], at(T));
    let PodState::InvalidRequest { reason } = &e.state else {
        panic!("{:?}", e.state)
    };
    assert!(reason.contains("both"), "{reason}");
    assert!(explanation_text(&e, Style { color: false }).contains(reason.as_str()));
}

#[test]
fn a_bad_policy_annotation_is_an_invalid_request_as_the_extender_says() {
    let mut p = pod(json!({"vramslice.io/vram-gib": "2"}), None);
    p.metadata.annotations = Some(
        [("vramslice.io/policy".to_string(), "Spread".to_string())]
            .into_iter()
            .collect(),
    );
    let gn = gpunode("2026-11-22T10:00:00Z", 40);
    let ledger = build_ledger(std::slice::from_ref(&gn), &[], CFG);
    let e = explain(&p, std::slice::from_ref(&gn), &ledger, &[], at(T));
    let PodState::InvalidRequest { reason } = &e.state else {
        panic!("the extender refuses every node for it: {:?}", e.state)
    };
    assert!(reason.contains("Spread"), "{reason}");
}

#[test]
fn a_recurring_event_series_is_the_latest_and_counts_its_repeats() {
    // kube-scheduler records through events.k8s.io/v1: repeats are a series (no count, no
    // lastTimestamp in the core view).
    let events: Vec<k8s_openapi::api::core::v1::Event> = serde_json::from_value(json!([
        {"metadata": {"name": "a"}, "involvedObject": {}, "reason": "FailedScheduling",
         "message": "old one-off", "lastTimestamp": "2026-11-22T09:59:30Z", "count": 1},
        {"metadata": {"name": "b"}, "involvedObject": {}, "reason": "FailedScheduling",
         "message": "still recurring", "eventTime": "2026-11-22T09:50:00.000000Z",
         "series": {"count": 5, "lastObservedTime": "2026-11-22T09:59:50.000000Z"}}
    ]))
    .unwrap();
    let p = pod(json!({"vramslice.io/vram-gib": "2"}), None);
    let ledger = build_ledger(&[], &[], CFG);
    let e = explain(&p, &[], &ledger, &events, at(T));
    assert_eq!(e.events[0].message, "still recurring");
    assert_eq!(e.events[0].count, 5);
    assert_eq!(
        e.events[0].last_seen.as_deref(),
        Some("2026-11-22T09:59:50Z")
    );
    assert_eq!(e.events[1].count, 1);
}

#[test]
fn live_usage_outside_declarations_blocks_a_pod_and_the_reason_says_so() {
    // Nothing declared on the GPU, but only 4 GiB is really free: a 6 GiB pod does not fit.
    let gn = gpunode("2026-11-22T09:59:50Z", 4);
    let p = pod(json!({"vramslice.io/vram-gib": "6"}), None);
    let ledger = build_ledger(std::slice::from_ref(&gn), std::slice::from_ref(&p), CFG);
    let e = explain(&p, std::slice::from_ref(&gn), &ledger, &[], at(T));
    assert_eq!(e.state, PodState::Pending { fits_on: 0 });
    let reason = e.nodes[0].reason.clone().unwrap();
    assert!(
        reason.contains("4 GiB effective free") && reason.contains("need 6 GiB"),
        "{reason}"
    );
    assert!(
        !e.nodes[0].unresolvable,
        "more room may come: not unresolvable"
    );
    // The same pod fits once the reading shows room.
    let roomy = gpunode("2026-11-22T09:59:50Z", 70);
    let ledger = build_ledger(std::slice::from_ref(&roomy), &[], CFG);
    assert_eq!(
        explain(&p, &[roomy], &ledger, &[], at(T)).state,
        PodState::Pending { fits_on: 1 }
    );
}

#[test]
fn rows_and_tables() {
    let gn = gpunode("2026-11-22T09:58:00Z", 70);
    let bound = pod(json!({"vramslice.io/vram-gib": "6"}), Some("n1"));
    let ledger = build_ledger(std::slice::from_ref(&gn), std::slice::from_ref(&bound), CFG);
    let rows = node_rows(std::slice::from_ref(&gn), &ledger, CFG, at(T));
    assert!(rows[0].stale, "120 s old reading with 90 s staleness");
    assert_eq!(rows[0].reading_age_seconds, Some(120));
    let plain = nodes_table(&rows, Style { color: false });
    let coloured = nodes_table(&rows, Style { color: true });
    assert!(!plain.contains('\x1b'));
    assert!(
        coloured.contains("\x1b[33m120s ago (stale)\x1b[0m"),
        "{coloured:?}"
    );
    // Colour codes never shift the columns: stripped, the coloured table equals the plain one.
    let stripped = coloured
        .replace("\x1b[32m", "")
        .replace("\x1b[33m", "")
        .replace("\x1b[31m", "")
        .replace("\x1b[0m", "");
    assert_eq!(stripped, plain);

    let prow = pod_rows(std::slice::from_ref(&gn), std::slice::from_ref(&bound));
    assert_eq!(prow[0].limit_bytes, 6 << 30);
    assert_eq!(
        prow[0].gpu_uuid, None,
        "no annotation and not in the reading yet"
    );
    let t = pods_table(&prow, Style { color: false });
    assert!(t.contains("6 GiB") && t.contains("n1"), "{t}");
    // Nothing on stdout for no rows (the hint goes to stderr), as kubectl's "No resources found".
    assert_eq!(pods_table(&[], Style { color: false }), "");
    assert_eq!(nodes_table(&[], Style { color: false }), "");
    // A pod asking for VRAM in two units has no row, and is named with the reason.
    let mixed = pod(
        json!({"vramslice.io/vram-gib": "2", "vramslice.io/vram-512mib": "4"}),
        None,
    );
    let (rows, unreadable) = pod_rows_and_unreadable(std::slice::from_ref(&gn), &[bound, mixed]);
    assert_eq!(rows.len(), 1);
    assert_eq!(unreadable.len(), 1, "{unreadable:?}");
    assert!(
        unreadable[0].contains("requests both vramslice.io/vram-512mib and vramslice.io/vram-gib")
            || unreadable[0]
                .contains("requests both vramslice.io/vram-gib and vramslice.io/vram-512mib"),
        "{unreadable:?}"
    );
}
