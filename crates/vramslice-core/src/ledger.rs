//! The allocation ledger: which pod holds (or is about to hold) how much of which GPU, and each
//! GPU's *effective free* memory by the contract's rule
//!
//! `effective_free = min(declared_free, live_free − unobserved − headroom)`
//!
//! Data enters as plain values: node readings (what the device plugin published in `GpuNode`
//! status), pod records (pods bound to a node, with the `vramslice.io/gpu-uuid` annotation), and
//! reservations (binds in flight). It leaves as verdicts ([`Ledger::check`]), scores
//! ([`Ledger::score`]), placements ([`Ledger::reserve`]) and per-GPU views. The caller supplies
//! the clock (`now`) to every time-dependent call; nothing here reads a clock or does I/O.
//!
//! Accounting rules, per GPU of a node with a valid reading:
//! - *assigned*: limits of ledger pods on the GPU (the kubelet's placement from the reading wins
//!   over the annotation), plus pods whose GPU is unknown (no annotation, or naming a GPU the
//!   node does not have; they count against every GPU of the node), plus pods the reading lists
//!   that the ledger does not know. `declared_free = advertised − assigned`.
//! - *unobserved*: for each pod counted above, its full limit when the reading does not show it
//!   (not listed, or assigned after the reading was taken), else `limit − measured usage`.
//! - a stale reading (older than the staleness bound) or an unhealthy GPU takes no new pods.
//!
//! [`Ledger::reserve`] only succeeds when effective free ≥ request, and effective free ≤
//! declared free, so the ledger never promises a GPU more units than it advertises.

mod book;
#[cfg(test)]
mod proptests;
mod reason;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

pub use reason::{GpuRejection, Rejection};

use crate::placement::{self, Candidate, PodRequest, Policy};
use crate::units::VramUnit;

/// The ledger's tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Safety margin kept free on every GPU, bytes.
    pub headroom_bytes: u64,
    /// Readings older than this take no new pods.
    pub staleness: Duration,
}

/// A pod bound to a node, as the API server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Pod UID (the ledger's key).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The node the pod is bound to.
    pub node: String,
    /// The `vramslice.io/gpu-uuid` annotation, when present.
    pub gpu_uuid: Option<String>,
    /// The `vramslice.io/assigned-at` annotation, when present and readable.
    pub assigned_at: Option<SystemTime>,
    /// The pod's VRAM request.
    pub request: PodRequest,
}

/// One node's readings (from `GpuNode` status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReading {
    /// When the readings were taken.
    pub observed_at: SystemTime,
    /// The unit the node advertises in.
    pub unit: VramUnit,
    /// The node's GPUs.
    pub gpus: Vec<GpuReading>,
}

/// One GPU's reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReading {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Live free memory (NVML), bytes.
    pub free_bytes: u64,
    /// Units advertised.
    pub units: u64,
    /// Whether the GPU may take work.
    pub healthy: bool,
    /// Why not, when unhealthy.
    pub health_reason: Option<String>,
    /// Pods the kubelet has allocated units of this GPU to.
    pub pods: Vec<ListedPod>,
}

/// A pod listed in a GPU's reading (the kubelet's truth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPod {
    /// Pod UID, when the plugin knows it.
    pub uid: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod's limit on this GPU, bytes.
    pub limit_bytes: u64,
    /// Measured usage, bytes, when known.
    pub used_bytes: Option<u64>,
}

/// One GPU's books: the numbers behind its effective free memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Whether the GPU may take work.
    pub healthy: bool,
    /// Why not, when unhealthy.
    pub health_reason: Option<String>,
    /// Advertised units × unit bytes.
    pub advertised_bytes: u64,
    /// Bytes assigned to pods (declared).
    pub assigned_bytes: u64,
    /// `advertised − assigned`, never below zero.
    pub declared_free: u64,
    /// Live free bytes from the reading.
    pub live_free: u64,
    /// Bytes assigned pods may still take that the reading cannot show.
    pub unobserved: u64,
    /// `min(declared_free, live_free − unobserved − headroom)`, never below zero.
    pub effective_free: u64,
}

/// Where a reservation landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node.
    pub node: String,
    /// The chosen GPU's UUID.
    pub gpu_uuid: String,
    /// The chosen GPU's index.
    pub gpu_index: u32,
}

/// A pod to reserve room for (a bind in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod's VRAM request.
    pub request: PodRequest,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The pod is already bound (the API server shows it on a node).
    #[error("pod {pod} is already bound to node {node}")]
    AlreadyBound {
        /// `namespace/name`.
        pod: String,
        /// Its node.
        node: String,
    },
    /// Another bind of the same pod holds a reservation.
    #[error("pod {pod} already has a bind in flight to node {node}")]
    InFlight {
        /// `namespace/name`.
        pod: String,
        /// The node of the other bind.
        node: String,
    },
    /// The node cannot take the pod.
    #[error("{0}")]
    NoFit(#[from] Rejection),
}

