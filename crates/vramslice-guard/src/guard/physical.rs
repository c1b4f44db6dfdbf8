//! Physical allocations (`cuMemCreate`, the virtual memory management API): charged for as long
//! as the driver keeps them.
//!
//! The driver frees a physical allocation when its last handle reference is released *and* its
//! last mapping is unmapped, in either order. Releasing the handle right after `cuMemMap` is a
//! documented pattern (the memory then lives until `cuMemUnmap`), and NCCL's free retains a
//! second reference from the address (`cuMemRetainAllocationHandle`) before releasing. So the
//! charge follows both counts, not `cuMemRelease` alone:
//!
//! - `cuMemCreate` charges the bytes with one reference and no mapping;
//! - `cuMemRetainAllocationHandle` adds a reference, `cuMemRelease` drops one;
//! - `cuMemMap` counts the mapping on the handle before the real call and records it (virtual
//!   address → size, handle) once the driver agrees; `cuMemUnmap` takes out every mapping in its range (one call may cover many, as
//!   PyTorch's expandable segments do);
//! - the bytes go back when both counts reach zero.
//!
//! A release or unmap is booked before the real call (so an allocation freed by it cannot be
//! confused with a new one that gets the same handle) and undone if the driver refuses it. A
//! mapping of a handle the guard does not track (imported from another process, host memory) is
//! recorded too, so an unmap covering it walks on to the next mapping; it never charges.

use super::Guard;
use crate::tracker::{Entry, Kind};

/// What keeps a physical allocation alive in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holds {
    /// Handle references not yet released.
    pub refs: u32,
    /// Mappings not yet unmapped.
    pub maps: u32,
}

impl Holds {
    /// A new allocation: one reference, no mapping.
    #[cfg(test)]
    pub const CREATED: Holds = Holds { refs: 1, maps: 0 };

    /// From a tracker entry's `extra`. The reference count is stored XOR 1, so that 0 (what
    /// [`Guard::track`] records for a new handle) reads as [`Holds::CREATED`].
    pub fn unpack(extra: u64) -> Holds {
        Holds {
            refs: (extra as u32) ^ 1,
            maps: (extra >> 32) as u32,
        }
    }

    /// Into a tracker entry's `extra` (see [`Holds::unpack`]).
    pub fn pack(self) -> u64 {
        (u64::from(self.maps) << 32) | u64::from(self.refs ^ 1)
    }

    /// Whether the driver still keeps the allocation.
    pub fn alive(self) -> bool {
        self.refs > 0 || self.maps > 0
    }

    fn retained(self) -> Holds {
        Holds {
            refs: self.refs.saturating_add(1),
            ..self
        }
    }

    fn released(self) -> Holds {
        Holds {
            refs: self.refs.saturating_sub(1),
            ..self
        }
    }

    fn mapped(self) -> Holds {
        Holds {
            maps: self.maps.saturating_add(1),
            ..self
        }
    }

    fn unmapped(self) -> Holds {
        Holds {
            maps: self.maps.saturating_sub(1),
            ..self
        }
    }
}

/// A `cuMemMap` counted on its handle before the real call: finish it with
/// [`Guard::physical_map_done`].
#[must_use = "pass it to Guard::physical_map_done with the driver's answer"]
#[derive(Debug)]
pub struct PendingMap {
    handle: u64,
}

/// A release or unmap booked before the real call: finish it with [`Guard::physical_done`].
#[must_use = "pass it to Guard::physical_done with the driver's answer"]
#[derive(Debug, Default)]
pub struct PhysicalChange {
    /// Each entry this change touched, as it was before (first touch only), to undo a refusal.
    before: Vec<(Kind, u64, Entry)>,
    /// Allocations nothing holds any more: their bytes go back once the driver agrees.
    freed: Vec<Entry>,
}

impl PhysicalChange {
    fn remember(&mut self, kind: Kind, handle: u64, entry: Entry) {
        if !self
            .before
            .iter()
            .any(|(k, h, _)| *k == kind && *h == handle)
        {
            self.before.push((kind, handle, entry));
        }
    }
}

