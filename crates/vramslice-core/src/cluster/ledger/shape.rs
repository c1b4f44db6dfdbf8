//! Pods of one size but different GPU counts must not wait on one node at once.
//!
//! The kubelet asks the device plugin for a number of units, one container at a time, without
//! saying for which pod, so the plugin matches requests to waiting pods by size
//! (`crate::owed_gpus`). Two waiting pods of one size are interchangeable to it: when they span
//! the same number of GPUs a swap only changes which GPU serves whom (the books follow the
//! reading), but a pod of 40 GiB on one GPU given the 2 × 20 GiB meant for a spanning pod runs
//! out of memory at 20 GiB, and the spanning pod (tensor parallel over two GPUs) finds one. So a
//! node takes a pod only when no pod of its size but another GPU count still waits there for its
//! units; the pod is placed once that one has them (seconds), or on another node meanwhile.
//! [`conflicting`] is the one rule the filter, the score, [`super::Ledger::reserve`] and the
//! refusal's reason share.

use std::time::{Duration, SystemTime};

use super::NodeState;
use crate::cluster::placement::PodRequest;

/// How long after its assignment a waiting pod holds pods of its size but another GPU count off
/// its node. The kubelet allocates a pod's units when it admits it, seconds after the bind; a
/// pod the reading still does not list long after (its VRAM only in a plain init container,
/// which PodResources never lists, or a kubelet that does not admit it) is no longer being
/// allocated beside anything, and must not block the node for its life.
pub(super) const SHAPE_WAIT_LIMIT: Duration = Duration::from_secs(120);

/// A pod bound to the node whose units the kubelet has not yet allocated (a reservation in
/// flight included), by size and GPU count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WaitingShape {
    /// The pod's whole limit, bytes (what the device plugin's matching compares).
    pub limit: u64,
    /// How many GPUs it was assigned.
    pub gpus: usize,
    /// `namespace/name`, for the reason.
    pub pod: String,
    /// When it was assigned (`vramslice.io/assigned-at`); a pod without holds nothing off.
    pub assigned_at: Option<SystemTime>,
}

/// The waiting pod of `request`'s size but another GPU count, assigned at most
/// [`SHAPE_WAIT_LIMIT`] before `now`, if one waits on the node.
pub(super) fn conflicting(
    state: &NodeState,
    request: PodRequest,
    now: SystemTime,
) -> Option<&WaitingShape> {
    let limit = request.bytes();
    let gpus = request.gpu_count();
    let recent = |w: &&WaitingShape| {
        w.assigned_at.is_some_and(|at| {
            now.duration_since(at)
                .map_or(true, |age| age <= SHAPE_WAIT_LIMIT)
        })
    };
    state
        .waiting_shapes
        .iter()
        .filter(recent)
        .find(|w| w.limit == limit && w.gpus != gpus)
}
