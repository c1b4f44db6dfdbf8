//! One node's books: per-GPU assigned, unobserved and effective free memory from its reading and
//! its pods, and the detailed reason when the node cannot take a pod.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::hash::FastMap;
use super::{GpuRejection, GpuView, LedgerConfig, NodeState, PodEntry, ReadingState, Rejection};
use crate::cluster::placement::{Candidate, PodRequest};
use crate::effective_free::{effective_free, unobserved_part};

/// Recompute `state.gpus`, `best_free` and `capacity` from the reading and the node's pods.
pub(super) fn recompute(state: &mut NodeState, pods: &FastMap<PodEntry>, headroom: u64) {
    state.refusal.clear();
    state.gpus.clear();
    state.candidates.clear();
    state.best_free = 0;
    state.capacity = 0;
    let ReadingState::Valid(reading) = &state.reading else {
        return;
    };
    state.gpus.extend(reading.gpus.iter().map(|g| GpuView {
        index: g.index,
        uuid: g.uuid.clone(),
        healthy: g.healthy,
        health_reason: g.health_reason.clone(),
        advertised_bytes: reading.unit.bytes_for(g.units),
        assigned_bytes: 0,
        declared_free: 0,
        live_free: g.free_bytes,
        unobserved: 0,
        effective_free: 0,
    }));
    let mut known: Vec<Vec<bool>> = reading
        .gpus
        .iter()
        .map(|g| vec![false; g.pods.len()])
        .collect();

    // Same-size pods are interchangeable to the device plugin: a pod waiting for its units may
    // be given those of another waiting pod of its size, and that pod the first one's GPU
    // (`crate::owed_gpus`). So waiting pods are booked per size, on the GPUs still owed that
    // size, not each on its own annotation: once the reading shows pod A (assigned GPU 0) on
    // GPU 1, the pod B of A's size still waiting on GPU 1 is booked on GPU 0, where it will land.
    let mut by_size: BTreeMap<u64, SizeGroup> = BTreeMap::new();
    let gpu_count = state.gpus.len();
    for uid in &state.pods {
        let Some(entry) = pods.get(uid) else {
            continue;
        };
        let limit = entry.record.request.bytes();
        // Where the reading shows the pod, and with what usage.
        let mut listed: Option<(usize, Option<u64>)> = None;
        for (i, g) in reading.gpus.iter().enumerate() {
            for (j, p) in g.pods.iter().enumerate() {
                let same = match &p.uid {
                    Some(u) => *u == entry.record.uid,
                    None => p.namespace == entry.record.namespace && p.name == entry.record.name,
                };
                if same {
                    known[i][j] = true;
                    listed = Some((i, p.used_bytes));
                }
            }
        }
        let position = |uuid: &str| state.gpus.iter().position(|g| g.uuid == uuid);
        let annotated = entry.record.gpu_uuid.as_deref().and_then(position);
        let target = entry.gpu().and_then(position);
        if let Some(annotated) = annotated {
            let group = by_size
                .entry(limit)
                .or_insert_with(|| SizeGroup::new(gpu_count));
            group.assigned[annotated] += 1;
            match (listed, entry.observed_gpu.as_deref().and_then(position)) {
                (Some((i, _)), _) | (None, Some(i)) => group.allocated[i] += 1,
                (None, None) => {
                    group.waiting += 1;
                    continue;
                }
            }
        }
        let seen_since_assignment = entry
            .record
            .assigned_at
            .is_none_or(|t| t <= reading.observed_at);
        for (i, view) in state.gpus.iter_mut().enumerate() {
            if target.is_some_and(|t| t != i) {
                continue;
            }
            view.assigned_bytes = view.assigned_bytes.saturating_add(limit);
            let unobserved = match listed {
                Some((li, used)) if li == i && seen_since_assignment => {
                    unobserved_part(limit, used)
                }
                _ => limit,
            };
            view.unobserved = view.unobserved.saturating_add(unobserved);
        }
    }
    super::departed::prune(&mut state.departed, pods);
    for gone in &state.departed {
        let Some(annotated) = state.gpus.iter().position(|g| g.uuid == gone.gpu_uuid) else {
            continue;
        };
        let group = by_size
            .entry(gone.limit)
            .or_insert_with(|| SizeGroup::new(gpu_count));
        group.assigned[annotated] += 1;
        group.waiting += 1;
    }
    for (limit, group) in &by_size {
        for (i, view) in state.gpus.iter_mut().enumerate() {
            let bytes = limit.saturating_mul(group.waiting_on(i));
            view.assigned_bytes = view.assigned_bytes.saturating_add(bytes);
            view.unobserved = view.unobserved.saturating_add(bytes);
        }
    }

    // Pods the kubelet reports that the ledger does not know (deleted since, or not yet seen).
    for (i, g) in reading.gpus.iter().enumerate() {
        for (j, p) in g.pods.iter().enumerate() {
            if known[i][j] {
                continue;
            }
            let view = &mut state.gpus[i];
            view.assigned_bytes = view.assigned_bytes.saturating_add(p.limit_bytes);
            view.unobserved = view
                .unobserved
                .saturating_add(unobserved_part(p.limit_bytes, p.used_bytes));
        }
    }

    for view in &mut state.gpus {
        view.declared_free = view.advertised_bytes.saturating_sub(view.assigned_bytes);
        view.effective_free = effective_free(
            view.advertised_bytes,
            view.assigned_bytes,
            view.live_free,
            view.unobserved,
            headroom,
        );
        state.capacity = state.capacity.max(view.advertised_bytes);
        if view.healthy {
            state.best_free = state.best_free.max(view.effective_free);
            state.candidates.push(Candidate {
                index: view.index,
                effective_free: view.effective_free,
                advertised_bytes: view.advertised_bytes,
            });
        }
    }
}

