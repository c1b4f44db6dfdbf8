//! Asking many nodes about one pod at one instant — what a filter or prioritize call does for
//! thousands of node names. A [`Probe`] works out the pod's share per GPU, its unit and the
//! freshness cut-off once; each node then costs one lookup of its name and a few comparisons.
//! [`Ledger::check`] is the one-node form of [`Probe::check`] (reserve and `kubectl vramslice
//! explain` ask about one node); the tests have one-node forms of the others.

use std::time::SystemTime;

use super::Ledger;
use super::book;
use super::reason::{Refusal, RefusalKey, Rejection};
use super::shape;
use super::steering;
use super::table::Hot;
use super::{NodeState, ReadingState};
use crate::cluster::placement::{self, PodRequest, Policy};

/// Why a node cannot take a pod, in the few kinds that callers naming many refusals with one
/// shared reason tell apart ([`Probe::refusal`]; [`Probe::check`] gives the detailed reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalKind {
    /// No usable reading: no `GpuNode`, one that cannot be used, or one listing no GPU.
    NoReading,
    /// Never: the node counts another unit, or has too few GPUs that large.
    NeverFits,
    /// The reading is older than the staleness bound.
    Stale,
    /// Too few GPUs large enough are healthy.
    Unhealthy,
    /// The node has the room, but a pod of the same size over another GPU count waits for its
    /// units there (`shape`).
    SameSizeWaiting,
    /// Not enough effective free memory now.
    Short,
}

impl RefusalKind {
    /// Whether preemption could never help ([`Rejection::is_unresolvable`]): only a node
    /// short of memory on fresh, healthy GPUs large enough can be helped by evicting pods.
    pub fn is_unresolvable(self) -> bool {
        self != RefusalKind::Short
    }
}

/// A pod's request prepared for questions about many nodes at `now` ([`Ledger::probe`]).
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    ledger: &'a Ledger,
    request: PodRequest,
    now: SystemTime,
    /// The pod's share on each of its GPUs, bytes.
    need: u64,
    /// How many GPUs it spans.
    gpus: usize,
    /// Readings taken before this are stale; `None` when none can be (the cut-off is before
    /// the earliest representable time).
    fresh_since: Option<SystemTime>,
    /// Readings stamped after this (a node clock ahead) are stale too; `None`: no bound.
    fresh_until: Option<SystemTime>,
}

impl Ledger {
    /// Prepare `request` for questions about many nodes at `now`.
    pub fn probe(&self, request: PodRequest, now: SystemTime) -> Probe<'_> {
        Probe {
            ledger: self,
            request,
            now,
            need: request.share_bytes(),
            gpus: request.gpu_count(),
            fresh_since: now.checked_sub(self.config.staleness),
            fresh_until: now.checked_add(self.config.staleness),
        }
    }

    /// Whether `node` can take a pod of `request` now; the reason when not.
    pub fn check(&self, node: &str, request: PodRequest, now: SystemTime) -> Result<(), Rejection> {
        self.probe(request, now).check(node)
    }
}

/// One-node forms of the probe's questions, for the ledger's tests (the extender asks a probe
/// for all the names of a call).
#[cfg(test)]
impl Ledger {
    /// [`Ledger::check`] without building the reason: `None` when `node` can take the pod,
    /// else the kind of refusal. For callers that word many refusals with one shared reason.
    pub(crate) fn refusal(
        &self,
        node: &str,
        request: PodRequest,
        now: SystemTime,
    ) -> Option<RefusalKind> {
        self.probe(request, now).refusal(node)
    }

    /// [`Ledger::check`] with the reason already rendered, and remembered per node until its
    /// books change: filters of same-size pods against many full nodes render each reason once.
    pub(crate) fn check_rendered(
        &self,
        node: &str,
        request: PodRequest,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        self.probe(request, now).check_rendered(node)
    }

    /// Score 0..=10 of `node` for a pod of `request` under `policy` (0 when it cannot fit).
    pub(crate) fn score(
        &self,
        node: &str,
        request: PodRequest,
        policy: Policy,
        now: SystemTime,
    ) -> u8 {
        self.probe(request, now).score(node, policy)
    }
}

