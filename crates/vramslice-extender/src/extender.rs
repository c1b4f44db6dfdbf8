//! The extender's state and verbs, free of HTTP: the ledger behind one lock, readiness, the
//! clock, and filter / prioritize / bind over the wire types.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use vramslice_core::cluster::ledger::{Ledger, RefusalKind};
use vramslice_core::cluster::placement::{MAX_SCORE, PodRequest};
use vramslice_core::format_bytes;

use crate::cluster::ClusterApi;
use crate::config::Config;
use crate::convert::{RequestError, policy_of, wire_pod_request};
use crate::metrics::{LedgerFigures, Metrics, Outcome};
use crate::pending::{PendingPod, PendingPods};
mod bind;
pub mod handover;

use crate::wire::{
    ExtenderArgs, ExtenderFilterResult, HostPriority, NodeListOut, NodeName, Reason, WireNodeName,
    WirePod,
};

/// The admission webhook is configured but serves no certificate yet (or no more): with
/// `failurePolicy: Fail` every new VRAM pod is refused meanwhile, so `/readyz` says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not ready: the admission webhook serves no certificate yet")]
pub struct WebhookNotServing;

/// Which watches have not delivered their first list yet (the extender answers no placement
/// question until both have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not ready: waiting for the first list of {}", self.waiting_for())]
pub struct NotReady {
    /// The pod watch has not listed yet.
    pub pods: bool,
    /// The GpuNode watch has not listed yet.
    pub gpunodes: bool,
}

impl NotReady {
    fn waiting_for(&self) -> &'static str {
        match (self.pods, self.gpunodes) {
            (true, true) => "pods and GpuNodes",
            (true, false) => "pods",
            _ => "GpuNodes",
        }
    }
}

/// The clock the extender reads (tests and benchmarks supply their own).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A request kube-scheduler should not have sent: answered with 400 and this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The body is not the expected JSON.
    #[error("malformed {what} JSON: {detail}")]
    Malformed {
        /// The type expected.
        what: &'static str,
        /// serde's message.
        detail: String,
    },
    /// `ExtenderArgs` without `Pod`.
    #[error("ExtenderArgs has no Pod")]
    MissingPod,
    /// `ExtenderArgs` with neither candidate form.
    #[error("ExtenderArgs has neither Nodes nor NodeNames")]
    MissingNodes,
    /// A node in `Nodes` without `metadata.name`.
    #[error("Nodes.items[{0}] has no metadata.name")]
    UnnamedNode(usize),
    /// A binding request without a required field.
    #[error("ExtenderBindingArgs has no {0}")]
    MissingField(&'static str),
}

/// Where the extender is in its start-up.
#[derive(Debug, Default)]
struct Readiness {
    pods: AtomicBool,
    gpunodes: AtomicBool,
}

/// The extender: configuration, ledger, cluster access, metrics.
pub struct Extender {
    config: Config,
    ledger: RwLock<Ledger>,
    cluster: Arc<dyn ClusterApi>,
    clock: Clock,
    metrics: Metrics,
    ready: Readiness,
    pending: PendingPods,
    handover: handover::Handover,
    /// The pod this extender runs in (`POD_NAMESPACE`, `POD_NAME`), when known.
    own_pod: Option<(String, String)>,
}

/// Candidates of one call, in the form they came in.
enum Candidates<'a> {
    Names(&'a [NodeName<'a>]),
    Nodes(Vec<(String, &'a serde_json::value::RawValue)>),
}

impl Candidates<'_> {
    fn names(&self) -> Vec<&str> {
        match self {
            Candidates::Names(n) => n.iter().map(|c| c.as_ref()).collect(),
            Candidates::Nodes(n) => n.iter().map(|(name, _)| name.as_str()).collect(),
        }
    }
}

/// A parsed filter/prioritize call.
struct Call<'a> {
    pod: &'a WirePod,
    candidates: Candidates<'a>,
}

fn parse_args<'a>(args: &'a ExtenderArgs<'a>) -> Result<Call<'a>, BadRequest> {
    let pod = args.pod.as_ref().ok_or(BadRequest::MissingPod)?;
    let candidates = match (&args.node_names, &args.nodes) {
        (Some(names), _) => Candidates::Names(names),
        (None, Some(list)) => {
            let items = list.items.as_deref().unwrap_or_default();
            let mut nodes = Vec::with_capacity(items.len());
            for (i, raw) in items.iter().enumerate() {
                let named: WireNodeName =
                    serde_json::from_str(raw.get()).map_err(|e| BadRequest::Malformed {
                        what: "Node",
                        detail: e.to_string(),
                    })?;
                if named.metadata.name.is_empty() {
                    return Err(BadRequest::UnnamedNode(i));
                }
                nodes.push((named.metadata.name, *raw));
            }
            Candidates::Nodes(nodes)
        }
        (None, None) => return Err(BadRequest::MissingNodes),
    };
    Ok(Call { pod, candidates })
}

