//! DRA mode: the node agent serves the kubelet's DRA plugin API (`vramslice-dra`) instead of
//! the device-plugin API, and keeps the node's ResourceSlice in step with the measurement. The
//! backend, poller, `GpuNode` readings and metrics are the same as in device-plugin mode.
//!
//! Each new GPU snapshot: processes get their pods from `/proc`, the driver learns the GPUs,
//! the prepared claims say what they hold and use per GPU, the core turns that into the
//! slice's devices and capacities, and the publisher writes the slice when it changed enough.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use vramslice_api::convert::dra::SliceSettings;
use vramslice_core::node::dra::{
    SlicePublishReason, mark_unread, reading_staleness_bound, slice_devices,
};
use vramslice_dra::claims::KubeClaims;
use vramslice_dra::driver::{Driver, DriverConfig};
use vramslice_dra::registration::KubeletRegistration;
use vramslice_dra::serve::{ServeError, Sockets, serve_with_registrations};
use vramslice_dra::slices::{KubeSlices, SlicePolicy, SlicePublisher, SliceWriter};
use vramslice_gpu::procfs::ProcRoot;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::poller::NodeWatch;

/// How often the node's ResourceSlice is checked while nothing needs writing (see
/// `SlicePolicy::verify_interval`).
const SLICE_VERIFY_INTERVAL: Duration = Duration::from_secs(30);
/// How soon a failed slice write is tried again when no new reading would trigger it.
const SLICE_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How long the slice loop waits for the Node when it reads its UID again.
const NODE_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often prepared claims are read again for the pods they are reserved for now, and
/// released when gone for good (`Driver::reconcile_prepared_claims`): one GET per prepared
/// claim of this node.
const CLAIM_PODS_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Why DRA mode could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DraModeError {
    /// The prepared-claims checkpoint is unreadable.
    #[error(transparent)]
    Checkpoint(#[from] vramslice_dra::checkpoint::CheckpointError),
    /// The plugin sockets failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The DRA driver of this node, with the claims its checkpoint says are prepared.
///
/// # Errors
/// [`DraModeError::Checkpoint`] when the checkpoint exists but cannot be read.
pub fn open_driver(
    settings: &Settings,
    client: kube::Client,
    node_name: &str,
) -> Result<Arc<Driver>, DraModeError> {
    Ok(Arc::new(Driver::open(
        DriverConfig {
            node: node_name.to_string(),
            settings: settings.allocation.clone(),
            cdi_dir: settings.dra.cdi_dir.clone(),
            checkpoint: settings.dra.checkpoint.clone(),
        },
        Arc::new(KubeClaims::new(client)),
    )?))
}

/// Who this agent is for the slice: the API, its node, and what it knows of the GPU driver.
pub struct NodeIdentity {
    /// The API client.
    pub client: kube::Client,
    /// The node's name (the pool's).
    pub node_name: String,
    /// The GPU driver's version as the backend reports it, when it does.
    pub driver_version: Option<String>,
}

/// Serve the DRA plugin and keep the slice until `shutdown` fires.
pub async fn run(
    settings: &Settings,
    driver: Arc<Driver>,
    identity: NodeIdentity,
    node: NodeWatch,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> Result<(), DraModeError> {
    let NodeIdentity {
        client,
        node_name,
        driver_version,
    } = identity;
    driver.set_gpus(&node.snapshot.borrow().readings);
    driver.learn_admin_access().await;
    let owner = NodeOwner {
        client: client.clone(),
        name: node_name.clone(),
    };
    // Bounded like the loop's reads: the kubelet is served only after this.
    let node_uid = owner.uid().await;
    let publisher = SlicePublisher::new(
        KubeSlices::new(client),
        SliceSettings {
            node: node_name,
            node_uid,
            step_bytes: settings.unit.bytes(),
            generation: 0,
            driver_version,
        },
        SlicePolicy {
            threshold_bytes: settings.dra.publish_threshold_bytes,
            min_interval: settings.dra.min_publish_interval,
            verify_interval: SLICE_VERIFY_INTERVAL,
        },
    );
    let (registrations, registered) = watch::channel(KubeletRegistration::default());
    let reported = tokio::spawn(report_registrations(registrations.subscribe(), metrics));
    let refresh = tokio::spawn(reconcile_claims(
        Arc::clone(&driver),
        CLAIM_PODS_REFRESH_INTERVAL,
        shutdown.clone(),
    ));
    let slices = tokio::spawn(keep_slice(
        Arc::clone(&driver),
        publisher,
        SliceTriggers {
            node,
            registered,
            owner,
        },
        SliceRules {
            proc_root: ProcRoot::new(settings.proc_root.clone()),
            step: settings.unit.bytes(),
            headroom: settings.dra.headroom_bytes,
            staleness: reading_staleness_bound(settings.poll_interval),
        },
        shutdown.clone(),
    ));
    let sockets = Sockets {
        registry_dir: settings.dra.registry_dir.clone(),
        plugin_dir: settings.dra.plugin_dir.clone(),
    };
    let served = serve_with_registrations(driver, &sockets, registrations, shutdown).await;
    // Ended by shutdown, or failed (a socket could not be bound): either way the slice loop
    // stops with it, and a failure is reported (the agent exits and is restarted).
    slices.abort();
    refresh.abort();
    reported.abort();
    let _ = slices.await;
    served.map_err(DraModeError::from)
}

/// Keep the metrics (`vramslice_plugin_registered`, and `/healthz` failing while the kubelet
/// refuses the plugin: the liveness probe restarts the agent, whose new registration socket
/// the kubelet's plugin watcher tries again) in step with what the kubelet says.
async fn report_registrations(
    mut registrations: watch::Receiver<KubeletRegistration>,
    metrics: Metrics,
) {
    let mut counted = 0;
    loop {
        let state = registrations.borrow_and_update().clone();
        metrics.count_registrations(state.confirmed.saturating_sub(counted));
        counted = state.confirmed;
        metrics.set_registered(state.registered());
        metrics.set_registration_refused(state.refused);
        if registrations.changed().await.is_err() {
            return;
        }
    }
}

/// Every `interval` until `shutdown` fires, reconcile the prepared claims with the API
/// server (their pods now; claims gone for good released).
async fn reconcile_claims(
    driver: Arc<Driver>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
        driver.reconcile_prepared_claims().await;
    }
}

/// The Node's UID (the slice's owner), `None` when it cannot be read.
async fn node_uid(client: &kube::Client, node_name: &str) -> Option<String> {
    match Api::<Node>::all(client.clone()).get_opt(node_name).await {
        Ok(found) => found.and_then(|n| n.metadata.uid),
        Err(e) => {
            tracing::warn!(node = %node_name, error = %e, "cannot read the Node: the slice keeps the owner it had");
            None
        }
    }
}

/// Where the slice's owner is read again.
struct NodeOwner {
    client: kube::Client,
    name: String,
}

/// Where the slice loop reads the Node's UID again (the API server; a stub in tests).
trait NodeUidSource: Send + 'static {
    /// The Node's UID now; `None` when it cannot be read within a few seconds (the slice
    /// loop must not wait on a slow API server).
    fn uid(&self) -> impl std::future::Future<Output = Option<String>> + Send;
}

impl NodeUidSource for NodeOwner {
    async fn uid(&self) -> Option<String> {
        tokio::time::timeout(NODE_READ_TIMEOUT, node_uid(&self.client, &self.name))
            .await
            .ok()
            .flatten()
    }
}

/// What makes the slice be looked at again: a new GPU snapshot, or a registration the kubelet
/// confirmed (a starting kubelet deletes its node's slices, so ours is written again, owned by
/// the Node as it is now: a kubelet started after `kubectl delete node` made it again).
struct SliceTriggers<O> {
    node: NodeWatch,
    registered: watch::Receiver<KubeletRegistration>,
    owner: O,
}

/// How the slice's devices are worked out from a reading.
struct SliceRules {
    proc_root: ProcRoot,
    step: u64,
    headroom: u64,
    /// A reading older than this taints every GPU ([`mark_unread`]).
    staleness: Duration,
}

async fn keep_slice<W: SliceWriter, O: NodeUidSource>(
    driver: Arc<Driver>,
    mut publisher: SlicePublisher<W>,
    triggers: SliceTriggers<O>,
    rules: SliceRules,
    mut shutdown: watch::Receiver<bool>,
) {
    let SliceTriggers {
        mut node,
        mut registered,
        owner,
    } = triggers;
    // When the reading in hand arrived (a failing or hung backend sends none). Tokio's clock,
    // so that tests can move it.
    let mut reading = (0u64, Instant::now());
    let mut writes_before = 0u64;
    let mut registrations_open = true;
    let mut confirmed = registered.borrow_and_update().confirmed;
    let mut owner_read: Option<Instant> = None;
    loop {
        // The Node could not be read when the agent started: read it again until it is, or
        // the slice stays without its owner (and outlives a deleted Node). At most once per
        // verify interval: a read that fails slowly must not hold back the slice's writes.
        if !publisher.has_owner()
            && owner_read.is_none_or(|at| at.elapsed() >= SLICE_VERIFY_INTERVAL)
        {
            owner_read = Some(Instant::now());
            publisher.set_node_uid(owner.uid().await);
        }
        let snapshot = Arc::clone(&node.snapshot.borrow_and_update());
        if snapshot.generation != reading.0 {
            reading = (snapshot.generation, Instant::now());
        }
        let age = reading.1.elapsed();
        let mut written = true;
        if snapshot.generation > 0 {
            let mut samples = snapshot.readings.clone();
            rules.proc_root.fill_pod_uids(&mut samples);
            driver.set_gpus(&samples);
            let grants = driver.grants_by_gpu(&samples).await;
            let devices = mark_unread(
                slice_devices(&samples, &grants, rules.step, rules.headroom),
                age,
                rules.staleness,
            );
            match publisher.observe(devices, Instant::now().into_std()).await {
                // Written whole again after the first time: the slice was gone (a kubelet's
                // wipe, or the garbage collector because its owner is: a Node made again).
                Ok(Some(SlicePublishReason::First)) if writes_before > 0 => {
                    if publisher.set_node_uid(owner.uid().await) {
                        // Written with the old owner just now: write it again at once.
                        writes_before = publisher.writes();
                        continue;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ResourceSlice not written; retrying");
                    written = false;
                }
            }
            writes_before = publisher.writes();
        }
        // Wake when the reading in hand goes stale. While it is stale, or after a failed
        // write, wake again after a while: no new reading may come to retry the taint.
        let now = Instant::now();
        let wake = if !written {
            now + SLICE_RETRY_INTERVAL
        } else if age < rules.staleness {
            reading.1 + rules.staleness
        } else {
            now + SLICE_VERIFY_INTERVAL
        };
        // A change the pace held back is written when its wait is over, reading or not.
        let wake = publisher
            .deferred_until()
            .map_or(wake, |due| wake.min(Instant::from_std(due)));
        tokio::select! {
            changed = node.snapshot.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(wake) => {}
            // Registered (again) with the kubelet, which deleted the node's slices when it
            // started: write ours again.
            changed = registered.changed(), if registrations_open => if changed.is_ok() {
                let now = registered.borrow_and_update().confirmed;
                if now != confirmed {
                    confirmed = now;
                    let _ = publisher.set_node_uid(owner.uid().await);
                    publisher.republish();
                }
            } else {
                // The server is gone (it failed; `run` ends this loop next): a closed channel
                // would otherwise answer at once on every turn.
                registrations_open = false;
            },
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    use k8s_openapi::api::resource::v1::ResourceSlice;
    use vramslice_core::VramUnit;
    use vramslice_core::node::allocation::{AllocationSettings, DeviceListStrategy, InjectionMode};
    use vramslice_dra::claims::{ClaimFuture, ClaimSource, FetchError, PodFuture};
    use vramslice_dra::slices::MemorySlices;
    use vramslice_gpu::{GpuSample, Health};

    use crate::poller::NodeState;

    const GIB: u64 = 1 << 30;

    struct NoClaims;

    impl ClaimSource for NoClaims {
        fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> ClaimFuture<'a> {
            Box::pin(async move { Err(FetchError::NotFound(format!("{namespace}/{name}"))) })
        }
        fn pod<'a>(&'a self, _namespace: &'a str, _name: &'a str) -> PodFuture<'a> {
            Box::pin(async { Ok(None) })
        }
    }

    /// The Node's UID as the API server would answer now.
    #[derive(Clone)]
    struct NodeNow(Arc<std::sync::Mutex<String>>);

    impl NodeUidSource for NodeNow {
        /// `None` while the UID is empty (the Node cannot be read).
        async fn uid(&self) -> Option<String> {
            Some(self.0.lock().unwrap().clone()).filter(|uid| !uid.is_empty())
        }
    }

    fn tainted(slice: &ResourceSlice) -> bool {
        slice
            .spec
            .devices
            .iter()
            .flatten()
            .all(|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()))
    }

    fn owner(slice: &ResourceSlice) -> String {
        slice.metadata.owner_references.as_ref().unwrap()[0]
            .uid
            .clone()
    }

    fn h100() -> Vec<GpuSample> {
        vec![GpuSample {
            index: 0,
            uuid: "GPU-0".into(),
            model: "NVIDIA H100".into(),
            total_bytes: 80 * GIB,
            used_bytes: 0,
            free_bytes: 80 * GIB,
            health: Health::Healthy,
            processes: Some(Vec::new()),
        }]
    }

    /// keep_slice on one H100 reading, with the slices in memory, on tokio's (paused) clock.
    struct Loop {
        slices: MemorySlices,
        node: NodeNow,
        readings: NodeState,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        registrations: watch::Sender<KubeletRegistration>,
        _root: tempfile::TempDir,
    }

    impl Loop {
        fn start() -> Loop {
            Self::start_owned_by(Some("node-uid"))
        }

        /// The loop, with the Node's UID as read at start (`None`: it could not be read).
        fn start_owned_by(owner: Option<&str>) -> Loop {
            let root = tempfile::tempdir().unwrap();
            let driver = Arc::new(
                Driver::open(
                    DriverConfig {
                        node: "node-a".into(),
                        settings: AllocationSettings {
                            injection: InjectionMode::LdPreloadEnv,
                            device_list_strategy: DeviceListStrategy::Envvar,
                            guard_library_host_path: root.path().join("guard.so"),
                            preload_file_host_path: root.path().join("ld.so.preload"),
                            accounting_root: root.path().join("accounting"),
                        },
                        cdi_dir: root.path().join("cdi"),
                        checkpoint: root.path().join("checkpoint.json"),
                    },
                    Arc::new(NoClaims),
                )
                .unwrap(),
            );
            let slices = MemorySlices::default();
            let publisher = SlicePublisher::new(
                slices.clone(),
                SliceSettings {
                    node: "node-a".into(),
                    node_uid: owner.map(str::to_string),
                    step_bytes: GIB,
                    generation: 0,
                    driver_version: None,
                },
                SlicePolicy {
                    threshold_bytes: GIB,
                    min_interval: Duration::from_secs(2),
                    verify_interval: SLICE_VERIFY_INTERVAL,
                },
            );
            let (readings, watch) = NodeState::new(VramUnit::Gib1);
            readings.apply(h100());
            let (registrations, registered) = watch::channel(KubeletRegistration::default());
            let (stop, shutdown) = watch::channel(false);
            let node = NodeNow(Arc::new(std::sync::Mutex::new(
                owner.unwrap_or_default().to_string(),
            )));
            let task = tokio::spawn(keep_slice(
                driver,
                publisher,
                SliceTriggers {
                    node: watch,
                    registered,
                    owner: node.clone(),
                },
                SliceRules {
                    proc_root: ProcRoot::new(root.path().join("proc")),
                    step: GIB,
                    headroom: 0,
                    staleness: reading_staleness_bound(Duration::from_secs(10)),
                },
                shutdown,
            ));
            Loop {
                slices,
                node,
                readings,
                stop,
                task,
                registrations,
                _root: root,
            }
        }

        async fn stop(self) {
            self.stop.send(true).unwrap();
            self.task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_nobody_renews_taints_the_slice_even_when_the_first_write_fails() {
        let l = Loop::start();
        let staleness = reading_staleness_bound(Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.slices.written().len(), 1);
        assert!(!tainted(&l.slices.written()[0]));
        // No reading comes any more (the backend hangs), and the write of the taint fails.
        l.slices.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(staleness).await;
        assert_eq!(l.slices.written().len(), 1);
        l.slices.failing.store(false, Ordering::SeqCst);
        tokio::time::sleep(SLICE_RETRY_INTERVAL * 2).await;
        let stored = l.slices.written();
        assert_eq!(
            stored.len(),
            2,
            "the taint was retried without a new reading"
        );
        assert!(tainted(&stored[1]));
        l.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_the_pace_held_back_is_written_when_its_wait_ends_without_a_new_reading() {
        let l = Loop::start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.slices.written().len(), 1);
        // 1 s after the first write, an outside process takes 10 GiB: a fall in capacity,
        // written once the minimum interval (2 s) since the last write has passed. No reading
        // comes after this one (a long pollInterval).
        let mut busy = h100();
        busy[0].used_bytes = 10 * GIB;
        busy[0].free_bytes = 70 * GIB;
        l.readings.apply(busy);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(l.slices.written().len(), 1, "held back by the pace");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stored = l.slices.written();
        assert_eq!(stored.len(), 2, "written when the wait ended");
        assert_ne!(stored[0].spec.devices, stored[1].spec.devices);
        l.stop().await;
    }

    /// A starting kubelet deletes the node's slices and then confirms the registration: the
    /// slice is written again on the confirmation, not on a refusal.
    #[tokio::test(start_paused = true)]
    async fn a_confirmed_registration_writes_the_slice_again_and_a_refusal_does_not() {
        let l = Loop::start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.slices.written().len(), 1);
        l.slices.stored.lock().unwrap().clear();
        l.registrations.send_modify(|state| {
            state.refused = Some("version not supported".into());
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(l.slices.written().is_empty(), "a refusal writes nothing");
        l.registrations.send_modify(|state| {
            state.confirmed += 1;
            state.refused = None;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            l.slices.written().len(),
            1,
            "written again on the confirmation"
        );
        l.stop().await;
    }

    /// What the kubelet says reaches the metrics: registered, counted, and `/healthz` failing
    /// (by the refusal it reports) while the kubelet refuses.
    #[tokio::test]
    async fn the_kubelets_verdicts_reach_the_metrics() {
        let metrics = Metrics::new();
        let (registrations, watched) = watch::channel(KubeletRegistration::default());
        let task = tokio::spawn(report_registrations(watched, metrics.clone()));
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        let text = |m: &Metrics| m.encode();
        settle().await;
        assert!(text(&metrics).contains("vramslice_plugin_registered 0\n"));
        registrations.send_modify(|s| s.confirmed += 2);
        settle().await;
        assert!(text(&metrics).contains("vramslice_plugin_registered 1\n"));
        assert!(text(&metrics).contains("vramslice_plugin_registrations_total 2\n"));
        assert_eq!(metrics.registration_refused(), None);
        registrations.send_modify(|s| s.refused = Some("no such version".into()));
        settle().await;
        assert!(text(&metrics).contains("vramslice_plugin_registered 0\n"));
        assert_eq!(
            metrics.registration_refused().as_deref(),
            Some("no such version")
        );
        registrations.send_modify(|s| {
            s.confirmed += 1;
            s.refused = None;
        });
        settle().await;
        assert!(text(&metrics).contains("vramslice_plugin_registrations_total 3\n"));
        assert_eq!(metrics.registration_refused(), None);
        drop(registrations);
        task.await.unwrap();
    }

    /// The Node could not be read at start: the slice goes out without an owner, and gets
    /// one as soon as the Node can be read.
    #[tokio::test(start_paused = true)]
    async fn a_slice_written_before_the_node_could_be_read_gets_its_owner_later() {
        let l = Loop::start_owned_by(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(l.slices.written().len(), 1);
        assert!(
            l.slices.written()[0]
                .metadata
                .owner_references
                .as_ref()
                .is_none_or(Vec::is_empty)
        );
        *l.node.0.lock().unwrap() = "node-uid".into();
        // Read again at the next verify interval, not on every turn.
        l.readings.apply(h100());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(l.slices.written().len(), 1, "not re-read on every turn");
        tokio::time::sleep(SLICE_VERIFY_INTERVAL).await;
        l.readings.apply(h100());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let stored = l.slices.written();
        assert_eq!(
            stored.last().map(owner).as_deref(),
            Some("node-uid"),
            "written again with its owner"
        );
        l.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_slice_the_garbage_collector_took_is_written_again_owned_by_the_node_as_it_is() {
        let l = Loop::start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(owner(&l.slices.written()[0]), "node-uid");
        // `kubectl delete node`, a kubelet restart: a new Node, and the garbage collector
        // deletes the slice its old owner held.
        *l.node.0.lock().unwrap() = "node-uid-2".into();
        l.slices.stored.lock().unwrap().clear();
        tokio::time::sleep(SLICE_VERIFY_INTERVAL).await;
        l.readings.apply(h100());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let stored = l.slices.written();
        assert_eq!(
            stored.iter().map(owner).collect::<Vec<_>>(),
            ["node-uid", "node-uid-2"],
            "written again with the owner it had, then at once with the new one"
        );
        l.stop().await;
    }
}
