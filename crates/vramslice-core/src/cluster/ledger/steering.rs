//! Where one more pod of a size would be booked besides the GPUs it is placed on.
//!
//! Waiting pods are booked per size on the GPUs still owed that size (`book::SizeGroup`). After
//! an unpaired swap at the device plugin, more GPUs are owed a size than its waiting pods can
//! fill, and each is booked for as much as may still come, capped at the waiting pods' bytes.
//! One more waiting pod of the size raises that cap, so it is booked on those GPUs too, wherever
//! the extender chose to place it: the device plugin, matching requests by size, may hand it any
//! of them. A node can take such a pod only when each of those GPUs has room for the growth;
//! [`blocking`] is the one rule the filter, the score, [`super::Ledger::reserve`] and the
//! refusal's reason share. The ledger's property test holds it to the books: a pod the check
//! passes never books a GPU past its effective free memory.

use super::NodeState;
use crate::cluster::placement::PodRequest;

/// A request size whose waiting pods are owed to more GPUs than they fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Steering {
    /// The size: a pod's whole limit, bytes.
    pub limit: u64,
    /// Healthy GPUs (by reading position) owed more of the size than the cap, and by how many
    /// bytes past it.
    pub over: Vec<(usize, u64)>,
}

impl Steering {
    /// Bytes one more pod of the size, taking `share` on each GPU it is placed on, may add to
    /// the booking of a GPU owed `over` bytes past the cap: the part of what it is owed that the
    /// raised cap uncovers, plus the share when the pod is placed there, at most the size.
    pub fn growth(&self, over: u64, share: u64) -> u64 {
        over.saturating_add(share).min(self.limit)
    }
}

/// A GPU that lacks room for what one more pod of `request`'s size would be booked on it: its
/// reading position and those bytes. `None` when the node can take the pod as far as steering
/// goes (its other checks are the probe's).
pub(super) fn blocking(state: &NodeState, request: PodRequest) -> Option<(usize, u64)> {
    let limit = request.bytes();
    let share = request.share_bytes();
    state
        .steering
        .iter()
        .filter(|s| s.limit == limit)
        .flat_map(|s| {
            s.over
                .iter()
                .map(move |&(i, over)| (i, s.growth(over, share)))
        })
        .find(|&(i, growth)| state.gpus.get(i).is_some_and(|g| g.effective_free < growth))
}
