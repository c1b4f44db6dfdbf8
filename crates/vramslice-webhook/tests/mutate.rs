//! The webhook mutates exactly the pods it should: table-driven reviews through the router,
//! and one review over real TLS with a certificate from the webhook's own CA.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use vramslice_core::cluster::admission::AdmissionPolicy;
use vramslice_webhook::review::AdmissionReviewOut;
use vramslice_webhook::{WebhookMetrics, router};

fn review(operation: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {"username": "alice"},
            "object": pod,
            "oldObject": null,
            "dryRun": false
        }
    })
}

/// A pod as the API server sends it to mutating webhooks (defaults already applied).
fn pod(scheduler: Option<&str>, containers: Value, init: Option<Value>) -> Value {
    let mut spec = json!({ "containers": containers, "restartPolicy": "Always" });
    if let Some(s) = scheduler {
        spec["schedulerName"] = json!(s);
    }
    if let Some(i) = init {
        spec["initContainers"] = i;
    }
    json!({ "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team-a"}, "spec": spec })
}

fn container(limits: Value, requests: Value) -> Value {
    json!({"name": "c", "image": "vllm/vllm-openai:latest", "resources": {"limits": limits, "requests": requests}})
}

async fn call(policy: AdmissionPolicy, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let app = router(policy, WebhookMetrics::default());
    let resp = app
        .oneshot(
            Request::post("/mutate-pods")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

/// The scheduler name after applying the response's patch (None: no patch).
async fn patched_scheduler(
    policy: AdmissionPolicy,
    review: Value,
) -> (Option<String>, AdmissionReviewOut) {
    let (status, body) = call(policy, serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let out: AdmissionReviewOut = serde_json::from_slice(&body).unwrap();
    assert!(out.response.allowed, "the webhook always allows");
    assert_eq!(out.response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(out.api_version, "admission.k8s.io/v1");
    let Some(patch) = &out.response.patch else {
        return (None, out);
    };
    assert_eq!(out.response.patch_type.as_deref(), Some("JSONPatch"));
    let ops: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap(),
    )
    .unwrap();
    let ops = ops.as_array().unwrap();
    assert_eq!(ops.len(), 1, "exactly one operation: {ops:?}");
    assert_eq!(ops[0]["path"], "/spec/schedulerName");
    assert!(ops[0]["op"] == "add" || ops[0]["op"] == "replace");
    (ops[0]["value"].as_str().map(str::to_string), out)
}

const VRAMSLICE: Option<&str> = Some("vramslice-scheduler");

#[tokio::test]
async fn mutates_exactly_the_pods_it_should() {
    let p = AdmissionPolicy::default();
    let vram = container(
        json!({"vramslice.io/vram-gib": "6"}),
        json!({"vramslice.io/vram-gib": "6"}),
    );
    let cpu_only = container(json!({"cpu": "2", "memory": "4Gi"}), json!({}));
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "defaulted name, VRAM limit",
            review(
                "CREATE",
                pod(Some("default-scheduler"), json!([vram.clone()]), None),
            ),
            VRAMSLICE,
        ),
        (
            "no name at all",
            review("CREATE", pod(None, json!([vram.clone()]), None)),
            VRAMSLICE,
        ),
        (
            "empty name",
            review("CREATE", pod(Some(""), json!([vram.clone()]), None)),
            VRAMSLICE,
        ),
        (
            "requests only, 128Mi unit",
            review(
                "CREATE",
                pod(
                    None,
                    json!([container(
                        json!({}),
                        json!({"vramslice.io/vram-128mib": "8"})
                    )]),
                    None,
                ),
            ),
            VRAMSLICE,
        ),
        (
            "init container only",
            review(
                "CREATE",
                pod(
                    None,
                    json!([cpu_only.clone()]),
                    Some(json!([container(
                        json!({"vramslice.io/vram-512mib": "2"}),
                        json!({})
                    )])),
                ),
            ),
            VRAMSLICE,
        ),
        (
            "second of two containers",
            review(
                "CREATE",
                pod(None, json!([cpu_only.clone(), vram.clone()]), None),
            ),
            VRAMSLICE,
        ),
        (
            "no VRAM",
            review("CREATE", pod(None, json!([cpu_only.clone()]), None)),
            None,
        ),
        (
            "whole GPUs only",
            review(
                "CREATE",
                pod(
                    None,
                    json!([container(json!({"nvidia.com/gpu": "1"}), json!({}))]),
                    None,
                ),
            ),
            None,
        ),
        (
            "zero VRAM",
            review(
                "CREATE",
                pod(
                    None,
                    json!([container(json!({"vramslice.io/vram-gib": "0"}), json!({}))]),
                    None,
                ),
            ),
            None,
        ),
        (
            "already vramslice",
            review("CREATE", pod(VRAMSLICE, json!([vram.clone()]), None)),
            None,
        ),
        (
            "another scheduler",
            review("CREATE", pod(Some("volcano"), json!([vram.clone()]), None)),
            None,
        ),
        (
            "update, not create",
            review("UPDATE", pod(None, json!([vram.clone()]), None)),
            None,
        ),
        (
            "no containers field",
            review(
                "CREATE",
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}),
            ),
            None,
        ),
        (
            "not a pod object",
            review("CREATE", json!({"spec": {"containers": "nope"}})),
            None,
        ),
    ];
    for (name, rv, want) in cases {
        let (got, _) = patched_scheduler(p, rv).await;
        assert_eq!(got.as_deref(), want, "case: {name}");
    }
    // A bound pod and an opted-out pod keep their name.
    let mut bound = pod(None, json!([vram.clone()]), None);
    bound["spec"]["nodeName"] = json!("gpu-node-1");
    assert_eq!(patched_scheduler(p, review("CREATE", bound)).await.0, None);
    let mut opted = pod(Some("default-scheduler"), json!([vram.clone()]), None);
    opted["metadata"]["annotations"] = json!({"vramslice.io/keep-scheduler-name": "true"});
    assert_eq!(patched_scheduler(p, review("CREATE", opted)).await.0, None);
    // With the override off, a defaulted name is kept.
    let off = AdmissionPolicy {
        override_default_scheduler: false,
    };
    let rv = review(
        "CREATE",
        pod(Some("default-scheduler"), json!([vram.clone()]), None),
    );
    assert_eq!(patched_scheduler(off, rv).await.0, None);
}

