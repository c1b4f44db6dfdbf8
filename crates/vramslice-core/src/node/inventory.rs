//! The GPUs of one node as the device plugin advertises them: units per GPU, device IDs with
//! their health, the check that an allocation names real units, and the choice of preferred units.

use std::collections::BTreeMap;

use crate::cluster::placement::gpu_uuids;
use crate::device_id::{DeviceId, GpuSelection};
use crate::units::VramUnit;

/// What the inventory needs to know about one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuUnitsView {
    /// NVML's UUID of the GPU.
    pub uuid: String,
    /// NVML's index of the GPU on its node.
    pub index: u32,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Whether the GPU may take work.
    pub healthy: bool,
}

impl From<&crate::node::sample::GpuSample> for GpuUnitsView {
    fn from(sample: &crate::node::sample::GpuSample) -> Self {
        GpuUnitsView {
            uuid: sample.uuid.clone(),
            index: sample.index,
            total_bytes: sample.total_bytes,
            healthy: sample.health.is_healthy(),
        }
    }
}

/// One advertised device (one unit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertisedDevice {
    /// `<uuid>::<k>`.
    pub id: DeviceId,
    /// Health of the unit's GPU.
    pub healthy: bool,
}

/// An allocation that names units the node does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    /// The GPU is not on this node (or has disappeared).
    #[error("GPU {0} is not on this node")]
    UnknownGpu(String),
    /// The unit index is past the GPU's advertised units.
    #[error("device ID {id} is unknown: GPU {gpu} advertises units 0..{units}")]
    UnknownUnit {
        /// The offending ID.
        id: String,
        /// The GPU's UUID.
        gpu: String,
        /// The GPU's unit count.
        units: u64,
    },
}

/// The GPUs of one node and the unit they are counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInventory {
    unit: VramUnit,
    gpus: Vec<GpuUnitsView>,
}

impl GpuInventory {
    /// An inventory of `gpus`, ordered by index then UUID.
    pub fn new(unit: VramUnit, mut gpus: Vec<GpuUnitsView>) -> Self {
        gpus.sort_by(|a, b| a.index.cmp(&b.index).then_with(|| a.uuid.cmp(&b.uuid)));
        GpuInventory { unit, gpus }
    }

    /// The unit devices are counted in.
    pub fn unit(&self) -> VramUnit {
        self.unit
    }

    /// The GPUs, by index.
    pub fn gpus(&self) -> &[GpuUnitsView] {
        &self.gpus
    }

    /// The GPU with this UUID.
    pub fn gpu(&self, uuid: &str) -> Option<&GpuUnitsView> {
        self.gpus.iter().find(|g| g.uuid == uuid)
    }

    /// Units the GPU advertises: floor(total / unit).
    pub fn units_of(&self, gpu: &GpuUnitsView) -> u64 {
        self.unit.units_in(gpu.total_bytes)
    }

    /// Every advertised device, GPU by GPU, units in order.
    pub fn advertised_devices(&self) -> Vec<AdvertisedDevice> {
        self.gpus
            .iter()
            .flat_map(|gpu| {
                (0..self.units_of(gpu)).map(move |k| AdvertisedDevice {
                    id: DeviceId::new(gpu.uuid.clone(), k),
                    healthy: gpu.healthy,
                })
            })
            .collect()
    }

    /// Check that every unit of the selection exists here; returns the GPU.
    pub fn resolve(&self, selection: &GpuSelection) -> Result<&GpuUnitsView, InventoryError> {
        let gpu = self
            .gpu(&selection.gpu_uuid)
            .ok_or_else(|| InventoryError::UnknownGpu(selection.gpu_uuid.clone()))?;
        let units = self.units_of(gpu);
        if let Some(bad) = selection.units.iter().find(|k| **k >= units) {
            return Err(InventoryError::UnknownUnit {
                id: DeviceId::new(gpu.uuid.clone(), *bad).to_string(),
                gpu: gpu.uuid.clone(),
                units,
            });
        }
        Ok(gpu)
    }

    /// The memory limit a selection grants: units × unit bytes.
    pub fn limit_bytes(&self, selection: &GpuSelection) -> u64 {
        self.unit.bytes_for(selection.unit_count())
    }
}

