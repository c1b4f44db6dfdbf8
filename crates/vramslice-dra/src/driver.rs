//! The driver: prepares and unprepares claims (files, CDI spec, checkpoint) and says what the
//! prepared claims hold on each GPU for the slice's capacity. Protocol-free: [`crate::grpc`]
//! adapts the kubelet's calls to it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::resource::v1::ResourceClaim;
use tokio::sync::Mutex;
use vramslice_api::convert::dra::{
    ClaimError, admin_access_on, allocated_by_driver, allocated_devices_in, claim_on_node,
    reserved_pods,
};
use vramslice_api::convert::pod_claims::containers_sharing;
use vramslice_core::node::allocation::{AllocationSettings, host_files, missing_guard_library};
use vramslice_core::node::dra::{
    AllocationSeen, ClaimPlanError, ClaimUse, GrantsOnGpu, allocated_again, base_request_name,
    claim_key, device_name, gpus_changed, grants_by_gpu, plan_claim,
};
use vramslice_core::node::publish::ClaimHolding;
use vramslice_core::node::sample::GpuSample;

use crate::cdi;
use crate::checkpoint::{
    Checkpoint, CheckpointError, PreparedClaim, PreparedDevice, PreparedFiles, PreparedPod,
    write_atomically,
};
use crate::claims::{ClaimSource, FetchError};

mod files;

use files::{create_accounting_dir, io_error, remove_files, restore_files, sweep_leftovers};

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
    /// Injection is on and the guard library is not a file on this node
    /// ([`missing_guard_library`]): the container would run without its limit enforced.
    #[error("claim {claim}: {detail}")]
    GuardLibrary {
        /// `namespace/name`.
        claim: String,
        /// What is wrong, naming the path and the setting.
        detail: String,
    },
    /// The claim was prepared on GPUs its devices no longer name: the node's GPUs changed
    /// since (one gone, or numbered otherwise after a reboot). Preparing it again would put its
    /// memory on whatever GPU now has the name, beside claims the scheduler counted there.
    #[error(
        "claim {claim}: it was prepared on {then}, but its devices {devices} are now {now}: the node's GPUs changed since (a GPU gone or numbered otherwise); it is not prepared again on other GPUs: delete its pod so that the claim is allocated anew"
    )]
    GpusChanged {
        /// `namespace/name`.
        claim: String,
        /// The GPUs it was prepared on.
        then: String,
        /// Its devices.
        devices: String,
        /// What the devices are now.
        now: String,
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
    /// One container uses two claims of this driver: the CDI edits of each set the same limit
    /// file, accounting directory and environment, so the one applied last would hold alone.
    #[error(
        "claim {claim}: container {container} of pod {pod} uses claims {} of driver vramslice.io; a container can use one (their limits would overwrite each other): ask for the memory of all its GPUs in one claim (count: 2 in one request, or a request per GPU with the constraint distinctAttribute: vramslice.io/uuid over them)",
        claims.join(", ")
    )]
    SeveralClaimsInOneContainer {
        /// `namespace/name` of the claim being prepared.
        claim: String,
        /// `namespace/name` of the pod.
        pod: String,
        /// The container.
        container: String,
        /// The claims of this driver it uses.
        claims: Vec<String>,
    },
}

/// How long a prepare of a claim already prepared waits for the API server's copy, to tell
/// whether it was allocated again ([`Driver::reallocated`]).
const ALLOCATION_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a prepare waits for the API server's copy of a claim it has not prepared (the
/// kubelet allows a NodePrepareResources call 45 s, and retries).
const CLAIM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// How long [`Driver::learn_admin_access`] waits for one claim.
const ADMIN_ACCESS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The DRA driver's state: prepared claims (checkpointed) and this node's GPUs.
pub struct Driver {
    config: DriverConfig,
    claims: Arc<dyn ClaimSource>,
    /// Device name → GPU UUID, from the latest sample (healthy or not: a claim allocated just
    /// before its GPU fell unhealthy still names it).
    gpus: RwLock<BTreeMap<String, String>>,
    state: Mutex<Checkpoint>,
    /// Claim UID → the lock its prepare and unprepare hold ([`Driver::claim_lock`]).
    claim_locks: std::sync::Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// Prepared claims no longer held here (gone from the API server, made again, deallocated,
    /// allocated elsewhere), since when, and the devices they were prepared with
    /// ([`Driver::reconcile_prepared_claims`]).
    gone_since: std::sync::Mutex<BTreeMap<String, (tokio::time::Instant, Vec<PreparedDevice>)>>,
}

