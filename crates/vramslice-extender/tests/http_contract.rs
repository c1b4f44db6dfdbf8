//! The HTTP contract as kube-scheduler uses it: both nodeCacheCapable modes, prioritize, bind,
//! health, metrics and bad input, in-process through the axum router.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use vramslice_core::VramUnit;
use vramslice_core::cluster::ledger::PodRecord;
use vramslice_core::cluster::placement::PodRequest;
use vramslice_extender::cluster::ApiError;
use vramslice_extender::fake::{Call, FakeCluster};
use vramslice_extender::{Config, Extender};

/// fit (16 GiB free), full (3 GiB effective), stale (95 s), sick (XID 79); ghost has no GpuNode.
fn cluster() -> (Arc<Extender>, Arc<FakeCluster>) {
    let fake = Arc::new(FakeCluster::new());
    let ext = extender_with(config(0), fake.clone());
    {
        let mut ledger = ext.ledger_mut();
        ledger.set_reading("fit", reading(5, vec![gpu(0, 16, 16)]));
        let mut busy = gpu(0, 16, 5);
        busy.pods.push(listed("running", 9, 9));
        ledger.set_reading("full", reading(5, vec![busy]));
        ledger.observe_pod(PodRecord {
            uid: "pending".into(),
            namespace: "default".into(),
            name: "pending".into(),
            node: "full".into(),
            gpu_uuid: Some("GPU-0".into()),
            assigned_at: Some(secs_ago(1)),
            request: PodRequest::new(VramUnit::Gib1, 2),
        });
        ledger.set_reading("stale", reading(95, vec![gpu(0, 16, 16)]));
        let mut sick = gpu(0, 16, 16);
        sick.healthy = false;
        sick.health_reason = Some("XID 79".into());
        ledger.set_reading("sick", reading(5, vec![sick]));
    }
    (ext, fake)
}

const ALL: [&str; 5] = ["fit", "full", "stale", "sick", "ghost"];

/// The node short of memory: evicting pods there could make room.
fn expected_failures() -> Value {
    json!({
        "full": "GPU 0: 3 GiB effective free (live 5 GiB, 2 GiB reserved by pods not yet running), need 6 GiB",
    })
}

/// The nodes no eviction can help: a stale reading, a sick GPU, no GpuNode.
fn expected_unresolvable() -> Value {
    json!({
        "stale": "GPU 0: reading 95 s old",
        "sick": "GPU 0: unhealthy (XID 79)",
        "ghost": "no GpuNode reading for node ghost"
    })
}

#[tokio::test]
async fn filter_with_node_names_returns_node_names_and_reasons() {
    let (ext, _) = cluster();
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let (status, body) = post_json(&ext, "/filter", &args_names(pod, &ALL)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "Nodes": null,
            "NodeNames": ["fit"],
            "FailedNodes": expected_failures(),
            "FailedAndUnresolvableNodes": expected_unresolvable(),
            "Error": ""
        })
    );
}

#[tokio::test]
async fn filter_with_full_nodes_echoes_the_node_objects() {
    let (ext, _) = cluster();
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let (status, body) = post_json(&ext, "/filter", &args_nodes(pod, &ALL)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["NodeNames"], Value::Null);
    assert_eq!(body["Nodes"]["items"], json!([node_json("fit")]));
    assert_eq!(body["FailedNodes"], expected_failures());
    assert_eq!(body["FailedAndUnresolvableNodes"], expected_unresolvable());
    assert_eq!(body["Error"], "");
    // Go sends an empty NodeList's items as null.
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let empty =
        json!({ "Pod": pod, "Nodes": { "metadata": {}, "items": null }, "NodeNames": null });
    let (status, body) = post_json(&ext, "/filter", &empty).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["Nodes"]["items"], json!([]));
}

#[tokio::test]
async fn requests_larger_than_every_gpu_are_unresolvable() {
    let (ext, _) = cluster();
    let pod = pod_json("huge", "uid-2", Some("100"), json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod, &["fit", "ghost"])).await;
    assert_eq!(body["NodeNames"], json!([]));
    assert_eq!(body["FailedNodes"], json!({}));
    let reason = "pod needs 100 GiB, more than the largest GPU in the cluster advertises (16 GiB)";
    assert_eq!(
        body["FailedAndUnresolvableNodes"],
        json!({ "fit": reason, "ghost": reason })
    );
}

