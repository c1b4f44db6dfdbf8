//! The webhook's HTTP routes: `POST /mutate-pods` (AdmissionReview v1) and `GET /healthz`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vramslice_core::cluster::admission::AdmissionPolicy;

use crate::review::{AdmissionReviewIn, Outcome, review};

/// Path the MutatingWebhookConfiguration points at.
pub const MUTATE_PATH: &str = "/mutate-pods";

/// Label set of the admissions counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `mutated`, `unchanged`, `unreadable` or `rejected` (malformed review).
    pub outcome: String,
}

/// The webhook's metrics.
#[derive(Debug, Clone, Default)]
pub struct WebhookMetrics {
    /// `vramslice_extender_webhook_admissions_total{outcome}` (in the extender's registry).
    pub admissions: Family<OutcomeLabels, Counter>,
    /// `vramslice_extender_webhook_cert_expiry_timestamp_seconds`: when the served certificate
    /// expires (self-signed mode).
    pub cert_expiry: Gauge,
    /// Whether the webhook serves a certificate (handshakes can succeed); the extender's
    /// `/readyz` says not ready while it does not.
    pub serving: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WebhookMetrics {
    /// Whether a certificate is being served.
    pub fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl WebhookMetrics {
    /// Create the metrics and register them in `registry` under relative names
    /// (`webhook_admissions`, `webhook_cert_expiry_timestamp_seconds`). Pass the extender's
    /// registry (prefix `vramslice_extender`) so they are exported as
    /// `vramslice_extender_webhook_*`.
    pub fn register(registry: &mut Registry) -> WebhookMetrics {
        let m = WebhookMetrics::default();
        registry.register(
            "webhook_admissions",
            "Pod admission reviews answered by the webhook, by outcome",
            m.admissions.clone(),
        );
        registry.register(
            "webhook_cert_expiry_timestamp_seconds",
            "Unix time when the webhook's serving certificate expires",
            m.cert_expiry.clone(),
        );
        m
    }

    fn count(&self, outcome: &str) {
        self.admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

#[derive(Clone)]
struct AppState {
    policy: AdmissionPolicy,
    metrics: WebhookMetrics,
}

/// The router; mount it on a TLS listener (see [`crate::serve`]) or test it directly.
pub fn router(policy: AdmissionPolicy, metrics: WebhookMetrics) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(AppState { policy, metrics })
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

async fn mutate(State(state): State<AppState>, body: Bytes) -> Response {
    let input: AdmissionReviewIn = match serde_json::from_slice(&body) {
        Ok(input) => input,
        Err(err) => {
            state.metrics.count("rejected");
            return bad_request(format!("body is not an AdmissionReview: {err}"));
        }
    };
    match review(input, state.policy) {
        Ok((out, outcome)) => {
            state.metrics.count(outcome.as_str());
            if outcome == Outcome::Mutated {
                tracing::info!(uid = %out.response.uid, "webhook: set schedulerName vramslice-scheduler");
            }
            axum::Json(out).into_response()
        }
        Err(err) => {
            state.metrics.count("rejected");
            bad_request(err.to_string())
        }
    }
}