impl Probe<'_> {
    /// Whether `node` can take the pod; the reason when not.
    pub fn check(&self, node: &str) -> Result<(), Rejection> {
        match self.ledger.nodes.hot_and_state(node) {
            Some((hot, state)) if self.fits(hot, state) => Ok(()),
            _ => Err(self.ledger.rejection(node, self.request, self.now)),
        }
    }

    /// `None` when `node` can take the pod, else the kind of refusal, without building the
    /// reason (in the detailed reason's order: the reading, the unit and sizes, freshness,
    /// health, memory).
    pub fn refusal(&self, node: &str) -> Option<RefusalKind> {
        let Some((hot, state)) = self.ledger.nodes.hot_and_state(node) else {
            return Some(RefusalKind::NoReading);
        };
        if self.fits(hot, state) {
            return None;
        }
        if !matches!(state.reading, ReadingState::Valid(_)) || state.gpus.is_empty() {
            return Some(RefusalKind::NoReading);
        }
        if book::unresolvable(state, self.request) {
            return Some(RefusalKind::NeverFits);
        }
        if !self.fresh(hot) {
            return Some(RefusalKind::Stale);
        }
        let healthy_large = state
            .gpus
            .iter()
            .filter(|g| g.healthy && g.advertised_bytes >= self.need)
            .count();
        if healthy_large < self.gpus {
            return Some(RefusalKind::Unhealthy);
        }
        if self.fits_but_for_shape(hot, state) {
            return Some(RefusalKind::SameSizeWaiting);
        }
        Some(RefusalKind::Short)
    }

    /// [`Probe::check`] with the reason rendered, remembered per node until its books change.
    pub fn check_rendered(&self, node: &str) -> Result<(), Refusal> {
        let Some((hot, state)) = self.ledger.nodes.hot_and_state(node) else {
            return Err(Refusal::from(&self.ledger.rejection(
                node,
                self.request,
                self.now,
            )));
        };
        if self.fits(hot, state) {
            return Ok(());
        }
        let ledger = self.ledger;
        let stale_age = match &state.reading {
            ReadingState::Valid(r) if ledger.age(r, self.now) > ledger.config.staleness => {
                Some(ledger.age(r, self.now).as_secs())
            }
            _ => None,
        };
        let key = RefusalKey {
            unit: self.request.unit,
            need: self.need,
            gpus: self.request.gpus,
            stale_age,
        };
        if let Some(hit) = state.refusal.get(&key) {
            return Err(hit);
        }
        let refusal = Refusal::from(&book::rejection(
            node,
            state,
            self.request,
            ledger.config,
            self.now,
        ));
        state.refusal.put(key, refusal.clone());
        Err(refusal)
    }

    /// Score 0..=10 of `node` under `policy` (0 when it cannot take the pod).
    pub fn score(&self, node: &str, policy: Policy) -> u8 {
        let Some((hot, state)) = self.ledger.nodes.hot_and_state(node) else {
            return 0;
        };
        if !self.fits(hot, state) {
            return 0;
        }
        let candidates = state.candidates.iter().copied();
        if self.gpus == 1 {
            return placement::choose(candidates, self.need, policy)
                .map_or(0, |c| placement::score(c, self.need, policy));
        }
        placement::choose_n(candidates, self.need, self.gpus, policy)
            .map_or(0, |c| placement::score_n(&c, self.need, policy))
    }

    /// Whether the node's reading is within the staleness bound of now, either way.
    fn fresh(&self, hot: &Hot) -> bool {
        self.fresh_since
            .is_none_or(|since| hot.observed_at >= since)
            && self
                .fresh_until
                .is_none_or(|until| hot.observed_at <= until)
    }

    /// Whether a node can take the pod: its unit, a fresh reading, as many healthy GPUs as
    /// the pod spans each with the pod's share effectively free, room on the GPUs the pod
    /// would be booked on besides (`steering`), and no pod of its size but another GPU count
    /// waiting there (`shape`).
    fn fits(&self, hot: &Hot, state: &NodeState) -> bool {
        self.fits_but_for_shape(hot, state)
            && shape::conflicting(state, self.request, self.now).is_none()
    }

    /// [`Probe::fits`] but for the `shape` rule: whether the node has the room.
    fn fits_but_for_shape(&self, hot: &Hot, state: &NodeState) -> bool {
        hot.unit == Some(self.request.unit)
            && hot.best_free >= self.need
            && self.fresh(hot)
            && (self.gpus == 1
                || state
                    .candidates
                    .iter()
                    .filter(|c| c.effective_free >= self.need)
                    .count()
                    >= self.gpus)
            && steering::blocking(state, self.request).is_none()
    }
}
