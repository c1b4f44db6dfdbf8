//! Deleted pods kept on the books while a same-size pod may hold the units meant for them.
//!
//! The device plugin cannot tell which waiting pod a kubelet request is for, so it may give
//! pod B (assigned GPU 1) the units meant for pod A (assigned GPU 0) of the same size, and A
//! GPU 1's later. If A is deleted (waiting, or after taking GPU 1) before the plugin's next
//! reading shows B on GPU 0, the books would have B on GPU 1 and nothing on GPU 0, where B
//! really is. So A stays booked, as a waiting pod assigned GPU 0, until every same-size pod
//! that was waiting when A left has been seen allocated, or is gone too.

use std::collections::BTreeSet;

use super::PodEntry;
use super::hash::FastMap;
use crate::cluster::placement::gpu_uuids;

/// A deleted pod whose GPU may be held by a same-size pod, and those pods.
#[derive(Debug, Clone)]
pub(super) struct Departed {
    /// The GPU the extender assigned it (several comma-separated for a pod spanning GPUs).
    pub gpu_uuid: String,
    /// Its limit, bytes (its size).
    pub limit: u64,
    /// Same-size pods of the node waiting when it was deleted.
    pub partners: BTreeSet<String>,
}

/// Whether a ledger pod is bound, annotated and not yet seen allocated by the kubelet.
pub(super) fn is_waiting(entry: &PodEntry) -> bool {
    entry.reserved_since.is_none()
        && entry.observed_gpu.is_none()
        && entry.record.gpu_uuid.is_some()
}

/// The record to keep for `gone`, deleted from a node whose pods are `node_pods`; `None` when
/// no same-size pod could have taken its units.
pub(super) fn departure(
    gone: &PodEntry,
    node_pods: &BTreeSet<String>,
    pods: &FastMap<PodEntry>,
) -> Option<Departed> {
    // A pod allocated on its own GPU paid its debt; one waiting, or allocated on another GPU
    // (a swap), leaves its GPU owed to a same-size pod that may already hold those units.
    let swapped = match (&gone.observed_gpu, &gone.record.gpu_uuid) {
        (Some(observed), Some(annotated)) => !same_gpus(observed, annotated),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if !(is_waiting(gone) || swapped) || gone.reserved_since.is_some() {
        return None;
    }
    let limit = gone.record.request.bytes();
    let partners: BTreeSet<String> = node_pods
        .iter()
        .filter(|uid| **uid != gone.record.uid)
        .filter(|uid| {
            pods.get(*uid)
                .is_some_and(|e| is_waiting(e) && e.record.request.bytes() == limit)
        })
        .cloned()
        .collect();
    Some(Departed {
        gpu_uuid: gone.record.gpu_uuid.clone()?,
        limit,
        partners: (!partners.is_empty()).then_some(partners)?,
    })
}

/// Whether two GPU lists (`vramslice.io/gpu-uuid` form) name the same GPUs, in any order.
pub(super) fn same_gpus(a: &str, b: &str) -> bool {
    let mut a = gpu_uuids(a);
    let mut b = gpu_uuids(b);
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// Drop partners no longer waiting, and departures left without partners.
pub(super) fn prune(departed: &mut Vec<Departed>, pods: &FastMap<PodEntry>) {
    for d in departed.iter_mut() {
        d.partners
            .retain(|uid| pods.get(uid).is_some_and(is_waiting));
    }
    departed.retain(|d| !d.partners.is_empty());
}
