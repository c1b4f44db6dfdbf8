//! One node's books: per-GPU assigned, unobserved and effective free memory from its reading and
//! its pods, and the detailed reason when the node cannot take a pod.

use std::time::SystemTime;

use super::hash::FastMap;
use super::{GpuRejection, GpuView, LedgerConfig, NodeState, PodEntry, ReadingState, Rejection};
use crate::placement::{Candidate, PodRequest};

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
        let target = entry
            .gpu()
            .and_then(|u| state.gpus.iter().position(|g| g.uuid == u));
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
                    limit.saturating_sub(used.unwrap_or(0))
                }
                _ => limit,
            };
            view.unobserved = view.unobserved.saturating_add(unobserved);
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
                .saturating_add(p.limit_bytes.saturating_sub(p.used_bytes.unwrap_or(0)));
        }
    }

    for view in &mut state.gpus {
        view.declared_free = view.advertised_bytes.saturating_sub(view.assigned_bytes);
        let live_part = view
            .live_free
            .saturating_sub(view.unobserved)
            .saturating_sub(headroom);
        view.effective_free = view.declared_free.min(live_part);
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