/// Parse a JSON body into `T`, naming the type on failure.
pub fn parse_body<'a, T: serde::Deserialize<'a>>(
    body: &'a [u8],
    what: &'static str,
) -> Result<T, BadRequest> {
    // serde would read a struct from an array too; the wire format is always an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(BadRequest::Malformed {
            what,
            detail: "expected a JSON object".into(),
        });
    }
    serde_json::from_slice(body).map_err(|e| BadRequest::Malformed {
        what,
        detail: e.to_string(),
    })
}

/// Refused nodes per filter call that get their own, detailed reason. kube-scheduler's
/// FailedScheduling message lists each distinct reason once, so a few detailed ones say what
/// is short where (`kubectl vramslice explain` has every node's); rendering one for a pod of a
/// new size costs about 2.5 µs, which at 100 per call was a quarter of the filter's time.
pub const DETAILED_REFUSALS: usize = 20;

/// The shared reasons for refused nodes past [`DETAILED_REFUSALS`], worded once per call and
/// kind of refusal. They are written once per refused node into the answer (5,000 times for a
/// pod no node can take), so they are kept short, but each names its cause (no reading, stale,
/// unhealthy, never, short of memory): the first refused nodes' detailed reasons say the rest.
struct BriefReasons {
    need: u64,
    gpus: u32,
    worded: BTreeMap<RefusalKind, Arc<str>>,
}

impl BriefReasons {
    /// Reasons for a pod needing `need` bytes on each of `gpus` GPUs.
    fn new(need: u64, gpus: u32) -> Self {
        BriefReasons {
            need,
            gpus,
            worded: BTreeMap::new(),
        }
    }

    fn reason(&mut self, kind: RefusalKind) -> Arc<str> {
        let (need, gpus) = (format_bytes(self.need), self.gpus);
        self.worded
            .entry(kind)
            .or_insert_with(|| {
                let text = match kind {
                    RefusalKind::NoReading => "no usable GpuNode reading".to_string(),
                    RefusalKind::Stale => "GpuNode reading is stale".to_string(),
                    RefusalKind::Unhealthy if gpus > 1 => {
                        format!("fewer than {gpus} healthy GPUs with {need}")
                    }
                    RefusalKind::Unhealthy => format!("no healthy GPU with {need}"),
                    RefusalKind::SameSizeWaiting => format!(
                        "a pod of this size over another number of GPUs waits for its units (this pod: {gpus} × {need})"
                    ),
                    RefusalKind::NeverFits if gpus > 1 => format!(
                        "never {gpus} GPUs with {need} each (too few that large, or another unit)"
                    ),
                    RefusalKind::NeverFits => {
                        format!("no GPU can ever take {need} (too large, or another unit)")
                    }
                    RefusalKind::Short if gpus > 1 => {
                        format!("no {gpus} GPUs with {need} effective free each")
                    }
                    RefusalKind::Short => format!("no GPU has {need} effective free"),
                };
                Arc::from(text)
            })
            .clone()
    }
}

impl Extender {
    /// An extender with an empty ledger, not ready until both watches report synced.
    pub fn new(config: Config, cluster: Arc<dyn ClusterApi>, clock: Clock) -> Self {
        Extender {
            ledger: RwLock::new(Ledger::new(config.ledger())),
            config,
            cluster,
            clock,
            metrics: Metrics::new(),
            ready: Readiness::default(),
            pending: PendingPods::new(),
            handover: handover::Handover::default(),
            own_pod: None,
        }
    }

    /// The pod this extender runs in: `/drain` is honoured only while it is terminating.
    pub fn with_own_pod(mut self, namespace: String, name: String) -> Self {
        self.own_pod = Some((namespace, name));
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The time now, by the extender's clock.
    pub fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Read access to the ledger (a poisoned lock is recovered: the ledger has no invariants a
    /// panicking reader could break).
    pub fn ledger(&self) -> RwLockReadGuard<'_, Ledger> {
        self.ledger.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Write access to the ledger.
    pub fn ledger_mut(&self) -> RwLockWriteGuard<'_, Ledger> {
        self.ledger.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod watch has listed every pod and the ledger holds them.
    pub fn mark_pods_synced(&self) {
        self.ready.pods.store(true, Ordering::SeqCst);
    }

    /// The GpuNode watch has listed every GpuNode and the ledger holds them.
    pub fn mark_gpunodes_synced(&self) {
        self.ready.gpunodes.store(true, Ordering::SeqCst);
    }

    /// `Ok` once both watches have synced and the ledger was rebuilt; else what is missing.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let not_ready = NotReady {
            pods: !self.ready.pods.load(Ordering::SeqCst),
            gpunodes: !self.ready.gpunodes.load(Ordering::SeqCst),
        };
        if not_ready.pods || not_ready.gpunodes {
            Err(not_ready)
        } else {
            Ok(())
        }
    }