/// What the ledger knows about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The node.
    pub node: String,
    /// The GPU it counts against (`None`: unknown, counts against every GPU of the node).
    pub gpu_uuid: Option<String>,
    /// The request.
    pub request: PodRequest,
    /// A reservation not yet confirmed by the API server.
    pub reserved: bool,
}

#[derive(Debug, Clone)]
struct PodEntry {
    record: PodRecord,
    /// The GPU the kubelet placed the pod on, per the node's reading (wins over the annotation).
    observed_gpu: Option<String>,
    /// `Some(since)` for a reservation the API server has not yet shown bound.
    reserved_since: Option<SystemTime>,
}

impl PodEntry {
    fn gpu(&self) -> Option<&str> {
        self.observed_gpu
            .as_deref()
            .or(self.record.gpu_uuid.as_deref())
    }
}

#[derive(Debug, Clone)]
enum ReadingState {
    Missing,
    Invalid(String),
    Valid(NodeReading),
}

#[derive(Debug, Clone)]
struct NodeState {
    reading: ReadingState,
    /// UIDs of ledger pods on the node.
    pods: BTreeSet<String>,
    /// Books per GPU, in reading order (by index).
    gpus: Vec<GpuView>,
    /// Largest effective free among healthy GPUs.
    best_free: u64,
    /// Largest advertised bytes among all GPUs.
    capacity: u64,
    /// The capacity this node contributes to the ledger's multiset, when it does.
    counted: Option<u64>,
}

impl NodeState {
    fn new() -> Self {
        NodeState {
            reading: ReadingState::Missing,
            pods: BTreeSet::new(),
            gpus: Vec::new(),
            best_free: 0,
            capacity: 0,
            counted: None,
        }
    }
}

