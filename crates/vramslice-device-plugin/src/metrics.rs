//! Prometheus metrics (`vramslice_` prefix) and the `/metrics` + `/healthz` HTTP endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use vramslice_core::exposition::Exposition;
use vramslice_core::node::sample::backend_stalled;
use vramslice_gpu::GpuSample;

/// Labels of per-GPU series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GpuLabels {
    /// GPU UUID.
    pub gpu: String,
    /// GPU index.
    pub index: String,
}

/// Labels of GpuNode writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why the write happened.
    pub reason: String,
}

/// Labels of per-pod series (a pod's share of one GPU).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PodGpuLabels {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// GPU UUID.
    pub gpu: String,
}

/// Labels of watchdog actions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabels {
    /// `report`, `kill-process` or `evict-pod`.
    pub action: String,
}

/// One pod's series: labels, measured bytes (when attributable), limit, self-report trusted.
pub type PodSeries = (PodGpuLabels, Option<u64>, u64, Option<bool>);

struct Inner {
    registry: Registry,
    total: Family<GpuLabels, Gauge>,
    used: Family<GpuLabels, Gauge>,
    free: Family<GpuLabels, Gauge>,
    allocated: Family<GpuLabels, Gauge>,
    healthy: Family<GpuLabels, Gauge>,
    registered: Gauge,
    registrations: Counter,
    kubelet_restarts: Counter,
    backend_errors: Counter,
    gpunode_writes: Family<ReasonLabels, Counter>,
    publish_errors: Counter,
    watchdog_breaches: Family<ActionLabels, Counter>,
    pod_used: Family<PodGpuLabels, Gauge>,
    pod_limit: Family<PodGpuLabels, Gauge>,
    pod_trusted: Family<PodGpuLabels, Gauge>,
    pods_seen: std::sync::Mutex<Vec<PodGpuLabels>>,
    /// When the backend was last read successfully (`None`: not yet).
    last_read: Mutex<Option<Instant>>,
    /// The kubelet's error while it refuses the plugin's registration (DRA mode).
    registration_refused: Mutex<Option<String>>,
    /// GPUs of the last reading, so vanished GPUs' series can be removed.
    gpus_seen: std::sync::Mutex<Vec<GpuLabels>>,
}

