//! The plugin's decisions behind a narrow trait that speaks no protocol: the device list to
//! stream, the preferred units for a container, and the allocation of a container's units. The
//! gRPC adapter ([`crate::grpc`]) is a thin translation over [`DevicePluginLogic`].

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use vramslice_api::convert::node_pods::{HeldUnits, held_units, placements, waiting_requests};
use vramslice_core::node::allocation::{
    AllocationSettings, ContainerAllocation, missing_guard_library, plan_allocation,
};
use vramslice_core::node::inventory::preferred_units;
use vramslice_core::{AdvertisedDevice, DeviceId, VramUnit, owed_gpus};

use crate::pods::NodePods;
use crate::poller::NodeWatch;

/// Longest wait for the API server or PodResources while the kubelet waits for a preference.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One container's GetPreferredAllocation question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferredRequest {
    /// IDs the kubelet may hand out.
    pub available: Vec<String>,
    /// IDs that must be in the answer.
    pub must_include: Vec<String>,
    /// How many IDs the container gets.
    pub size: usize,
}

/// A request the plugin refuses or cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The request itself is wrong (mixed GPUs, unknown IDs): gRPC InvalidArgument.
    #[error("{0}")]
    InvalidArgument(String),
    /// The plugin failed (host directory not creatable): gRPC Internal.
    #[error("{0}")]
    Internal(String),
}

/// What a device plugin decides, with no transport types.
pub trait DevicePluginLogic: Send + Sync + 'static {
    /// The extended resource name served.
    fn resource_name(&self) -> &'static str;

    /// The advertised devices; changes whenever a device or its health changes.
    fn devices(&self) -> watch::Receiver<Arc<Vec<AdvertisedDevice>>>;

    /// Preferred IDs per container request (empty: no preference).
    fn preferred_allocation(
        &self,
        requests: Vec<PreferredRequest>,
    ) -> impl Future<Output = Vec<Vec<String>>> + Send;

    /// The allocation of each container's IDs, all or nothing.
    fn allocate(
        &self,
        containers: Vec<Vec<String>>,
    ) -> impl Future<Output = Result<Vec<ContainerAllocation>, PluginError>> + Send;
}

/// Held while the accounting root's files are written (Allocate) or deleted (the sweeper), so
/// that neither runs into the middle of the other: one plugin process serves one root.
pub(crate) static ACCOUNTING_FILES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The vramslice plugin: units of GPU memory.
#[derive(Debug, Clone)]
pub struct VramPlugin {
    unit: VramUnit,
    allocation: AllocationSettings,
    node: NodeWatch,
    pods: Option<NodePods>,
    pod_resources_socket: Option<std::path::PathBuf>,
}

impl VramPlugin {
    /// A plugin over the poller's state. With `pods`, GetPreferredAllocation prefers the GPU of
    /// the pending pod a request belongs to; with `pod_resources_socket`, pods the kubelet has
    /// already allocated are not considered pending.
    pub fn new(
        unit: VramUnit,
        allocation: AllocationSettings,
        node: NodeWatch,
        pods: Option<NodePods>,
        pod_resources_socket: Option<std::path::PathBuf>,
    ) -> Self {
        VramPlugin {
            unit,
            allocation,
            node,
            pods,
            pod_resources_socket,
        }
    }