/// How long a prepared claim must be no longer held here (gone from the API server, or not
/// allocated here as prepared) before the driver releases it itself: the kubelet's unprepare normally comes first; one that never comes (the kubelet's
/// state was lost) would otherwise keep its files and its grant in the books for good.
pub const GONE_CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// What [`Driver::reconcile_prepared_claims`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Claims whose pods changed.
    pub pods_changed: usize,
    /// Claims released (`namespace/name`), gone from the API server for the grace period.
    pub released: Vec<String>,
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
        sweep_leftovers(&config);
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
            claim_locks: std::sync::Mutex::new(BTreeMap::new()),
            gone_since: std::sync::Mutex::new(BTreeMap::new()),
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

    /// Where the files of claim `uid` are: they follow from its UID alone.
    fn files_of(&self, uid: &str) -> PreparedFiles {
        let key = claim_key(uid);
        let (accounting_dir, limit_file) = host_files(&self.config.settings.accounting_root, &key);
        PreparedFiles {
            cdi_spec: cdi::spec_path(&self.config.cdi_dir, &key),
            limit_file,
            accounting_dir,
        }
    }

    /// The lock of claim `uid`, held by its prepare and unprepare from the checkpoint read to
    /// the checkpoint write: the kubelet may call both at once for one claim (two pods sharing
    /// it start together, say), and each writes or removes the claim's files before it
    /// checkpoints.
    async fn claim_lock(&self, uid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .claim_locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Locks no call holds or waits for are dropped.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(locks.entry(uid.to_string()).or_default())
        };
        lock.lock_owned().await
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
        // Also before a checkpointed claim's files are written again (after a reboot): its CDI
        // spec mounts the library as much as a new one's.
        if let Some(detail) = missing_guard_library(&self.config.settings, |path| {
            std::fs::metadata(path).map(|m| m.is_file())
        }) {
            tracing::error!(claim = %claim.label(), problem = %detail, "guard library missing; claim not prepared");
            return Err(PrepareError::GuardLibrary {
                claim: claim.label(),
                detail,
            });
        }
        let _claim = self.claim_lock(&claim.uid).await;
        let checkpointed = self.state.lock().await.claims.get(&claim.uid).cloned();
        let mut read = None;
        if let Some(done) = checkpointed {
            // Bounded: when the API server cannot say, the checkpoint answers (as after a
            // restart with the API server away).
            read = tokio::time::timeout(
                ALLOCATION_CHECK_TIMEOUT,
                self.claims.get(&claim.namespace, &claim.name),
            )
            .await
            .ok()
            .and_then(Result::ok);
            if read
                .as_ref()
                .is_some_and(|object| self.reallocated(claim, &done, object))
            {
                tracing::warn!(claim = %claim.label(), uid = %claim.uid, "the claim was allocated again since it was prepared here (its unprepare never came); preparing its new allocation");
                self.unprepare_held(claim).await?;
            } else {
                // The same allocation (or none readable): it stays on the GPUs it was prepared
                // on, or is refused when its devices now name others.
                if let Some(changed) = self.gpus_changed(claim, &done) {
                    tracing::error!(claim = %claim.label(), uid = %claim.uid, problem = %changed, "claim not prepared again");
                    return Err(changed);
                }
                if restore_files(claim, &done)? {
                    return Ok(answered(&done.devices));
                }
                tracing::info!(claim = %claim.label(), uid = %claim.uid, "prepared claim's files are gone and its checkpoint cannot rewrite them; preparing it again");
            }
        }
        let object = match read {
            Some(object) => object,
            // Bounded: the claim's lock is held meanwhile, and an unprepare of it waits.
            None => tokio::time::timeout(
                CLAIM_READ_TIMEOUT,
                self.claims.get(&claim.namespace, &claim.name),
            )
            .await
            .map_err(|_| FetchError::Api {
                claim: claim.label(),
                detail: format!(
                    "the API server did not answer within {}s",
                    CLAIM_READ_TIMEOUT.as_secs()
                ),
            })??,
        };
        let on_node = claim_on_node(&object, &claim.uid, &self.config.node, |d| self.uuid_of(d))?;
        self.refuse_several_in_one_container(claim, &on_node.pods)
            .await?;
        let plan = plan_claim(
            &claim.label(),
            &claim.uid,
            &on_node.grants,
            &self.config.settings,
        )?;
        let files = self.files_of(&claim.uid);
        debug_assert_eq!(
            (&files.limit_file, &files.accounting_dir),
            (&plan.edits.host_limit_file, &plan.edits.host_accounting_dir)
        );
        create_accounting_dir(claim, &files.accounting_dir)?;
        write_atomically(&files.limit_file, plan.limit_file.as_bytes())
            .map_err(io_error(claim, &files.limit_file))?;
        let spec = cdi::spec_json(&claim.uid, &plan.edits).map_err(|e| PrepareError::Spec {
            claim: claim.label(),
            detail: e.to_string(),
        })?;
        write_atomically(&files.cdi_spec, spec.as_bytes())
            .map_err(io_error(claim, &files.cdi_spec))?;

        let mut cdi_device_ids = vec![cdi::device_id(&claim.uid)];
        cdi_device_ids.extend(plan.edits.cdi_devices.iter().cloned());
        // The CDI IDs cover the whole claim. The kubelet gives a container the IDs of every
        // device of the requests it names (all of them for a container naming the claim),
        // concatenated, and the runtime applies each occurrence (its hooks run as often). So
        // exactly one device carries them, the first, listed under every request of the claim:
        // a container naming any request, or the claim, gets them once.
        let mut every_request: Vec<String> = Vec::new();
        for grant in &on_node.grants {
            if !every_request.contains(&grant.request) {
                every_request.push(grant.request.clone());
            }
        }
        let devices: Vec<PreparedDevice> = on_node
            .grants
            .iter()
            .zip(&on_node.share_ids)
            .enumerate()
            .map(|(i, (grant, share_id))| PreparedDevice {
                request_names: if i == 0 {
                    every_request.clone()
                } else {
                    vec![grant.request.clone()]
                },
                pool: self.config.node.clone(),
                device: grant.device.clone(),
                cdi_device_ids: if i == 0 {
                    cdi_device_ids.clone()
                } else {
                    Vec::new()
                },
                share_id: share_id.clone(),
            })
            .collect();
        let prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            cdi_spec_text: Some(spec),
            limit_file_text: Some(plan.limit_file.clone()),
            limits: plan.limits,
            admin_access: Some(on_node.admin_access),
            pods: on_node
                .pods
                .into_iter()
                .map(|(name, uid)| PreparedPod { name, uid })
                .collect(),
            devices: devices.clone(),
            files,
        };
        let mut state = self.state.lock().await;
        state.claims.insert(claim.uid.clone(), prepared);
        if let Err(e) = state.save(&self.config.checkpoint) {
            state.claims.remove(&claim.uid);
            return Err(e.into());
        }
        tracing::info!(claim = %claim.label(), uid = %claim.uid, devices = devices.len(), "prepared claim");
        Ok(devices)
    }

    /// Whether `object` (the API server's copy of `claim`) is still allocated here as it was
    /// prepared (`done`): the same claim, with results in this node's pool, not allocated again.
    fn held_here(&self, claim: &ClaimRef, done: &PreparedClaim, object: &ResourceClaim) -> bool {
        object.metadata.uid.as_deref() == Some(claim.uid.as_str())
            && !allocated_devices_in(object, &self.config.node).is_empty()
            && !self.reallocated(claim, done, object)
    }

    /// [`PrepareError::GpusChanged`] when the GPUs `done`'s devices name now are not those it
    /// was prepared on; `None` while this node's GPUs are not known yet (nothing to compare).
    fn gpus_changed(&self, claim: &ClaimRef, done: &PreparedClaim) -> Option<PrepareError> {
        let known = !self
            .gpus
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty();
        let changed = gpus_changed(
            done.limits.iter().map(|(uuid, _)| uuid.as_str()),
            done.devices.iter().map(|d| d.device.as_str()),
            |d| self.uuid_of(d),
        )
        .filter(|_| known)?;
        Some(PrepareError::GpusChanged {
            claim: claim.label(),
            then: changed.then.join(", "),
            devices: changed.devices.join(", "),
            now: changed
                .now
                .iter()
                .map(|u| u.as_deref().unwrap_or("no GPU"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Whether `object`, the claim as the API server has it now, is allocated on this node
    /// otherwise than when `done` was prepared: a claim keeps its UID when it is deallocated and
    /// allocated again, and an unprepare lost meanwhile (the plugin down while the pod went)
    /// would otherwise hand its next pod the old GPUs and limits. `false` when that cannot be
    /// told (the claim not allocated here, or made again as another object).
    fn reallocated(&self, claim: &ClaimRef, done: &PreparedClaim, object: &ResourceClaim) -> bool {
        if object.metadata.uid.as_deref() != Some(claim.uid.as_str()) {
            return false;
        }
        let then: Vec<(String, Option<String>)> = done
            .devices
            .iter()
            .map(|d| (d.device.clone(), d.share_id.clone()))
            .collect();
        // The limits its grants give here now, when this node can read them (a device it no
        // longer knows cannot be; its results still tell a new allocation).
        let limits = claim_on_node(object, &claim.uid, &self.config.node, |d| self.uuid_of(d))
            .ok()
            .and_then(|on_node| {
                plan_claim(
                    &claim.label(),
                    &claim.uid,
                    &on_node.grants,
                    &self.config.settings,
                )
                .ok()
            })
            .map(|plan| plan.limits);
        allocated_again(
            AllocationSeen {
                devices: &then,
                limits: Some(&done.limits),
            },
            AllocationSeen {
                devices: &allocated_devices_in(object, &self.config.node),
                limits: limits.as_deref(),
            },
        )
    }

    /// Refuse `claim` when a container of a pod it is reserved for (`pods`: name, UID) also
    /// uses another claim of this driver. A pod or claim that cannot be read is not held
    /// against it (logged): the check only turns a silent overwrite into a clear error.
    async fn refuse_several_in_one_container(
        &self,
        claim: &ClaimRef,
        pods: &[(String, String)],
    ) -> Result<(), PrepareError> {
        for (pod_name, pod_uid) in pods {
            let pod = match self.claims.pod(&claim.namespace, pod_name).await {
                Ok(Some(pod)) if pod.metadata.uid.as_deref() == Some(pod_uid.as_str()) => pod,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(claim = %claim.label(), pod = %pod_name, error = %e, "cannot read the pod to check its containers' claims");
                    continue;
                }
            };
            for (container, others) in containers_sharing(&pod, &claim.name) {
                let mut ours = vec![claim.label()];
                for other in &others {
                    match self.claims.get(&claim.namespace, other).await {
                        Ok(found) if allocated_by_driver(&found) => {
                            ours.push(format!("{}/{other}", claim.namespace));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(claim = %claim.label(), other = %other, error = %e, "cannot read a claim the same container uses");
                        }
                    }
                }
                if ours.len() > 1 {
                    return Err(PrepareError::SeveralClaimsInOneContainer {
                        claim: claim.label(),
                        pod: format!("{}/{pod_name}", claim.namespace),
                        container,
                        claims: ours,
                    });
                }
            }
        }
        Ok(())
    }

    /// Read again the claims a checkpoint of an earlier version holds without knowing whether
    /// they were allocated with admin access, and record it (checkpointed). A claim that
    /// cannot be read keeps counting as a plain one, as before, and is logged.
    pub async fn learn_admin_access(&self) {
        let unknown: Vec<(String, String, String)> = self
            .state
            .lock()
            .await
            .claims
            .iter()
            .filter(|(_, c)| c.admin_access.is_none())
            .map(|(uid, c)| (uid.clone(), c.namespace.clone(), c.name.clone()))
            .collect();
        if unknown.is_empty() {
            return;
        }
        let mut learned = Vec::new();
        for (uid, namespace, name) in unknown {
            // Bounded: the plugin serves the kubelet only after this.
            let read = tokio::time::timeout(
                ADMIN_ACCESS_READ_TIMEOUT,
                self.claims.get(&namespace, &name),
            )
            .await;
            match read {
                Ok(Ok(object)) if object.metadata.uid.as_deref() == Some(uid.as_str()) => {
                    let admin = admin_access_on(&object, &self.config.node);
                    learned.push((uid, admin));
                }
                // Deleted, or made again as another object: this one is not allocated any more,
                // so nothing will tell; it counts as before (and is not asked again).
                Ok(Ok(_)) | Ok(Err(FetchError::NotFound(_))) => learned.push((uid, false)),
                Ok(Err(e)) => {
                    tracing::warn!(claim = %format!("{namespace}/{name}"), error = %e, "cannot read a prepared claim to learn whether it has admin access");
                }
                Err(_) => {
                    tracing::warn!(claim = %format!("{namespace}/{name}"), "reading a prepared claim to learn whether it has admin access timed out");
                }
            }
        }
        let mut state = self.state.lock().await;
        for (uid, admin) in learned {
            if let Some(claim) = state.claims.get_mut(&uid) {
                claim.admin_access = Some(admin);
            }
        }
        if let Err(e) = state.save(&self.config.checkpoint) {
            tracing::warn!(error = %e, "cannot checkpoint what was learned of prepared claims");
        }
    }

    /// Read each prepared claim again: record the pods it is reserved for now, and release
    /// one gone from the API server for [`GONE_CLAIM_GRACE`].
    ///
    /// The kubelet prepares a claim once, for the pods it was reserved for then; pods that share
    /// it later (a Deployment rolling over one claim) are only in `status.reservedFor`. Without
    /// this their use would count as use outside every claim, and the claim's whole grant as
    /// still to come: counted twice, the published capacity shrinks by up to the grant. A
    /// claim prepared anew meanwhile (other devices) is left to that prepare; one that cannot
    /// be read keeps what it had.
    ///
    /// A claim is deleted, or deallocated, only once no pod is reserved for it, so one gone,
    /// made again under its name, no longer allocated here, or allocated here otherwise has no
    /// container left of what was prepared; its unprepare normally follows at once. When it has
    /// not come after the grace period (the kubelet's own state was lost), the claim is
    /// unprepared here, unless a prepare (of a new allocation) came since: its files removed,
    /// its grant no longer held. A claim that cannot be read keeps its time towards the grace.
    pub async fn reconcile_prepared_claims(&self) -> Reconciled {
        let prepared: Vec<(String, PreparedClaim)> = self
            .state
            .lock()
            .await
            .claims
            .iter()
            .map(|(uid, c)| (uid.clone(), c.clone()))
            .collect();
        let mut read = Vec::new();
        let mut gone: Vec<(ClaimRef, Vec<PreparedDevice>)> = Vec::new();
        let mut unread: Vec<String> = Vec::new();
        for (uid, done) in prepared {
            let claim = ClaimRef {
                namespace: done.namespace.clone(),
                name: done.name.clone(),
                uid: uid.clone(),
            };
            match self.claims.get(&claim.namespace, &claim.name).await {
                // Still allocated here as it was prepared: its pods now.
                Ok(object) if self.held_here(&claim, &done, &object) => {
                    let pods: Vec<PreparedPod> = reserved_pods(&object)
                        .into_iter()
                        .map(|(name, uid)| PreparedPod { name, uid })
                        .collect();
                    read.push((uid, done.devices, pods));
                }
                // Gone, made again, deallocated (a claim of its own outlives its pods), or
                // allocated elsewhere or otherwise: what was prepared is held by nobody here.
                Ok(_) | Err(FetchError::NotFound(_)) => gone.push((claim, done.devices)),
                Err(e) => {
                    tracing::debug!(claim = %claim.label(), error = %e, "cannot read a prepared claim to reconcile it");
                    unread.push(uid);
                }
            }
        }
        let now = tokio::time::Instant::now();
        let overdue: Vec<(ClaimRef, Vec<PreparedDevice>)> = {
            let mut since = self
                .gone_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A claim that could not be read this time keeps its time: a flaky API server
            // must not postpone the release for ever.
            since.retain(|uid, _| unread.contains(uid) || gone.iter().any(|(c, _)| &c.uid == uid));
            gone.into_iter()
                .filter(|(claim, devices)| {
                    let entry = since
                        .entry(claim.uid.clone())
                        .or_insert_with(|| (now, devices.clone()));
                    if &entry.1 != devices {
                        // Prepared anew since (other devices): its own time.
                        *entry = (now, devices.clone());
                    }
                    now.duration_since(entry.0) >= GONE_CLAIM_GRACE
                })
                .collect()
        };
        let mut reconciled = Reconciled::default();
        {
            let mut state = self.state.lock().await;
            for (uid, devices, pods) in read {
                if let Some(claim) = state.claims.get_mut(&uid)
                    && claim.devices == devices
                    && claim.pods != pods
                {
                    tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), before = claim.pods.len(), now = pods.len(), "the pods a prepared claim is reserved for changed");
                    claim.pods = pods;
                    reconciled.pods_changed += 1;
                }
            }
            if reconciled.pods_changed > 0
                && let Err(e) = state.save(&self.config.checkpoint)
            {
                tracing::warn!(error = %e, "cannot checkpoint the pods of prepared claims");
            }
        }
        for (claim, devices) in overdue {
            let _claim = self.claim_lock(&claim.uid).await;
            // A prepare since (the kubelet's, for a new allocation) is not this one.
            let Some(done) = self
                .state
                .lock()
                .await
                .claims
                .get(&claim.uid)
                .filter(|c| c.devices == devices)
                .cloned()
            else {
                continue;
            };
            // Read again under the claim's lock: a claim allocated back here with the same
            // devices since the read above may be being prepared (from the checkpoint) for a
            // container starting now.
            match self.claims.get(&claim.namespace, &claim.name).await {
                Ok(object) if self.held_here(&claim, &done, &object) => {
                    self.gone_since
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&claim.uid);
                    continue;
                }
                Ok(_) | Err(FetchError::NotFound(_)) => {}
                Err(_) => continue,
            }
            tracing::warn!(claim = %claim.label(), uid = %claim.uid, grace_s = GONE_CLAIM_GRACE.as_secs(), "a prepared claim is no longer allocated here (or gone) and its unprepare never came; releasing it");
            match self.unprepare_held(&claim).await {
                Ok(()) => {
                    self.gone_since
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&claim.uid);
                    reconciled.released.push(claim.label());
                }
                Err(e) => {
                    tracing::warn!(claim = %claim.label(), error = %e, "cannot release a prepared claim held by nobody here; trying again later");
                }
            }
        }
        reconciled
    }

    /// Unprepare `claim`: remove its files and forget it. A claim this driver never prepared
    /// (or already unprepared) succeeds: the kubelet may repeat the call. Its files, whose
    /// paths follow from its UID, are removed all the same: a prepare that wrote them and then
    /// failed to checkpoint (or was cancelled by the kubelet's timeout) left them behind.
    ///
    /// # Errors
    /// [`PrepareError`] when a file cannot be removed or the checkpoint cannot be written; the
    /// claim then stays prepared, so the kubelet's retry finds it.
    pub async fn unprepare(&self, claim: &ClaimRef) -> Result<(), PrepareError> {
        let _claim = self.claim_lock(&claim.uid).await;
        self.unprepare_held(claim).await
    }

    /// [`Driver::unprepare`] with the claim's lock held.
    async fn unprepare_held(&self, claim: &ClaimRef) -> Result<(), PrepareError> {
        let mut state = self.state.lock().await;
        let Some(prepared) = state.claims.get(&claim.uid).cloned() else {
            let files = self.files_of(&claim.uid);
            if [&files.cdi_spec, &files.limit_file, &files.accounting_dir]
                .iter()
                .any(|p| p.exists())
            {
                remove_files(claim, &files)?;
                tracing::info!(claim = %claim.label(), uid = %claim.uid, "removed the files of a claim not prepared here (a prepare that did not finish)");
            } else {
                tracing::debug!(claim = %claim.label(), uid = %claim.uid, "unprepare of a claim not prepared here");
            }
            return Ok(());
        };
        remove_files(claim, &prepared.files)?;
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
        let claims = state.claims.values().map(|c| ClaimUse {
            limits: &c.limits,
            pods: c.pods.iter().map(|p| p.uid.as_str()).collect(),
            admin_access: c.admin_access.unwrap_or(false),
        });
        grants_by_gpu(claims, samples)
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