/// Choose `size` unit IDs out of `available`, always including `must_include`.
///
/// Each entry of `preferred_gpus` (for the device plugin, [`owed_gpus`]) is one GPU UUID or,
/// for a pod spanning several GPUs, their UUIDs comma-separated: such an entry is served by
/// `size / k` units from each of its `k` GPUs (when `size` divides). The answer is, in order:
/// with `must_include` on one GPU, that GPU; with `must_include` on several GPUs, the first
/// preferred entry naming all of them that can serve the request, else an even share of those
/// GPUs; otherwise the first preferred
/// entry that can serve it; otherwise the GPU with the fewest available units that still has
/// enough (binpacking the node). Units are taken lowest index first. Returns an empty list when
/// nothing can serve the request, which tells the kubelet we have no preference. The answer
/// only ever holds available units, each once: `must_include` IDs that are not available (the
/// kubelet never sends such) are ignored, repeats dropped, and a `size` beyond the available
/// units is served by nobody.
pub fn preferred_units<S: AsRef<str>>(
    available: &[DeviceId],
    must_include: &[DeviceId],
    size: usize,
    preferred_gpus: &[S],
) -> Vec<DeviceId> {
    if size == 0 || size > available.len() {
        return Vec::new();
    }
    let mut must: Vec<DeviceId> = Vec::new();
    for id in must_include.iter().filter(|id| available.contains(id)) {
        if !must.contains(id) {
            must.push(id.clone());
        }
    }
    let must_include = must.as_slice();
    let mut by_gpu: BTreeMap<&str, Vec<&DeviceId>> = BTreeMap::new();
    for id in available {
        by_gpu.entry(id.gpu_uuid.as_str()).or_default().push(id);
    }
    let mut must_gpus: Vec<&str> = must_include.iter().map(|id| id.gpu_uuid.as_str()).collect();
    must_gpus.sort_unstable();
    must_gpus.dedup();
    let preferred = preferred_gpus.iter().map(|s| gpu_uuids(s.as_ref()));
    if must_gpus.len() > 1 {
        // Without a preference naming them all (no pod cache, or the pod not found), an even
        // share of each of the must-include GPUs: what a spanning pod's containers hold.
        return preferred
            .filter(|gpus| must_gpus.iter().all(|m| gpus.contains(m)))
            .find_map(|gpus| take_even(&by_gpu, &gpus, must_include, size))
            .or_else(|| take_even(&by_gpu, &must_gpus, must_include, size))
            .unwrap_or_default();
    }
    if must_gpus.is_empty() {
        for gpus in preferred {
            if let Some(picked) = take_even(&by_gpu, &gpus, must_include, size) {
                return picked;
            }
        }
    }
    let fits = |gpu: &str| by_gpu.get(gpu).is_some_and(|ids| ids.len() >= size);
    let chosen: Option<&str> = if let Some(gpu) = must_gpus.first() {
        fits(gpu).then_some(*gpu)
    } else {
        by_gpu
            .iter()
            .filter(|(_, ids)| ids.len() >= size)
            .min_by_key(|(gpu, ids)| (ids.len(), **gpu))
            .map(|(gpu, _)| *gpu)
    };
    chosen
        .and_then(|gpu| take_even(&by_gpu, &[gpu], must_include, size))
        .unwrap_or_default()
}