    /// The kubelet's record of what each pod's containers hold (PodResources, [`held_units`]),
    /// or `None` when it cannot be read (then started pods count as allocated).
    async fn allocated_gpus(&self) -> Option<HeldUnits> {
        let socket = self.pod_resources_socket.as_ref()?;
        let listed = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            crate::podresources::list_allocations(socket, self.resource_name()),
        )
        .await;
        match listed {
            Ok(Ok(records)) => Some(held_units(&records)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "PodResources unavailable; started pods count as allocated");
                None
            }
            Err(_) => {
                tracing::debug!("PodResources List timed out");
                None
            }
        }
    }

    /// This node's pods for a preference: the watch cache when it holds a pod waiting for every
    /// requested size, else a consistent LIST (`None` when that fails too).
    async fn node_pods(
        &self,
        pods: &NodePods,
        sizes: &BTreeSet<usize>,
        allocated: Option<&HeldUnits>,
    ) -> Option<Vec<Arc<Pod>>> {
        let resource = self.resource_name();
        if let Some(cached) = pods.cached() {
            let known = sizes
                .iter()
                .all(|size| waiting_requests(&cached, resource, *size as u64, allocated) > 0);
            if known {
                return Some(cached);
            }
            tracing::debug!(sizes = ?sizes, "the pod cache holds no pod waiting for this size; listing");
        }
        match tokio::time::timeout(LOOKUP_TIMEOUT, pods.list()).await {
            Ok(Ok(listed)) => Some(listed.into_iter().map(Arc::new).collect()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot look up the node's pods; falling back to binpacking");
                None
            }
            Err(_) => {
                tracing::warn!(timeout = ?LOOKUP_TIMEOUT, "pod lookup timed out; falling back to binpacking");
                None
            }
        }
    }

    async fn candidate_gpus(&self, sizes: &BTreeSet<usize>) -> Vec<(usize, Vec<String>)> {
        let Some(lister) = &self.pods else {
            return Vec::new();
        };
        let allocated = self.allocated_gpus().await;
        let Some(pods) = self.node_pods(lister, sizes, allocated.as_ref()).await else {
            return Vec::new();
        };
        sizes
            .iter()
            .map(|size| {
                let pods = placements(
                    &pods,
                    self.resource_name(),
                    *size as u64,
                    allocated.as_ref(),
                );
                (*size, owed_gpus(&pods))
            })
            .collect()
    }
}

fn parse_ids(ids: &[String]) -> Vec<DeviceId> {
    ids.iter().filter_map(|s| s.parse().ok()).collect()
}

/// The preferred IDs for one request: the first candidate GPU with room (a candidate naming
/// several GPUs, comma-separated, is a pod spanning them: an equal share from each), else
/// binpacking (`vramslice_core::preferred_units` decides; this parses the kubelet's strings).
pub fn choose(request: &PreferredRequest, candidates: &[String]) -> Vec<String> {
    let available = parse_ids(&request.available);
    let must = parse_ids(&request.must_include);
    preferred_units(&available, &must, request.size, candidates)
        .iter()
        .map(ToString::to_string)
        .collect()
}

