//! Publishes the node's live readings: every poll it joins the latest GPU readings with the
//! kubelet's allocation record (PodResources) and pod UIDs (API server, /proc cgroups), builds
//! the report with the core, updates the allocated-bytes metrics, and — when a kube client is
//! configured and the core's publish rule says so — writes the `GpuNode` status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use vramslice_api::convert::gpunode_status;
use vramslice_api::convert::node_pods::{
    init_phase_pods, plain_init_holds, running_pods_using, uids_by_name,
};
use vramslice_api::{GpuNode, GpuNodeSpec, GpuNodeStatus};
use vramslice_core::VramUnit;
use vramslice_core::node::init_limit::apply_init_limits;
use vramslice_core::node::publish::{
    ContainerAllocationRecord, NodeReport, PublishPolicy, add_claim_holdings, build_report,
    publish_reason,
};
use vramslice_core::node::sweep::unlisted_running_pods;
use vramslice_core::node::watchdog::{PodOnGpu, SelfReport};
use vramslice_gpu::procfs::ProcRoot;

use crate::metrics::Metrics;
use crate::pods::NodePods;
use crate::poller::NodeWatch;
use crate::sweeper::Sweeper;
use crate::watchdog::Watchdog;

/// How often pod UIDs may be re-listed when an unknown pod shows up.
const UID_REFRESH: Duration = Duration::from_secs(5);

/// The longest one API call of a poll may take (a GpuNode write, a pod list, an eviction): a
/// half-open connection to the API server would otherwise hold the whole loop, the watchdog and
/// the sweep with it, until TCP gives up.
pub(crate) const API_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// First and longest pause after a failed GpuNode write (doubling in between), so a broken API
/// server or missing RBAC does not turn into a write per poll.
const WRITE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// Everything the publisher needs.
#[derive(Debug)]
pub struct Publisher {
    /// Unit advertised.
    pub unit: VramUnit,
    /// When to write.
    pub policy: PublishPolicy,
    /// Kubelet PodResources socket.
    pub pod_resources_socket: PathBuf,
    /// Where PIDs are mapped to pods.
    pub proc_root: PathBuf,
    /// Readings.
    pub node: NodeWatch,
    /// Metrics.
    pub metrics: Metrics,
    /// API access for UIDs and writes; `None`: metrics only.
    pub kube: Option<NodePods>,
    /// Whether to write GpuNode objects (needs `kube`).
    pub write: bool,
    /// Compares measured usage with limits every poll and acts on breaches.
    pub watchdog: Watchdog,
    /// Deletes ended allocations' accounting files; `None`: kept forever.
    pub sweeper: Option<Sweeper>,
    /// In DRA mode, the driver whose prepared claims the report shows (the kubelet's record
    /// lists no device IDs for them).
    pub claims: Option<Arc<vramslice_dra::driver::Driver>>,
}