/// The plugin's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vramslice");
        let total = Family::<GpuLabels, Gauge>::default();
        let used = Family::<GpuLabels, Gauge>::default();
        let free = Family::<GpuLabels, Gauge>::default();
        let allocated = Family::<GpuLabels, Gauge>::default();
        let healthy = Family::<GpuLabels, Gauge>::default();
        let registered = Gauge::default();
        let registrations = Counter::default();
        let kubelet_restarts = Counter::default();
        let backend_errors = Counter::default();
        let gpunode_writes = Family::<ReasonLabels, Counter>::default();
        let publish_errors = Counter::default();
        registry.register("gpu_total_bytes", "GPU memory, bytes", total.clone());
        registry.register("gpu_used_bytes", "GPU memory in use, bytes", used.clone());
        registry.register("gpu_free_bytes", "GPU memory free, bytes", free.clone());
        registry.register(
            "gpu_allocated_bytes",
            "GPU memory allocated to containers by the kubelet, bytes",
            allocated.clone(),
        );
        registry.register("gpu_healthy", "1 when the GPU is healthy", healthy.clone());
        registry.register(
            "plugin_registered",
            "1 while the plugin is registered with the kubelet",
            registered.clone(),
        );
        registry.register(
            "plugin_registrations",
            "Successful registrations with the kubelet",
            registrations.clone(),
        );
        registry.register(
            "kubelet_restarts",
            "Kubelet restarts (kubelet.sock re-created) or plugin socket losses seen",
            kubelet_restarts.clone(),
        );
        registry.register(
            "backend_errors",
            "Failed GPU backend reads",
            backend_errors.clone(),
        );
        registry.register(
            "gpunode_writes",
            "GpuNode status writes, by reason",
            gpunode_writes.clone(),
        );
        registry.register(
            "gpunode_write_errors",
            "Failed GpuNode writes",
            publish_errors.clone(),
        );
        let watchdog_breaches = Family::<ActionLabels, Counter>::default();
        let pod_used = Family::<PodGpuLabels, Gauge>::default();
        let pod_limit = Family::<PodGpuLabels, Gauge>::default();
        let pod_trusted = Family::<PodGpuLabels, Gauge>::default();
        registry.register(
            "watchdog_breaches",
            "Pods over their GPU memory limit + tolerance past the grace period, by the action taken",
            watchdog_breaches.clone(),
        );
        registry.register(
            "pod_used_bytes",
            "GPU memory a pod's processes use on a GPU, as NVML measures it, bytes",
            pod_used.clone(),
        );
        registry.register(
            "pod_limit_bytes",
            "A pod's GPU memory limit on a GPU (its units), bytes",
            pod_limit.clone(),
        );
        registry.register(
            "pod_self_report_trusted",
            "1 when a pod's accounting file agrees with NVML within the watchdog tolerance, 0 when not",
            pod_trusted.clone(),
        );
        Metrics(Arc::new(Inner {
            watchdog_breaches,
            pod_used,
            pod_limit,
            pod_trusted,
            pods_seen: std::sync::Mutex::new(Vec::new()),
            registry,
            total,
            used,
            free,
            allocated,
            healthy,
            registered,
            registrations,
            kubelet_restarts,
            backend_errors,
            gpunode_writes,
            publish_errors,
            last_read: Mutex::new(None),
            registration_refused: Mutex::new(None),
            gpus_seen: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Record a successful read. Series of GPUs no longer read are removed (not the others, so
    /// a concurrent scrape never sees a GPU missing).
    pub fn observe_readings(&self, readings: &[GpuSample]) {
        let m = &self.0;
        let now: Vec<GpuLabels> = readings
            .iter()
            .map(|r| GpuLabels {
                gpu: r.uuid.clone(),
                index: r.index.to_string(),
            })
            .collect();
        for (r, labels) in readings.iter().zip(&now) {
            m.total.get_or_create(labels).set(to_i64(r.total_bytes));
            m.used.get_or_create(labels).set(to_i64(r.used_bytes));
            m.free.get_or_create(labels).set(to_i64(r.free_bytes));
            m.healthy
                .get_or_create(labels)
                .set(i64::from(r.health.is_healthy()));
        }
        if let Ok(mut seen) = m.gpus_seen.lock() {
            for gone in seen.iter().filter(|l| !now.contains(l)) {
                for family in [&m.total, &m.used, &m.free, &m.healthy, &m.allocated] {
                    family.remove(gone);
                }
            }
            *seen = now;
        }
        self.mark_read_at(Instant::now());
    }

    /// Record allocated bytes per GPU (uuid → (index, bytes)).
    pub fn observe_allocated(&self, allocated: &BTreeMap<String, (u32, u64)>) {
        for (uuid, (index, bytes)) in allocated {
            self.0
                .allocated
                .get_or_create(&GpuLabels {
                    gpu: uuid.clone(),
                    index: index.to_string(),
                })
                .set(to_i64(*bytes));
        }
    }

    /// Per-pod series; series of pods no longer listed are removed.
    pub fn observe_pods(&self, series: &[PodSeries]) {
        let m = &self.0;
        for (labels, used, limit, trusted) in series {
            match used {
                Some(u) => {
                    m.pod_used.get_or_create(labels).set(to_i64(*u));
                }
                None => {
                    m.pod_used.remove(labels);
                }
            }
            m.pod_limit.get_or_create(labels).set(to_i64(*limit));
            match trusted {
                Some(t) => {
                    m.pod_trusted.get_or_create(labels).set(i64::from(*t));
                }
                None => {
                    m.pod_trusted.remove(labels);
                }
            }
        }
        if let Ok(mut seen) = m.pods_seen.lock() {
            let now: Vec<PodGpuLabels> = series.iter().map(|s| s.0.clone()).collect();
            for gone in seen.iter().filter(|l| !now.contains(l)) {
                for family in [&m.pod_used, &m.pod_limit, &m.pod_trusted] {
                    family.remove(gone);
                }
            }
            *seen = now;
        }
    }

    /// The watchdog applied `action` to a breach.
    pub fn watchdog_breach(&self, action: &str) {
        self.0
            .watchdog_breaches
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .inc();
    }

    /// Registration state.
    pub fn set_registered(&self, registered: bool) {
        self.0.registered.set(i64::from(registered));
    }

    /// `count` more registrations the kubelet accepted.
    pub fn count_registrations(&self, count: u64) {
        self.0.registrations.inc_by(count);
    }

    /// The kubelet refuses the plugin's registration, with this error (`None`: it does not);
    /// `/healthz` fails while it does.
    pub fn set_registration_refused(&self, refused: Option<String>) {
        *self
            .0
            .registration_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = refused;
    }

    pub(crate) fn registration_refused(&self) -> Option<String> {
        self.0
            .registration_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A kubelet restart (or loss of our socket) was seen.
    pub fn kubelet_restart(&self) {
        self.0.kubelet_restarts.inc();
    }

    /// A backend read failed.
    pub fn backend_error(&self) {
        self.0.backend_errors.inc();
    }

    /// A GpuNode write happened.
    pub fn gpunode_written(&self, reason: &str) {
        self.0
            .gpunode_writes
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A GpuNode write failed.
    pub fn gpunode_write_failed(&self) {
        self.0.publish_errors.inc();
    }

    fn mark_read_at(&self, at: Instant) {
        *self.0.last_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// How long ago the backend was last read successfully; `None` before the first read.
    pub fn since_last_read(&self) -> Option<Duration> {
        let last = *self.0.last_read.lock().unwrap_or_else(|e| e.into_inner());
        last.map(|at| at.elapsed())
    }

    /// The metrics as OpenMetrics text (`/metrics` serves them as the scraper asks).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The metrics in the format the scraper's `Accept` asks for (the Prometheus text format unless
/// it prefers OpenMetrics).
async fn metrics_handler(State(metrics): State<Metrics>, headers: HeaderMap) -> impl IntoResponse {
    let format = Exposition::negotiate(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    (
        [(header::CONTENT_TYPE, format.content_type())],
        format.render(metrics.encode()),
    )
}

/// What `/healthz` reads: the metrics (when the backend was last read) and how often it is.
#[derive(Debug, Clone)]
struct Probe {
    metrics: Metrics,
    poll_interval: Duration,
}

/// 200 while the backend reads; 503 before the first reading, once reads have failed or hung
/// long enough that the backend is stalled ([`backend_stalled`]), and while the kubelet refuses
/// the plugin's registration: the kubelet's liveness probe then restarts the plugin.
async fn healthz(State(probe): State<Probe>) -> impl IntoResponse {
    if let Some(error) = probe.metrics.registration_refused() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the kubelet refused the plugin's registration: {error}\n"),
        );
    }
    match probe.metrics.since_last_read() {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first GPU reading\n".to_string(),
        ),
        Some(age) if backend_stalled(probe.poll_interval, age) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "GPU backend stalled: no successful reading for {}s (polling every {}ms)\n",
                age.as_secs(),
                probe.poll_interval.as_millis()
            ),
        ),
        Some(_) => (StatusCode::OK, "ok\n".to_string()),
    }
}

/// The HTTP routes; `/healthz` judges the backend stalled by `poll_interval`.
pub fn router(metrics: Metrics, poll_interval: Duration) -> Router {
    let probe = Probe {
        metrics: metrics.clone(),
        poll_interval,
    };
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
        .route("/healthz", get(healthz).with_state(probe))
}

/// Serve `/metrics` and `/healthz` on `addr` until `shutdown` fires. Returns the bound address
/// once listening (port 0 picks a free port) and the serving future.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    poll_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let serve =
        axum::serve(listener, router(metrics, poll_interval)).with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        });
    Ok((local, async move { serve.await }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_gpu::Health;

    #[test]
    fn metrics_are_prefixed_and_per_gpu() {
        let m = Metrics::new();
        m.observe_readings(&[GpuSample {
            index: 1,
            uuid: "GPU-a".into(),
            model: "m".into(),
            total_bytes: 80 << 30,
            used_bytes: 1 << 30,
            free_bytes: 79 << 30,
            health: Health::Unhealthy {
                reason: "XID".into(),
            },
            processes: Some(vec![]),
        }]);
        m.observe_allocated(&BTreeMap::from([("GPU-a".to_string(), (1, 2 << 30))]));
        m.set_registered(true);
        m.kubelet_restart();
        let text = m.encode();
        for want in [
            "vramslice_gpu_total_bytes{gpu=\"GPU-a\",index=\"1\"} 85899345920",
            "vramslice_gpu_used_bytes{gpu=\"GPU-a\",index=\"1\"} 1073741824",
            "vramslice_gpu_free_bytes{gpu=\"GPU-a\",index=\"1\"} 84825604096",
            "vramslice_gpu_allocated_bytes{gpu=\"GPU-a\",index=\"1\"} 2147483648",
            "vramslice_gpu_healthy{gpu=\"GPU-a\",index=\"1\"} 0",
            "vramslice_plugin_registered 1",
            "vramslice_kubelet_restarts_total 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(m.since_last_read().is_some());
        m.observe_readings(&[]);
        let text = m.encode();
        assert!(
            !text.contains("GPU-a"),
            "vanished GPU still exported:\n{text}"
        );
    }

    /// `/metrics` speaks the Prometheus text format to a plain GET and OpenMetrics to a
    /// scraper that prefers it.
    #[tokio::test]
    async fn metrics_answer_in_the_format_asked_for() {
        let m = Metrics::new();
        m.kubelet_restart();
        for (accept, want_type, want_counter) in [
            (
                None,
                "text/plain; version=0.0.4; charset=utf-8",
                "# TYPE vramslice_kubelet_restarts_total counter\n",
            ),
            (
                Some("application/openmetrics-text;version=1.0.0,*/*;q=0.1"),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                "# TYPE vramslice_kubelet_restarts counter\n",
            ),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(header::ACCEPT, accept.parse().expect("a header value"));
            }
            let response = metrics_handler(State(m.clone()), headers)
                .await
                .into_response();
            assert_eq!(response.headers()[header::CONTENT_TYPE], want_type);
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            assert!(body.contains(want_counter), "{accept:?}:\n{body}");
            assert!(
                body.contains("vramslice_kubelet_restarts_total 1\n"),
                "{body}"
            );
            assert_eq!(body.contains("# EOF"), accept.is_some(), "{body}");
        }
    }

    fn ago(secs: u64) -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs(secs))
            .expect("the clock has run that long")
    }

    async fn probe(metrics: &Metrics) -> (StatusCode, String) {
        let probe = Probe {
            metrics: metrics.clone(),
            poll_interval: Duration::from_millis(500),
        };
        let response = healthz(State(probe)).await.into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn healthz_fails_before_the_first_reading_and_once_the_backend_stalls() {
        let m = Metrics::new();
        let (status, body) = probe(&m).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("first GPU reading"), "{body}");
        m.observe_readings(&[]);
        assert_eq!(probe(&m).await.0, StatusCode::OK);
        // Reads failing since 30 s ago: not yet stalled (the floor is a minute).
        m.mark_read_at(ago(30));
        assert_eq!(probe(&m).await.0, StatusCode::OK);
        m.mark_read_at(ago(90));
        let (status, body) = probe(&m).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("stalled: no successful reading for 90s"),
            "{body}"
        );
        // A successful read makes it healthy again.
        m.observe_readings(&[]);
        assert_eq!(probe(&m).await.0, StatusCode::OK);
        // The kubelet refuses the registration (DRA mode): unhealthy whatever the backend does.
        m.observe_readings(&[]);
        m.set_registration_refused(Some("unsupported version".into()));
        let (status, body) = probe(&m).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("the kubelet refused the plugin's registration: unsupported version"),
            "{body}"
        );
        m.set_registration_refused(None);
        assert_eq!(probe(&m).await.0, StatusCode::OK);
    }
}
