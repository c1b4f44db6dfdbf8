//! Prometheus metrics of the extender (`vramslice_extender_*`): decisions by verb and outcome,
//! latency per verb, bind conflicts, and gauges of the ledger set at scrape time.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vramslice_webhook::WebhookMetrics;

/// Labels of a decision.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `filter`, `prioritize` or `bind`.
    pub verb: &'static str,
    /// What happened (see [`Outcome`]).
    pub outcome: &'static str,
}

/// Labels of a latency observation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// `filter`, `prioritize` or `bind`.
    pub verb: &'static str,
}

/// The outcome of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The pod asks for no VRAM: nodes passed unchanged / scored 0 / bound plainly.
    Ignored,
    /// Filter: at least one node fits. Prioritize: scored. Bind: bound.
    Ok,
    /// Filter: no node fits.
    NoFit,
    /// Bind: the re-check under the ledger lock refused (a racing bind won, or memory moved).
    Conflict,
    /// Filter: the pod's own request is invalid (a bad annotation, unit or split), so no node
    /// can take it.
    Invalid,
    /// The call failed (bad input, API error, not ready).
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ignored => "ignored",
            Outcome::Ok => "ok",
            Outcome::NoFit => "no_fit",
            Outcome::Conflict => "conflict",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 50 µs .. ~6.6 s: filter and prioritize take well under a millisecond, a bind waits
        // for the API server, up to kube-scheduler's extender timeout (5 s by default).
        Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
    }
}

/// The extender's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Family<VerbLabels, Histogram, LatencyBuckets>,
    bind_conflicts: Counter,
    ledger_pods: Gauge,
    ledger_reservations: Gauge,
    nodes: Gauge,
    stale_nodes: Gauge,
    webhook: WebhookMetrics,
}

/// Ledger figures for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LedgerFigures {
    /// Pods in the ledger.
    pub pods: usize,
    /// Reservations in flight.
    pub reservations: usize,
    /// Nodes with a valid reading.
    pub nodes: usize,
    /// Nodes whose reading is stale.
    pub stale_nodes: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vramslice_extender");
        let decisions = Family::<DecisionLabels, Counter>::default();
        let latency = Family::new_with_constructor(LatencyBuckets);
        let bind_conflicts = Counter::default();
        let (ledger_pods, ledger_reservations, nodes, stale_nodes) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "decisions",
            "Extender calls by verb and outcome",
            decisions.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer an extender call, by verb",
            latency.clone(),
        );
        registry.register(
            "bind_conflicts",
            "Binds refused by the re-check under the ledger lock",
            bind_conflicts.clone(),
        );
        registry.register(
            "ledger_pods",
            "Pods in the ledger (bound and reserved)",
            ledger_pods.clone(),
        );
        registry.register(
            "ledger_reservations",
            "Reservations of binds not yet seen bound",
            ledger_reservations.clone(),
        );
        registry.register(
            "nodes",
            "Nodes with a usable GpuNode reading",
            nodes.clone(),
        );
        registry.register(
            "stale_nodes",
            "Nodes whose GpuNode reading is older than the staleness bound",
            stale_nodes.clone(),
        );
        let webhook = WebhookMetrics::register(&mut registry);
        Metrics {
            registry,
            decisions,
            latency,
            bind_conflicts,
            ledger_pods,
            ledger_reservations,
            nodes,
            stale_nodes,
            webhook,
        }
    }

    /// The admission webhook's metrics, exported as `vramslice_extender_webhook_*`.
    pub fn webhook(&self) -> WebhookMetrics {
        self.webhook.clone()
    }

    /// Count one call and its latency.
    pub fn record(&self, verb: &'static str, outcome: Outcome, elapsed: Duration) {
        self.decisions
            .get_or_create(&DecisionLabels {
                verb,
                outcome: outcome.label(),
            })
            .inc();
        self.latency
            .get_or_create(&VerbLabels { verb })
            .observe(elapsed.as_secs_f64());
        if outcome == Outcome::Conflict {
            self.bind_conflicts.inc();
        }
    }

    /// Render the text exposition, with the ledger gauges set to `figures`.
    pub fn render(&self, figures: LedgerFigures) -> String {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.ledger_pods.set(as_i64(figures.pods));
        self.ledger_reservations.set(as_i64(figures.reservations));
        self.nodes.set(as_i64(figures.nodes));
        self.stale_nodes.set(as_i64(figures.stale_nodes));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# metrics encoding failed\n");
        }
        out
    }
}
