//! The allocation ledger: which pod holds (or is about to hold) how much of which GPU, and each
//! GPU's *effective free* memory by the contract's rule
//!
//! `effective_free = min(declared_free, live_free − unobserved − headroom)`
//!
//! (the arithmetic is [`crate::effective_free`], which the DRA plugin's published capacity
//! shares; this module gathers its inputs).
//!
//! Data enters as plain values: node readings (what the device plugin published in `GpuNode`
//! status), pod records (pods bound to a node, with the `vramslice.io/gpu-uuid` annotation), and
//! reservations (binds in flight). It leaves as verdicts ([`Ledger::check`], and for many nodes
//! at once [`Ledger::probe`]), scores ([`Probe::score`]), placements ([`Ledger::reserve`]) and
//! per-GPU views. The caller supplies the clock (`now`) to every time-dependent call; nothing
//! here reads a clock or does I/O.
//!
//! Accounting rules, per GPU of a node with a valid reading:
//! - *assigned*: limits of ledger pods the kubelet placed on the GPU (the reading wins over the
//!   annotation); pods still waiting, booked per request size on the GPUs still owed that size
//!   (per set of GPUs, assigned by annotation minus allocated; same-size pods swap sets at
//!   allocation, see `vramslice_core::owed_gpus`), including deleted ones whose units a waiting pod may hold
//!   (`departed`); pods whose GPU is unknown (no annotation, or naming a GPU the node does not
//!   have; they count against every GPU of the node); pods the reading lists that the ledger
//!   does not know. `declared_free = advertised − assigned`.
//! - *unobserved*: for each pod counted above, its full limit when the reading does not show it
//!   (not listed, or assigned after the reading was taken), else `limit − measured usage`.
//! - a stale reading (older than the staleness bound) or an unhealthy GPU takes no new pods.
//!
//! A pod spanning N GPUs (`vramslice.io/gpus`, [`PodRequest::gpus`]) takes an even share
//! (request / N) on each of N distinct GPUs: it is booked for its share on each GPU its
//! annotation (comma-separated UUIDs) or the reading names, and its share on every GPU when
//! they are unknown. Waiting pods are booked per size on the sets of GPUs still owed a pod, counted
//! per set as the device plugin counts them, so pods of one size but different GPU counts that
//! swap sets at the device plugin stay booked where they land.
//!
//! A node fits a pod ([`Ledger::check`], the filter) and [`Ledger::reserve`] succeeds only when
//! effective free ≥ the pod's share on each GPU it chooses and there is room on each GPU the pod
//! would end up booked on besides (after an unpaired swap, a GPU still owed a pod of its size,
//! where the device plugin may place it: `steering`), and effective free ≤ declared free, so
//! the ledger never promises a GPU more units than it advertises; and no pod of its size but
//! another GPU count waits for its units on the node (`shape`: the device plugin could swap the
//! two, and each would start on GPUs of the wrong shape).

mod book;
mod departed;
mod hash;
mod probe;
#[cfg(test)]
mod proptests;
mod reason;
mod reservations;
mod shape;
#[cfg(test)]
mod spanning_tests;
mod steering;
mod table;
#[cfg(test)]
mod tests;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

pub use probe::{Probe, RefusalKind};
use reason::RefusalCache;
pub use reason::{GpuRejection, Refusal, Rejection};
pub use types::{
    GpuView, ListedPod, NodeReading, Placement, PodInfo, PodRecord, PublishedGpu, ReserveError,
    ReserveRequest,
};

use hash::FastMap;
use table::{Hot, NodeTable};

use crate::cluster::placement::{self, Candidate, PodRequest, Policy};

/// How far a reading taken at `observed` is from `now`, and whether it is stamped after now (a
/// node clock ahead of the extender's). Staleness is this distance: a reading from the future
/// is as untrustworthy as an old one, and would otherwise never go stale.
fn reading_distance(observed: SystemTime, now: SystemTime) -> (Duration, bool) {
    match now.duration_since(observed) {
        Ok(age) => (age, false),
        Err(ahead) => (ahead.duration(), true),
    }
}

/// The extender's default `headroom`, as configuration writes it ([`DEFAULT_HEADROOM_BYTES`]).
pub const DEFAULT_HEADROOM: &str = "512Mi";
/// [`DEFAULT_HEADROOM`] in bytes.
pub const DEFAULT_HEADROOM_BYTES: u64 = 512 << 20;
/// The extender's default `staleness`, as configuration writes it ([`DEFAULT_STALENESS_DURATION`]).
pub const DEFAULT_STALENESS: &str = "90s";
/// [`DEFAULT_STALENESS`] as a duration.
pub const DEFAULT_STALENESS_DURATION: Duration = Duration::from_secs(90);