    /// `/readyz`: [`Extender::readiness`], and the admission webhook serving when configured
    /// (placement itself does not wait for the webhook).
    pub fn probe_readiness(&self) -> Result<(), String> {
        self.readiness().map_err(|e| e.to_string())?;
        if self.config.webhook.is_some() && !self.metrics.webhook().is_serving() {
            return Err(WebhookNotServing.to_string());
        }
        Ok(())
    }

    /// The metrics (for recording and rendering).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Render `/metrics`.
    pub fn render_metrics(&self) -> String {
        let now = self.now();
        let figures = {
            let ledger = self.ledger();
            LedgerFigures {
                pods: ledger.pod_count(),
                reservations: ledger.reservation_count(),
                nodes: ledger.node_count(),
                stale_nodes: ledger.stale_node_count(now),
            }
        };
        self.metrics.render(figures)
    }

    fn request_of(&self, pod: &WirePod) -> Result<Option<PodRequest>, RequestError> {
        wire_pod_request(pod, &self.config.resources)
    }

    /// Remember a filtered pod for its bind (only pods whose request and policy read cleanly:
    /// the others take bind's slow path, which reads the pod and names the problem).
    fn remember_pending(&self, pod: &WirePod, request: Option<PodRequest>) {
        let meta = &pod.metadata;
        let policy = match request {
            None => self.config.policy,
            Some(_) => {
                let who = format!("{}/{}", meta.namespace, meta.name);
                match policy_of(&who, meta.annotations.as_ref(), self.config.policy) {
                    Ok(policy) => policy,
                    Err(_) => return,
                }
            }
        };
        let pending = PendingPod {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            request,
            policy,
        };
        self.pending.remember(&meta.uid, pending, self.now());
    }

