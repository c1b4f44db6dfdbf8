//! DRA mode: the node agent serves the kubelet's DRA plugin API (`vramslice-dra`) instead of
//! the device-plugin API, and keeps the node's ResourceSlice in step with the measurement. The
//! backend, poller, `GpuNode` readings and metrics are the same as in device-plugin mode.
//!
//! Each new GPU snapshot: processes get their pods from `/proc`, the driver learns the GPUs,
//! the prepared claims say what they hold and use per GPU, the core turns that into the
//! slice's devices and capacities, and the publisher writes the slice when it changed enough.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::sync::watch;
use vramslice_api::convert::dra::SliceSettings;
use vramslice_core::node::dra::{mark_unread, reading_staleness_bound, slice_devices};
use vramslice_dra::claims::KubeClaims;
use vramslice_dra::driver::{Driver, DriverConfig};
use vramslice_dra::serve::{ServeError, Sockets, serve_with_registrations};
use vramslice_dra::slices::{KubeSlices, SlicePolicy, SlicePublisher};
use vramslice_gpu::procfs::ProcRoot;

use crate::config::Settings;
use crate::poller::NodeWatch;

/// How often the node's ResourceSlice is checked while nothing needs writing (see
/// `SlicePolicy::verify_interval`).
const SLICE_VERIFY_INTERVAL: Duration = Duration::from_secs(30);

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
    shutdown: watch::Receiver<bool>,
) -> Result<(), DraModeError> {
    let NodeIdentity {
        client,
        node_name,
        driver_version,
    } = identity;
    driver.set_gpus(&node.snapshot.borrow().readings);
    let node_uid = node_uid(&client, &node_name).await;
    let owner = NodeOwner {
        client: client.clone(),
        name: node_name.clone(),
    };
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
    let (registrations, registered) = watch::channel(0u64);
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
    let _ = slices.await;
    served.map_err(DraModeError::from)
}

/// Sleep until `at`, or for ever when there is nothing to wake for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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

/// What makes the slice be looked at again: a new GPU snapshot, or a registration the kubelet
/// confirmed (a starting kubelet deletes its node's slices, so ours is written again, owned by
/// the Node as it is now: a kubelet started after `kubectl delete node` made it again).
struct SliceTriggers {
    node: NodeWatch,
    registered: watch::Receiver<u64>,
    owner: NodeOwner,
}

/// How the slice's devices are worked out from a reading.
struct SliceRules {
    proc_root: ProcRoot,
    step: u64,
    headroom: u64,
    /// A reading older than this taints every GPU ([`mark_unread`]).
    staleness: Duration,
}

async fn keep_slice(
    driver: Arc<Driver>,
    mut publisher: SlicePublisher<KubeSlices>,
    triggers: SliceTriggers,
    rules: SliceRules,
    mut shutdown: watch::Receiver<bool>,
) {
    let SliceTriggers {
        mut node,
        mut registered,
        owner,
    } = triggers;
    // When the reading in hand arrived (a failing or hung backend sends none).
    let mut reading = (0u64, Instant::now());
    loop {
        let snapshot = Arc::clone(&node.snapshot.borrow_and_update());
        if snapshot.generation != reading.0 {
            reading = (snapshot.generation, Instant::now());
        }
        let age = reading.1.elapsed();
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
            if let Err(e) = publisher.observe(devices, Instant::now()).await {
                tracing::warn!(error = %e, "ResourceSlice not written; retrying on the next reading");
            }
        }
        // Wake when the reading in hand goes stale, once; then only a new reading helps.
        let stale_at = (age < rules.staleness).then(|| reading.1 + rules.staleness);
        tokio::select! {
            changed = node.snapshot.changed() => if changed.is_err() { return },
            () = sleep_until(stale_at) => {}
            // Registered (again) with the kubelet, which deleted the node's slices when it
            // started: write ours again.
            changed = registered.changed() => if changed.is_ok() {
                publisher.set_node_uid(node_uid(&owner.client, &owner.name).await);
                publisher.republish();
            },
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
