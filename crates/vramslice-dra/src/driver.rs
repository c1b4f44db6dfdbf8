//! The driver: prepares and unprepares claims (files, CDI spec, checkpoint) and says what the
//! prepared claims hold on each GPU for the slice's capacity. Protocol-free: [`crate::grpc`]
//! adapts the kubelet's calls to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::Mutex;
use vramslice_api::convert::dra::{ClaimError, claim_on_node};
use vramslice_core::effective_free::unobserved_part;
use vramslice_core::node::allocation::AllocationSettings;
use vramslice_core::node::dra::{
    ClaimPlanError, GrantsOnGpu, base_request_name, claim_key, device_name, plan_claim,
};
use vramslice_core::node::publish::ClaimHolding;
use vramslice_core::node::sample::GpuSample;

use crate::cdi;
use crate::checkpoint::{
    Checkpoint, CheckpointError, PreparedClaim, PreparedDevice, PreparedFiles, PreparedPod,
    write_atomically,
};
use crate::claims::{ClaimSource, FetchError};

/// Where the driver keeps its files, and what containers get.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// This node's name (also the pool name).
    pub node: String,
    /// Guard injection, visible-GPU strategy, and the accounting root (as in device-plugin mode).
    pub settings: AllocationSettings,
    /// The CDI spec directory the container runtime reads (`/var/run/cdi`).
    pub cdi_dir: PathBuf,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
}