#[tokio::test]
async fn pods_without_vram_pass_score_zero_and_bind_plainly() {
    let (ext, fake) = cluster();
    let pod = pod_json("web", "uid-3", None, json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod.clone(), &ALL)).await;
    assert_eq!(body["NodeNames"], json!(ALL));
    assert_eq!(body["FailedNodes"], json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_nodes(pod.clone(), &ALL)).await;
    assert_eq!(body["Nodes"]["items"].as_array().unwrap().len(), ALL.len());
    let (_, body) = post_json(&ext, "/prioritize", &args_names(pod, &["fit", "ghost"])).await;
    assert_eq!(
        body,
        json!([{ "Host": "fit", "Score": 0 }, { "Host": "ghost", "Score": 0 }])
    );

    fake.put_pod(pod_object("web", "uid-3", None, json!({})));
    let (status, body) = post_json(&ext, "/bind", &binding_args("web", "uid-3", "ghost")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "Error": "" })));
    // The filter call showed the pod: one API call, the Binding, without annotations.
    assert_eq!(
        fake.calls(),
        vec![Call::Bind(
            "default".into(),
            "web".into(),
            "uid-3".into(),
            "ghost".into(),
            BTreeMap::new()
        )]
    );
}

#[tokio::test]
async fn prioritize_follows_the_policy_and_the_pod_annotation() {
    let fake = Arc::new(FakeCluster::new());
    let ext = extender_with(config(0), fake);
    {
        let mut ledger = ext.ledger_mut();
        ledger.set_reading("tight", reading(1, vec![gpu(0, 16, 8)]));
        ledger.set_reading("roomy", reading(1, vec![gpu(0, 16, 16)]));
    }
    let nodes = ["tight", "roomy", "ghost"];
    let pod = pod_json("a", "uid-a", Some("4"), json!({}));
    let (status, body) = post_json(&ext, "/prioritize", &args_names(pod, &nodes)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!([{ "Host": "tight", "Score": 8 }, { "Host": "roomy", "Score": 4 },
               { "Host": "ghost", "Score": 0 }])
    );
    let pod = pod_json(
        "b",
        "uid-b",
        Some("4"),
        json!({ "vramslice.io/policy": "spread" }),
    );
    let (_, body) = post_json(&ext, "/prioritize", &args_nodes(pod, &nodes)).await;
    assert_eq!(
        body,
        json!([{ "Host": "tight", "Score": 3 }, { "Host": "roomy", "Score": 7 },
               { "Host": "ghost", "Score": 0 }])
    );
}

fn placement_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("vramslice.io/gpu-uuid".to_string(), "GPU-0".to_string()),
        (
            "vramslice.io/assigned-at".to_string(),
            "2026-11-18T11:06:40Z".to_string(),
        ),
    ])
}

#[tokio::test]
async fn bind_annotates_binds_and_reserves() {
    let (ext, fake) = cluster();
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    let (status, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "Error": "" })));
    // Never filtered here: the pod is read, then bound with the annotations in the Binding.
    assert_eq!(
        fake.calls(),
        vec![
            Call::Get("default".into(), "llm".into()),
            Call::Bind(
                "default".into(),
                "llm".into(),
                "uid-1".into(),
                "fit".into(),
                placement_annotations()
            )
        ]
    );
    let pod = fake.pod("default", "llm").unwrap();
    let annotations = pod.metadata.annotations.unwrap();
    assert_eq!(annotations["vramslice.io/gpu-uuid"], "GPU-0");
    assert_eq!(
        annotations["vramslice.io/assigned-at"],
        "2026-11-18T11:06:40Z"
    );
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("fit"));
    let info = ext.ledger().pod("uid-1").unwrap();
    assert!(
        !info.reserved,
        "booked as bound: the API server confirmed it, so it never expires"
    );
    assert_eq!(info.gpu_uuid.as_deref(), Some("GPU-0"));
    // The reservation counts at once: a 12 GiB pod no longer fits on 16 - 6.
    let pod = pod_json("big", "uid-9", Some("12"), json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod, &["fit"])).await;
    assert_eq!(
        body["FailedNodes"]["fit"],
        "GPU 0: 10 GiB effective free (live 16 GiB, 6 GiB reserved by pods not yet running), need 12 GiB"
    );
    // A retry of the bind (kube-scheduler gave up waiting for the first) succeeds without a
    // second Binding or booking: an error would make kube-scheduler unreserve a bound pod.
    let binds = |fake: &FakeCluster| {
        fake.calls()
            .iter()
            .filter(|c| matches!(c, Call::Bind(..)))
            .count()
    };
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(body["Error"], "", "{body}");
    assert_eq!(binds(&fake), 1, "no second Binding");
    let (_, body) = post_json(
        &ext,
        "/filter",
        &args_names(pod_json("big", "uid-9", Some("12"), json!({})), &["fit"]),
    )
    .await;
    assert_eq!(
        body["FailedNodes"]["fit"],
        "GPU 0: 10 GiB effective free (live 16 GiB, 6 GiB reserved by pods not yet running), need 12 GiB",
        "booked once"
    );
    // A bind of it to another node is refused: it is bound where it is.
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "other")).await;
    assert_eq!(
        body["Error"],
        "cannot bind pod default/llm to node other: pod default/llm is already bound to node fit"
    );
}