impl Guard {
    /// Applies `change` to the tracked allocation `handle` (if tracked), noting its old state in
    /// `plan` and whether nothing holds it any more.
    fn physical_update(&self, handle: u64, plan: &mut PhysicalChange, change: fn(Holds) -> Holds) {
        let mut old = None;
        let mut freed = None;
        self.tracker.update(Kind::Physical, handle, |e| {
            let e = e?;
            old = Some(e);
            let holds = change(Holds::unpack(e.extra));
            if holds.alive() {
                Some(Entry {
                    extra: holds.pack(),
                    ..e
                })
            } else {
                freed = Some(e);
                None
            }
        });
        if let Some(old) = old {
            plan.remember(Kind::Physical, handle, old);
        }
        plan.freed.extend(freed);
    }

    /// `cuMemRetainAllocationHandle` returned `handle`: one more reference to release.
    pub fn physical_retained(&self, handle: u64) {
        self.tracker.update(Kind::Physical, handle, |e| {
            e.map(|e| Entry {
                extra: Holds::unpack(e.extra).retained().pack(),
                ..e
            })
        });
    }

    /// Before the real `cuMemMap(va, size, handle)`: the mapping counts on the handle already,
    /// so a `cuMemRelease` of the same handle on another thread, racing the map, cannot give
    /// back memory the new mapping keeps. Finish it with [`Guard::physical_map_done`].
    pub fn physical_map(&self, handle: u64) -> PendingMap {
        self.physical_update(handle, &mut PhysicalChange::default(), Holds::mapped);
        PendingMap { handle }
    }

    /// After the real `cuMemMap`: on success the mapping is recorded at `va` (so an unmap finds
    /// it); on a refusal the count taken by [`Guard::physical_map`] is dropped again, and the
    /// allocation is given back if a release came meanwhile and nothing else holds it.
    pub fn physical_map_done(&self, pending: PendingMap, va: u64, size: u64, ok: bool) {
        let handle = pending.handle;
        if !ok {
            let mut plan = PhysicalChange::default();
            self.physical_update(handle, &mut plan, Holds::unmapped);
            self.physical_done(plan, true);
            return;
        }
        let mapping = Entry {
            bytes: size,
            extra: handle,
            account: 0,
        };
        if let Some(stale) = self.tracker.insert(Kind::Mapping, va, mapping) {
            // An unmap the guard never saw: that mapping is gone.
            let mut plan = PhysicalChange::default();
            self.physical_update(stale.extra, &mut plan, Holds::unmapped);
            self.physical_done(plan, true);
        }
    }

    /// Before the real `cuMemRelease(handle)`: one reference fewer.
    pub fn physical_release(&self, handle: u64) -> PhysicalChange {
        let mut plan = PhysicalChange::default();
        self.physical_update(handle, &mut plan, Holds::released);
        plan
    }

    /// Before the real `cuMemUnmap(va, size)`: every recorded mapping from `va` on, mapping after
    /// mapping, up to `va + size` (a range with a gap the guard did not see stops the walk; what
    /// lies past it stays charged, never the other way round).
    pub fn physical_unmap(&self, va: u64, size: u64) -> PhysicalChange {
        let mut plan = PhysicalChange::default();
        let end = va.saturating_add(size);
        let mut at = va;
        while at < end {
            let Some(m) = self.tracker.remove(Kind::Mapping, at) else {
                break;
            };
            plan.remember(Kind::Mapping, at, m);
            self.physical_update(m.extra, &mut plan, Holds::unmapped);
            at = at.saturating_add(m.bytes.max(1));
        }
        plan
    }