/// `size / gpus.len()` available units from each of `gpus` (lowest index first, those of
/// `must_include` on that GPU first), or `None` when `size` does not divide, a GPU repeats, or
/// a GPU lacks the units.
fn take_even(
    by_gpu: &BTreeMap<&str, Vec<&DeviceId>>,
    gpus: &[&str],
    must_include: &[DeviceId],
    size: usize,
) -> Option<Vec<DeviceId>> {
    let k = gpus.len();
    if k == 0 || !size.is_multiple_of(k) || (1..k).any(|i| gpus[..i].contains(&gpus[i])) {
        return None;
    }
    let per = size / k;
    let mut picked = Vec::with_capacity(size);
    for gpu in gpus {
        let ids = by_gpu.get(gpu)?;
        let must: Vec<&DeviceId> = must_include
            .iter()
            .filter(|id| id.gpu_uuid == *gpu)
            .collect();
        if must.len() > per || ids.len() < per {
            return None;
        }
        let mut rest: Vec<&DeviceId> = ids
            .iter()
            .copied()
            .filter(|id| !must.contains(id))
            .collect();
        rest.sort_by_key(|id| id.unit);
        let mut here: Vec<DeviceId> = must.into_iter().cloned().collect();
        for id in rest {
            if here.len() >= per {
                break;
            }
            here.push(id.clone());
        }
        if here.len() < per {
            return None;
        }
        picked.extend(here);
    }
    (picked.len() == size).then_some(picked)
}

/// A pod on the node that holds, or waits for, units of one request size.
///
/// For a pod spanning several GPUs each GPU field holds the GPUs' UUIDs comma-separated, in one
/// canonical order (sorted) on both sides, so a pod is owed its set of GPUs as one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlacement {
    /// The GPU the extender assigned (the `vramslice.io/gpu-uuid` annotation).
    pub annotated_gpu: String,
    /// The GPU the kubelet actually allocated to it, once it has.
    pub allocated_gpu: Option<String>,
    /// Orders pods by assignment: `assigned-at`, then creation time, then name.
    pub order_key: String,
}