#[tokio::test]
async fn a_filtered_pod_binds_with_one_api_call() {
    let (ext, fake) = cluster();
    let spread = json!({ "vramslice.io/policy": "spread" });
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), spread.clone()));
    let pod = pod_json("llm", "uid-1", Some("6"), spread);
    post_json(&ext, "/filter", &args_names(pod, &ALL)).await;
    assert_eq!(ext.pending_count(), 1);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(body["Error"], "");
    assert_eq!(
        fake.calls(),
        vec![Call::Bind(
            "default".into(),
            "llm".into(),
            "uid-1".into(),
            "fit".into(),
            placement_annotations()
        )]
    );
    assert_eq!(ext.pending_count(), 0);
    assert!(
        !ext.ledger().pod("uid-1").unwrap().reserved,
        "booked as bound"
    );
}

#[tokio::test]
async fn a_recreated_pod_is_read_again_not_taken_from_its_predecessor() {
    let (ext, fake) = cluster();
    // Filtered as uid-old asking 2 GiB; deleted and re-created as uid-new asking 6 GiB.
    let old = pod_json("llm", "uid-old", Some("2"), json!({}));
    post_json(&ext, "/filter", &args_names(old, &ALL)).await;
    fake.put_pod(pod_object("llm", "uid-new", Some("6"), json!({})));
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-new", "full")).await;
    // The new pod's own request decides: 6 GiB does not fit on full (3 GiB effective).
    assert_eq!(
        body["Error"],
        "cannot bind pod default/llm to node full: GPU 0: 3 GiB effective free (live 5 GiB, 2 GiB reserved by pods not yet running), need 6 GiB"
    );
    assert_eq!(
        fake.calls(),
        vec![Call::Get("default".into(), "llm".into())]
    );
    // A bind naming the old UID gets the remembered 2 GiB pod; the Binding's UID
    // precondition is what the API server refuses.
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-old", "fit")).await;
    assert_eq!(
        body["Error"],
        "cannot bind pod default/llm to node fit: Precondition failed: UID in precondition: uid-old, UID in object meta: uid-new"
    );
    assert_eq!(ext.ledger().reservation_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn failed_binds_release_the_reservation() {
    let (ext, fake) = cluster();
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    fake.fail_bind(Some(ApiError::Refused(
        "pods \"llm\" is forbidden (403)".into(),
    )));
    let (status, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["Error"],
        "cannot bind pod default/llm to node fit: pods \"llm\" is forbidden (403)"
    );
    assert!(ext.ledger().pod("uid-1").is_none());
    // A lost answer where the pod is not bound yet: the Binding may still land for a minute
    // (kube-apiserver's request timeout), so the reservation stays until the pod is read back
    // not bound after that.
    fake.fail_bind(Some(ApiError::Transport("connection reset".into())));
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(
        body["Error"],
        "cannot bind pod default/llm to node fit: connection reset; the pod is not bound yet, but the binding may still take, so its reservation stays until that is read back"
    );
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    tokio::time::sleep(std::time::Duration::from_secs(59)).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(ext.ledger().pod("uid-1").is_none());
    assert!(
        fake.pod("default", "llm")
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .is_none()
    );
    assert_eq!(ext.ledger().reservation_count(), 0);
}

#[tokio::test]
async fn bind_names_unknown_nodes_pods_and_uids() {
    let (ext, fake) = cluster();
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    let cases = [
        (
            binding_args("llm", "uid-1", "ghost"),
            "cannot bind pod default/llm to node ghost: no GpuNode reading for node ghost",
        ),
        (
            binding_args("llm", "uid-1", "full"),
            "cannot bind pod default/llm to node full: GPU 0: 3 GiB effective free (live 5 GiB, 2 GiB reserved by pods not yet running), need 6 GiB",
        ),
        (
            binding_args("nope", "uid-x", "fit"),
            "cannot bind pod default/nope: pod not found",
        ),
        (
            binding_args("llm", "uid-other", "fit"),
            "cannot bind pod default/llm: it has UID uid-1, the bind names UID uid-other",
        ),
    ];
    for (args, want) in cases {
        let (status, body) = post_json(&ext, "/bind", &args).await;
        assert_eq!(status, StatusCode::OK, "{args}");
        assert_eq!(body["Error"], want, "{args}");
    }
    assert_eq!(ext.ledger().reservation_count(), 0);
}

#[tokio::test]
async fn bad_input_gets_400_with_the_reason() {
    let (ext, _) = cluster();
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let cases: Vec<(&str, String, &str)> = vec![
        ("/filter", "{not json".into(), "malformed ExtenderArgs JSON"),
        ("/filter", "".into(), "malformed ExtenderArgs JSON"),
        (
            "/filter",
            json!({ "NodeNames": ["fit"] }).to_string(),
            "ExtenderArgs has no Pod",
        ),
        (
            "/filter",
            json!({ "Pod": pod }).to_string(),
            "ExtenderArgs has neither Nodes nor NodeNames",
        ),
        (
            "/filter",
            json!({ "Pod": pod, "NodeNames": "fit" }).to_string(),
            "malformed ExtenderArgs JSON",
        ),
        (
            "/filter",
            json!({ "Pod": pod, "Nodes": { "items": [{ "metadata": {} }] } }).to_string(),
            "Nodes.items[0] has no metadata.name",
        ),
        ("/prioritize", "[]".into(), "malformed ExtenderArgs JSON"),
        (
            "/prioritize",
            json!({ "Pod": null, "NodeNames": [] }).to_string(),
            "ExtenderArgs has no Pod",
        ),
        ("/bind", "{".into(), "malformed ExtenderBindingArgs JSON"),
        (
            "/bind",
            json!({ "PodNamespace": "default", "Node": "fit" }).to_string(),
            "ExtenderBindingArgs has no PodName",
        ),
        (
            "/bind",
            json!({ "PodName": "a", "PodNamespace": "default" }).to_string(),
            "ExtenderBindingArgs has no Node",
        ),
    ];
    for (path, body, want) in cases {
        let (status, answer) = post(&ext, path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}");
        let text = answer.as_str().unwrap_or_default().to_string();
        assert!(text.contains(want), "{path} {body}: {text}");
    }
}

#[tokio::test]
async fn unusable_pod_requests_make_every_node_unresolvable_with_the_reason() {
    let (ext, _) = cluster();
    let pod = pod_json("odd", "uid-5", Some("1.5"), json!({}));
    let (status, body) = post_json(&ext, "/filter", &args_names(pod.clone(), &["fit"])).await;
    assert_eq!(status, StatusCode::OK);
    // The API server refuses fractional extended resources; a caller that sends one anyway is
    // told so (not rounded up to 2 units).
    assert_eq!(body["NodeNames"], json!([]));
    assert_eq!(
        body["FailedAndUnresolvableNodes"]["fit"],
        "pod default/odd container server: vramslice.io/vram-gib: \"1.5\" is not a whole number; expected a whole number of units"
    );
    let mut mixed = pod_json("mixed", "uid-6", Some("2"), json!({}));
    mixed["spec"]["containers"][0]["resources"]["limits"]["vramslice.io/vram-512mib"] = json!("4");
    let (_, body) = post_json(&ext, "/filter", &args_names(mixed, &["fit", "full"])).await;
    // The pod's own mistake: not an extender error (which kube-scheduler retries at every
    // backoff), but every node unresolvable with the reason, so the pod waits as unschedulable.
    let reason = "pod default/mixed requests vramslice.io/vram-512mib, which this extender does not accept (accepted: vramslice.io/vram-gib)";
    assert_eq!(body["Error"], "");
    assert_eq!(
        body["FailedAndUnresolvableNodes"],
        json!({ "fit": reason, "full": reason })
    );
    assert_eq!(body["NodeNames"], json!([]));
    let pod = pod_json(
        "bad",
        "uid-7",
        Some("2"),
        json!({ "vramslice.io/policy": "random" }),
    );
    let (_, body) = post_json(&ext, "/prioritize", &args_names(pod.clone(), &["fit"])).await;
    assert_eq!(body, json!([{ "Host": "fit", "Score": 0 }]));
    // Filter names the bad annotation at once instead of passing the node to a bind that fails.
    let (status, body) = post_json(&ext, "/filter", &args_names(pod, &["fit"])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["Error"], "");
    assert_eq!(
        body["FailedAndUnresolvableNodes"]["fit"],
        "pod default/bad: annotation vramslice.io/policy=\"random\" is invalid: expected binpack or spread"
    );
    assert_eq!(body["NodeNames"], json!([]));
    let metrics = ext.render_metrics();
    assert!(
        metrics
            .contains(r#"vramslice_extender_decisions_total{verb="filter",outcome="invalid"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn readiness_waits_for_both_watches_and_gates_placement() {
    let fake = Arc::new(FakeCluster::new());
    let ext = Arc::new(Extender::new(
        Config::default(),
        fake.clone(),
        Arc::new(now),
    ));
    let (status, text) = get(&ext, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        text,
        "not ready: waiting for the first list of pods and GpuNodes\n"
    );
    assert_eq!(get(&ext, "/healthz").await, (StatusCode::OK, "ok\n".into()));
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod, &["fit"])).await;
    assert_eq!(
        body["Error"],
        "vramslice extender not ready: waiting for the first list of pods and GpuNodes"
    );
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert!(
        body["Error"].as_str().unwrap().contains("not ready"),
        "{body}"
    );
    ext.mark_pods_synced();
    assert_eq!(
        get(&ext, "/readyz").await.1,
        "not ready: waiting for the first list of GpuNodes\n"
    );
    ext.mark_gpunodes_synced();
    assert_eq!(
        get(&ext, "/readyz").await,
        (StatusCode::OK, "ready\n".into())
    );
}

#[tokio::test]
async fn a_configured_webhook_without_a_certificate_keeps_the_probe_unready_not_placement() {
    // With failurePolicy Fail a webhook that serves no certificate refuses every new VRAM pod:
    // the pod must not look ready meanwhile. Placement of pods already admitted goes on.
    let config = Config::parse(
        "webhook:\n  listenAddr: 0.0.0.0:8443\n  certDir: /certs\n",
        "test",
    )
    .unwrap();
    let fake = Arc::new(FakeCluster::new());
    let ext = Arc::new(Extender::new(config, fake, Arc::new(now)));
    ext.mark_pods_synced();
    ext.mark_gpunodes_synced();
    assert_eq!(
        get(&ext, "/readyz").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the admission webhook serves no certificate yet\n".into()
        )
    );
    assert!(
        ext.readiness().is_ok(),
        "placement does not wait for the webhook"
    );
    ext.metrics()
        .webhook()
        .serving
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        get(&ext, "/readyz").await,
        (StatusCode::OK, "ready\n".into())
    );
}