#[tokio::test]
async fn other_scheduler_gets_a_warning() {
    let vram = container(json!({"vramslice.io/vram-gib": "6"}), json!({}));
    let (got, out) = patched_scheduler(
        AdmissionPolicy::default(),
        review("CREATE", pod(Some("volcano"), json!([vram]), None)),
    )
    .await;
    assert_eq!(got, None);
    assert_eq!(out.response.warnings.len(), 1);
    assert!(out.response.warnings[0].contains("\"volcano\""));
}

#[tokio::test]
async fn malformed_reviews_get_400_with_the_reason() {
    let p = AdmissionPolicy::default();
    let (status, body) = call(p, b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}});
    let (status, body) = call(p, serde_json::to_vec(&v1beta1).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("admission.k8s.io/v1beta1"));
    let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    let (status, body) = call(p, serde_json::to_vec(&no_request).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("no request"));
}

#[tokio::test]
async fn serves_reviews_over_tls_with_its_own_ca() {
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;
    use std::time::Duration;
    use vramslice_webhook::certs::{CertSettings, Plan, renew};
    use vramslice_webhook::tls;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let settings = CertSettings {
        cert_validity: Duration::from_secs(3600),
        ca_validity: Duration::from_secs(86_400),
        dns_names: vec!["vramslice-webhook.vramslice-system.svc".into()],
    };
    let certs = renew(None, Plan::NewCa, now, &settings).unwrap();
    let slot = tls::CertSlot::new();
    assert!(slot.set(&certs.tls_cert, &certs.tls_key).unwrap());
    assert!(
        !slot.set(&certs.tls_cert, &certs.tls_key).unwrap(),
        "same certificate: no change"
    );
    let listener = tls::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vramslice_webhook::listen::serve(
        listener,
        router(AdmissionPolicy::default(), WebhookMetrics::default()),
        Some(tls::acceptor(slot).unwrap()),
        vramslice_webhook::listen::ConnectionLimits::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(certs.ca_bundle().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("vramslice-webhook.vramslice-system.svc").unwrap();
    let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls_stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let vram = container(json!({"vramslice.io/vram-gib": "6"}), json!({}));
    let body = serde_json::to_vec(&review(
        "CREATE",
        pod(Some("default-scheduler"), json!([vram]), None),
    ))
    .unwrap();
    let req = Request::post("/mutate-pods")
        .header("host", "vramslice-webhook.vramslice-system.svc")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let out: AdmissionReviewOut = serde_json::from_slice(&bytes).unwrap();
    assert!(out.response.patch.is_some(), "the pod is mutated over TLS");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn admissions_are_counted_under_the_extender_prefix() {
    let mut registry = prometheus_client::registry::Registry::with_prefix("vramslice_extender");
    let metrics = WebhookMetrics::register(&mut registry);
    let app = router(AdmissionPolicy::default(), metrics);
    let vram = container(json!({"vramslice.io/vram-gib": "1"}), json!({}));
    let body = serde_json::to_vec(&review("CREATE", pod(None, json!([vram]), None))).unwrap();
    for payload in [body, b"nope".to_vec()] {
        let req = Request::post("/mutate-pods")
            .body(Body::from(payload))
            .unwrap();
        app.clone().oneshot(req).await.unwrap();
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("vramslice_extender_webhook_admissions_total{outcome=\"mutated\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vramslice_extender_webhook_admissions_total{outcome=\"rejected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vramslice_extender_webhook_cert_expiry_timestamp_seconds"),
        "{text}"
    );
}