/// One request size's pods on a node, per GPU (by reading position).
struct SizeGroup {
    /// Pods the extender assigned to each GPU (their annotation), waiting or allocated.
    assigned: Vec<u64>,
    /// Pods the kubelet has allocated each GPU to (the reading), among those annotated.
    allocated: Vec<u64>,
    /// Pods of the size not yet allocated.
    waiting: u64,
}

impl SizeGroup {
    fn new(gpus: usize) -> Self {
        SizeGroup {
            assigned: vec![0; gpus],
            allocated: vec![0; gpus],
            waiting: 0,
        }
    }

    /// How many of the waiting pods may land on GPU `i`: the pods it is still owed
    /// (`assigned − allocated`), at most all the waiting ones. Without swaps this is exactly the
    /// waiting pods annotated with GPU `i`; after an unpaired swap, when several GPUs are owed
    /// more than the pods left, each is booked for as many as may still come (over-booking a
    /// little, never under-booking).
    fn waiting_on(&self, i: usize) -> u64 {
        self.assigned[i]
            .saturating_sub(self.allocated[i])
            .min(self.waiting)
    }
}

/// Whether a refusal of `request` by `state` could never be helped by preemption: the unit and
/// size checks of [`rejection`] (in its order), without building the reason.
pub(super) fn unresolvable(state: &NodeState, request: PodRequest) -> bool {
    match &state.reading {
        ReadingState::Valid(reading) => {
            !state.gpus.is_empty()
                && (reading.unit != request.unit || request.bytes() > state.capacity)
        }
        ReadingState::Missing | ReadingState::Invalid(_) => false,
    }
}

/// Why `state` (the books of `node`) cannot take `request` at `now`.
pub(super) fn rejection(
    node: &str,
    state: &NodeState,
    request: PodRequest,
    config: LedgerConfig,
    now: SystemTime,
) -> Rejection {
    let reading = match &state.reading {
        ReadingState::Missing => {
            return Rejection::NoReading {
                node: node.to_string(),
            };
        }
        ReadingState::Invalid(reason) => {
            return Rejection::InvalidReading {
                node: node.to_string(),
                reason: reason.clone(),
            };
        }
        ReadingState::Valid(reading) => reading,
    };
    if state.gpus.is_empty() {
        return Rejection::NoGpus {
            node: node.to_string(),
        };
    }
    if reading.unit != request.unit {
        return Rejection::UnitMismatch {
            node: node.to_string(),
            node_resource: reading.unit.resource_name(),
            pod_resource: request.unit.resource_name(),
        };
    }
    let need = request.bytes();
    if need > state.capacity {
        return Rejection::TooLarge {
            node: node.to_string(),
            need,
            largest: state.capacity,
        };
    }
    let age = now.duration_since(reading.observed_at).unwrap_or_default();
    let stale = age > config.staleness;
    let gpus = state
        .gpus
        .iter()
        .filter_map(|g| {
            if stale {
                Some(GpuRejection::Stale {
                    index: g.index,
                    age_secs: age.as_secs(),
                })
            } else if !g.healthy {
                Some(GpuRejection::Unhealthy {
                    index: g.index,
                    reason: g.health_reason.clone(),
                })
            } else if g.effective_free < need {
                Some(GpuRejection::Short {
                    index: g.index,
                    effective: g.effective_free,
                    live: g.live_free,
                    unobserved: g.unobserved,
                    headroom: config.headroom_bytes,
                    assigned: g.assigned_bytes,
                    advertised: g.advertised_bytes,
                    need,
                })
            } else {
                None
            }
        })
        .collect();
    Rejection::Gpus(gpus)
}