    /// How many filtered pods are remembered for their bind.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The filter verb: the JSON answer, and the outcome for metrics. The first
    /// [`DETAILED_REFUSALS`] refused nodes get their own reason; the rest share one per kind
    /// (rendering thousands of per-node reasons for a pod of a new size took milliseconds, and
    /// kube-scheduler's "0/N nodes are available" message groups identical reasons).
    pub fn filter(&self, body: &[u8]) -> Result<(String, Outcome), BadRequest> {
        let args: ExtenderArgs = parse_body(body, "ExtenderArgs")?;
        let call = parse_args(&args)?;
        let names = call.candidates.names();
        let mut result = ExtenderFilterResult::default();
        let mut passed: Vec<usize> = Vec::with_capacity(names.len());
        let meta = &call.pod.metadata;
        let request = self.request_of(call.pod).and_then(|r| {
            // A bad `vramslice.io/policy` annotation is the pod's mistake as much as a bad
            // request: named here, rather than failing every bind after a passing filter.
            if r.is_some() {
                let who = format!("{}/{}", meta.namespace, meta.name);
                policy_of(&who, meta.annotations.as_ref(), self.config.policy)?;
            }
            Ok(r)
        });
        if let Ok(request) = request {
            self.remember_pending(call.pod, request);
        }
        let outcome = match (self.readiness(), request) {
            (_, Ok(None)) => {
                passed.extend(0..names.len());
                Outcome::Ignored
            }
            (Err(not_ready), _) => {
                result.error = format!("vramslice extender {not_ready}");
                Outcome::Error
            }
            (_, Err(bad)) => {
                // The pod's own mistake: no node can take it until the pod changes. Every node
                // is unresolvable with the reason, so kube-scheduler parks the pod as
                // unschedulable with the reason in its event, instead of an `Error` that it
                // would retry at every backoff.
                let reason: Arc<str> = Arc::from(bad.to_string());
                for name in &names {
                    result
                        .failed_and_unresolvable_nodes
                        .insert(name, Reason(reason.clone()));
                }
                Outcome::Invalid
            }
            (Ok(()), Ok(Some(request))) => {
                let now = self.now();
                let ledger = self.ledger();
                // Per GPU: the whole request, or its share on each GPU of a spanning pod.
                let need = request.share_bytes();
                match ledger.largest_gpu_bytes() {
                    Some(largest) if need > largest => {
                        let each = if request.gpus > 1 {
                            " on each of its GPUs"
                        } else {
                            ""
                        };
                        let reason = format!(
                            "pod needs {}{each}, more than the largest GPU in the cluster advertises ({})",
                            format_bytes(need),
                            format_bytes(largest)
                        );
                        let reason: Arc<str> = Arc::from(reason);
                        for name in &names {
                            result
                                .failed_and_unresolvable_nodes
                                .insert(name, Reason(reason.clone()));
                        }
                    }
                    _ => {
                        let mut briefly = BriefReasons::new(need, request.gpus);
                        let mut detailed = 0usize;
                        let probe = ledger.probe(request, now);
                        for (i, name) in names.iter().enumerate() {
                            let refusal = if detailed < DETAILED_REFUSALS {
                                probe.check_rendered(name).map_err(|r| {
                                    detailed += 1;
                                    (r.unresolvable, r.reason)
                                })
                            } else {
                                match probe.refusal(name) {
                                    None => Ok(()),
                                    Some(kind) => {
                                        Err((kind.is_unresolvable(), briefly.reason(kind)))
                                    }
                                }
                            };
                            match refusal {
                                Ok(()) => passed.push(i),
                                Err((true, reason)) => {
                                    result
                                        .failed_and_unresolvable_nodes
                                        .insert(name, Reason(reason));
                                }
                                Err((false, reason)) => {
                                    result.failed_nodes.insert(name, Reason(reason));
                                }
                            }
                        }
                        if passed.is_empty()
                            && let Some(waiting) = names.iter().find(|name| {
                                probe.refusal(name) == Some(RefusalKind::SameSizeWaiting)
                            })
                            && let Err(why) = probe.check(waiting)
                        {
                            // Not unschedulable but not yet: a scheduler error sends the pod to
                            // the backoff queue (retried within seconds), where a refusal would
                            // park it until some cluster event kube-scheduler watches for.
                            result.error = format!("{why}; retried shortly");
                        }
                    }
                }
                if passed.is_empty() {
                    Outcome::NoFit
                } else {
                    Outcome::Ok
                }
            }
        };
        tracing::debug!(
            pod = %format_args!("{}/{}", call.pod.metadata.namespace, call.pod.metadata.name),
            candidates = names.len(),
            passed = passed.len(),
            failed = result.failed_nodes.len(),
            unresolvable = result.failed_and_unresolvable_nodes.len(),
            error = %result.error,
            "filter"
        );
        match &call.candidates {
            Candidates::Names(_) => {
                result.node_names = Some(passed.iter().map(|i| names[*i]).collect());
            }
            Candidates::Nodes(nodes) => {
                result.nodes = Some(NodeListOut {
                    metadata: BTreeMap::new(),
                    items: passed.iter().map(|i| nodes[*i].1).collect(),
                });
            }
        }
        let json = serde_json::to_string(&result).map_err(|e| BadRequest::Malformed {
            what: "ExtenderFilterResult",
            detail: e.to_string(),
        })?;
        Ok((json, outcome))
    }

    /// The prioritize verb: scores 0..=10 per candidate, in the order given (the JSON answer).
    pub fn prioritize(&self, body: &[u8]) -> Result<(String, Outcome), BadRequest> {
        let args: ExtenderArgs = parse_body(body, "ExtenderArgs")?;
        let call = parse_args(&args)?;
        let names = call.candidates.names();
        let scored = |score: &dyn Fn(&str) -> u8| -> Vec<HostPriority<'_>> {
            names
                .iter()
                .map(|n| HostPriority {
                    host: Cow::Borrowed(*n),
                    score: i64::from(score(n).min(MAX_SCORE)),
                })
                .collect()
        };
        let policy = || {
            let who = format!("{}/{}", call.pod.metadata.namespace, call.pod.metadata.name);
            policy_of(
                &who,
                call.pod.metadata.annotations.as_ref(),
                self.config.policy,
            )
        };
        let (list, outcome) = match (self.readiness(), self.request_of(call.pod), policy()) {
            (_, Ok(None), _) => (scored(&|_| 0), Outcome::Ignored),
            (Err(_), _, _) | (_, Err(_), _) | (_, _, Err(_)) => (scored(&|_| 0), Outcome::Error),
            (Ok(()), Ok(Some(request)), Ok(policy)) => {
                let now = self.now();
                let ledger = self.ledger();
                let probe = ledger.probe(request, now);
                (scored(&|n| probe.score(n, policy)), Outcome::Ok)
            }
        };
        let json = serde_json::to_string(&list).map_err(|e| BadRequest::Malformed {
            what: "HostPriorityList",
            detail: e.to_string(),
        })?;
        Ok((json, outcome))
    }
}
