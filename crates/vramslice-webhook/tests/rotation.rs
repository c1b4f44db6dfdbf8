//! Self-signed rotation against a recorded-style in-memory API server: the first check fills
//! the Secret and the CA bundle, the next one changes nothing, a lost race is a conflict, and a
//! second replica adopts the first one's certificate.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, Response, StatusCode};
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use vramslice_webhook::WebhookMetrics;
use vramslice_webhook::certs::keys;
use vramslice_webhook::config::SelfSigned;
use vramslice_webhook::rotation::{CheckResult, check_self_signed};
use vramslice_webhook::tls::CertSlot;

const SECRET: &str = "/api/v1/namespaces/vramslice-system/secrets/vramslice-webhook-tls";
const MWC: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/vramslice-webhook";

/// Something another replica does, run once when the configuration is next read.
type Interleave = Box<dyn FnOnce(&mut ApiState) + Send>;

#[derive(Default)]
struct ApiState {
    secret: Value,
    mwc: Value,
    log: Vec<String>,
    refuse_updates: bool,
    on_mwc_get: Option<Interleave>,
}

/// Bump an object's resourceVersion, as the API server does on every write.
fn bump(object: &mut Value) {
    let rv: u64 = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    object["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
}

fn fake_api() -> Arc<Mutex<ApiState>> {
    Arc::new(Mutex::new(ApiState {
        secret: json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "vramslice-webhook-tls", "namespace": "vramslice-system", "resourceVersion": "1"}}),
        mwc: json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "vramslice-webhook", "resourceVersion": "1"},
            "webhooks": [{"name": "scheduler-name.pods.vramslice.io", "admissionReviewVersions": ["v1"],
                "sideEffects": "None", "failurePolicy": "Ignore",
                "clientConfig": {"service": {"name": "vramslice-webhook", "namespace": "vramslice-system", "path": "/mutate-pods", "port": 443}}}]}),
        ..ApiState::default()
    }))
}