/// A `staleness` setting: a duration above zero (a zero bound would make every reading stale).
///
/// # Errors
/// The text is not a duration, or it is zero.
pub fn parse_staleness(text: &str) -> Result<Duration, String> {
    let staleness = crate::parse_duration(text).map_err(|e| e.to_string())?;
    if staleness.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(staleness)
}

/// The ledger's tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Safety margin kept free on every GPU, bytes.
    pub headroom_bytes: u64,
    /// Readings older than this take no new pods.
    pub staleness: Duration,
}

#[derive(Debug, Clone)]
struct PodEntry {
    record: PodRecord,
    /// The GPU the kubelet placed the pod on, per the node's reading (wins over the annotation);
    /// several comma-separated for a pod the reading lists on several GPUs.
    observed_gpu: Option<String>,
    /// `Some(since)` for a reservation the API server has not yet shown bound.
    reserved_since: Option<SystemTime>,
    /// A reservation whose bind ended without knowing whether its Binding took
    /// ([`Ledger::unsettle`]).
    unsettled: Option<Unsettled>,
    /// Bound by a Binding the API server confirmed, not yet shown by the pod watch: the re-list
    /// count when it was confirmed ([`Ledger::confirm_bound`]).
    confirmed_in: Option<u64>,
}

/// When and under which token a reservation was left unsettled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unsettled {
    token: u64,
    at: SystemTime,
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
    /// The healthy GPUs as placement sees them (compact, for scoring many nodes).
    candidates: Vec<Candidate>,
    /// Largest effective free among healthy GPUs.
    best_free: u64,
    /// Largest advertised bytes among all GPUs.
    capacity: u64,
    /// The capacity this node contributes to the ledger's multiset, when it does.
    counted: Option<u64>,
    /// The last refusal rendered for this node (cleared whenever its books change).
    refusal: RefusalCache,
    /// Waiting pods deleted while a same-size pod may hold their units.
    departed: Vec<departed::Departed>,
    /// Sizes one more pod of which would be booked on GPUs besides its own.
    steering: Vec<steering::Steering>,
    /// Pods waiting for their units, by size and GPU count (`shape`).
    waiting_shapes: Vec<shape::WaitingShape>,
}

impl NodeState {
    fn new() -> Self {
        NodeState {
            reading: ReadingState::Missing,
            pods: BTreeSet::new(),
            gpus: Vec::new(),
            candidates: Vec::new(),
            best_free: 0,
            capacity: 0,
            counted: None,
            refusal: RefusalCache::default(),
            departed: Vec::new(),
            steering: Vec::new(),
            waiting_shapes: Vec::new(),
        }
    }
}

