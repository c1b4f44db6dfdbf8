//! The runtime's Prometheus metrics (names prefixed `vramslice_sidecar_`), rendered as text for
//! the embedder's `/metrics` or the runtime's own port.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The HTTP content type of [`Metrics::render`]'s text: OpenMetrics. Prometheus reads the
/// counters' `_total` samples as untyped when the same text is served as `text/plain`; an
/// embedder that must answer plain clients in the classic format converts it with
/// [`Exposition`](vramslice_core::exposition::Exposition), as the runtime's own port does.
pub const METRICS_CONTENT_TYPE: &str = vramslice_core::exposition::OPENMETRICS_CONTENT_TYPE;

/// Why a job was refused admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// It needs more than the runtime ever admits.
    NeverFits,
    /// The queue held its maximum of waiting jobs.
    QueueFull,
    /// It waited its timeout without memory freeing.
    Timeout,
}

impl RejectReason {
    fn label(self) -> &'static str {
        match self {
            RejectReason::NeverFits => "never_fits",
            RejectReason::QueueFull => "queue_full",
            RejectReason::Timeout => "timeout",
        }
    }
}

/// The label of the refusals counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: &'static str,
}

/// Every metric the runtime keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Bytes in use or held now: live usage, or what running jobs hold (their reservations on
    /// top of the usage when they started) when that is larger.
    pub used_bytes: Gauge<u64, AtomicU64>,
    /// Bytes still admissible below the high-water mark.
    pub available_bytes: Gauge<u64, AtomicU64>,
    /// The limit in bytes.
    pub limit_bytes: Gauge<u64, AtomicU64>,
    /// Jobs holding a reservation.
    pub jobs_running: Gauge<u64, AtomicU64>,
    /// Jobs waiting for admission.
    pub jobs_queued: Gauge<u64, AtomicU64>,
    /// Seconds from request to admission (admitted jobs only).
    pub admission_wait: Histogram,
    /// Seconds a job held its reservation.
    pub job_duration: Histogram,
    /// Jobs refused, by reason.
    rejected: Family<RejectLabels, Counter>,
    /// Out-of-memory errors seen by jobs.
    pub oom_errors: Counter,
    /// Retries after out-of-memory.
    pub retries: Counter,
    /// Admissions sized from a learned peak.
    pub profile_hits: Counter,
    /// Admissions with no learned peak.
    pub profile_misses: Counter,
    /// Calls of the reclaim hook for a job that did not fit while no job ran.
    pub reclaims: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered under `vramslice_sidecar_`.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("vramslice_sidecar");
        let m = Self {
            used_bytes: Gauge::default(),
            available_bytes: Gauge::default(),
            limit_bytes: Gauge::default(),
            jobs_running: Gauge::default(),
            jobs_queued: Gauge::default(),
            admission_wait: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
            job_duration: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            rejected: Family::default(),
            oom_errors: Counter::default(),
            retries: Counter::default(),
            profile_hits: Counter::default(),
            profile_misses: Counter::default(),
            reclaims: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "used_bytes",
            "GPU memory in use by this container, or held by its running jobs when more",
            m.used_bytes.clone(),
        );
        r.register(
            "available_bytes",
            "GPU memory still admissible below the high-water mark",
            m.available_bytes.clone(),
        );
        r.register(
            "limit_bytes",
            "The container's GPU memory limit",
            m.limit_bytes.clone(),
        );
        r.register(
            "jobs_running",
            "Jobs holding a memory reservation",
            m.jobs_running.clone(),
        );
        r.register(
            "jobs_queued",
            "Jobs waiting for admission",
            m.jobs_queued.clone(),
        );
        r.register(
            "admission_wait_seconds",
            "Time from request to admission",
            m.admission_wait.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Time a job held its reservation",
            m.job_duration.clone(),
        );
        r.register(
            "admission_rejected",
            "Jobs refused admission, by reason: never_fits, queue_full or timeout",
            m.rejected.clone(),
        );
        r.register(
            "oom_errors",
            "Out-of-memory errors seen by jobs",
            m.oom_errors.clone(),
        );
        r.register(
            "retries",
            "Retries after out-of-memory errors",
            m.retries.clone(),
        );
        r.register(
            "profile_hits",
            "Admissions sized from a learned peak",
            m.profile_hits.clone(),
        );
        r.register(
            "profile_misses",
            "Admissions with no learned peak",
            m.profile_misses.clone(),
        );
        r.register(
            "reclaims",
            "Reclaim hook calls for a job that did not fit while no job ran",
            m.reclaims.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }

    /// Count a refused job.
    pub fn reject(&self, reason: RejectReason) {
        let labels = RejectLabels {
            reason: reason.label(),
        };
        self.rejected.get_or_create(&labels).inc();
    }

    /// The metrics as OpenMetrics text (ending in `# EOF`); served as [`METRICS_CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_value() {
        let m = Metrics::new();
        m.used_bytes.set(1024);
        m.oom_errors.inc();
        m.retries.inc_by(2);
        m.job_duration.observe(0.5);
        let text = m.render();
        for needle in [
            "vramslice_sidecar_used_bytes 1024",
            "vramslice_sidecar_available_bytes 0",
            "vramslice_sidecar_jobs_running 0",
            "vramslice_sidecar_jobs_queued 0",
            "vramslice_sidecar_oom_errors_total 1",
            "vramslice_sidecar_retries_total 2",
            "vramslice_sidecar_profile_hits_total 0",
            "vramslice_sidecar_profile_misses_total 0",
            "vramslice_sidecar_reclaims_total 0",
            "vramslice_sidecar_job_duration_seconds_count 1",
            "vramslice_sidecar_admission_wait_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