fn respond(code: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

fn client(state: Arc<Mutex<ApiState>>) -> kube::Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let state = state.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let mut s = state.lock().unwrap();
            let path = parts.uri.path().to_string();
            s.log.push(format!("{} {}", parts.method, path));
            let resp = match (parts.method.clone(), path.as_str()) {
                (Method::GET, SECRET) => respond(StatusCode::OK, s.secret.clone()),
                (Method::PUT, SECRET) => {
                    let new: Value = serde_json::from_slice(&body).unwrap();
                    if s.refuse_updates
                        || new["metadata"]["resourceVersion"]
                            != s.secret["metadata"]["resourceVersion"]
                    {
                        respond(StatusCode::CONFLICT, status(409, "Conflict"))
                    } else {
                        let mut stored = new;
                        stored["metadata"]["resourceVersion"] =
                            s.secret["metadata"]["resourceVersion"].clone();
                        bump(&mut stored);
                        s.secret = stored.clone();
                        respond(StatusCode::OK, stored)
                    }
                }
                (Method::GET, MWC) => {
                    let reply = respond(StatusCode::OK, s.mwc.clone());
                    if let Some(other_replica) = s.on_mwc_get.take() {
                        other_replica(&mut s);
                    }
                    reply
                }
                (Method::PATCH, MWC) => {
                    let content_type = parts.headers["content-type"].to_str().unwrap().to_string();
                    assert_eq!(content_type, "application/strategic-merge-patch+json");
                    let patch: Value = serde_json::from_slice(&body).unwrap();
                    // A resourceVersion in a patch is a precondition.
                    let rv = &patch["metadata"]["resourceVersion"];
                    if !rv.is_null() && *rv != s.mwc["metadata"]["resourceVersion"] {
                        respond(StatusCode::CONFLICT, status(409, "Conflict"))
                    } else {
                        for w in patch["webhooks"].as_array().unwrap() {
                            let hooks = s.mwc["webhooks"].as_array_mut().unwrap();
                            let hook = hooks.iter_mut().find(|h| h["name"] == w["name"]).unwrap();
                            hook["clientConfig"]["caBundle"] =
                                w["clientConfig"]["caBundle"].clone();
                        }
                        bump(&mut s.mwc);
                        respond(StatusCode::OK, s.mwc.clone())
                    }
                }
                _ => respond(StatusCode::NOT_FOUND, status(404, "NotFound")),
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    kube::Client::new(svc, "default")
}

fn cfg() -> SelfSigned {
    SelfSigned {
        namespace: "vramslice-system".into(),
        secret_name: "vramslice-webhook-tls".into(),
        webhook_config_name: "vramslice-webhook".into(),
        service_name: "vramslice-webhook".into(),
        cert_validity: Duration::from_secs(90 * 86_400),
        ca_validity: Duration::from_secs(3650 * 86_400),
    }
}

/// Base64 text (a Secret's data, a caBundle) decoded.
fn decoded(b64: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn secret_value(state: &Arc<Mutex<ApiState>>, key: &str) -> String {
    let b64 = state.lock().unwrap().secret["data"][key]
        .as_str()
        .unwrap_or_default()
        .to_string();
    decoded(&b64)
}

/// The CA bundle `state`'s configuration trusts, decoded.
fn mwc_bundle(state: &Arc<Mutex<ApiState>>) -> String {
    let b64 = state.lock().unwrap().mwc["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    decoded(&b64)
}

/// One check of a replica serving from `slot`, at `at`.
async fn check(c: &kube::Client, slot: &CertSlot, at: i64) -> CheckResult {
    check_self_signed(c, &cfg(), slot, &WebhookMetrics::default(), at)
        .await
        .unwrap()
}

const NOW: i64 = 1_800_000_000;

#[tokio::test]
async fn first_check_fills_secret_and_ca_bundle_then_settles() {
    let api = fake_api();
    let c = client(api.clone());
    let slot = CertSlot::new();
    let metrics = WebhookMetrics::default();
    let r = check_self_signed(&c, &cfg(), &slot, &metrics, NOW)
        .await
        .unwrap();
    assert!(matches!(r, CheckResult::Renewed(_)), "{r:?}");
    let tls_cert = secret_value(&api, keys::TLS_CERT);
    assert!(tls_cert.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        slot.current_pem().as_deref(),
        Some(tls_cert.as_str()),
        "the stored certificate is served"
    );
    let bundle = mwc_bundle(&api);
    assert_eq!(bundle, secret_value(&api, keys::CA_BUNDLE));
    assert_eq!(metrics.cert_expiry.get(), NOW + 90 * 86_400);
    assert_eq!(
        api.lock().unwrap().log,
        vec![
            format!("GET {SECRET}"),
            format!("PUT {SECRET}"),
            format!("GET {MWC}"),
            format!("GET {SECRET}"),
            format!("PATCH {MWC}")
        ]
    );

    api.lock().unwrap().log.clear();
    let r = check_self_signed(&c, &cfg(), &slot, &metrics, NOW + 3600)
        .await
        .unwrap();
    assert_eq!(r, CheckResult::Current);
    assert_eq!(
        api.lock().unwrap().log,
        vec![format!("GET {SECRET}"), format!("GET {MWC}")],
        "nothing written"
    );

    // Two thirds into its life the serving certificate is replaced; the bundle stays.
    api.lock().unwrap().log.clear();
    let r = check_self_signed(&c, &cfg(), &slot, &metrics, NOW + 61 * 86_400)
        .await
        .unwrap();
    assert!(
        matches!(
            r,
            CheckResult::Renewed(vramslice_webhook::certs::Plan::NewServing)
        ),
        "{r:?}"
    );
    assert_ne!(secret_value(&api, keys::TLS_CERT), tls_cert);
    assert_eq!(secret_value(&api, keys::CA_BUNDLE), bundle);
    assert!(
        !api.lock()
            .unwrap()
            .log
            .iter()
            .any(|l| l.starts_with("PATCH")),
        "CA bundle unchanged: no patch"
    );
}

#[tokio::test]
async fn a_lost_race_is_a_conflict_and_the_winner_is_adopted() {
    let api = fake_api();
    let c = client(api.clone());
    api.lock().unwrap().refuse_updates = true;
    let loser = CertSlot::new();
    let r = check(&c, &loser, NOW).await;
    assert_eq!(r, CheckResult::Conflict);
    assert_eq!(
        loser.current_pem(),
        None,
        "nothing served from a write that lost"
    );

    api.lock().unwrap().refuse_updates = false;
    let winner = CertSlot::new();
    check(&c, &winner, NOW).await;
    let r = check(&c, &loser, NOW + 5).await;
    assert_eq!(r, CheckResult::Current);
    assert_eq!(
        loser.current_pem(),
        winner.current_pem(),
        "every replica serves the same certificate"
    );
}

#[tokio::test]
async fn a_missing_secret_is_a_clear_error() {
    let api = fake_api();
    let c = client(api.clone());
    let mut bad = cfg();
    bad.secret_name = "absent".into();
    let err = check_self_signed(&c, &bad, &CertSlot::new(), &WebhookMetrics::default(), NOW)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("get Secret vramslice-system/absent"),
        "{err}"
    );
}

#[tokio::test]
async fn a_replica_never_writes_an_older_ca_bundle_over_a_renewed_one() {
    use vramslice_webhook::certs::{CertSettings, Plan, StoredCerts, renew};
    let api = fake_api();
    let c = client(api.clone());
    check(&c, &CertSlot::new(), NOW).await;
    let first_bundle = mwc_bundle(&api);
    // Replica A renews the CA: the Secret holds the new CA, the bundle trusts new and old.
    let names: Vec<String> = api.lock().unwrap().secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let data: std::collections::BTreeMap<String, String> = names
        .into_iter()
        .map(|k| {
            let v = secret_value(&api, &k);
            (k, v)
        })
        .collect();
    let stored = StoredCerts::from_data(&data).unwrap();
    let settings = CertSettings {
        cert_validity: cfg().cert_validity,
        ca_validity: cfg().ca_validity,
        dns_names: cfg().dns_names(),
    };
    let renewed = renew(Some(&stored), Plan::NewCa, NOW + 7200, &settings).unwrap();
    let new_bundle = renewed.ca_bundle();
    assert_ne!(new_bundle, first_bundle);
    // Replica B has read the Secret (old CA: nothing to renew) when A writes both.
    let a_data: serde_json::Map<String, Value> = renewed
        .to_data()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    let a_bundle = base64::engine::general_purpose::STANDARD.encode(&new_bundle);
    // B finds the configuration not trusting its (old) bundle; A renews just then.
    api.lock().unwrap().mwc["webhooks"][0]["clientConfig"]["caBundle"] = json!("");
    api.lock().unwrap().on_mwc_get = Some(Box::new(move |s: &mut ApiState| {
        s.secret["data"] = Value::Object(a_data);
        bump(&mut s.secret);
        s.mwc["webhooks"][0]["clientConfig"]["caBundle"] = json!(a_bundle);
        bump(&mut s.mwc);
    }));
    let b = CertSlot::new();
    let r = check(&c, &b, NOW + 3600).await;
    assert_eq!(r, CheckResult::Conflict, "B holds an outdated bundle");
    assert_eq!(mwc_bundle(&api), new_bundle, "A's bundle stays");
    assert_eq!(b.current_pem(), None, "B serves nothing from what it read");
    // B's next check adopts A's certificates.
    let r = check(&c, &b, NOW + 3605).await;
    assert_eq!(r, CheckResult::Current);
    assert_eq!(b.current_pem().as_deref(), Some(renewed.tls_cert.as_str()));
    assert_eq!(mwc_bundle(&api), new_bundle);
}

#[tokio::test]
async fn a_configuration_changed_between_read_and_patch_is_a_conflict() {
    let api = fake_api();
    let c = client(api.clone());
    check(&c, &CertSlot::new(), NOW).await;
    let bundle = mwc_bundle(&api);
    // The bundle lost (someone edited the configuration), and written again by another
    // replica between this one's read and its patch.
    api.lock().unwrap().mwc["webhooks"][0]["clientConfig"]["caBundle"] = json!("");
    api.lock().unwrap().on_mwc_get = Some(Box::new(|s: &mut ApiState| bump(&mut s.mwc)));
    let r = check(&c, &CertSlot::new(), NOW + 60).await;
    assert_eq!(
        r,
        CheckResult::Conflict,
        "the patch's resourceVersion was stale"
    );
    // The next check reads the configuration again and mends it.
    let r = check(&c, &CertSlot::new(), NOW + 61).await;
    assert_eq!(r, CheckResult::Current);
    assert_eq!(mwc_bundle(&api), bundle);
}
