//! Placement policies: how much VRAM a pod asks for, which GPU of a node takes it (binpack or
//! spread) and the 0–10 score a node gets for it.
//!
//! Everything here works on plain numbers: the [`ledger`](crate::cluster::ledger) supplies each GPU's
//! effective free memory and capacity, and the extender turns a pod spec into a [`PodRequest`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units::VramUnit;

/// The highest score a node can get (kube-scheduler's `MaxExtenderPriority`).
pub const MAX_SCORE: u8 = 10;

/// How to choose among GPUs (and nodes) that can all take a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// Prefer the GPU left with the least effective free memory after placing: fill GPUs up
    /// and keep whole GPUs free for large pods.
    #[default]
    Binpack,
    /// Prefer the GPU left with the most effective free memory: spread load and blast radius.
    Spread,
}

/// A policy name that is neither `binpack` nor `spread`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {0:?}: expected binpack or spread")]
pub struct PolicyError(pub String);

impl Policy {
    /// The policy as written in configuration and annotations.
    pub const fn as_str(self) -> &'static str {
        match self {
            Policy::Binpack => "binpack",
            Policy::Spread => "spread",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "binpack" => Ok(Policy::Binpack),
            "spread" => Ok(Policy::Spread),
            other => Err(PolicyError(other.to_string())),
        }
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// The most GPUs one pod may span (`vramslice.io/gpus`).
pub const MAX_GPUS_PER_POD: u32 = 8;

/// What a pod asks for: a number of units of one VRAM resource, spread evenly over `gpus`
/// distinct GPUs of one node (one GPU unless the pod carries `vramslice.io/gpus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodRequest {
    /// The unit of the resource the pod names.
    pub unit: VramUnit,
    /// Units requested (the pod-level total; see [`pod_units`]).
    pub units: u64,
    /// How many distinct GPUs the units are spread over, evenly (1..=[`MAX_GPUS_PER_POD`]).
    pub gpus: u32,
}

impl PodRequest {
    /// A request of `units` units of `unit`, all on one GPU.
    pub const fn new(unit: VramUnit, units: u64) -> Self {
        PodRequest {
            unit,
            units,
            gpus: 1,
        }
    }

    /// A request of `units` units of `unit` spread evenly over `gpus` GPUs (`units / gpus` on
    /// each; the caller checks that it divides, see `vramslice_api::convert`). `gpus` of 0 is
    /// taken as 1.
    pub const fn spanning(unit: VramUnit, units: u64, gpus: u32) -> Self {
        PodRequest {
            unit,
            units,
            gpus: if gpus == 0 { 1 } else { gpus },
        }
    }

    /// The whole request in bytes: the sum of the pod's limits over its GPUs.
    pub const fn bytes(self) -> u64 {
        self.unit.bytes_for(self.units)
    }

    /// Units the pod takes on each of its GPUs: `units / gpus`, rounded up (so a request that
    /// does not divide is never under-booked).
    pub const fn share_units(self) -> u64 {
        self.units.div_ceil(self.gpu_count() as u64)
    }

    /// Bytes the pod takes on each of its GPUs: its limit on each.
    pub const fn share_bytes(self) -> u64 {
        self.unit.bytes_for(self.share_units())
    }

    /// The number of GPUs, at least 1.
    pub const fn gpu_count(self) -> usize {
        if self.gpus == 0 {
            1
        } else {
            self.gpus as usize
        }
    }
}

/// The GPUs a `vramslice.io/gpu-uuid` annotation names: one UUID, or several comma-separated
/// (a pod spanning several GPUs). Blank entries are dropped; order is kept.
pub fn gpu_uuids(annotation: &str) -> Vec<&str> {
    annotation
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The annotation value for `uuids` (comma-separated, in the order given).
pub fn join_gpu_uuids<S: AsRef<str>>(uuids: &[S]) -> String {
    uuids
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(",")
}

/// Units an init container asks for, and whether it is a sidecar (`restartPolicy: Always`),
/// which keeps running beside the app containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitUnits {
    /// Units of the VRAM resource in the container's limits (or requests).
    pub units: u64,
    /// A restartable (sidecar) init container.
    pub sidecar: bool,
}