impl DevicePluginLogic for VramPlugin {
    fn resource_name(&self) -> &'static str {
        self.unit.resource_name()
    }

    fn devices(&self) -> watch::Receiver<Arc<Vec<AdvertisedDevice>>> {
        self.node.devices.clone()
    }

    async fn preferred_allocation(&self, requests: Vec<PreferredRequest>) -> Vec<Vec<String>> {
        let sizes: BTreeSet<usize> = requests.iter().map(|r| r.size).collect();
        let candidates = self.candidate_gpus(&sizes).await;
        requests
            .iter()
            .map(|request| {
                let gpus = candidates
                    .iter()
                    .find(|(size, _)| *size == request.size)
                    .map(|(_, g)| g.as_slice())
                    .unwrap_or(&[]);
                let chosen = choose(request, gpus);
                tracing::info!(size = request.size, candidates = ?gpus, chosen = ?chosen.first(), "preferred allocation");
                chosen
            })
            .collect()
    }

    async fn allocate(
        &self,
        containers: Vec<Vec<String>>,
    ) -> Result<Vec<ContainerAllocation>, PluginError> {
        guard_library_present(&self.allocation)?;
        let snapshot = Arc::clone(&self.node.snapshot.borrow());
        let plans = containers
            .iter()
            .map(|ids| {
                plan_allocation(&snapshot.inventory, &self.allocation, ids).map_err(|e| {
                    tracing::warn!(ids = ?ids, error = %e, "allocation refused");
                    PluginError::InvalidArgument(e.to_string())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The sweeper deletes ended allocations' files under the same lock: these units are
        // often the last pod's, whose files it may be deleting just now.
        let _files = ACCOUNTING_FILES.lock().await;
        for plan in &plans {
            create_accounting_dir(&plan.host_accounting_dir).await?;
            write_limit_file(&plan.host_limit_file, &plan.limits).await?;
            tracing::info!(
                gpu = %plan.gpu_uuid,
                units = plan.units,
                limit_bytes = plan.limit_bytes,
                dir = %plan.host_accounting_dir.display(),
                "allocated"
            );
        }
        Ok(plans)
    }
}

/// Refused, naming the path, when injection is on and the guard library is not a file on the
/// node ([`missing_guard_library`]).
fn guard_library_present(settings: &AllocationSettings) -> Result<(), PluginError> {
    match missing_guard_library(settings, |path| {
        std::fs::metadata(path).map(|m| m.is_file())
    }) {
        None => Ok(()),
        Some(problem) => {
            tracing::error!(path = %settings.guard_library_host_path.display(), problem = %problem, "guard library missing; allocations refused");
            Err(PluginError::Internal(problem))
        }
    }
}

/// Create the per-allocation accounting directory, empty, writable by any container user.
///
/// Its name follows from the unit IDs alone, and the next pod of a size on a GPU usually gets
/// the units the last one had: whatever that pod left there (an account with a slot that reads
/// as alive, a FIFO in place of a file) must not reach the new container, so anything at the
/// path is removed first (not followed, if a link). The kubelet allocates only units no running
/// container holds, so nothing in use is there.
async fn create_accounting_dir(dir: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        PluginError::Internal(format!(
            "cannot create accounting directory {}: {e}",
            dir.display()
        ))
    };
    if remove_whatever_is_at(dir).await.map_err(fail)? {
        tracing::debug!(dir = %dir.display(), "removed what an earlier allocation of these units left");
    }
    tokio::fs::create_dir_all(dir).await.map_err(fail)?;
    // Writable by a container running as any user (the guard creates its account there);
    // sticky, so only a file's owner may remove or rename it.
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
        .await
        .map_err(fail)
}

/// Remove whatever is at `path` (a file, a link, not followed, or a directory with all it
/// holds); `Ok(false)` when nothing was there.
pub(crate) async fn remove_whatever_is_at(path: &Path) -> std::io::Result<bool> {
    let removed = match tokio::fs::symlink_metadata(path).await {
        Ok(found) if found.is_dir() => tokio::fs::remove_dir_all(path).await,
        Ok(_) => tokio::fs::remove_file(path).await,
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Write the allocation's limit file (mounted read-only into the container), atomically: a
/// temporary file renamed over the old one, so a container starting meanwhile never reads half.
/// A directory in its place (a container runtime makes one where a bind-mount source is missing,
/// as when a container restarts after the file was swept) is removed first: a rename cannot
/// replace it, and these units could never be allocated again.
async fn write_limit_file(
    path: &Path,
    limits: &vramslice_core::container::limit::GpuLimits,
) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        PluginError::Internal(format!("cannot write limit file {}: {e}", path.display()))
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let text = vramslice_core::container::limit::gpu_limits_file_content(limits);
    for stale in [&tmp, &path.to_path_buf()] {
        if tokio::fs::symlink_metadata(stale)
            .await
            .is_ok_and(|m| m.is_dir())
        {
            remove_whatever_is_at(stale).await.map_err(fail)?;
        }
    }
    tokio::fs::write(&tmp, text).await.map_err(fail)?;
    tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
        .await
        .map_err(fail)?;
    tokio::fs::rename(&tmp, path).await.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(available: &[&str], size: usize) -> PreferredRequest {
        PreferredRequest {
            available: available.iter().map(|s| s.to_string()).collect(),
            must_include: Vec::new(),
            size,
        }
    }

    #[test]
    fn prefers_the_first_candidate_that_fits() {
        let r = request(
            &["GPU-a::0", "GPU-a::1", "GPU-b::0", "GPU-b::1", "GPU-b::2"],
            2,
        );
        assert_eq!(choose(&r, &["GPU-b".into()]), vec!["GPU-b::0", "GPU-b::1"]);
        assert_eq!(
            choose(&r, &["GPU-x".into(), "GPU-a".into()]),
            vec!["GPU-a::0", "GPU-a::1"]
        );
        // No candidate: binpack onto the fuller GPU (fewer available units).
        assert_eq!(choose(&r, &[]), vec!["GPU-a::0", "GPU-a::1"]);
        // A candidate without room is skipped.
        let r = request(&["GPU-a::0", "GPU-b::0", "GPU-b::1", "GPU-b::2"], 3);
        assert_eq!(
            choose(&r, &["GPU-a".into()]),
            vec!["GPU-b::0", "GPU-b::1", "GPU-b::2"]
        );
    }

    #[test]
    fn a_spanning_candidate_splits_the_units_evenly() {
        let r = request(
            &[
                "GPU-a::0", "GPU-a::1", "GPU-a::2", "GPU-b::0", "GPU-b::1", "GPU-b::2",
            ],
            4,
        );
        assert_eq!(
            choose(&r, &["GPU-a,GPU-b".into()]),
            vec!["GPU-a::0", "GPU-a::1", "GPU-b::0", "GPU-b::1"]
        );
    }
}