/// Per-GPU books for every node, and the pods behind them. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct Ledger {
    config: LedgerConfig,
    nodes: NodeTable,
    pods: FastMap<PodEntry>,
    /// Node capacities (largest GPU per node) as a multiset, for the cluster-wide largest GPU.
    capacities: BTreeMap<u64, usize>,
    /// Tokens handed out by [`Ledger::unsettle`].
    unsettles: u64,
    /// Re-lists of the pods so far ([`Ledger::replace_pods`]).
    relists: u64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Self {
        Ledger {
            config,
            nodes: NodeTable::default(),
            pods: FastMap::default(),
            capacities: BTreeMap::new(),
            unsettles: 0,
            relists: 0,
        }
    }

    /// The ledger's tunables.
    pub fn config(&self) -> LedgerConfig {
        self.config
    }

    /// Record a node's latest reading. Pods it lists on a GPU other than their annotation are
    /// moved there: the kubelet's allocation is the truth.
    pub fn set_reading(&mut self, node: &str, reading: NodeReading) {
        for (uid, gpus) in self.listed_placements(node, &reading) {
            if let Some(entry) = self.pods.get_mut(&uid) {
                entry.observed_gpu = Some(gpus);
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
            .names()
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
                unsettled: None,
                confirmed_in: None,
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
                let node = old.record.node.as_str();
                if let Some(state) = self.nodes.get_mut(node)
                    && let Some(d) = departed::departure(&old, &state.pods, &self.pods)
                {
                    state.departed.push(d);
                }
                self.detach(&old.record.node, uid);
                self.recompute(&old.record.node);
                true
            }
            None => false,
        }
    }

    /// Replace every bound pod at once (after a full re-list). Reservations in flight are kept,
    /// and so are pods confirmed bound since the last re-list (this list may have been taken
    /// just before their Binding; the watch after it shows them). A confirmed pod the next
    /// re-list still lacks is gone.
    pub fn replace_pods(&mut self, records: Vec<PodRecord>) {
        let listed: BTreeSet<&str> = records.iter().map(|r| r.uid.as_str()).collect();
        let relists = self.relists;
        self.relists += 1;
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, e)| {
                e.reserved_since.is_none()
                    && e.confirmed_in != Some(relists)
                    && !listed.contains(uid.as_str())
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.forget_pod(&uid);
        }
        for record in records {
            self.observe_pod(record);
        }
    }

    /// Reserve room for a pod on `node`, choosing the GPU (or, for a pod spanning N GPUs, the N
    /// distinct GPUs) by `policy`. Fails when the pod is already bound or being bound, or when
    /// the node lacks enough GPUs with the pod's share effectively free now. The reservation holds until [`Ledger::release`], confirmation by
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
                Some(_) if existing.unsettled.is_some() => ReserveError::Unsettled { pod, node },
                Some(_) => ReserveError::InFlight { pod, node },
                None => ReserveError::AlreadyBound { pod, node },
            });
        }
        self.check(node, request.request, now)?;
        let chosen = self
            .best_gpus(node, request.request, policy)
            .ok_or_else(|| self.rejection(node, request.request, now))?;
        let gpus: Vec<&GpuView> = chosen
            .iter()
            .filter_map(|c| {
                self.nodes
                    .get(node)
                    .and_then(|s| s.gpus.iter().find(|g| g.index == c.index))
            })
            .collect();
        if gpus.len() != chosen.len() || gpus.is_empty() {
            return Err(self.rejection(node, request.request, now).into());
        }
        let gpu_uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
        let gpu_indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
        // Waiting pods are booked per size on the GPUs still owed that size, which after an
        // unpaired swap may not be the GPU chosen here: the check above made sure those GPUs
        // have room too (`steering`).
        let gpu_uuid = placement::join_gpu_uuids(&gpu_uuids);
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
                unsettled: None,
                confirmed_in: None,
            },
        );
        self.node_mut(node).pods.insert(request.uid.clone());
        self.recompute(node);
        Ok(Placement {
            node: node.to_string(),
            gpu_uuid,
            gpu_index: gpu_indices[0],
            gpu_uuids,
            gpu_indices,
        })
    }

    /// The per-GPU books of a node with a valid reading.
    pub fn gpu_views(&self, node: &str) -> Option<&[GpuView]> {
        self.nodes.get(node).map(|s| s.gpus.as_slice())
    }

    /// The largest GPU (advertised bytes) of any node with a valid reading.
    pub fn largest_gpu_bytes(&self) -> Option<u64> {
        self.capacities.keys().next_back().copied()
    }

    /// Whether the ledger holds a pod (bound or reserved).
    pub fn has_pod(&self, uid: &str) -> bool {
        self.pods.contains_key(uid)
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

    /// Whether any node keeps a deleted waiting pod on its books (see `departed`).
    #[cfg(test)]
    fn keeps_departed(&self) -> bool {
        self.nodes.values().any(|s| !s.departed.is_empty())
    }

    fn age(&self, reading: &NodeReading, now: SystemTime) -> Duration {
        reading_distance(reading.observed_at, now).0
    }

    fn node_mut(&mut self, node: &str) -> &mut NodeState {
        self.nodes.entry(node)
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
        let moves = self.listed_placements(node, reading);
        for (uid, gpus) in moves {
            if let Some(entry) = self.pods.get_mut(&uid) {
                entry.observed_gpu = Some(gpus);
            }
        }
    }

    /// The ledger pods of `node` that `reading` lists, each with the GPUs it lists them on
    /// (comma-separated in reading order: one GPU, or several for a pod spanning GPUs).
    fn listed_placements(&self, node: &str, reading: &NodeReading) -> Vec<(String, String)> {
        let mut found: Vec<(String, Vec<&str>)> = Vec::new();
        for gpu in &reading.gpus {
            for listed in &gpu.pods {
                let Some(uid) = self.match_listed(node, listed) else {
                    continue;
                };
                match found.iter_mut().find(|(u, _)| *u == uid) {
                    Some((_, gpus)) => {
                        if !gpus.contains(&gpu.uuid.as_str()) {
                            gpus.push(&gpu.uuid);
                        }
                    }
                    None => found.push((uid, vec![gpu.uuid.as_str()])),
                }
            }
        }
        found
            .into_iter()
            .map(|(uid, gpus)| (uid, placement::join_gpu_uuids(&gpus)))
            .collect()
    }

    fn best_gpus(&self, node: &str, request: PodRequest, policy: Policy) -> Option<Vec<Candidate>> {
        let state = self.nodes.get(node)?;
        placement::choose_n(
            state.candidates.iter().copied(),
            request.share_bytes(),
            request.gpu_count(),
            policy,
        )
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
        let hot = match &state.reading {
            ReadingState::Valid(reading) => Hot {
                unit: Some(reading.unit),
                observed_at: reading.observed_at,
                best_free: state.best_free,
            },
            _ => Hot {
                unit: None,
                observed_at: SystemTime::UNIX_EPOCH,
                best_free: 0,
            },
        };
        if matches!(state.reading, ReadingState::Missing) && state.pods.is_empty() {
            self.nodes.remove(node);
        } else {
            self.nodes.set_hot(node, hot);
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