/// A pod's total units as Kubernetes computes effective pod requests: the larger of (app
/// containers plus sidecars) and, for each ordinary init container, itself plus the sidecars
/// started before it. Without sidecars: max(sum of app containers, largest init container).
pub fn pod_units(app: &[u64], init: &[InitUnits]) -> u64 {
    let mut sidecars: u64 = 0;
    let mut peak_init: u64 = 0;
    for c in init {
        if c.sidecar {
            sidecars = sidecars.saturating_add(c.units);
        } else {
            peak_init = peak_init.max(sidecars.saturating_add(c.units));
        }
    }
    let steady = app
        .iter()
        .fold(0u64, |acc, u| acc.saturating_add(*u))
        .saturating_add(sidecars);
    steady.max(peak_init)
}

/// A container of a pod in the kubelet's allocation order: init containers first, then app
/// containers, each by its index in the pod spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerAt {
    /// `spec.initContainers[i]`.
    Init(usize),
    /// `spec.containers[i]`.
    App(usize),
}

/// A container the kubelet would give part, not all, of the devices earlier plain init
/// containers hand on ([`partial_reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialReuse {
    /// The container.
    pub container: ContainerAt,
    /// Its units.
    pub units: u64,
    /// The units handed on when its turn comes (more than it asks for).
    pub reusable: u64,
}

/// The first container that would take a strict part of the devices handed on by plain init
/// containers, as the kubelet's device manager allocates: a plain init container's devices are
/// offered to the containers after it, and a container asking for fewer than are on offer gets
/// an arbitrary subset of them (Go map order) without the device plugin being asked for a
/// preference. For a pod spanning several GPUs that subset need not split evenly over them.
/// A container that takes all on offer (or more, the rest by preference) is safe.
pub fn partial_reuse(app: &[u64], init: &[InitUnits]) -> Option<PartialReuse> {
    let mut reusable: u64 = 0;
    let containers = init
        .iter()
        .enumerate()
        .map(|(i, c)| (ContainerAt::Init(i), c.units, !c.sidecar))
        .chain(
            app.iter()
                .enumerate()
                .map(|(i, u)| (ContainerAt::App(i), *u, false)),
        );
    for (container, units, hands_on) in containers {
        if units > 0 && units < reusable {
            return Some(PartialReuse {
                container,
                units,
                reusable,
            });
        }
        reusable = if hands_on {
            reusable.max(units)
        } else {
            reusable.saturating_sub(units)
        };
    }
    None
}

/// Which of a pod's init containers (`init`, in spec order) are plain ones the kubelet has
/// allocated, given that its PodResources record lists `listed` of the pod's containers. The
/// kubelet allocates at admission one container after another (init containers in spec order,
/// then app containers) and its record lists only sidecars and app containers that ask for
/// units, so what it lists is a prefix of that order: a plain init container was allocated once
/// the record lists more containers than the sidecars asking for units before it.
pub fn plain_init_allocated(init: &[InitUnits], listed: usize) -> Vec<bool> {
    let mut sidecars_before = 0usize;
    init.iter()
        .map(|c| {
            if c.sidecar {
                sidecars_before += usize::from(c.units > 0);
                false
            } else {
                c.units > 0 && listed > sidecars_before
            }
        })
        .collect()
}

/// One GPU that could take a pod, as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The GPU's index on its node (ties go to the lowest).
    pub index: u32,
    /// Effective free memory, bytes.
    pub effective_free: u64,
    /// Memory the GPU advertises (units × unit bytes).
    pub advertised_bytes: u64,
}