    /// After the real call: `ok` gives the freed allocations' bytes back; a refusal puts every
    /// touched entry back as it was.
    pub fn physical_done(&self, plan: PhysicalChange, ok: bool) {
        if ok {
            for e in plan.freed {
                self.release(e.account, e.bytes);
            }
            return;
        }
        for (kind, handle, entry) in plan.before {
            self.tracker.insert(kind, handle, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::guard;
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn create(g: &Guard, handle: u64, bytes: u64) {
        g.reserve(0, bytes).unwrap();
        g.track(Kind::Physical, handle, 0, bytes);
    }

    fn release(g: &Guard, handle: u64) {
        let plan = g.physical_release(handle);
        g.physical_done(plan, true);
    }

    fn map(g: &Guard, va: u64, size: u64, handle: u64) {
        let pending = g.physical_map(handle);
        g.physical_map_done(pending, va, size, true);
    }

    fn unmap(g: &Guard, va: u64, size: u64) {
        let plan = g.physical_unmap(va, size);
        g.physical_done(plan, true);
    }

    #[test]
    fn packing_reads_a_fresh_entry_as_created() {
        assert_eq!(Holds::unpack(0), Holds::CREATED);
        for holds in [
            Holds { refs: 0, maps: 3 },
            Holds { refs: 2, maps: 0 },
            Holds {
                refs: u32::MAX,
                maps: u32::MAX,
            },
        ] {
            assert_eq!(Holds::unpack(holds.pack()), holds);
        }
    }

    #[test]
    fn release_right_after_map_keeps_the_charge_until_the_unmap() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 60 * MIB);
        map(&g, 0x1000_0000, 60 * MIB, 0xa);
        release(&g, 0xa);
        assert_eq!(g.used(0), 60 * MIB, "mapped: the driver keeps it");
        assert!(
            g.reserve(0, 41 * MIB).is_err(),
            "and it counts toward the limit"
        );
        unmap(&g, 0x1000_0000, 60 * MIB);
        assert_eq!(g.used(0), 0);
        assert!(g.tracker.is_empty());
    }

    #[test]
    fn a_retained_reference_must_be_released_too() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 10 * MIB);
        map(&g, 0x1000_0000, 10 * MIB, 0xa);
        g.physical_retained(0xa);
        release(&g, 0xa);
        unmap(&g, 0x1000_0000, 10 * MIB);
        assert_eq!(g.used(0), 10 * MIB, "one reference left");
        release(&g, 0xa);
        assert_eq!(g.used(0), 0);
    }

    #[test]
    fn one_unmap_covers_many_mappings_and_a_handle_mapped_twice_is_charged_once() {
        let g = guard(100 * MIB);
        let (base, page) = (0x2000_0000, 2 * MIB);
        for i in 0..4 {
            create(&g, 0x10 + i, page);
            map(&g, base + i * page, page, 0x10 + i);
        }
        create(&g, 0x20, page);
        map(&g, base + 4 * page, page, 0x20);
        map(&g, 0x3000_0000, page, 0x20);
        for h in [0x10, 0x11, 0x12, 0x13, 0x20] {
            release(&g, h);
        }
        assert_eq!(g.used(0), 5 * page);
        unmap(&g, base, 5 * page);
        assert_eq!(g.used(0), page, "0x20 is still mapped elsewhere");
        unmap(&g, 0x3000_0000, page);
        assert_eq!(g.used(0), 0);
        assert!(g.tracker.is_empty());
    }

    #[test]
    fn a_refused_release_or_unmap_changes_nothing() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 10 * MIB);
        map(&g, 0x1000_0000, 10 * MIB, 0xa);
        let plan = g.physical_release(0xa);
        g.physical_done(plan, false);
        let plan = g.physical_unmap(0x1000_0000, 10 * MIB);
        g.physical_done(plan, false);
        assert_eq!(
            g.tracker
                .update(Kind::Physical, 0xa, |e| e)
                .map(|e| e.extra),
            Some(Holds { refs: 1, maps: 1 }.pack())
        );
        unmap(&g, 0x1000_0000, 10 * MIB);
        release(&g, 0xa);
        assert_eq!(g.used(0), 0);
    }

    #[test]
    fn a_release_racing_a_map_leaves_the_charge_to_the_mapping() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 10 * MIB);
        let pending = g.physical_map(0xa);
        release(&g, 0xa); // another thread, while the driver maps
        assert_eq!(g.used(0), 10 * MIB, "the mapping being made keeps it");
        g.physical_map_done(pending, 0x1000_0000, 10 * MIB, true);
        assert_eq!(g.used(0), 10 * MIB);
        unmap(&g, 0x1000_0000, 10 * MIB);
        assert_eq!(g.used(0), 0);
        assert!(g.tracker.is_empty());
    }

    #[test]
    fn a_refused_map_gives_back_what_a_racing_release_left_to_it() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 10 * MIB);
        create(&g, 0xb, 10 * MIB);
        map(&g, 0x1000_0000, 10 * MIB, 0xb);
        let pending = g.physical_map(0xa);
        release(&g, 0xa);
        // Refused, e.g. because the range is already mapped: the old mapping stays.
        g.physical_map_done(pending, 0x1000_0000, 10 * MIB, false);
        assert_eq!(g.used(0), 10 * MIB, "only 0xb is left");
        let pending = g.physical_map(0xb);
        g.physical_map_done(pending, 0x2000_0000, 10 * MIB, false);
        unmap(&g, 0x1000_0000, 10 * MIB);
        release(&g, 0xb);
        assert_eq!(g.used(0), 0);
        assert!(g.tracker.is_empty());
    }

    #[test]
    fn untracked_handles_are_walked_past_and_never_charged() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 2 * MIB);
        map(&g, 0x1000_0000, 2 * MIB, 0xbad); // imported: not tracked
        map(&g, 0x1000_0000 + 2 * MIB, 2 * MIB, 0xa);
        release(&g, 0xa);
        release(&g, 0xbad);
        unmap(&g, 0x1000_0000, 4 * MIB);
        assert_eq!(g.used(0), 0);
        assert!(g.tracker.is_empty());
    }

    #[test]
    fn a_mapping_replaced_without_an_unmap_is_counted_off_its_old_handle() {
        let g = guard(100 * MIB);
        create(&g, 0xa, 2 * MIB);
        create(&g, 0xb, 2 * MIB);
        map(&g, 0x1000_0000, 2 * MIB, 0xa);
        release(&g, 0xa);
        map(&g, 0x1000_0000, 2 * MIB, 0xb);
        assert_eq!(g.used(0), 2 * MIB, "0xa had nothing else holding it");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create,
        Retain(usize),
        Release(usize),
        Map(usize),
        Unmap(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Create),
            (0..6usize).prop_map(Op::Retain),
            (0..6usize).prop_map(Op::Release),
            (0..6usize).prop_map(Op::Map),
            (0..12usize).prop_map(Op::Unmap),
        ]
    }

    proptest! {
        /// Against a model of the driver: after any sequence of valid calls, what the guard
        /// charges is exactly the bytes of the allocations the driver still keeps.
        #[test]
        fn the_charge_is_what_the_driver_keeps(ops in prop::collection::vec(op(), 0..60)) {
            let g = guard(u64::MAX / 4);
            // The model: per allocation (refs, mapping addresses); mappings: va -> allocation.
            let mut allocs: Vec<(u32, u32, bool)> = Vec::new(); // (refs, maps, freed)
            let mut mappings: Vec<(u64, usize)> = Vec::new();
            let mut next_va = 0x1000_0000u64;
            let bytes = |i: usize| (i as u64 + 1) * MIB;
            for op in ops {
                match op {
                    Op::Create => {
                        create(&g, 0x100 + allocs.len() as u64, bytes(allocs.len()));
                        allocs.push((1, 0, false));
                    }
                    Op::Retain(i) if i < allocs.len() && allocs[i].1 > 0 => {
                        // The driver hands out a reference only for a mapped address.
                        allocs[i].0 += 1;
                        g.physical_retained(0x100 + i as u64);
                    }
                    Op::Release(i) if i < allocs.len() && allocs[i].0 > 0 => {
                        allocs[i].0 -= 1;
                        release(&g, 0x100 + i as u64);
                    }
                    Op::Map(i) if i < allocs.len() && allocs[i].0 > 0 => {
                        allocs[i].1 += 1;
                        mappings.push((next_va, i));
                        map(&g, next_va, bytes(i), 0x100 + i as u64);
                        next_va += 0x1000_0000;
                    }
                    Op::Unmap(k) if k < mappings.len() => {
                        let (va, i) = mappings.remove(k);
                        allocs[i].1 -= 1;
                        unmap(&g, va, bytes(i));
                    }
                    _ => {}
                }
                for a in &mut allocs {
                    if a.0 == 0 && a.1 == 0 {
                        a.2 = true;
                    }
                }
                let kept: u64 = allocs.iter().enumerate().filter(|(_, a)| !a.2).map(|(i, _)| bytes(i)).sum();
                prop_assert_eq!(g.used(0), kept);
            }
        }
    }
}