/// A claim as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl ClaimRef {
    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the kubelet is told of prepared devices: request names as containers name them (a
/// checkpoint of an earlier version may hold `<request>/<subrequest>`).
fn answered(devices: &[PreparedDevice]) -> Vec<PreparedDevice> {
    devices
        .iter()
        .map(|d| PreparedDevice {
            request_names: d
                .request_names
                .iter()
                .map(|r| base_request_name(r).to_string())
                .collect(),
            ..d.clone()
        })
        .collect()
}

/// Write a prepared claim's files again where they are gone, from its checkpoint. `false` when
/// one is gone and the checkpoint does not hold it (written by an earlier version).
fn restore_files(claim: &ClaimRef, done: &PreparedClaim) -> Result<bool, PrepareError> {
    let files = &done.files;
    let io = |path: &Path| {
        let (claim, path) = (claim.label(), path.display().to_string());
        move |source| PrepareError::Io {
            claim,
            path,
            source,
        }
    };
    for (path, text) in [
        (&files.cdi_spec, &done.cdi_spec_text),
        (&files.limit_file, &done.limit_file_text),
    ] {
        if path.exists() {
            continue;
        }
        let Some(text) = text else {
            return Ok(false);
        };
        write_atomically(path, text.as_bytes()).map_err(io(path))?;
        tracing::info!(claim = %claim.label(), path = %path.display(), "wrote a prepared claim's file again");
    }
    std::fs::create_dir_all(&files.accounting_dir).map_err(io(&files.accounting_dir))?;
    Ok(true)
}

/// Why a claim could not be prepared or unprepared. The text goes back to the kubelet, which
/// shows it in the pod's events.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The claim could not be read.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Its allocation cannot be prepared here.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// Nothing to prepare, or nothing granted.
    #[error(transparent)]
    Plan(#[from] ClaimPlanError),
    /// A file could not be written or removed.
    #[error("claim {claim}: {path}: {source}")]
    Io {
        /// `namespace/name`.
        claim: String,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CDI spec could not be rendered.
    #[error("claim {claim}: CDI spec: {detail}")]
    Spec {
        /// `namespace/name`.
        claim: String,
        /// What failed.
        detail: String,
    },
    /// The checkpoint could not be written; the claim is not prepared.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// The DRA driver's state: prepared claims (checkpointed) and this node's GPUs.
pub struct Driver {
    config: DriverConfig,
    claims: Arc<dyn ClaimSource>,
    /// Device name → GPU UUID, from the latest sample (healthy or not: a claim allocated just
    /// before its GPU fell unhealthy still names it).
    gpus: RwLock<BTreeMap<String, String>>,
    state: Mutex<Checkpoint>,
}

impl Driver {
    /// A driver with the prepared claims of its checkpoint.
    ///
    /// # Errors
    /// [`CheckpointError`] when the checkpoint exists but cannot be read.
    pub fn open(
        config: DriverConfig,
        claims: Arc<dyn ClaimSource>,
    ) -> Result<Self, CheckpointError> {
        let checkpoint = Checkpoint::load(&config.checkpoint)?;
        tracing::info!(
            checkpoint = %config.checkpoint.display(),
            prepared = checkpoint.claims.len(),
            "loaded prepared claims"
        );
        Ok(Driver {
            config,
            claims,
            gpus: RwLock::new(BTreeMap::new()),
            state: Mutex::new(checkpoint),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// Learn the node's GPUs from a sample.
    pub fn set_gpus(&self, samples: &[GpuSample]) {
        let map = samples
            .iter()
            .map(|s| (device_name(s.index), s.uuid.clone()))
            .collect();
        *self
            .gpus
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = map;
    }

    fn uuid_of(&self, device: &str) -> Option<String> {
        self.gpus
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(device)
            .cloned()
    }

    /// Prepare `claim`: the same devices again when it is already prepared (its files written
    /// again if they are gone: the CDI directory is a tmpfs, emptied by a reboot, after which
    /// the kubelet prepares its pods' claims again); otherwise read its allocation, write its
    /// limit file, accounting directory and CDI spec, and checkpoint it before answering.
    ///
    /// # Errors
    /// [`PrepareError`] naming the claim and the cause; nothing is checkpointed then.
    pub async fn prepare(&self, claim: &ClaimRef) -> Result<Vec<PreparedDevice>, PrepareError> {
        if let Some(done) = self.state.lock().await.claims.get(&claim.uid) {
            if restore_files(claim, done)? {
                return Ok(answered(&done.devices));
            }
            tracing::info!(claim = %claim.label(), uid = %claim.uid, "prepared claim's files are gone and its checkpoint cannot rewrite them; preparing it again");
        }
        let object = self.claims.get(&claim.namespace, &claim.name).await?;
        let on_node = claim_on_node(&object, &claim.uid, &self.config.node, |d| self.uuid_of(d))?;
        let plan = plan_claim(
            &claim.label(),
            &claim.uid,
            &on_node.grants,
            &self.config.settings,
        )?;
        let key = claim_key(&claim.uid);
        let files = PreparedFiles {
            cdi_spec: cdi::spec_path(&self.config.cdi_dir, &key),
            limit_file: plan.edits.host_limit_file.clone(),
            accounting_dir: plan.edits.host_accounting_dir.clone(),
        };
        let io = |path: &Path| {
            let claim = claim.label();
            let path = path.display().to_string();
            move |source| PrepareError::Io {
                claim,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&files.accounting_dir).map_err(io(&files.accounting_dir))?;
        write_atomically(&files.limit_file, plan.limit_file.as_bytes())
            .map_err(io(&files.limit_file))?;
        let spec = cdi::spec_json(&claim.uid, &plan.edits).map_err(|e| PrepareError::Spec {
            claim: claim.label(),
            detail: e.to_string(),
        })?;
        write_atomically(&files.cdi_spec, spec.as_bytes()).map_err(io(&files.cdi_spec))?;

        let mut cdi_device_ids = vec![cdi::device_id(&claim.uid)];
        cdi_device_ids.extend(plan.edits.cdi_devices.iter().cloned());
        let devices: Vec<PreparedDevice> = on_node
            .grants
            .iter()
            .zip(&on_node.share_ids)
            .map(|(grant, share_id)| PreparedDevice {
                request_names: vec![grant.request.clone()],
                pool: self.config.node.clone(),
                device: grant.device.clone(),
                cdi_device_ids: cdi_device_ids.clone(),
                share_id: share_id.clone(),
            })
            .collect();
        let prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            cdi_spec_text: Some(spec),
            limit_file_text: Some(plan.limit_file.clone()),
            limits: plan.limits,
            pods: on_node
                .pods
                .into_iter()
                .map(|(name, uid)| PreparedPod { name, uid })
                .collect(),
            devices: devices.clone(),
            files,
        };
        let mut state = self.state.lock().await;
        if let Some(done) = state.claims.get(&claim.uid)
            && done.cdi_spec_text.is_some()
        {
            // Prepared meanwhile by a concurrent call: same claim, same files.
            return Ok(answered(&done.devices));
        }
        state.claims.insert(claim.uid.clone(), prepared);
        if let Err(e) = state.save(&self.config.checkpoint) {
            state.claims.remove(&claim.uid);
            return Err(e.into());
        }
        tracing::info!(claim = %claim.label(), uid = %claim.uid, devices = devices.len(), "prepared claim");
        Ok(devices)
    }

    /// Unprepare `claim`: remove its files and forget it. A claim this driver never prepared
    /// (or already unprepared) succeeds: the kubelet may repeat the call.
    ///
    /// # Errors
    /// [`PrepareError`] when a file cannot be removed or the checkpoint cannot be written; the
    /// claim then stays prepared, so the kubelet's retry finds it.
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), PrepareError> {
        let mut state = self.state.lock().await;
        let Some(prepared) = state.claims.get(&claim.uid).cloned() else {
            tracing::debug!(claim = %claim.label(), uid = %claim.uid, "unprepare of a claim not prepared here");
            return Ok(());
        };
        let files = &prepared.files;
        for file in [&files.cdi_spec, &files.limit_file] {
            remove_file(file).map_err(|source| PrepareError::Io {
                claim: claim.label(),
                path: file.display().to_string(),
                source,
            })?;
        }
        match std::fs::remove_dir_all(&files.accounting_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PrepareError::Io {
                    claim: claim.label(),
                    path: files.accounting_dir.display().to_string(),
                    source,
                });
            }
        }
        state.claims.remove(&claim.uid);
        if let Err(e) = state.save(&self.config.checkpoint) {
            state.claims.insert(claim.uid.clone(), prepared);
            return Err(e.into());
        }
        tracing::info!(claim = %claim.label(), uid = %claim.uid, "unprepared claim");
        Ok(())
    }

    /// What the prepared claims hold, per claim and GPU, for the node's `GpuNode` report.
    pub async fn holdings(&self) -> Vec<ClaimHolding> {
        let state = self.state.lock().await;
        state
            .claims
            .values()
            .flat_map(|claim| {
                claim.limits.iter().map(|(uuid, bytes)| ClaimHolding {
                    namespace: claim.namespace.clone(),
                    claim: claim.name.clone(),
                    pods: claim
                        .pods
                        .iter()
                        .map(|p| (p.name.clone(), p.uid.clone()))
                        .collect(),
                    gpu_uuid: uuid.clone(),
                    bytes: *bytes,
                })
            })
            .collect()
    }

    /// What prepared claims hold on each GPU: granted bytes, and what they may still take
    /// unseen (a claim's use is what the processes of the pods it was reserved for use on
    /// that GPU; `samples` must carry pod UIDs).
    pub async fn grants_by_gpu(&self, samples: &[GpuSample]) -> BTreeMap<String, GrantsOnGpu> {
        let state = self.state.lock().await;
        grants_by_gpu(state.claims.values(), samples)
    }
}

/// [`Driver::grants_by_gpu`] over plain values.
///
/// What a pod's processes use on a GPU cannot be told apart by claim, so claims on one GPU
/// that share a pod are counted together: their grants less what their pods use there.
/// Counting each claim against all of its pods' use would credit one pod's use to every claim
/// it holds, and hide the rest of the grants.
pub fn grants_by_gpu<'a>(
    claims: impl Iterator<Item = &'a PreparedClaim>,
    samples: &[GpuSample],
) -> BTreeMap<String, GrantsOnGpu> {
    // Per GPU: groups of claims linked by a shared pod, as (granted, pod UIDs).
    let mut groups: BTreeMap<&str, Vec<(u64, Vec<&str>)>> = BTreeMap::new();
    for claim in claims {
        let pods: Vec<&str> = claim.pods.iter().map(|p| p.uid.as_str()).collect();
        for (uuid, granted) in &claim.limits {
            let on_gpu = groups.entry(uuid.as_str()).or_default();
            let mut merged = (*granted, pods.clone());
            let mut kept = Vec::with_capacity(on_gpu.len() + 1);
            for group in on_gpu.drain(..) {
                if group.1.iter().any(|p| merged.1.contains(p)) {
                    merged.0 = merged.0.saturating_add(group.0);
                    merged
                        .1
                        .extend(group.1.into_iter().filter(|p| !pods.contains(p)));
                } else {
                    kept.push(group);
                }
            }
            kept.push(merged);
            *on_gpu = kept;
        }
    }
    let mut out: BTreeMap<String, GrantsOnGpu> = BTreeMap::new();
    for (uuid, on_gpu) in groups {
        let entry = out.entry(uuid.to_string()).or_default();
        for (granted, pods) in on_gpu {
            let used: u64 = samples
                .iter()
                .filter(|s| s.uuid == uuid)
                .flat_map(|s| &s.processes)
                .filter(|p| p.pod_uid.as_deref().is_some_and(|uid| pods.contains(&uid)))
                .map(|p| p.used_bytes)
                .sum();
            entry.granted = entry.granted.saturating_add(granted);
            entry.unobserved = entry
                .unobserved
                .saturating_add(unobserved_part(granted, Some(used)));
        }
    }
    out
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_core::node::sample::{Health, ProcessSample};

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_claims_use_is_its_pods_processes_on_its_gpu() {
        let claim = PreparedClaim {
            namespace: "ml".into(),
            name: "llm".into(),
            limits: vec![("GPU-0".into(), 8 * GIB)],
            pods: vec![PreparedPod {
                name: "llm-0".into(),
                uid: "pod-a".into(),
            }],
            devices: Vec::new(),
            files: PreparedFiles {
                cdi_spec: "/x".into(),
                limit_file: "/y".into(),
                accounting_dir: "/z".into(),
            },
            cdi_spec_text: None,
            limit_file_text: None,
        };
        let process = |pid, used, pod: Option<&str>| ProcessSample {
            pid,
            used_bytes: used,
            pod_uid: pod.map(str::to_string),
        };
        let sample = GpuSample {
            index: 0,
            uuid: "GPU-0".into(),
            model: "H100".into(),
            total_bytes: 80 * GIB,
            used_bytes: 21 * GIB,
            free_bytes: 59 * GIB,
            health: Health::Healthy,
            processes: vec![
                process(1, 3 * GIB, Some("pod-a")),
                process(2, 2 * GIB, Some("pod-a")),
                process(3, 16 * GIB, None),
            ],
        };
        let grants = grants_by_gpu([&claim].into_iter(), std::slice::from_ref(&sample));
        assert_eq!(
            grants["GPU-0"],
            GrantsOnGpu {
                granted: 8 * GIB,
                unobserved: 3 * GIB
            }
        );

        // Two claims of one pod on the GPU (one container uses each): the pod's 5 GiB cannot
        // be told apart by claim, so the two 8 GiB grants are 16 GiB less 5 used, not each
        // 8 GiB less the pod's whole 5 GiB.
        let second = PreparedClaim {
            name: "llm-kv".into(),
            ..claim.clone()
        };
        // And a claim of another pod, counted on its own (its pod uses nothing yet).
        let other = PreparedClaim {
            name: "embed".into(),
            pods: vec![PreparedPod {
                name: "embed-0".into(),
                uid: "pod-b".into(),
            }],
            limits: vec![("GPU-0".into(), 2 * GIB)],
            ..claim.clone()
        };
        let grants = grants_by_gpu([&claim, &other, &second].into_iter(), &[sample]);
        assert_eq!(
            grants["GPU-0"],
            GrantsOnGpu {
                granted: 18 * GIB,
                unobserved: 11 * GIB + 2 * GIB
            }
        );
    }
}