/// The GPU the policy picks among `candidates` for a pod of `need` bytes: binpack takes the one
/// left with the least effective free memory, spread the most; ties go to the lowest index.
/// `None` when no candidate has `need` bytes free.
pub fn choose(
    candidates: impl IntoIterator<Item = Candidate>,
    need: u64,
    policy: Policy,
) -> Option<Candidate> {
    let mut best: Option<Candidate> = None;
    for c in candidates {
        if c.effective_free < need {
            continue;
        }
        best = match best {
            None => Some(c),
            Some(b) => {
                let better = match policy {
                    Policy::Binpack => c.effective_free < b.effective_free,
                    Policy::Spread => c.effective_free > b.effective_free,
                };
                let tie_won = c.effective_free == b.effective_free && c.index < b.index;
                Some(if better || tie_won { c } else { b })
            }
        };
    }
    best
}

/// The `n` distinct GPUs the policy picks among `candidates` for a pod taking `need` bytes on
/// each: the `n` that [`choose`] would pick one after another (binpack the tightest, spread the
/// emptiest; ties to the lowest index), ordered by index. `None` when fewer than `n` have
/// `need` bytes free. `n` of 0 is taken as 1.
pub fn choose_n(
    candidates: impl IntoIterator<Item = Candidate>,
    need: u64,
    n: usize,
    policy: Policy,
) -> Option<Vec<Candidate>> {
    let n = n.max(1);
    let mut fitting: Vec<Candidate> = candidates
        .into_iter()
        .filter(|c| c.effective_free >= need)
        .collect();
    if fitting.len() < n {
        return None;
    }
    fitting.sort_by(|a, b| {
        let by_free = match policy {
            Policy::Binpack => a.effective_free.cmp(&b.effective_free),
            Policy::Spread => b.effective_free.cmp(&a.effective_free),
        };
        by_free.then(a.index.cmp(&b.index))
    });
    fitting.truncate(n);
    fitting.sort_by_key(|c| c.index);
    Some(fitting)
}

/// Score 1..=10 for placing `need` bytes on each of `chosen`: the mean of [`score`] over the
/// GPUs, rounded to nearest (the one GPU's score for a single-GPU pod); 0 for no GPU.
pub fn score_n(chosen: &[Candidate], need: u64, policy: Policy) -> u8 {
    if chosen.is_empty() {
        return 0;
    }
    let sum: usize = chosen
        .iter()
        .map(|c| usize::from(score(*c, need, policy)))
        .sum();
    let n = chosen.len();
    u8::try_from((sum + n / 2) / n).unwrap_or(MAX_SCORE)
}

