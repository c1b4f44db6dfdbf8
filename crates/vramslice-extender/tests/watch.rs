//! The watches drive the ledger: restart rebuild from pod annotations and GpuNode status (the
//! kubelet's placement wins), live updates, re-lists, readiness, and binds confirmed by the
//! pod watch. Events are fed as plain streams; no cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use futures::stream;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use serde_json::json;
use vramslice_api::{GpuNode, GpuNodeSpec, GpuNodeStatus, GpuStatus, PodUsage};
use vramslice_extender::convert::format_time;
use vramslice_extender::fake::FakeCluster;
use vramslice_extender::{Config, Extender, watch};

fn bound_pod(name: &str, gib: &str, node: &str, gpu: Option<&str>, phase: &str) -> Pod {
    let annotations = match gpu {
        Some(g) => {
            json!({ "vramslice.io/gpu-uuid": g, "vramslice.io/assigned-at": "2026-11-18T10:00:00Z" })
        }
        None => json!({}),
    };
    let mut pod = pod_object(name, &format!("uid-{name}"), Some(gib), annotations);
    pod.spec.as_mut().unwrap().node_name = Some(node.to_string());
    pod.status.as_mut().unwrap().phase = Some(phase.to_string());
    pod
}

fn gpunode(name: &str, observed: &str, gpus: Vec<GpuStatus>) -> GpuNode {
    let mut gn = GpuNode::new(
        name,
        GpuNodeSpec {
            node_name: name.into(),
        },
    );
    gn.status = Some(GpuNodeStatus {
        unit: "1Gi".into(),
        resource_name: "vramslice.io/vram-gib".into(),
        observed_at: observed.into(),
        gpus,
        ..GpuNodeStatus::default()
    });
    gn
}

fn gpu_status(index: u32, units: u64, free_gib: u64, pods: Vec<PodUsage>) -> GpuStatus {
    GpuStatus {
        index,
        uuid: format!("GPU-{index}"),
        model: "H100".into(),
        total_bytes: units * GIB,
        used_bytes: (units - free_gib) * GIB,
        free_bytes: free_gib * GIB,
        units,
        allocated_units: pods.iter().map(|p| p.allocated_units).sum(),
        healthy: true,
        pods,
        ..GpuStatus::default()
    }
}

fn usage(name: &str, gib: u64) -> PodUsage {
    PodUsage {
        namespace: "default".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        allocated_units: gib,
        limit_bytes: gib * GIB,
        used_bytes: Some(gib * GIB),
        self_report_trusted: None,
        initialising: false,
    }
}

fn fresh() -> (Arc<Extender>, Arc<FakeCluster>) {
    let fake = Arc::new(FakeCluster::new());
    let ext = Arc::new(Extender::new(
        Config {
            headroom_bytes: 0,
            ..Config::default()
        },
        fake.clone(),
        Arc::new(now),
    ));
    (ext, fake)
}

fn ok<K>(events: Vec<Event<K>>) -> impl futures::Stream<Item = Result<Event<K>, String>> {
    stream::iter(events.into_iter().map(Ok))
}

#[tokio::test]
async fn a_restart_rebuilds_the_ledger_and_the_kubelet_wins() {
    let (ext, _) = fresh();
    let observed = format_time(secs_ago(5));
    // The kubelet put pod a on GPU 1 although its annotation says GPU 0.
    let gn = gpunode(
        "n1",
        &observed,
        vec![
            gpu_status(0, 16, 16, vec![]),
            gpu_status(1, 16, 12, vec![usage("a", 4)]),
        ],
    );
    watch::drive_gpunodes(
        ext.clone(),
        ok(vec![Event::Init, Event::InitApply(gn), Event::InitDone]),
    )
    .await;
    let not_ready = ext.readiness().expect_err("pods not listed yet");
    assert_eq!(
        not_ready.to_string(),
        "not ready: waiting for the first list of pods"
    );
    let pods = vec![
        Event::Init,
        Event::InitApply(bound_pod("a", "4", "n1", Some("GPU-0"), "Running")),
        Event::InitApply(pod_object("pending", "uid-p", Some("4"), json!({}))),
        Event::InitApply(bound_pod("done", "4", "n1", Some("GPU-0"), "Succeeded")),
        Event::InitApply({
            let mut web = pod_object("web", "uid-web", None, json!({}));
            web.spec.as_mut().unwrap().node_name = Some("n1".into());
            web
        }),
        Event::InitDone,
    ];
    watch::drive_pods(ext.clone(), ok(pods)).await;
    assert_eq!(ext.readiness(), Ok(()));
    let ledger = ext.ledger();
    assert_eq!(ledger.pod_count(), 1);
    assert_eq!(
        ledger.pod("uid-a").unwrap().gpu_uuid.as_deref(),
        Some("GPU-1")
    );
    let views = ledger.gpu_views("n1").unwrap();
    assert_eq!(
        (views[0].assigned_bytes, views[1].assigned_bytes),
        (0, 4 * GIB)
    );
    assert_eq!(views[1].effective_free, 12 * GIB);
}