/// Per-GPU books for every node, and the pods behind them. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: LedgerConfig,
    nodes: HashMap<String, NodeState>,
    pods: HashMap<String, PodEntry>,
    /// Node capacities (largest GPU per node) as a multiset, for the cluster-wide largest GPU.
    capacities: BTreeMap<u64, usize>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Self {
        Ledger {
            config,
            nodes: HashMap::new(),
            pods: HashMap::new(),
            capacities: BTreeMap::new(),
        }
    }

    /// The ledger's tunables.
    pub fn config(&self) -> LedgerConfig {
        self.config
    }

    /// Record a node's latest reading. Pods it lists on a GPU other than their annotation are
    /// moved there: the kubelet's allocation is the truth.
    pub fn set_reading(&mut self, node: &str, reading: NodeReading) {
        for gpu in &reading.gpus {
            for listed in &gpu.pods {
                if let Some(entry) = self
                    .match_listed(node, listed)
                    .and_then(|uid| self.pods.get_mut(&uid))
                {
                    entry.observed_gpu = Some(gpu.uuid.clone());
                }
            }
        }
        self.node_mut(node).reading = ReadingState::Valid(reading);
        self.recompute(node);
    }

    /// Record that a node's `GpuNode` exists but cannot be read (the reason is shown in every
    /// failure for the node).
    pub fn set_reading_invalid(&mut self, node: &str, reason: impl Into<String>) {
        self.node_mut(node).reading = ReadingState::Invalid(reason.into());
        self.recompute(node);
    }

    /// Forget a node's reading (its `GpuNode` was deleted).
    pub fn remove_reading(&mut self, node: &str) {
        if let Some(state) = self.nodes.get_mut(node) {
            state.reading = ReadingState::Missing;
            self.recompute(node);
        }
    }

    /// Replace every reading at once (after a full re-list): nodes not named lose theirs.
    pub fn replace_readings(&mut self, readings: Vec<(String, Result<NodeReading, String>)>) {
        let named: BTreeSet<String> = readings.iter().map(|(n, _)| n.clone()).collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !named.contains(*n))
            .cloned()
            .collect();
        for node in gone {
            self.remove_reading(&node);
        }
        for (node, reading) in readings {
            match reading {
                Ok(reading) => self.set_reading(&node, reading),
                Err(reason) => self.set_reading_invalid(&node, reason),
            }
        }
    }

    /// Record a pod the API server shows bound to a node. Confirms a reservation of the same
    /// UID (keeping its GPU when the record carries no annotation).
    pub fn observe_pod(&mut self, record: PodRecord) {
        let mut observed_gpu = None;
        let mut record = record;
        if let Some(old) = self.pods.remove(&record.uid) {
            self.detach(&old.record.node, &old.record.uid);
            if old.record.node == record.node {
                observed_gpu = old.observed_gpu;
                if record.gpu_uuid.is_none() {
                    record.gpu_uuid = old.record.gpu_uuid;
                }
                if record.assigned_at.is_none() {
                    record.assigned_at = old.record.assigned_at;
                }
            } else {
                self.recompute(&old.record.node);
            }
        }
        let node = record.node.clone();
        let uid = record.uid.clone();
        self.pods.insert(
            uid.clone(),
            PodEntry {
                record,
                observed_gpu,
                reserved_since: None,
            },
        );
        self.node_mut(&node).pods.insert(uid);
        self.reconcile_from_reading(&node);
        self.recompute(&node);
    }

    /// Forget a pod (deleted, or finished and holding nothing). Returns whether it was known.
    pub fn forget_pod(&mut self, uid: &str) -> bool {
        match self.pods.remove(uid) {
            Some(old) => {
                self.detach(&old.record.node, uid);
                self.recompute(&old.record.node);
                true
            }
            None => false,
        }
    }

    /// Replace every bound pod at once (after a full re-list). Reservations in flight are kept.
    pub fn replace_pods(&mut self, records: Vec<PodRecord>) {
        let listed: BTreeSet<&str> = records.iter().map(|r| r.uid.as_str()).collect();
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, e)| e.reserved_since.is_none() && !listed.contains(uid.as_str()))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.forget_pod(&uid);
        }
        for record in records {
            self.observe_pod(record);
        }
    }

    /// Reserve room for a pod on `node`, choosing the GPU by `policy`. Fails when the pod is
    /// already bound or being bound, or when no GPU of the node has enough effective free
    /// memory now. The reservation holds until [`Ledger::release`], confirmation by
    /// [`Ledger::observe_pod`], or expiry.
    pub fn reserve(
        &mut self,
        request: ReserveRequest,
        node: &str,
        policy: Policy,
        now: SystemTime,
    ) -> Result<Placement, ReserveError> {
        if let Some(existing) = self.pods.get(&request.uid) {
            let pod = format!("{}/{}", request.namespace, request.name);
            let node = existing.record.node.clone();
            return Err(match existing.reserved_since {
                Some(_) => ReserveError::InFlight { pod, node },
                None => ReserveError::AlreadyBound { pod, node },
            });
        }
        self.check(node, request.request, now)?;
        let chosen = self
            .best_gpu(node, request.request, policy)
            .ok_or_else(|| self.rejection(node, request.request, now))?;
        let gpu_uuid = self
            .nodes
            .get(node)
            .and_then(|s| s.gpus.iter().find(|g| g.index == chosen.index))
            .map(|g| g.uuid.clone())
            .ok_or_else(|| self.rejection(node, request.request, now))?;
        let record = PodRecord {
            uid: request.uid.clone(),
            namespace: request.namespace,
            name: request.name,
            node: node.to_string(),
            gpu_uuid: Some(gpu_uuid.clone()),
            assigned_at: Some(now),
            request: request.request,
        };
        self.pods.insert(
            request.uid.clone(),
            PodEntry {
                record,
                observed_gpu: None,
                reserved_since: Some(now),
            },
        );
        self.node_mut(node).pods.insert(request.uid);
        self.recompute(node);
        Ok(Placement {
            node: node.to_string(),
            gpu_uuid,
            gpu_index: chosen.index,
        })
    }

    /// Drop a reservation (its bind failed). Bound pods are not touched. Returns whether a
    /// reservation was dropped.
    pub fn release(&mut self, uid: &str) -> bool {
        let reserved = self
            .pods
            .get(uid)
            .is_some_and(|e| e.reserved_since.is_some());
        reserved && self.forget_pod(uid)
    }

    /// Drop reservations older than `ttl` that the API server never showed bound; returns their
    /// UIDs.
    pub fn expire_reservations(&mut self, now: SystemTime, ttl: Duration) -> Vec<String> {
        let expired: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.reserved_since
                    .is_some_and(|since| now.duration_since(since).unwrap_or_default() > ttl)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &expired {
            self.forget_pod(uid);
        }
        expired
    }

    /// Whether `node` can take a pod of `request` now; the reason when not.
    pub fn check(&self, node: &str, request: PodRequest, now: SystemTime) -> Result<(), Rejection> {
        if let Some(state) = self.nodes.get(node)
            && let ReadingState::Valid(reading) = &state.reading
            && reading.unit == request.unit
            && state.best_free >= request.bytes()
            && self.age(reading, now) <= self.config.staleness
        {
            return Ok(());
        }
        Err(self.rejection(node, request, now))
    }

    /// Score 0..=10 of `node` for a pod of `request` under `policy` (0 when it cannot fit).
    pub fn score(&self, node: &str, request: PodRequest, policy: Policy, now: SystemTime) -> u8 {
        if self.check(node, request, now).is_err() {
            return 0;
        }
        self.best_gpu(node, request, policy)
            .map_or(0, |c| placement::score(c, request.bytes(), policy))
    }

    /// The per-GPU books of a node with a valid reading.
    pub fn gpu_views(&self, node: &str) -> Option<&[GpuView]> {
        self.nodes.get(node).map(|s| s.gpus.as_slice())
    }

    /// The largest GPU (advertised bytes) of any node with a valid reading.
    pub fn largest_gpu_bytes(&self) -> Option<u64> {
        self.capacities.keys().next_back().copied()
    }

    /// What the ledger knows about a pod.
    pub fn pod(&self, uid: &str) -> Option<PodInfo> {
        self.pods.get(uid).map(|e| PodInfo {
            node: e.record.node.clone(),
            gpu_uuid: e.gpu().map(str::to_string),
            request: e.record.request,
            reserved: e.reserved_since.is_some(),
        })
    }

    /// Pods in the ledger (bound and reserved).
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Reservations not yet confirmed.
    pub fn reservation_count(&self) -> usize {
        self.pods
            .values()
            .filter(|e| e.reserved_since.is_some())
            .count()
    }

    /// Nodes with a valid reading.
    pub fn node_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|s| matches!(s.reading, ReadingState::Valid(_)))
            .count()
    }

    /// Nodes whose reading is older than the staleness bound.
    pub fn stale_node_count(&self, now: SystemTime) -> usize {
        self.nodes
            .values()
            .filter(|s| match &s.reading {
                ReadingState::Valid(r) => self.age(r, now) > self.config.staleness,
                _ => false,
            })
            .count()
    }

    fn age(&self, reading: &NodeReading, now: SystemTime) -> Duration {
        now.duration_since(reading.observed_at).unwrap_or_default()
    }

    fn node_mut(&mut self, node: &str) -> &mut NodeState {
        self.nodes
            .entry(node.to_string())
            .or_insert_with(NodeState::new)
    }

    fn detach(&mut self, node: &str, uid: &str) {
        if let Some(state) = self.nodes.get_mut(node) {
            state.pods.remove(uid);
        }
    }

    /// The ledger pod on `node` a listed pod stands for: by UID, else by namespace and name.
    fn match_listed(&self, node: &str, listed: &ListedPod) -> Option<String> {
        let state = self.nodes.get(node)?;
        if let Some(uid) = &listed.uid {
            return state.pods.contains(uid).then(|| uid.clone());
        }
        state
            .pods
            .iter()
            .find(|uid| {
                self.pods.get(*uid).is_some_and(|e| {
                    e.record.namespace == listed.namespace && e.record.name == listed.name
                })
            })
            .cloned()
    }

    /// Apply the node's current reading's placements to newly observed pods.
    fn reconcile_from_reading(&mut self, node: &str) {
        let Some(ReadingState::Valid(reading)) = self.nodes.get(node).map(|s| &s.reading) else {
            return;
        };
        let mut moves = Vec::new();
        for gpu in &reading.gpus {
            for listed in &gpu.pods {
                if let Some(uid) = self.match_listed(node, listed) {
                    moves.push((uid, gpu.uuid.clone()));
                }
            }
        }
        for (uid, gpu) in moves {
            if let Some(entry) = self.pods.get_mut(&uid) {
                entry.observed_gpu = Some(gpu);
            }
        }
    }

    fn best_gpu(&self, node: &str, request: PodRequest, policy: Policy) -> Option<Candidate> {
        let state = self.nodes.get(node)?;
        let candidates = state.gpus.iter().filter(|g| g.healthy).map(|g| Candidate {
            index: g.index,
            effective_free: g.effective_free,
            advertised_bytes: g.advertised_bytes,
        });
        placement::choose(candidates, request.bytes(), policy)
    }

    fn recompute(&mut self, node: &str) {
        let Some(state) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some(old) = state.counted.take() {
            multiset_remove(&mut self.capacities, old);
        }
        book::recompute(state, &self.pods, self.config.headroom_bytes);
        let has_reading = matches!(state.reading, ReadingState::Valid(_));
        if has_reading {
            *self.capacities.entry(state.capacity).or_insert(0) += 1;
            state.counted = Some(state.capacity);
        }
        if matches!(state.reading, ReadingState::Missing) && state.pods.is_empty() {
            self.nodes.remove(node);
        }
    }

    /// The detailed reason `node` cannot take `request` now.
    fn rejection(&self, node: &str, request: PodRequest, now: SystemTime) -> Rejection {
        let Some(state) = self.nodes.get(node) else {
            return Rejection::NoReading {
                node: node.to_string(),
            };
        };
        book::rejection(node, state, request, self.config, now)
    }
}

fn multiset_remove(set: &mut BTreeMap<u64, usize>, key: u64) {
    if let Some(count) = set.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            set.remove(&key);
        }
    }
}