/// Score 1..=10 for placing `need` bytes on `chosen`: by the share of the GPU left free after
/// placing, low share scores high under binpack and low under spread. Nodes that cannot take the
/// pod score 0, so every fitting node outranks every non-fitting one.
pub fn score(chosen: Candidate, need: u64, policy: Policy) -> u8 {
    let left = u128::from(chosen.effective_free.saturating_sub(need));
    let cap = u128::from(chosen.advertised_bytes.max(1));
    let ninths = (9 * left.min(cap) / cap) as u8; // 0..=9
    match policy {
        Policy::Binpack => MAX_SCORE - ninths,
        Policy::Spread => 1 + ninths,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(units: u64) -> InitUnits {
        InitUnits {
            units,
            sidecar: false,
        }
    }

    fn sidecar(units: u64) -> InitUnits {
        InitUnits {
            units,
            sidecar: true,
        }
    }

    #[test]
    fn the_record_lists_a_prefix_of_the_kubelets_allocation_order() {
        let init = [sidecar(1), plain(2), sidecar(0), plain(4), plain(0)];
        // Nothing listed: nothing allocated yet.
        assert_eq!(plain_init_allocated(&init, 0), [false; 5]);
        // Only the sidecar before them: the plain ones' own turn may be under way.
        assert_eq!(plain_init_allocated(&init, 1), [false; 5]);
        // Anything after: both plain ones asking for units were allocated.
        assert_eq!(
            plain_init_allocated(&init, 2),
            [false, true, false, true, false]
        );
        assert_eq!(plain_init_allocated(&[plain(3)], 1), [true]);
    }

    #[test]
    fn partial_reuse_finds_the_container_given_part_of_an_init_containers_devices() {
        // init 8 then app 4: the app gets 4 of the init container's 8, picked at random.
        assert_eq!(
            partial_reuse(&[4], &[plain(8)]),
            Some(PartialReuse {
                container: ContainerAt::App(0),
                units: 4,
                reusable: 8
            })
        );
        // Taking all of them, or more, or none, is safe; so is an app after the pool is used.
        assert_eq!(partial_reuse(&[8], &[plain(8)]), None);
        assert_eq!(partial_reuse(&[12], &[plain(8)]), None);
        assert_eq!(partial_reuse(&[0, 8, 4], &[plain(8)]), None);
        assert_eq!(partial_reuse(&[4], &[]), None);
        // A second plain init container smaller than the first takes part of it.
        assert_eq!(
            partial_reuse(&[8], &[plain(8), plain(4)]).map(|p| p.container),
            Some(ContainerAt::Init(1))
        );
        // A sidecar takes from the offer too, and keeps what it took.
        assert_eq!(
            partial_reuse(&[4], &[plain(8), sidecar(4)]).map(|p| p.container),
            Some(ContainerAt::Init(1))
        );
        assert_eq!(partial_reuse(&[4], &[plain(4), sidecar(4)]), None);
        // A sidecar before any plain init container: nothing is on offer yet.
        assert_eq!(partial_reuse(&[4], &[sidecar(2), plain(4)]), None);
    }

    const GIB: u64 = 1 << 30;

    fn cand(index: u32, free_gib: u64) -> Candidate {
        Candidate {
            index,
            effective_free: free_gib * GIB,
            advertised_bytes: 80 * GIB,
        }
    }

    #[test]
    fn policies_parse_and_print() {
        assert_eq!("binpack".parse::<Policy>(), Ok(Policy::Binpack));
        assert_eq!(" spread ".parse::<Policy>(), Ok(Policy::Spread));
        let err = "random".parse::<Policy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown placement policy \"random\": expected binpack or spread"
        );
        assert_eq!(Policy::default(), Policy::Binpack);
        assert_eq!(Policy::Spread.to_string(), "spread");
    }

    #[test]
    fn pod_units_follow_kubernetes_effective_requests() {
        assert_eq!(pod_units(&[2, 3], &[]), 5);
        let init = |units, sidecar| InitUnits { units, sidecar };
        // A large init container dominates.
        assert_eq!(pod_units(&[2, 3], &[init(8, false)]), 8);
        // A small one does not.
        assert_eq!(pod_units(&[2, 3], &[init(4, false)]), 5);
        // Sidecars add to the app containers and to later init containers.
        assert_eq!(pod_units(&[2], &[init(1, true), init(4, false)]), 5);
        assert_eq!(pod_units(&[2], &[init(4, false), init(1, true)]), 4);
        assert_eq!(pod_units(&[], &[]), 0);
        assert_eq!(pod_units(&[u64::MAX, 1], &[]), u64::MAX);
    }

    #[test]
    fn binpack_takes_the_tightest_gpu_and_spread_the_emptiest() {
        let gpus = [cand(0, 10), cand(1, 7), cand(2, 30), cand(3, 5)];
        let need = 6 * GIB;
        assert_eq!(
            choose(gpus, need, Policy::Binpack).map(|c| c.index),
            Some(1)
        );
        assert_eq!(choose(gpus, need, Policy::Spread).map(|c| c.index), Some(2));
        assert_eq!(choose(gpus, 31 * GIB, Policy::Spread), None);
        assert_eq!(choose([], need, Policy::Binpack), None);
    }

    #[test]
    fn ties_go_to_the_lowest_index_whatever_the_order() {
        let gpus = [cand(3, 8), cand(1, 8), cand(2, 8)];
        for policy in [Policy::Binpack, Policy::Spread] {
            assert_eq!(choose(gpus, GIB, policy).map(|c| c.index), Some(1));
        }
    }

    #[test]
    fn scores_span_one_to_ten() {
        let full = cand(0, 6);
        let empty = cand(0, 80);
        let need = 6 * GIB;
        assert_eq!(score(full, need, Policy::Binpack), 10);
        assert_eq!(score(empty, need, Policy::Binpack), 2);
        assert_eq!(score(full, need, Policy::Spread), 1);
        assert_eq!(score(empty, need, Policy::Spread), 9);
        let all_free = Candidate {
            index: 0,
            effective_free: 80 * GIB,
            advertised_bytes: 80 * GIB,
        };
        assert_eq!(score(all_free, 0, Policy::Binpack), 1);
        assert_eq!(score(all_free, 0, Policy::Spread), 10);
    }

    #[test]
    fn choose_n_takes_distinct_gpus_by_policy() {
        let gpus = [cand(0, 10), cand(1, 7), cand(2, 30), cand(3, 5), cand(4, 7)];
        let need = 6 * GIB;
        let idx =
            |c: Option<Vec<Candidate>>| c.map(|v| v.iter().map(|c| c.index).collect::<Vec<_>>());
        assert_eq!(
            idx(choose_n(gpus, need, 2, Policy::Binpack)),
            Some(vec![1, 4])
        );
        assert_eq!(
            idx(choose_n(gpus, need, 2, Policy::Spread)),
            Some(vec![0, 2])
        );
        assert_eq!(
            idx(choose_n(gpus, need, 4, Policy::Binpack)),
            Some(vec![0, 1, 2, 4])
        );
        assert_eq!(choose_n(gpus, need, 5, Policy::Binpack), None);
        // One GPU: the same GPU `choose` picks.
        for policy in [Policy::Binpack, Policy::Spread] {
            assert_eq!(
                choose_n(gpus, need, 1, policy).map(|v| v[0]),
                choose(gpus, need, policy)
            );
        }
    }

    #[test]
    fn score_n_is_the_mean_and_equals_score_for_one_gpu() {
        let need = 6 * GIB;
        let full = cand(0, 6);
        let empty = cand(1, 80);
        assert_eq!(
            score_n(&[full], need, Policy::Binpack),
            score(full, need, Policy::Binpack)
        );
        assert_eq!(score_n(&[full, empty], need, Policy::Binpack), 6);
        assert_eq!(score_n(&[], need, Policy::Binpack), 0);
    }

    #[test]
    fn shares_and_gpu_lists() {
        let r = PodRequest::spanning(VramUnit::Gib1, 40, 2);
        assert_eq!(r.share_units(), 20);
        assert_eq!(r.share_bytes(), 20 * GIB);
        assert_eq!(r.bytes(), 40 * GIB);
        assert_eq!(PodRequest::new(VramUnit::Gib1, 7).share_bytes(), 7 * GIB);
        assert_eq!(PodRequest::spanning(VramUnit::Gib1, 7, 0).gpu_count(), 1);
        assert_eq!(gpu_uuids(" GPU-a, GPU-b ,,"), vec!["GPU-a", "GPU-b"]);
        assert_eq!(gpu_uuids("GPU-a"), vec!["GPU-a"]);
        assert_eq!(join_gpu_uuids(&["GPU-a", "GPU-b"]), "GPU-a,GPU-b");
    }

    #[test]
    fn request_bytes_follow_the_unit() {
        assert_eq!(PodRequest::new(VramUnit::Gib1, 6).bytes(), 6 * GIB);
        assert_eq!(
            PodRequest::new(VramUnit::Mib512, 3).bytes(),
            (3 * 512) << 20
        );
    }
}
