//! The HTTP adapter: axum routes over [`Extender`]'s verbs.
//!
//! `POST /filter`, `POST /prioritize`, `POST /bind` (kube-scheduler extender v1 JSON),
//! `GET /healthz`, `GET /readyz`, `GET /metrics`: all on one listener ([`router`]), or the verbs
//! on one ([`verb_router`], kept to loopback beside kube-scheduler) and the probes and metrics
//! on another ([`probe_router`]). A body kube-scheduler could not have meant
//! (malformed JSON, no Pod, no candidates) gets `400` with a plain-text message; a pod or node
//! the extender cannot place gets `200` with the reason inside the result, as the scheduler
//! expects.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use vramslice_core::exposition::Exposition;

use crate::extender::{BadRequest, Extender};
use crate::metrics::Outcome;

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

/// Largest request body accepted: a full `NodeList` of thousands of nodes (nodeCacheCapable:
/// false) runs to tens of MiB, far past axum's 2 MiB default.
pub const MAX_BODY_BYTES: usize = 256 << 20;

/// Every route on one listener: the verbs, the probes and the metrics.
pub fn router(extender: Arc<Extender>) -> Router {
    verb_routes().merge(probe_routes()).with_state(extender)
}

/// Only kube-scheduler's verbs (`/filter`, `/prioritize`, `/bind`), for a listener no one else
/// reaches: whoever can call `/bind` can bind pending pods with the extender's rights.
pub fn verb_router(extender: Arc<Extender>) -> Router {
    verb_routes().with_state(extender)
}

/// Only `/healthz`, `/readyz`, `/metrics` and `/drain`, for the kubelet's probes and hooks and
/// Prometheus.
pub fn probe_router(extender: Arc<Extender>) -> Router {
    probe_routes().with_state(extender)
}

fn verb_routes() -> Router<Arc<Extender>> {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/bind", post(bind))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn probe_routes() -> Router<Arc<Extender>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/drain", get(drain))
}

/// Hand over: refuse binds and answer once none is in flight and no reservation is unsettled
/// (the kube-scheduler container's preStop hook, which keeps its lease until then).
async fn drain(State(ext): State<Arc<Extender>>) -> Response {
    use crate::extender::handover::DrainPermission;
    let refused = |status: StatusCode, why: String| {
        tracing::warn!(%why, "drain refused");
        text(status, why)
    };
    match ext.drain_permission().await {
        DrainPermission::Granted => {}
        DrainPermission::NotTerminating => {
            return refused(
                StatusCode::CONFLICT,
                "not drained: this extender's pod is not terminating (/drain hands over a stopping extender)".into(),
            );
        }
        DrainPermission::Unknown(why) => {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not drained: {why}"),
            );
        }
    }
    tracing::info!("draining: binds refused until the handover");
    match ext.drain(crate::extender::handover::DRAIN_LIMIT).await {
        Ok(()) => text(StatusCode::OK, "drained"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not drained: {why}"),
        ),
    }
}

/// A plain-text answer: `body` and a newline.
fn text(status: StatusCode, body: impl std::fmt::Display) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT)], format!("{body}\n")).into_response()
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, JSON)], body).into_response()
}

fn bad_request(verb: &'static str, ext: &Extender, started: Instant, err: &BadRequest) -> Response {
    ext.metrics()
        .record(verb, Outcome::Error, started.elapsed());
    tracing::warn!(verb, error = %err, "bad request");
    text(StatusCode::BAD_REQUEST, err)
}

async fn filter(State(ext): State<Arc<Extender>>, body: Bytes) -> Response {
    let started = Instant::now();
    match ext.filter(&body) {
        Ok((answer, outcome)) => {
            ext.metrics().record("filter", outcome, started.elapsed());
            json(answer)
        }
        Err(e) => bad_request("filter", &ext, started, &e),
    }
}

async fn prioritize(State(ext): State<Arc<Extender>>, body: Bytes) -> Response {
    let started = Instant::now();
    match ext.prioritize(&body) {
        Ok((answer, outcome)) => {
            ext.metrics()
                .record("prioritize", outcome, started.elapsed());
            json(answer)
        }
        Err(e) => bad_request("prioritize", &ext, started, &e),
    }
}

async fn bind(State(ext): State<Arc<Extender>>, body: Bytes) -> Response {
    let started = Instant::now();
    // A bind's outcome is counted by the bind itself (it runs on when this call is dropped);
    // here only a request that never became a bind.
    let answer = ext.bind(&body).await.and_then(|result| {
        serde_json::to_string(&result).map_err(|e| BadRequest::Malformed {
            what: "ExtenderBindingResult",
            detail: e.to_string(),
        })
    });
    match answer {
        Ok(answer) => json(answer),
        Err(e) => bad_request("bind", &ext, started, &e),
    }
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok")
}

async fn readyz(State(ext): State<Arc<Extender>>) -> Response {
    match ext.probe_readiness() {
        Ok(()) => text(StatusCode::OK, "ready"),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The metrics in the format the scraper's `Accept` asks for (the Prometheus text format unless
/// it prefers OpenMetrics).
async fn metrics(State(ext): State<Arc<Extender>>, headers: HeaderMap) -> Response {
    let format = Exposition::negotiate(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    (
        [(header::CONTENT_TYPE, format.content_type())],
        format.render(ext.render_metrics()),
    )
        .into_response()
}