/// The GPUs still owed an allocation of this size, in the order to prefer them.
///
/// The kubelet admits pods one at a time, normally in the order they were bound, so the GPU of
/// the earliest-assigned pod still waiting is the best guess for the request at hand. But
/// same-size pods are interchangeable and the guess can be wrong: pod A (assigned GPU 1) may take
/// GPU 0's units meant for pod B. What must hold is the multiset: every GPU ends up with as many
/// same-size pods as the extender assigned it. A GPU is owed `assigned − allocated` pods, so the
/// order is: the GPUs of waiting pods by assignment order, skipping GPUs no longer owed, then any
/// other owed GPU (most owed first, then UUID). Following it keeps the kubelet's allocations equal
/// to the extender's ledger whatever order pods are admitted in.
pub fn owed_gpus(pods: &[PodPlacement]) -> Vec<String> {
    let mut owed: BTreeMap<&str, i64> = BTreeMap::new();
    for pod in pods {
        *owed.entry(pod.annotated_gpu.as_str()).or_insert(0) += 1;
    }
    for gpu in pods.iter().filter_map(|p| p.allocated_gpu.as_deref()) {
        *owed.entry(gpu).or_insert(0) -= 1;
    }
    // Match waiting pods to owed GPUs in assignment order: each takes its own GPU while that GPU
    // is still owed; the pods whose GPU was paid by a swap take the GPUs left over.
    let mut waiting: Vec<&PodPlacement> =
        pods.iter().filter(|p| p.allocated_gpu.is_none()).collect();
    waiting.sort_by(|a, b| a.order_key.cmp(&b.order_key));
    let mut matched: Vec<Option<&str>> = Vec::with_capacity(waiting.len());
    for pod in &waiting {
        let gpu = pod.annotated_gpu.as_str();
        match owed.get_mut(gpu) {
            Some(n) if *n > 0 => {
                *n -= 1;
                matched.push(Some(gpu));
            }
            _ => matched.push(None),
        }
    }
    let mut leftover: Vec<(&str, i64)> = owed
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(gpu, n)| (*gpu, *n))
        .collect();
    leftover.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut spare = leftover
        .iter()
        .flat_map(|(gpu, n)| std::iter::repeat_n(*gpu, usize::try_from(*n).unwrap_or(0)));
    let mut order: Vec<String> = Vec::new();
    for gpu in matched.into_iter().map(|m| m.or_else(|| spare.next())) {
        if let Some(gpu) = gpu.filter(|g| !order.iter().any(|o| o == g)) {
            order.push(gpu.to_string());
        }
    }
    for gpu in spare {
        if !order.iter().any(|o| o == gpu) {
            order.push(gpu.to_string());
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn two_gpus() -> GpuInventory {
        GpuInventory::new(
            VramUnit::Gib1,
            vec![
                GpuUnitsView {
                    uuid: "GPU-b".into(),
                    index: 1,
                    total_bytes: (24 << 30) + 5,
                    healthy: false,
                },
                GpuUnitsView {
                    uuid: "GPU-a".into(),
                    index: 0,
                    total_bytes: 80 << 30,
                    healthy: true,
                },
            ],
        )
    }

    #[test]
    fn advertises_one_device_per_whole_unit() {
        let inv = two_gpus();
        let devices = inv.advertised_devices();
        assert_eq!(devices.len(), 80 + 24);
        assert_eq!(devices[0].id.to_string(), "GPU-a::0");
        assert!(devices[0].healthy);
        assert_eq!(devices[80].id.to_string(), "GPU-b::0");
        assert!(!devices[80].healthy);
    }

    #[test]
    fn resolve_names_unknown_gpus_and_units() {
        let inv = two_gpus();
        let sel = GpuSelection::from_ids(&["GPU-b::23", "GPU-b::0"]).unwrap();
        assert_eq!(inv.resolve(&sel).unwrap().uuid, "GPU-b");
        assert_eq!(inv.limit_bytes(&sel), 2 << 30);
        let sel = GpuSelection::from_ids(&["GPU-b::24"]).unwrap();
        assert_eq!(
            inv.resolve(&sel).unwrap_err().to_string(),
            "device ID GPU-b::24 is unknown: GPU GPU-b advertises units 0..24"
        );
        let sel = GpuSelection::from_ids(&["GPU-z::0"]).unwrap();
        assert_eq!(
            inv.resolve(&sel).unwrap_err(),
            InventoryError::UnknownGpu("GPU-z".into())
        );
    }

    const NO_PREFERENCE: &[&str] = &[];

    fn ids(gpu: &str, units: std::ops::Range<u64>) -> Vec<DeviceId> {
        units.map(|k| DeviceId::new(gpu, k)).collect()
    }

    #[test]
    fn the_answer_holds_only_available_units_each_once() {
        let available = ids("GPU-a", 0..3);
        // must_include outside available, or repeated: ignored / once.
        let got = preferred_units(&available, &ids("GPU-a", 9..10), 2, NO_PREFERENCE);
        assert_eq!(got, ids("GPU-a", 0..2));
        let twice = [DeviceId::new("GPU-a", 1), DeviceId::new("GPU-a", 1)];
        let got = preferred_units(&available, &twice, 2, NO_PREFERENCE);
        assert_eq!(
            got,
            vec![DeviceId::new("GPU-a", 1), DeviceId::new("GPU-a", 0)]
        );
        // A size beyond the available units (a hand-made call) is no preference, at once.
        assert!(preferred_units(&available, &[], i32::MAX as usize, NO_PREFERENCE).is_empty());
        assert!(preferred_units(&available, &[], 0, NO_PREFERENCE).is_empty());
    }

    #[test]
    fn prefers_the_assigned_gpu() {
        let mut available = ids("GPU-a", 0..10);
        available.extend(ids("GPU-b", 0..4));
        let picked = preferred_units(&available, &[], 3, &["GPU-a"]);
        assert_eq!(picked, ids("GPU-a", 0..3));
        // Without a preference, binpack onto the fuller GPU (fewest available units).
        let picked = preferred_units(&available, &[], 3, NO_PREFERENCE);
        assert_eq!(picked, ids("GPU-b", 0..3));
        // A preferred GPU that cannot hold the request is not forced.
        let picked = preferred_units(&available, &[], 5, &["GPU-b"]);
        assert_eq!(picked, ids("GPU-a", 0..5));
        // Nothing fits on one GPU: no preference.
        assert!(preferred_units(&available, &[], 11, NO_PREFERENCE).is_empty());
        // must_include decides the GPU.
        let must = vec![DeviceId::new("GPU-a", 7)];
        let picked = preferred_units(&available, &must, 2, &["GPU-b"]);
        assert_eq!(
            picked,
            vec![DeviceId::new("GPU-a", 7), DeviceId::new("GPU-a", 0)]
        );
        // Preferences in order: the first with room wins.
        let picked = preferred_units(&available, &[], 2, &["GPU-x", "GPU-b", "GPU-a"]);
        assert_eq!(picked, ids("GPU-b", 0..2));
        let picked = preferred_units(&available, &[], 6, &["GPU-b", "GPU-a"]);
        assert_eq!(picked, ids("GPU-a", 0..6));
    }

    #[test]
    fn a_spanning_preference_takes_equal_shares() {
        let mut available = ids("GPU-a", 0..10);
        available.extend(ids("GPU-b", 3..8));
        available.extend(ids("GPU-c", 0..2));
        // 4 units over GPU-a and GPU-b: 2 from each, lowest index first.
        let picked = preferred_units(&available, &[], 4, &["GPU-a,GPU-b"]);
        let mut want = ids("GPU-a", 0..2);
        want.extend(ids("GPU-b", 3..5));
        assert_eq!(picked, want);
        // A shape that cannot serve (GPU-c has 2 units, the share is 3; 5 does not divide by 2)
        // is skipped for the next preference, then binpacking.
        let picked = preferred_units(&available, &[], 6, &["GPU-a,GPU-c", "GPU-b,GPU-a"]);
        let mut want = ids("GPU-b", 3..6);
        want.extend(ids("GPU-a", 0..3));
        assert_eq!(picked, want);
        assert_eq!(
            preferred_units(&available, &[], 5, &["GPU-a,GPU-b"]),
            ids("GPU-b", 3..8)
        );
        // must_include on two GPUs: the first preference naming both.
        let must = vec![DeviceId::new("GPU-a", 9), DeviceId::new("GPU-b", 7)];
        let picked = preferred_units(&available, &must, 4, &["GPU-a", "GPU-a,GPU-b"]);
        assert_eq!(
            picked,
            vec![
                DeviceId::new("GPU-a", 9),
                DeviceId::new("GPU-a", 0),
                DeviceId::new("GPU-b", 7),
                DeviceId::new("GPU-b", 3)
            ]
        );
        // ... and without such a preference an even share of the must-include GPUs (the
        // kubelet would otherwise fill in an uneven split that Allocate refuses).
        assert_eq!(
            preferred_units(&available, &must, 4, &["GPU-a"]),
            preferred_units(&available, &must, 4, NO_PREFERENCE)
        );
        assert_eq!(
            preferred_units(&available, &must, 4, NO_PREFERENCE),
            vec![
                DeviceId::new("GPU-a", 9),
                DeviceId::new("GPU-a", 0),
                DeviceId::new("GPU-b", 7),
                DeviceId::new("GPU-b", 3)
            ]
        );
        // A size that does not split evenly over them: no preference.
        assert!(preferred_units(&available, &must, 5, NO_PREFERENCE).is_empty());
    }

    fn placed(gpu: &str, allocated: Option<&str>, order: &str) -> PodPlacement {
        PodPlacement {
            annotated_gpu: gpu.into(),
            allocated_gpu: allocated.map(Into::into),
            order_key: order.into(),
        }
    }

    #[test]
    fn a_swapped_allocation_is_paid_back_to_the_other_gpu() {
        // A was assigned GPU-1, B GPU-0; the kubelet admitted A first and it took GPU-0.
        let pods = vec![
            placed("GPU-1", Some("GPU-0"), "1-a"),
            placed("GPU-0", None, "2-b"),
        ];
        assert_eq!(owed_gpus(&pods), vec!["GPU-1"]);
        // Nobody waiting: nothing owed, even with the swap on record.
        let pods = vec![
            placed("GPU-1", Some("GPU-0"), "1-a"),
            placed("GPU-0", Some("GPU-1"), "2-b"),
        ];
        assert!(owed_gpus(&pods).is_empty());
        // No swaps: the earliest-assigned waiting pod's GPU first (the kubelet admits in order).
        let pods = vec![
            placed("GPU-0", None, "2"),
            placed("GPU-1", None, "1"),
            placed("GPU-0", None, "3"),
        ];
        assert_eq!(owed_gpus(&pods), vec!["GPU-1", "GPU-0"]);
        // B (GPU-0, earliest) waits but GPU-0 was already paid by A's swap: GPU-1 is the one owed.
        let pods = vec![
            placed("GPU-1", Some("GPU-0"), "2"),
            placed("GPU-0", None, "1"),
            placed("GPU-2", None, "3"),
        ];
        // B, admitted next, takes the GPU A's swap left owed; C keeps its own.
        assert_eq!(owed_gpus(&pods), vec!["GPU-1", "GPU-2"]);
    }

    proptest! {
        #[test]
        fn never_advertises_more_than_the_card_holds(total in any::<u64>(), unit_ix in 0usize..4) {
            let unit = VramUnit::ALL[unit_ix];
            let inv = GpuInventory::new(unit, vec![GpuUnitsView {
                uuid: "GPU-x".into(), index: 0, total_bytes: total % (1 << 44), healthy: true,
            }]);
            let units = inv.units_of(&inv.gpus()[0]);
            prop_assert!(unit.bytes_for(units) <= inv.gpus()[0].total_bytes);
            prop_assert!(unit.bytes_for(units + 1) > inv.gpus()[0].total_bytes);
        }

        /// Serving each waiting pod with the most-owed GPU, in any admission order, leaves every
        /// GPU with exactly as many pods as were assigned to it.
        #[test]
        fn following_owed_gpus_matches_the_assignment(
            assigned in proptest::collection::vec(0usize..3, 1..12),
            order in proptest::collection::vec(any::<u32>(), 12),
        ) {
            let gpus = ["GPU-0", "GPU-1", "GPU-2"];
            let mut pods: Vec<PodPlacement> = assigned
                .iter()
                .enumerate()
                .map(|(i, g)| placed(gpus[*g], None, &format!("{i:02}")))
                .collect();
            let mut admission: Vec<usize> = (0..pods.len()).collect();
            admission.sort_by_key(|i| order[*i]);
            for i in admission {
                let gpu = owed_gpus(&pods).first().cloned();
                prop_assert!(gpu.is_some(), "a waiting pod found no owed GPU");
                pods[i].allocated_gpu = gpu;
            }
            for gpu in gpus {
                let want = pods.iter().filter(|p| p.annotated_gpu == gpu).count();
                let got = pods.iter().filter(|p| p.allocated_gpu.as_deref() == Some(gpu)).count();
                prop_assert_eq!(want, got);
            }
        }

        #[test]
        fn preferred_units_are_one_gpu_of_the_right_size(
            a in 0u64..20, b in 0u64..20, size in 1usize..25, pref in proptest::option::of(0usize..2)
        ) {
            let mut available = ids("GPU-a", 0..a);
            available.extend(ids("GPU-b", 0..b));
            let pref: Vec<&str> = pref.map(|i| ["GPU-a", "GPU-b"][i]).into_iter().collect();
            let picked = preferred_units(&available, &[], size, &pref);
            if picked.is_empty() {
                prop_assert!(a < size as u64 && b < size as u64);
            } else {
                prop_assert_eq!(picked.len(), size);
                prop_assert!(picked.iter().all(|id| id.gpu_uuid == picked[0].gpu_uuid));
                prop_assert!(picked.iter().all(|id| available.contains(id)));
            }
        }

        #[test]
        fn spanning_preferences_are_equal_shares_or_one_gpu(
            a in 0u64..12, b in 0u64..12, size in 1usize..25
        ) {
            let mut available = ids("GPU-a", 0..a);
            available.extend(ids("GPU-b", 0..b));
            let picked = preferred_units(&available, &[], size, &["GPU-a,GPU-b"]);
            let on = |g: &str| picked.iter().filter(|id| id.gpu_uuid == g).count();
            let even = size % 2 == 0 && a >= (size / 2) as u64 && b >= (size / 2) as u64;
            if even {
                prop_assert_eq!((on("GPU-a"), on("GPU-b")), (size / 2, size / 2));
            } else if !picked.is_empty() {
                prop_assert_eq!(picked.len(), size);
                prop_assert!(on("GPU-a") == 0 || on("GPU-b") == 0);
            }
            prop_assert!(picked.iter().all(|id| available.contains(id)));
        }
    }
}