#[tokio::test]
async fn metrics_count_decisions_and_show_the_ledger() {
    let (ext, fake) = cluster();
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    post_json(&ext, "/filter", &args_names(pod.clone(), &ALL)).await;
    post_json(&ext, "/filter", &args_names(pod, &["ghost"])).await;
    post(&ext, "/filter", "nonsense").await;
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    post_json(&ext, "/bind", &binding_args("llm", "uid-1", "full")).await;
    let (status, text) = get(&ext, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "vramslice_extender_decisions_total{verb=\"filter\",outcome=\"ok\"} 1",
        "vramslice_extender_decisions_total{verb=\"filter\",outcome=\"no_fit\"} 1",
        "vramslice_extender_decisions_total{verb=\"filter\",outcome=\"error\"} 1",
        "vramslice_extender_decisions_total{verb=\"bind\",outcome=\"conflict\"} 1",
        "vramslice_extender_bind_conflicts_total 1",
        "vramslice_extender_request_duration_seconds_count{verb=\"filter\"} 3",
        "vramslice_extender_ledger_pods 1",
        "vramslice_extender_nodes 4",
        "vramslice_extender_stale_nodes 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// `/metrics` answers curl and classic parsers in the Prometheus text format, and a scraper
/// that prefers OpenMetrics (Prometheus itself) in OpenMetrics.
#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_preferred() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let (ext, _) = cluster();
    post_json(&ext, "/bind", &binding_args("ghost", "uid-9", "fit")).await;
    let scrape = |accept: Option<&'static str>| {
        let router = vramslice_extender::http::router(ext.clone());
        async move {
            let mut request = axum::http::Request::get("/metrics");
            if let Some(accept) = accept {
                request = request.header("accept", accept);
            }
            let resp = router
                .oneshot(request.body(axum::body::Body::empty()).unwrap())
                .await
                .unwrap();
            let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (content_type, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, text) = scrape(accept).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(
            text.contains("# TYPE vramslice_extender_decisions_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("vramslice_extender_decisions_total{verb=\"bind\",outcome=\"error\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }
    let (content_type, text) = scrape(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ))
    .await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        text.contains("# TYPE vramslice_extender_decisions counter\n"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

#[tokio::test]
async fn a_lost_binding_answer_is_checked_against_the_api_server() {
    let (ext, fake) = cluster();
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    fake.lose_bind_answers(true);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(
        body,
        json!({ "Error": "" }),
        "the pod is bound: the bind succeeded"
    );
    assert!(
        !ext.ledger().pod("uid-1").unwrap().reserved,
        "and the pod is booked as bound"
    );
    // A refusal from a conflict where the pod is not bound elsewhere (a UID precondition):
    // read back, definite, released at once.
    fake.put_pod(pod_object("other", "uid-2", Some("6"), json!({})));
    fake.lose_bind_answers(false);
    fake.fail_bind(Some(ApiError::Conflict(
        "Operation cannot be fulfilled (409)".into(),
    )));
    let (_, body) = post_json(&ext, "/bind", &binding_args("other", "uid-2", "fit")).await;
    assert_eq!(
        body["Error"],
        "cannot bind pod default/other to node fit: Operation cannot be fulfilled (409)"
    );
    assert!(ext.ledger().pod("uid-2").is_none());
}

/// An extender whose clock is `now()` plus the seconds in the returned cell, node "fit" (16 GiB
/// free) and pod default/llm (uid-1, 6 GiB) in the fake cluster.
fn clocked() -> (
    Arc<Extender>,
    Arc<FakeCluster>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let fake = Arc::new(FakeCluster::new());
    let seconds = Arc::new(AtomicU64::new(0));
    let clock = seconds.clone();
    let ext = Arc::new(Extender::new(
        config(0),
        fake.clone(),
        Arc::new(move || now() + std::time::Duration::from_secs(clock.load(Ordering::SeqCst))),
    ));
    ext.mark_pods_synced();
    ext.mark_gpunodes_synced();
    ext.ledger_mut()
        .set_reading("fit", reading(5, vec![gpu(0, 16, 16)]));
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    (ext, fake, seconds)
}

#[tokio::test(start_paused = true)]
async fn an_unsettled_bind_read_back_bound_by_the_next_bind_is_booked_as_bound() {
    use std::sync::atomic::Ordering;
    let (ext, fake, seconds) = clocked();
    // The Binding takes but its answer is lost, and the pod cannot be read back.
    fake.lose_bind_answers(true);
    fake.fail_reads_after_bind(true);
    post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    // A minute on (the background read-back at 60 s could not read either), kube-scheduler's
    // retry reads the pod back itself: bound where it was reserved.
    fake.lose_bind_answers(false);
    seconds.store(61, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    fake.fail_reads_after_bind(false);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(
        body,
        json!({ "Error": "" }),
        "bound where this bind asks: a success, as kube-scheduler must not unreserve it"
    );
    let info = ext.ledger().pod("uid-1").unwrap();
    assert!(
        !info.reserved,
        "booked as bound, not a reservation that expires"
    );
    let later = now() + std::time::Duration::from_secs(1000);
    let expired = ext
        .ledger_mut()
        .expire_reservations(later, std::time::Duration::from_secs(300));
    assert!(expired.is_empty(), "{expired:?}");
    assert!(ext.ledger().pod("uid-1").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_bind_whose_outcome_cannot_be_read_back_keeps_its_reservation_until_checked() {
    use std::sync::atomic::Ordering;
    let (ext, fake, seconds) = clocked();
    // The Binding's answer is lost and the API server cannot be asked again: it may have taken.
    fake.fail_bind(Some(ApiError::Transport("connection reset".into())));
    fake.fail_reads_after_bind(true);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    let error = body["Error"].as_str().unwrap();
    assert!(
        error.contains("whether the binding took cannot be read back"),
        "{error}"
    );
    assert!(
        ext.ledger().pod("uid-1").unwrap().reserved,
        "the room stays reserved: the pod may be bound there"
    );
    // kube-scheduler tries again at once, the API server answering reads: too soon to tell by
    // one read (the Binding may still be committing), so the reservation stays.
    fake.fail_reads_after_bind(false);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    let error = body["Error"].as_str().unwrap();
    assert!(
        error.contains("ended without knowing whether it took"),
        "{error}"
    );
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    fake.fail_reads_after_bind(true);
    // 61 s later (the background read at 60 s failed too), the API server answers again: the
    // next bind reads the pod not bound, replaces the reservation, and binds.
    seconds.store(61, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    fake.fail_reads_after_bind(false);
    fake.fail_bind(None);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(body, json!({ "Error": "" }));
    let bound = fake.pod("default", "llm").unwrap();
    assert_eq!(bound.spec.unwrap().node_name.as_deref(), Some("fit"));
    let booked = |ext: &Extender| ext.ledger().pod("uid-1").is_some_and(|p| !p.reserved);
    assert!(booked(&ext), "booked as bound");
    // The first bind's background read-back, due again at 75 s, leaves the booking alone.
    tokio::time::sleep(std::time::Duration::from_secs(100)).await;
    assert!(booked(&ext));
}

#[tokio::test(start_paused = true)]
async fn an_earlier_read_back_never_releases_a_reservation_a_later_bind_left_unsettled() {
    use std::sync::atomic::Ordering;
    let (ext, fake, seconds) = clocked();
    // Bind A: its answer lost, the pod unreadable: unsettled, read back from 60 s.
    fake.fail_bind(Some(ApiError::Transport("connection reset".into())));
    fake.fail_reads_after_bind(true);
    post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    seconds.store(61, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(61)).await;
    // Bind B at 61 s (the pod as its filter call showed it): takes the reservation, cannot
    // read the pod either, and leaves it unsettled again with a read-back of its own.
    let filter = args_nodes(pod_json("llm", "uid-1", Some("6"), json!({})), &["fit"]);
    post_json(&ext, "/filter", &filter).await;
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert!(
        body["Error"].as_str().unwrap().contains("earlier bind"),
        "{body}"
    );
    // The API server answers again. A's read-back (at 75 s) finds the pod not bound, but the
    // reservation is B's now: it stays, as B's Binding might have been sent.
    fake.fail_reads_after_bind(false);
    seconds.store(100, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(39)).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    // B's own read-back (60 s after B) releases it.
    tokio::time::sleep(std::time::Duration::from_secs(25)).await;
    assert!(ext.ledger().pod("uid-1").is_none());
}

#[tokio::test]
async fn a_conflict_from_a_retried_binding_that_took_is_a_success() {
    let (ext, fake) = cluster();
    let mut pod = pod_object("llm", "uid-1", Some("6"), json!({}));
    // The client's first attempt took; its retry is told the pod is already assigned.
    pod.spec.as_mut().unwrap().node_name = Some("fit".into());
    fake.put_pod(pod);
    let (_, body) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(body, json!({ "Error": "" }));
    assert!(
        !ext.ledger().pod("uid-1").unwrap().reserved,
        "booked as bound"
    );
    // Assigned to another node: a failure, and the reservation goes.
    let mut other = pod_object("other", "uid-2", Some("6"), json!({}));
    other.spec.as_mut().unwrap().node_name = Some("full".into());
    fake.put_pod(other);
    let (_, body) = post_json(&ext, "/bind", &binding_args("other", "uid-2", "fit")).await;
    assert!(
        body["Error"].as_str().unwrap().contains("already assigned"),
        "{body}"
    );
    assert!(ext.ledger().pod("uid-2").is_none());
}

#[tokio::test]
async fn a_bind_the_scheduler_stops_waiting_for_still_releases_its_reservation() {
    let (ext, fake) = cluster();
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    fake.set_latency(std::time::Duration::from_millis(300));
    fake.fail_bind(Some(ApiError::Refused(
        "pods \"llm\" is forbidden (403)".into(),
    )));
    // kube-scheduler's httpTimeout: the HTTP call is dropped while the Binding is on its way.
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(ext.ledger().reservation_count(), 1, "the bind goes on");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while ext.ledger().reservation_count() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed bind never released its reservation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // And it is counted, though nobody waited for its answer.
    let (_, text) = get(&ext, "/metrics").await;
    assert!(
        text.contains("vramslice_extender_decisions_total{verb=\"bind\",outcome=\"error\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn large_node_lists_are_accepted() {
    let (ext, _) = cluster();
    // 3,000 full Node objects (~3 MiB, past axum's default body limit), as a
    // non-nodeCacheCapable kube-scheduler sends them for a large cluster.
    let names: Vec<String> = (0..3000).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pod = pod_json("web", "uid-3", None, json!({}));
    let body = args_nodes(pod, &refs).to_string();
    assert!(body.len() > 2 << 20, "{} bytes", body.len());
    let (status, answer) = post(&ext, "/filter", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["Nodes"]["items"].as_array().unwrap().len(), 3000);
}

#[tokio::test]
async fn refused_nodes_past_the_detailed_limit_share_one_reason_per_kind() {
    use vramslice_extender::extender::DETAILED_REFUSALS;
    let fake = Arc::new(FakeCluster::new());
    let ext = extender_with(config(0), fake);
    let count = DETAILED_REFUSALS + 40;
    let names: Vec<String> = (0..count).map(|i| format!("n{i:03}")).collect();
    {
        let mut ledger = ext.ledger_mut();
        for (i, name) in names.iter().enumerate() {
            // Every node short of a 6 GiB pod, each by a different amount; the last few too
            // small to ever take it (unresolvable); one that fits at the very end.
            let gpu = if i >= count - 5 {
                gpu(0, 4, 4)
            } else {
                gpu(0, 16, (i % 5) as u64 + 1)
            };
            ledger.set_reading(name, reading(5, vec![gpu]));
        }
        ledger.set_reading("fits", reading(5, vec![gpu(0, 16, 16)]));
        // Past the detailed limit too: a stale reading, an unhealthy GPU, no reading at all.
        ledger.set_reading("stale", reading(500, vec![gpu(0, 16, 16)]));
        let mut sick = gpu(0, 16, 16);
        sick.healthy = false;
        ledger.set_reading("sick", reading(5, vec![sick]));
    }
    let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
    let others = ["stale", "sick", "ghost"];
    all.extend(others);
    all.push("fits");
    let pod = pod_json("llm", "uid-1", Some("6"), json!({}));
    let (status, body) = post_json(&ext, "/filter", &args_names(pod, &all)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["NodeNames"], json!(["fits"]));
    let failed = body["FailedNodes"].as_object().unwrap();
    let unresolvable = body["FailedAndUnresolvableNodes"].as_object().unwrap();
    // Nothing is lost: every refused node is listed, in the map its kind belongs to. Evicting
    // pods cannot refresh a reading, heal a GPU or publish a GpuNode: those are unresolvable.
    assert_eq!(failed.len(), count - 5);
    // Each brief reason names its cause, not only memory.
    assert_eq!(unresolvable["stale"], "GpuNode reading is stale");
    assert_eq!(unresolvable["sick"], "no healthy GPU with 6 GiB");
    assert_eq!(unresolvable["ghost"], "no usable GpuNode reading");
    assert_eq!(unresolvable.len(), 5 + others.len());
    let detailed = |name: &str| {
        let i: usize = name[1..].parse().unwrap();
        i < DETAILED_REFUSALS
    };
    for (name, reason) in failed {
        let reason = reason.as_str().unwrap();
        if detailed(name) {
            assert!(
                reason.starts_with("GPU 0: ") && reason.ends_with("need 6 GiB"),
                "{name}: {reason}"
            );
        } else {
            assert_eq!(reason, "no GPU has 6 GiB effective free");
        }
    }
    for (name, reason) in unresolvable {
        if others.contains(&name.as_str()) {
            continue;
        }
        assert!(!detailed(name));
        assert!(
            reason
                .as_str()
                .unwrap()
                .starts_with("no GPU can ever take 6 GiB"),
            "{reason}"
        );
    }
}

/// Handing over: `/drain` refuses binds at once and answers when no reservation is unsettled
/// any more (a Binding that may still land settled); until then it waits, bounded.
#[tokio::test(start_paused = true)]
async fn a_drain_refuses_binds_and_waits_for_an_unsettled_reservation() {
    use std::sync::atomic::Ordering;
    let (ext, fake, seconds) = clocked();
    // A Binding whose answer is lost and whose pod cannot be read back: unsettled.
    fake.lose_bind_answers(true);
    fake.fail_reads_after_bind(true);
    post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert!(ext.ledger().pod("uid-1").unwrap().reserved);
    assert_eq!(ext.ledger().unsettled_count(), 1);
    // Not settled within a short limit: the drain says what is open.
    let err = ext
        .drain(std::time::Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.contains("1 reservation(s) unsettled"), "{err}");
    // Binds are refused meanwhile, with the reason, and reserve nothing.
    fake.put_pod(pod_object("other", "uid-2", Some("2"), json!({})));
    let (_, body) = post_json(&ext, "/bind", &binding_args("other", "uid-2", "fit")).await;
    assert!(
        body["Error"]
            .as_str()
            .unwrap()
            .contains("handing over to a new leader (draining)"),
        "{body}"
    );
    assert!(ext.ledger().pod("uid-2").is_none());
    // The pod can be read again: the background read-back settles it and the drain ends.
    fake.fail_reads_after_bind(false);
    seconds.store(61, Ordering::SeqCst);
    let drained = ext.drain(std::time::Duration::from_secs(120)).await;
    assert_eq!(drained, Ok(()));
    assert_eq!(ext.ledger().unsettled_count(), 0);
}

/// `/drain` hands over only a terminating extender: asked while its own pod runs on (anyone who
/// reaches the probe port), it refuses and binds go on; once the pod is being deleted, it drains.
#[tokio::test]
async fn a_drain_is_honoured_only_while_the_extenders_pod_terminates() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let fake = Arc::new(FakeCluster::new());
    let ext = Arc::new(
        Arc::try_unwrap(extender_with(config(0), fake.clone()))
            .ok()
            .unwrap()
            .with_own_pod("vramslice-system".into(), "sched-0".into()),
    );
    ext.ledger_mut()
        .set_reading("fit", reading(5, vec![gpu(0, 16, 16)]));
    let own = |deleting: bool| {
        let mut pod = pod_json("sched-0", "uid-sched", None, json!({}));
        pod["metadata"]["namespace"] = json!("vramslice-system");
        if deleting {
            pod["metadata"]["deletionTimestamp"] = json!("2026-12-07T20:00:00Z");
        }
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(pod).unwrap()
    };
    let drain = || {
        let router = vramslice_extender::http::router(ext.clone());
        async move {
            let resp = router
                .oneshot(
                    axum::http::Request::get("/drain")
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    fake.put_pod(own(false));
    let (status, body) = drain().await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("not terminating"), "{body}");
    fake.put_pod(pod_object("llm", "uid-1", Some("6"), json!({})));
    let (_, answer) = post_json(&ext, "/bind", &binding_args("llm", "uid-1", "fit")).await;
    assert_eq!(answer, json!({ "Error": "" }), "binds go on");
    fake.put_pod(own(true));
    let (status, body) = drain().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    fake.put_pod(pod_object("other", "uid-2", Some("2"), json!({})));
    let (_, answer) = post_json(&ext, "/bind", &binding_args("other", "uid-2", "fit")).await;
    assert!(
        answer["Error"].as_str().unwrap().contains("draining"),
        "{answer}"
    );
}