async fn ensure_gpunode(client: &kube::Client, node: &str) -> Result<(), kube::Error> {
    let owner = Api::<Node>::all(client.clone()).get(node).await?;
    let object = GpuNode {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid: owner.metadata.uid.unwrap_or_default(),
                controller: Some(false),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: GpuNodeSpec {
            node_name: node.to_string(),
        },
        status: None,
    };
    match Api::<GpuNode>::all(client.clone())
        .create(&PostParams::default(), &object)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

async fn write_status(
    client: &kube::Client,
    node: &str,
    status: &GpuNodeStatus,
) -> Result<(), kube::Error> {
    let api: Api<GpuNode> = Api::all(client.clone());
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    match api
        .patch_status(node, &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => {
            ensure_gpunode(client, node).await?;
            api.patch_status(node, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// What the publisher carries from one poll to the next.
#[derive(Debug, Default)]
struct PollState {
    /// The kubelet's allocations as last read (kept when PodResources fails).
    records: Vec<ContainerAllocationRecord>,
    /// Whether the last PodResources read failed (warn once per outage).
    pr_failing: bool,
    /// (namespace, name) → pod UID.
    uids: BTreeMap<(String, String), String>,
    /// When the UIDs were last listed from the API server.
    uids_at: Option<Instant>,
    /// The last report written, and when.
    last: Option<(NodeReport, Instant)>,
    /// Pause after failed writes, doubling.
    backoff: Duration,
    /// No write before this.
    retry_at: Option<Instant>,
    /// The last reading's generation and when this loop first saw it: how old it is, on the
    /// monotonic clock (the snapshot's `read_at` is wall-clock time, for the GpuNode).
    reading: Option<(u64, Instant)>,
}

impl PollState {
    /// How long ago the reading of `generation` was first seen (0 for a new one).
    fn reading_age(&mut self, generation: u64) -> Duration {
        match self.reading {
            Some((seen, at)) if seen == generation => at.elapsed(),
            _ => {
                self.reading = Some((generation, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

impl Publisher {
    /// Run until `shutdown` fires, once per `interval`.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let proc_root = ProcRoot::new(self.proc_root.clone());
        let mut state = PollState::default();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.poll(&mut state, &proc_root).await;
        }
    }

    /// One poll, in steps: the kubelet's allocations (and the sweep of ended ones), their pod
    /// UIDs, the report from the latest readings (with the limits of pods whose plain init
    /// container may still run raised to what it may use), the watchdog and metrics, and the
    /// GpuNode write when the publish rule asks for one.
    async fn poll(&mut self, state: &mut PollState, proc_root: &ProcRoot) {
        let snapshot = Arc::clone(&self.node.snapshot.borrow());
        if snapshot.generation == 0 {
            return;
        }
        let reading_age = state.reading_age(snapshot.generation);
        // The node's pods, as the watch cache holds them; `None` without a kube client or
        // before the cache has synced.
        let pods = self.kube.as_ref().and_then(NodePods::cached);
        self.read_allocations(state, pods.as_deref()).await;
        self.attach_pod_uids(state).await;
        let mut samples = snapshot.readings.clone();
        if samples
            .iter()
            .any(|r| r.listed_processes().iter().any(|p| p.pod_uid.is_none()))
        {
            proc_root.fill_pod_uids(&mut samples);
        }
        let mut report = build_report(self.unit, &samples, &state.records);
        if let Some(pods) = &pods {
            let initialising = init_phase_pods(pods, self.unit.resource_name());
            apply_init_limits(&mut report, &samples, &initialising);
        }
        if let Some(driver) = &self.claims {
            add_claim_holdings(&mut report, &samples, &driver.holdings().await);
        }
        let self_reports = self
            .watchdog
            .observe(&report, &samples, &state.records, reading_age)
            .await;
        self.observe_allocated(&report);
        self.publish(state, report, snapshot.read_at, &self_reports)
            .await;
    }

    /// Reads the kubelet's allocations (keeping the last known when PodResources fails) and
    /// sweeps the accounting files of allocations that ended, given the node's `pods` (`None`
    /// without a kube client or before its cache has synced).
    async fn read_allocations(&mut self, state: &mut PollState, pods: Option<&[Arc<Pod>]>) {
        let resource = self.unit.resource_name();
        match crate::podresources::list_allocations(&self.pod_resources_socket, resource).await {
            Ok(fresh) => {
                state.records = fresh;
                state.pr_failing = false;
                if let Some(sweeper) = &mut self.sweeper {
                    // Without a synced pod cache, plain init containers cannot be told: no sweep.
                    // With it, a kubelet record that misses a running VRAM pod is incomplete
                    // (a kubelet restarted without the API server): no sweep either.
                    let known = match (&self.kube, pods) {
                        (None, _) => Some((Vec::new(), Vec::new())),
                        (Some(_), pods) => pods.map(|pods| {
                            (
                                plain_init_holds(pods, resource),
                                running_pods_using(pods, resource),
                            )
                        }),
                    };
                    match known {
                        Some((init, running)) => {
                            let unlisted = unlisted_running_pods(&state.records, &running);
                            if unlisted.is_empty() {
                                sweeper.run(&state.records, &init).await;
                            } else {
                                sweeper.hold(&unlisted);
                            }
                        }
                        None => tracing::debug!("pod cache not synced; accounting sweep skipped"),
                    }
                }
            }
            Err(e) => {
                if !state.pr_failing {
                    tracing::warn!(error = %e, "cannot read allocations; keeping the last known");
                    state.pr_failing = true;
                }
            }
        }
    }

    /// Gives each allocation its pod's UID: from the pod cache, else (at most every
    /// [`UID_REFRESH`]) from a LIST.
    async fn attach_pod_uids(&self, state: &mut PollState) {
        if let Some(lister) = &self.kube {
            let cached = lister.cached();
            let list_due = state.uids_at.is_none_or(|t| t.elapsed() >= UID_REFRESH);
            if refresh_uids(&mut state.uids, cached.as_deref(), &state.records) && list_due {
                state.uids_at = Some(Instant::now());
                // Bounded, as every API call of the poll: the watchdog and the sweep run in the
                // same loop and must not wait on a half-open connection.
                match tokio::time::timeout(API_CALL_TIMEOUT, lister.list()).await {
                    Ok(Ok(pods)) => state.uids = uids_by_name(&pods),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot map pods to UIDs"),
                    Err(_) => {
                        tracing::warn!(timeout = ?API_CALL_TIMEOUT, "listing pods to map them to UIDs timed out")
                    }
                }
            }
        }
        for r in &mut state.records {
            r.pod_uid = state
                .uids
                .get(&(r.namespace.clone(), r.pod.clone()))
                .cloned();
        }
    }

    /// Allocated bytes per GPU, for the metrics.
    fn observe_allocated(&self, report: &NodeReport) {
        let allocated: BTreeMap<String, (u32, u64)> = report
            .gpus
            .iter()
            .map(|g| {
                (
                    g.uuid.clone(),
                    (g.index, self.unit.bytes_for(g.allocated_units)),
                )
            })
            .collect();
        self.metrics.observe_allocated(&allocated);
    }

    /// Writes the GpuNode status when the publish rule asks for it, backing off after failures.
    /// `observedAt` is when the GPUs were read (`read_at`), not when the status is written: a
    /// heartbeat while the backend fails republishes an old reading as old.
    async fn publish(
        &self,
        state: &mut PollState,
        report: NodeReport,
        read_at: Option<std::time::SystemTime>,
        self_reports: &BTreeMap<PodOnGpu, SelfReport>,
    ) {
        let Some(lister) = self.kube.as_ref().filter(|_| self.write) else {
            return;
        };
        if state.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let since = state
            .last
            .as_ref()
            .map(|(_, at)| at.elapsed())
            .unwrap_or_default();
        let Some(reason) = publish_reason(
            &self.policy,
            state.last.as_ref().map(|(r, _)| r),
            since,
            &report,
        ) else {
            return;
        };
        let observed_at = read_at
            .and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
            .unwrap_or_else(k8s_openapi::jiff::Timestamp::now)
            .to_string();
        let status = gpunode_status(&report, observed_at, self_reports);
        let written = tokio::time::timeout(
            API_CALL_TIMEOUT,
            write_status(lister.client(), lister.node(), &status),
        )
        .await
        .map_err(|_| format!("no answer within {}s", API_CALL_TIMEOUT.as_secs()))
        .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                tracing::info!(%reason, node = lister.node(), "published GpuNode status");
                self.metrics.gpunode_written(reason.label());
                state.last = Some((report, Instant::now()));
                state.backoff = Duration::ZERO;
                state.retry_at = None;
            }
            Err(e) => {
                self.metrics.gpunode_write_failed();
                state.backoff = (state.backoff * 2).clamp(WRITE_BACKOFF.0, WRITE_BACKOFF.1);
                state.retry_at = Some(Instant::now() + state.backoff);
                tracing::warn!(error = %e, node = lister.node(), retry_in = ?state.backoff, "cannot write GpuNode status");
            }
        }
    }
}

/// Pod UIDs by (namespace, name) for this poll: the watch cache's whenever it has synced (at
/// every poll, not only when a name is missing: a pod deleted and created again under its name,
/// as a StatefulSet's are, has a new UID). Returns whether some allocation's pod is still
/// unknown (a LIST should fill the map).
fn refresh_uids(
    uids: &mut BTreeMap<(String, String), String>,
    cached: Option<&[Arc<Pod>]>,
    records: &[ContainerAllocationRecord],
) -> bool {
    if let Some(cached) = cached {
        *uids = uids_by_name(cached);
    }
    records
        .iter()
        .any(|r| !uids.contains_key(&(r.namespace.clone(), r.pod.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_ages_from_when_its_generation_was_first_seen() {
        let mut state = PollState::default();
        assert_eq!(state.reading_age(1), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(20));
        assert!(state.reading_age(1) >= Duration::from_millis(20));
        assert_eq!(state.reading_age(2), Duration::ZERO, "a new read is fresh");
    }

    fn pod(name: &str, uid: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                namespace: Some("ml".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn record(pod: &str) -> ContainerAllocationRecord {
        ContainerAllocationRecord {
            namespace: "ml".into(),
            pod: pod.into(),
            device_ids: vec!["GPU-a::0".into()],
            pod_uid: None,
        }
    }

    #[test]
    fn a_pod_created_again_under_its_name_gets_its_new_uid_from_the_cache() {
        // Regression: the cache was read only when a name was missing, so llm-0 recreated by
        // its StatefulSet was published under its deleted predecessor's UID for good.
        let mut uids = BTreeMap::new();
        let records = [record("llm-0")];
        assert!(!refresh_uids(
            &mut uids,
            Some(&[pod("llm-0", "old")]),
            &records
        ));
        assert!(!refresh_uids(
            &mut uids,
            Some(&[pod("llm-0", "new")]),
            &records
        ));
        assert_eq!(uids[&("ml".to_string(), "llm-0".to_string())], "new");
        // Without a synced cache the last map stands, and an unknown pod asks for a LIST.
        assert!(!refresh_uids(&mut uids, None, &records));
        assert_eq!(uids[&("ml".to_string(), "llm-0".to_string())], "new");
        assert!(refresh_uids(&mut uids, None, &[record("llm-1")]), "a LIST");
    }
}