#[tokio::test]
async fn live_events_update_the_ledger() {
    let (ext, _) = fresh();
    let observed = format_time(secs_ago(5));
    let gn = gpunode("n1", &observed, vec![gpu_status(0, 16, 16, vec![])]);
    watch::drive_gpunodes(
        ext.clone(),
        ok(vec![Event::Init, Event::InitApply(gn), Event::InitDone]),
    )
    .await;
    watch::drive_pods(ext.clone(), ok(vec![Event::Init, Event::InitDone])).await;
    assert_eq!(ext.readiness(), Ok(()));

    watch::drive_pods(
        ext.clone(),
        ok(vec![Event::Apply(bound_pod(
            "a",
            "4",
            "n1",
            Some("GPU-0"),
            "Running",
        ))]),
    )
    .await;
    assert_eq!(ext.ledger().pod_count(), 1);
    watch::drive_pods(
        ext.clone(),
        ok(vec![Event::Apply(bound_pod(
            "a",
            "4",
            "n1",
            Some("GPU-0"),
            "Failed",
        ))]),
    )
    .await;
    assert_eq!(ext.ledger().pod_count(), 0);
    watch::drive_pods(
        ext.clone(),
        ok(vec![
            Event::Apply(bound_pod("b", "2", "n1", Some("GPU-0"), "Running")),
            Event::Delete(bound_pod("b", "2", "n1", Some("GPU-0"), "Running")),
        ]),
    )
    .await;
    assert_eq!(ext.ledger().pod_count(), 0);

    // Watch errors are logged and the stream goes on.
    let events: Vec<Result<Event<Pod>, String>> = vec![
        Err("watch closed".into()),
        Ok(Event::Apply(bound_pod(
            "c",
            "2",
            "n1",
            Some("GPU-0"),
            "Running",
        ))),
    ];
    watch::drive_pods(ext.clone(), stream::iter(events)).await;
    assert_eq!(ext.ledger().pod_count(), 1);

    // An unreadable GpuNode makes its node fail with the reason; deleting it, with "no reading".
    let bad = gpunode("n1", "yesterday", vec![gpu_status(0, 16, 16, vec![])]);
    watch::drive_gpunodes(ext.clone(), ok(vec![Event::Apply(bad.clone())])).await;
    let pod = pod_json("x", "uid-x", Some("1"), json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod.clone(), &["n1"])).await;
    assert_eq!(
        body["FailedAndUnresolvableNodes"]["n1"],
        "GpuNode n1 is unusable: observedAt \"yesterday\" is not an RFC 3339 time"
    );
    watch::drive_gpunodes(ext.clone(), ok(vec![Event::Delete(bad)])).await;
    let (_, body) = post_json(&ext, "/filter", &args_names(pod, &["n1"])).await;
    assert_eq!(
        body["FailedAndUnresolvableNodes"]["n1"],
        "no GpuNode reading for node n1"
    );
}

#[tokio::test]
async fn relists_drop_vanished_pods_but_keep_binds_in_flight_and_binds_get_confirmed() {
    let (ext, fake) = fresh();
    let observed = format_time(secs_ago(5));
    let gn = gpunode("n1", &observed, vec![gpu_status(0, 16, 16, vec![])]);
    watch::drive_gpunodes(
        ext.clone(),
        ok(vec![
            Event::Init,
            Event::InitApply(gn.clone()),
            Event::InitDone,
        ]),
    )
    .await;
    watch::drive_pods(
        ext.clone(),
        ok(vec![
            Event::Init,
            Event::InitApply(bound_pod("old", "4", "n1", Some("GPU-0"), "Running")),
            Event::InitDone,
        ]),
    )
    .await;
    fake.put_pod(pod_object("new", "uid-new", Some("6"), json!({})));
    let (_, body) = post_json(&ext, "/bind", &binding_args("new", "uid-new", "n1")).await;
    assert_eq!(body["Error"], "");
    // The watch desyncs; "old" vanished meanwhile. The re-list may have been taken before the
    // Binding of "new", which the API server confirmed: its booking stays.
    watch::drive_pods(ext.clone(), ok(vec![Event::Init, Event::InitDone])).await;
    {
        let ledger = ext.ledger();
        assert!(ledger.pod("uid-old").is_none());
        assert!(ledger.pod("uid-new").is_some());
    }
    // The pod watch shows the bound pod: the reservation is confirmed, GPU kept.
    let seen = fake.pod("default", "new").unwrap();
    watch::drive_pods(ext.clone(), ok(vec![Event::Apply(seen)])).await;
    let info = ext.ledger().pod("uid-new").unwrap();
    assert!(!info.reserved);
    assert_eq!(info.gpu_uuid.as_deref(), Some("GPU-0"));
    // GpuNodes re-listed without n1: its reading is gone.
    watch::drive_gpunodes(ext.clone(), ok(vec![Event::Init, Event::InitDone])).await;
    assert_eq!(ext.ledger().node_count(), 0);
}
