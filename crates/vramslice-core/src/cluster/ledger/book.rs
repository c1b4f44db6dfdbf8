//! One node's books: per-GPU assigned, unobserved and effective free memory from its reading and
//! its pods, and the detailed reason when the node cannot take a pod.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::hash::FastMap;
use super::shape::{self, WaitingShape};
use super::steering::{self, Steering};
use super::{GpuRejection, GpuView, LedgerConfig, NodeState, PodEntry, ReadingState, Rejection};
use crate::cluster::placement::{Candidate, PodRequest, gpu_uuids};
use crate::effective_free::{effective_free, unobserved_part};

/// Recompute `state.gpus`, `best_free` and `capacity` from the reading and the node's pods.
pub(super) fn recompute(state: &mut NodeState, pods: &FastMap<PodEntry>, headroom: u64) {
    state.refusal.clear();
    state.steering.clear();
    state.waiting_shapes.clear();
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
        // Where the reading shows the pod (one entry per GPU it holds units of), with the
        // units the kubelet gave it there and their usage.
        let mut listed: Vec<Listed> = Vec::new();
        for (i, g) in reading.gpus.iter().enumerate() {
            for (j, p) in g.pods.iter().enumerate() {
                let same = match &p.uid {
                    Some(u) => *u == entry.record.uid,
                    None => p.namespace == entry.record.namespace && p.name == entry.record.name,
                };
                if same {
                    known[i][j] = true;
                    match listed.iter_mut().find(|l| l.gpu == i) {
                        Some(l) => {
                            l.limit = l.limit.saturating_add(p.limit_bytes);
                            l.used = add_known(l.used, p.used_bytes);
                        }
                        None => listed.push(Listed {
                            gpu: i,
                            limit: p.limit_bytes,
                            used: p.used_bytes,
                        }),
                    }
                }
            }
        }
        let annotated = entry
            .record
            .gpu_uuid
            .as_deref()
            .and_then(|a| positions(&state.gpus, a));
        let placed: Option<Vec<usize>> = if listed.is_empty() {
            entry
                .observed_gpu
                .as_deref()
                .and_then(|a| positions(&state.gpus, a))
        } else {
            Some(listed.iter().map(|l| l.gpu).collect())
        };
        // Listed for less than its limit: a pod whose plain init container asked for more than
        // its app containers (PodResources never lists plain init containers, yet the kubelet
        // keeps their units for the pod), or one whose containers are not all allocated yet
        // (the kubelet allocates them one by one).
        let listed_bytes = listed.iter().map(|l| l.limit).fold(0, u64::saturating_add);
        let partly = !listed.is_empty() && listed_bytes < limit;
        // Each assigned GPU's share of the limit (the pod spreads it evenly over them).
        let share = annotated.as_ref().map(|a| even_share(limit, a.len()));
        // Partly listed on a GPU it was not assigned, or for more than its share there: one of
        // its containers took the place of another pod of that container's size (of another
        // shape), and where its others land depends on other pods of their sizes, which this
        // pod-level group cannot follow.
        let swapped_part = partly
            && annotated.as_ref().zip(share).is_some_and(|(a, share)| {
                listed
                    .iter()
                    .any(|l| !a.contains(&l.gpu) || l.limit > share)
            });
        if let Some(annotated) = &annotated {
            let group = by_size.entry(limit).or_default();
            group.assign(annotated);
            match &placed {
                // It waits in its group for its whole limit, besides its listed parts: more
                // than is left to come, which errs on the safe side until the kubelet is done.
                Some(_) if swapped_part => group.waiting += 1,
                Some(placed) => group.allocate(if partly { annotated } else { placed }),
                None => {
                    group.waiting += 1;
                    state.waiting_shapes.push(WaitingShape {
                        limit,
                        gpus: annotated.len(),
                        pod: format!("{}/{}", entry.record.namespace, entry.record.name),
                        assigned_at: entry.record.assigned_at,
                    });
                    continue;
                }
            }
        }
        let seen_since_assignment = entry
            .record
            .assigned_at
            .is_none_or(|t| t <= reading.observed_at);
        if !listed.is_empty() {
            // What the kubelet gave the pod on each GPU, which need not be an even share: the
            // containers of one pod are allocated one by one, and one may take the units of
            // another pod of its size on another GPU (the device plugin's swaps).
            for l in &listed {
                let view = &mut state.gpus[l.gpu];
                view.assigned_bytes = view.assigned_bytes.saturating_add(l.limit);
                let unobserved = if seen_since_assignment {
                    unobserved_part(l.limit, l.used)
                } else {
                    l.limit
                };
                view.unobserved = view.unobserved.saturating_add(unobserved);
            }
            // What the listing lacks of its request (a larger plain init container's part, which
            // the kubelet spread evenly over the pod's GPUs, or containers still to come): evenly
            // over its assigned GPUs, else where it is listed. (Booking each GPU what its share
            // there lacks would be wrong for good when a sidecar of a spanning pod took another
            // pod's place on one GPU and its init container then took its share on each.)
            if partly && !swapped_part {
                let owed = annotated.unwrap_or_else(|| listed.iter().map(|l| l.gpu).collect());
                let each = even_share(limit.saturating_sub(listed_bytes), owed.len());
                for i in owed {
                    let view = &mut state.gpus[i];
                    view.assigned_bytes = view.assigned_bytes.saturating_add(each);
                    view.unobserved = view.unobserved.saturating_add(each);
                }
            }
            continue;
        }
        // A pod's GPUs each take an even share of its limit; a pod whose GPUs are unknown counts
        // its per-GPU share against every GPU of the node.
        let (targets, share) = match placed.or(annotated) {
            Some(targets) => {
                let share = even_share(limit, targets.len());
                (Some(targets), share)
            }
            None => (None, entry.record.request.share_bytes()),
        };
        for (i, view) in state.gpus.iter_mut().enumerate() {
            if targets.as_ref().is_some_and(|t| !t.contains(&i)) {
                continue;
            }
            view.assigned_bytes = view.assigned_bytes.saturating_add(share);
            view.unobserved = view.unobserved.saturating_add(share);
        }
    }
    super::departed::prune(&mut state.departed, pods);
    for gone in &state.departed {
        let Some(annotated) = positions(&state.gpus, &gone.gpu_uuid) else {
            continue;
        };
        let group = by_size.entry(gone.limit).or_default();
        group.assign(&annotated);
        group.waiting += 1;
    }
    for (limit, group) in &by_size {
        for (i, view) in state.gpus.iter_mut().enumerate() {
            let bytes = group.waiting_on(i, *limit);
            view.assigned_bytes = view.assigned_bytes.saturating_add(bytes);
            view.unobserved = view.unobserved.saturating_add(bytes);
        }
        let over: Vec<(usize, u64)> = (0..gpu_count)
            .filter(|&i| state.gpus[i].healthy)
            .filter_map(|i| group.owed_past_cap(i, *limit).map(|over| (i, over)))
            .collect();
        if !over.is_empty() {
            state.steering.push(Steering {
                limit: *limit,
                over,
            });
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

/// Each of `gpus` GPUs' share of `bytes`, rounded up (never under-booked); all of it for none.
fn even_share(bytes: u64, gpus: usize) -> u64 {
    bytes.div_ceil(gpus.max(1) as u64)
}

/// Where the reading lists a pod: a GPU (reading position), the bytes the kubelet gave it there,
/// and their usage when known.
struct Listed {
    gpu: usize,
    limit: u64,
    used: Option<u64>,
}

/// The sum of two usages, known only when both are.
fn add_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(a?.saturating_add(b?))
}

/// The positions in `gpus` of the GPUs an annotation (or observed placement) names, one or
/// several comma-separated; `None` when it names none or a GPU the node does not have.
fn positions(gpus: &[GpuView], list: &str) -> Option<Vec<usize>> {
    let uuids = gpu_uuids(list);
    if uuids.is_empty() {
        return None;
    }
    let mut out: Vec<usize> = Vec::with_capacity(uuids.len());
    for uuid in uuids {
        let i = gpus.iter().position(|g| g.uuid == uuid)?;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Some(out)
}

/// One request size's pods on a node, counted per set of GPUs (reading positions, sorted) as
/// the device plugin counts them (`crate::owed_gpus`): a pod spanning several GPUs is one entry
/// for its set, not a share on each GPU. Counting bytes per GPU instead would let an allocation
/// pay a debt it does not pay at the plugin: once the pod assigned GPUs {0, 1} is deleted, the
/// pod that took {0, 1} in its place pays nothing, and must not offset what a pod still waiting
/// for GPU 0 is owed there.
#[derive(Default)]
struct SizeGroup {
    /// Per set of GPUs: pods the extender assigned it (annotations) minus pods the kubelet
    /// allocated it (the reading).
    owed: BTreeMap<Vec<usize>, i64>,
    /// Pods of the size not yet allocated.
    waiting: u64,
}

impl SizeGroup {
    /// A pod assigned the GPUs at `at`.
    fn assign(&mut self, at: &[usize]) {
        *self.owed.entry(gpu_set(at)).or_insert(0) += 1;
    }

    /// A pod allocated the GPUs at `at`.
    fn allocate(&mut self, at: &[usize]) {
        *self.owed.entry(gpu_set(at)).or_insert(0) -= 1;
    }

    /// Bytes of the waiting pods (each of `limit` bytes) that may land on GPU `i`: what it is
    /// still owed, at most all the waiting pods' bytes (one pod's whole limit may land on one
    /// GPU). Without swaps this is exactly the waiting pods' shares on GPU `i`; after an
    /// unpaired swap, when more sets are owed than pods are left, each is booked for as much as
    /// may still come (over-booking a little, never under-booking).
    fn waiting_on(&self, i: usize, limit: u64) -> u64 {
        self.owed(i, limit).min(limit.saturating_mul(self.waiting))
    }

    /// Bytes GPU `i` is still owed: each pod's share there of the sets holding it that are
    /// assigned more pods than allocated.
    fn owed(&self, i: usize, limit: u64) -> u64 {
        self.owed
            .iter()
            .filter(|(set, n)| **n > 0 && set.contains(&i))
            .map(|(set, n)| {
                let share = even_share(limit, set.len());
                share.saturating_mul(n.unsigned_abs())
            })
            .fold(0, u64::saturating_add)
    }

    /// How far GPU `i` is owed past the waiting pods' bytes (each of `limit` bytes), when it
    /// is: one more waiting pod of the size is booked there too (`steering`).
    fn owed_past_cap(&self, i: usize, limit: u64) -> Option<u64> {
        let cap = limit.saturating_mul(self.waiting);
        self.owed(i, limit)
            .checked_sub(cap)
            .filter(|&over| over > 0)
    }
}

/// A set of GPU positions in one order, so that one set is one key.
fn gpu_set(at: &[usize]) -> Vec<usize> {
    let mut set = at.to_vec();
    set.sort_unstable();
    set.dedup();
    set
}

/// How many GPUs of the node advertise at least `bytes`.
fn gpus_at_least(state: &NodeState, bytes: u64) -> usize {
    state
        .gpus
        .iter()
        .filter(|g| g.advertised_bytes >= bytes)
        .count()
}

/// Whether a refusal of `request` by `state` could never be helped by preemption: the unit and
/// size checks of [`rejection`] (in its order), without building the reason.
pub(super) fn unresolvable(state: &NodeState, request: PodRequest) -> bool {
    match &state.reading {
        ReadingState::Valid(reading) => {
            !state.gpus.is_empty()
                && (reading.unit != request.unit
                    || gpus_at_least(state, request.share_bytes()) < request.gpu_count())
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
    let need = request.share_bytes();
    let n = request.gpu_count();
    if need > state.capacity {
        return Rejection::TooLarge {
            node: node.to_string(),
            need,
            largest: state.capacity,
        };
    }
    let large_enough = gpus_at_least(state, need);
    if large_enough < n {
        return Rejection::TooFewGpus {
            node: node.to_string(),
            gpus: n,
            need,
            have: large_enough,
        };
    }
    let (age, ahead) = super::reading_distance(reading.observed_at, now);
    let stale = age > config.staleness;
    let steered = steering::blocking(state, request);
    let gpus = state
        .gpus
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            if stale {
                Some(GpuRejection::Stale {
                    index: g.index,
                    age_secs: age.as_secs(),
                    ahead,
                })
            } else if !g.healthy {
                Some(GpuRejection::Unhealthy {
                    index: g.index,
                    reason: g.health_reason.clone(),
                })
            } else if let Some((_, booked)) = steered.filter(|&(at, _)| at == i) {
                Some(GpuRejection::Owed {
                    index: g.index,
                    effective: g.effective_free,
                    booked,
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
        .collect::<Vec<_>>();
    let fitting = state.gpus.len().saturating_sub(gpus.len());
    // Room enough: only a waiting pod of its size over another GPU count holds it off.
    if fitting >= n
        && steered.is_none()
        && let Some(waiting) = shape::conflicting(state, request, now)
    {
        return Rejection::SameSizeWaiting {
            node: node.to_string(),
            pod: waiting.pod.clone(),
            size: waiting.limit,
            waiting_gpus: waiting.gpus,
            gpus: n,
        };
    }
    if n > 1 {
        return Rejection::Spanning {
            gpus: n,
            need,
            fitting,
            reasons: gpus,
        };
    }
    Rejection::Gpus(gpus)
}
