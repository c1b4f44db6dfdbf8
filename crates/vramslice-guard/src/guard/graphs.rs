//! CUDA graph memory: what a device's graph memory pool holds, charged when the driver maps it.
//!
//! A graph memory node (`cuGraphAddMemAllocNode`, or a `cuMemAllocAsync` captured from a
//! stream) gets its virtual address when the node is made; physical memory comes from the
//! device's graph memory pool when the graph is launched or uploaded, stays mapped to the graph
//! between launches, and stays in the pool (even after the graph is destroyed) until
//! `cuDeviceGraphMemTrim`. The policy follows that:
//!
//! - capturing an allocation takes no memory and charges nothing;
//! - at instantiation the bytes each device's memory nodes ask for are recorded
//!   ([`GraphNeeds`]);
//! - before a graph is mapped (its first launch or upload since its device's pool was last
//!   trimmed), the growth it may cause — its bytes less what the pool holds unused — is reserved
//!   in the device's account; when that does not fit, the pool is trimmed once (what idle graphs
//!   keep mapped goes back) and the reading taken again; a launch that still does not fit is
//!   refused with `CUDA_ERROR_OUT_OF_MEMORY` before the driver maps anything;
//! - after a launch, upload or trim, the device's charge is set to what the pool really
//!   reserves (`CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`), and the advance reservation is given
//!   back.
//!
//! A graph launched again without a trim in between is only re-read afterwards: the driver keeps
//! its mappings, so it normally takes nothing new.

use super::{AccountId, Guard};
use crate::ledger::OverLimit;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{MutexGuard, PoisonError};

/// A device's graph memory pool as the driver reports it (`cuDeviceGetGraphMemAttribute`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphPoolReading {
    /// `CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`: physical memory the pool holds.
    pub reserved: u64,
    /// `CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT`: the part of it associated with graphs.
    pub used: u64,
}

impl GraphPoolReading {
    /// What mapping `bytes` more could add to the pool at most: what it holds unused is reused
    /// first.
    pub fn growth_for(self, bytes: u64) -> u64 {
        bytes.saturating_sub(self.reserved.saturating_sub(self.used))
    }
}

/// Bytes of memory nodes per device ordinal, for one graph.
pub type GraphNeeds = Vec<(i32, u64)>;

/// What one executable graph's memory nodes need on one device.
#[derive(Debug, Clone, Copy)]
struct DeviceNeed {
    device: i32,
    bytes: u64,
    /// The device pool's trim epoch when the graph was last mapped there.
    mapped_in: Option<u64>,
}

/// One device's graph memory pool, as charged.
#[derive(Debug, Clone, Copy)]
struct DevicePool {
    account: AccountId,
    charged: u64,
    /// Counts trims: a graph mapped in an older epoch may need new memory.
    epoch: u64,
}

/// Graph state of one process.
#[derive(Debug, Default)]
pub struct GraphState {
    /// Executable graph handle → its needs per device.
    execs: HashMap<u64, Vec<DeviceNeed>>,
    pools: HashMap<i32, DevicePool>,
}

impl GraphState {
    /// Device `dev`'s trim epoch (0 before its pool is first read).
    fn epoch(&self, dev: i32) -> u64 {
        self.pools.get(&dev).map_or(0, |p| p.epoch)
    }
}

thread_local! {
    static GRAPH_FORK_GUARD: RefCell<Option<MutexGuard<'static, GraphState>>> = const { RefCell::new(None) };
}

/// What to do around one mapping call (launch, upload, or instantiation with upload): the
/// devices to re-read afterwards, with their account and the bytes reserved in advance.
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "give the plan to Guard::graph_after_mapping once the real call returned"]
pub struct GraphMapping {
    devices: Vec<(i32, AccountId, u64)>,
    exec: Option<u64>,
}

impl GraphMapping {
    /// Bytes reserved in advance, over all devices.
    pub fn reserved_in_advance(&self) -> u64 {
        self.devices.iter().map(|d| d.2).sum()
    }
}

/// Why a graph may not be mapped: the device has no account, or its account has no room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GraphRefusal {
    /// Per-GPU limits with no entry for this device.
    Device(i32),
    /// The growth does not fit the account's limit, even after a trim.
    OverLimit(OverLimit),
}

impl Guard {
    fn graphs(&self) -> MutexGuard<'_, GraphState> {
        self.graphs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An executable graph was made from a graph whose memory nodes need `needs` (`None`: they
    /// could not be read; the graph is then re-read after each launch on the current device).
    /// `mapped`: the instantiation also uploaded it.
    pub fn graph_instantiated(&self, exec: u64, needs: Option<GraphNeeds>, mapped: bool) {
        let mut guard = self.graphs();
        let st = &mut *guard;
        let Some(needs) = needs else {
            st.execs.remove(&exec);
            return;
        };
        let record = needs
            .into_iter()
            .map(|(device, bytes)| DeviceNeed {
                device,
                bytes,
                mapped_in: mapped.then(|| st.epoch(device)),
            })
            .collect();
        st.execs.insert(exec, record);
    }

    /// An executable graph was destroyed (its memory stays in the pool until a trim).
    pub fn graph_destroyed(&self, exec: u64) {
        self.graphs().execs.remove(&exec);
    }

    /// Before a launch or upload of `exec`: reserves the growth of its first mapping since the
    /// last trim (trimming once when it does not fit). `current` names the calling thread's
    /// device, asked only for a graph the guard did not see instantiated.
    ///
    /// # Errors
    /// [`GraphRefusal`] when a device has no account or no room; nothing stays reserved then.
    pub fn graph_before_launch(
        &self,
        exec: u64,
        current: impl FnOnce() -> Option<i32>,
    ) -> Result<GraphMapping, GraphRefusal> {
        let record = self.graphs().execs.get(&exec).cloned();
        let Some(record) = record else {
            let devices = current()
                .and_then(|dev| Some((dev, self.account_of_device(dev)?, 0)))
                .into_iter()
                .collect();
            return Ok(GraphMapping {
                devices,
                exec: None,
            });
        };
        let mut plan = GraphMapping {
            devices: Vec::with_capacity(record.len()),
            exec: Some(exec),
        };
        for need in record {
            let (dev, bytes) = (need.device, need.bytes);
            let still_mapped = need.mapped_in == Some(self.graphs().epoch(dev));
            let step = if still_mapped {
                self.account_of_device(dev)
                    .map(|a| (dev, a, 0))
                    .ok_or(GraphRefusal::Device(dev))
            } else {
                self.reserve_graph_growth(dev, bytes)
            };
            match step {
                Ok(d) => plan.devices.push(d),
                Err(e) => {
                    self.undo_advance(&plan);
                    return Err(e);
                }
            }
        }
        Ok(plan)
    }

    /// Before an instantiation that also uploads a graph needing `needs`.
    ///
    /// # Errors
    /// As [`Guard::graph_before_launch`].
    pub fn graph_before_upload(&self, needs: &GraphNeeds) -> Result<GraphMapping, GraphRefusal> {
        let mut plan = GraphMapping::default();
        for &(dev, bytes) in needs {
            match self.reserve_graph_growth(dev, bytes) {
                Ok(d) => plan.devices.push(d),
                Err(e) => {
                    self.undo_advance(&plan);
                    return Err(e);
                }
            }
        }
        Ok(plan)
    }

    /// After the real call: each device's charge becomes what its pool reserves now, the advance
    /// reservations are given back, and a launched graph is remembered as mapped.
    pub fn graph_after_mapping(&self, plan: GraphMapping, succeeded: bool) {
        for &(dev, a, _) in &plan.devices {
            self.reconcile_graph_pool(dev, a);
        }
        self.undo_advance(&plan);
        if let (true, Some(exec)) = (succeeded, plan.exec) {
            let mut guard = self.graphs();
            let st = &mut *guard;
            if let Some(record) = st.execs.get_mut(&exec) {
                for need in record {
                    need.mapped_in = Some(st.pools.get(&need.device).map_or(0, |p| p.epoch));
                }
            }
        }
    }

    /// Device `dev`'s graph pool was trimmed: graphs mapped before must be checked again, and
    /// the charge follows the pool.
    pub fn graph_trimmed(&self, dev: i32) {
        let account = {
            let mut st = self.graphs();
            match st.pools.get_mut(&dev) {
                Some(p) => {
                    p.epoch += 1;
                    Some(p.account)
                }
                None => None,
            }
        };
        if let Some(a) = account.or_else(|| self.account_of_device(dev)) {
            self.reconcile_graph_pool(dev, a);
        }
    }

    /// Bytes charged for device `dev`'s graph pool.
    pub fn graph_charged(&self, dev: i32) -> u64 {
        self.graphs().pools.get(&dev).map_or(0, |p| p.charged)
    }

    /// Re-reads every graph pool this process has mapped graphs into (when memory is short, and
    /// for memory information): what a launch mapped after the guard read the pool is charged
    /// here at the latest.
    pub fn reconcile_graph_pools(&self) {
        let pools: Vec<(i32, AccountId)> = self
            .graphs()
            .pools
            .iter()
            .map(|(&dev, p)| (dev, p.account))
            .collect();
        for (dev, a) in pools {
            self.reconcile_graph_pool(dev, a);
        }
    }

    /// Sets device `dev`'s charge to what its pool reserves (an unreadable pool keeps its charge).
    fn reconcile_graph_pool(&self, dev: i32, a: AccountId) {
        let Some(reading) = (self.probes.graph_pool)(dev) else {
            return;
        };
        let (account, old) = {
            let mut st = self.graphs();
            let pool = st.pools.entry(dev).or_insert(DevicePool {
                account: a,
                charged: 0,
                epoch: 0,
            });
            let old = pool.charged;
            pool.charged = reading.reserved;
            (pool.account, old)
        };
        if reading.reserved > old {
            self.accounts[account]
                .ledger
                .force_add(reading.reserved - old);
        } else {
            self.release(account, old - reading.reserved);
        }
    }

    /// Reserves what mapping `bytes` on `dev` may add; trims the pool once when it does not fit.
    fn reserve_graph_growth(
        &self,
        dev: i32,
        bytes: u64,
    ) -> Result<(i32, AccountId, u64), GraphRefusal> {
        let a = self
            .account_of_device(dev)
            .ok_or(GraphRefusal::Device(dev))?;
        let reading = (self.probes.graph_pool)(dev).unwrap_or_default();
        let growth = reading.growth_for(bytes);
        if self.reserve_reclaiming(a, growth).is_ok() {
            return Ok((dev, a, growth));
        }
        if (self.probes.graph_trim)(dev) {
            self.graph_trimmed(dev);
        }
        let reading = (self.probes.graph_pool)(dev).unwrap_or_default();
        let growth = reading.growth_for(bytes);
        self.reserve(a, growth)
            .map(|()| (dev, a, growth))
            .map_err(GraphRefusal::OverLimit)
    }

    fn undo_advance(&self, plan: &GraphMapping) {
        for &(_, a, advance) in &plan.devices {
            self.release(a, advance);
        }
    }

    /// Before `fork`: hold the graph state so the child never copies it half-written.
    pub(super) fn graphs_prepare_fork(&'static self) {
        GRAPH_FORK_GUARD.with(|g| *g.borrow_mut() = Some(self.graphs()));
    }

    /// After `fork`, in the parent.
    pub(super) fn graphs_parent_after_fork() {
        GRAPH_FORK_GUARD.with(|g| *g.borrow_mut() = None);
    }

    /// After `fork`, in the child: the parent's graphs are not the child's.
    pub(super) fn graphs_child_after_fork() {
        GRAPH_FORK_GUARD.with(|g| {
            if let Some(mut st) = g.borrow_mut().take() {
                *st = GraphState::default();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{account, probes_with};
    use super::*;
    use crate::guard::{Mapping, Probes};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A fake graph pool per test: tests run on parallel threads and probes are plain `fn`s, so
    /// each test reads its own static through a distinct const generic.
    struct Pool {
        reserved: AtomicU64,
        used: AtomicU64,
        trims: AtomicU64,
        trim_works: AtomicBool,
    }

    impl Pool {
        const fn new() -> Pool {
            Pool {
                reserved: AtomicU64::new(0),
                used: AtomicU64::new(0),
                trims: AtomicU64::new(0),
                trim_works: AtomicBool::new(true),
            }
        }
        fn set(&self, reserved: u64, used: u64) {
            self.reserved.store(reserved, Ordering::SeqCst);
            self.used.store(used, Ordering::SeqCst);
        }
        fn reading(&self) -> GraphPoolReading {
            GraphPoolReading {
                reserved: self.reserved.load(Ordering::SeqCst),
                used: self.used.load(Ordering::SeqCst),
            }
        }
        fn trim(&self) -> bool {
            self.trims.fetch_add(1, Ordering::SeqCst);
            if self.trim_works.load(Ordering::SeqCst) {
                // Idle mappings go back; nothing is live in these tests.
                self.set(0, 0);
            }
            true
        }
    }

    static POOLS: [Pool; 6] = [
        Pool::new(),
        Pool::new(),
        Pool::new(),
        Pool::new(),
        Pool::new(),
        Pool::new(),
    ];

    fn probes_on<const I: usize>() -> Probes {
        let mut p = probes_with(|_| Some(0));
        p.graph_pool = |dev| (dev == 0).then(|| POOLS[I].reading());
        p.graph_trim = |_| POOLS[I].trim();
        p
    }

    fn guard_on<const I: usize>(limit: u64) -> Guard {
        POOLS[I].set(0, 0);
        POOLS[I].trims.store(0, Ordering::SeqCst);
        POOLS[I].trim_works.store(true, Ordering::SeqCst);
        Guard::new(
            vec![account("", limit)],
            Mapping::Container,
            probes_on::<I>(),
        )
        .unwrap()
    }

    /// What the driver does on a first mapping in these tests: the pool grows by the growth.
    fn driver_maps<const I: usize>(bytes: u64) {
        let r = POOLS[I].reading();
        POOLS[I].set(r.reserved + r.growth_for(bytes), r.used + bytes);
    }

    #[test]
    fn growth_counts_the_unused_part_of_the_pool_first() {
        let r = GraphPoolReading {
            reserved: 100,
            used: 30,
        };
        assert_eq!(r.growth_for(50), 0);
        assert_eq!(r.growth_for(70), 0);
        assert_eq!(r.growth_for(90), 20);
        assert_eq!(GraphPoolReading::default().growth_for(5), 5);
        let odd = GraphPoolReading {
            reserved: 10,
            used: 40,
        };
        assert_eq!(
            odd.growth_for(5),
            5,
            "a used figure above reserved reuses nothing"
        );
    }

    #[test]
    fn a_first_launch_is_reserved_in_advance_then_charged_what_the_pool_holds() {
        let g = guard_on::<0>(100);
        g.graph_instantiated(7, Some(vec![(0, 40)]), false);
        let plan = g.graph_before_launch(7, || Some(0)).unwrap();
        assert_eq!(plan.reserved_in_advance(), 40);
        assert_eq!(g.used(0), 40, "reserved before the driver maps");
        driver_maps::<0>(40);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 40, "the advance became the pool's charge");
        assert_eq!(g.graph_charged(0), 40);
        // A replay: nothing reserved in advance, nothing new charged.
        let plan = g.graph_before_launch(7, || Some(0)).unwrap();
        assert_eq!(plan.reserved_in_advance(), 0);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 40);
    }

    #[test]
    fn a_launch_that_does_not_fit_is_refused_with_nothing_left_reserved() {
        let g = guard_on::<1>(100);
        g.reserve(0, 70).unwrap();
        g.graph_instantiated(9, Some(vec![(0, 40)]), false);
        match g.graph_before_launch(9, || Some(0)) {
            Err(GraphRefusal::OverLimit(e)) => {
                assert_eq!((e.requested, e.used, e.limit), (40, 70, 100));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(g.used(0), 70, "nothing left reserved");
        assert_eq!(
            POOLS[1].trims.load(Ordering::SeqCst),
            1,
            "trimmed once first"
        );
        g.release(0, 70);
        assert!(g.graph_before_launch(9, || Some(0)).is_ok());
    }

    #[test]
    fn a_trim_makes_room_for_a_new_graph_and_maps_old_ones_again() {
        let g = guard_on::<2>(100);
        g.graph_instantiated(1, Some(vec![(0, 60)]), false);
        g.graph_instantiated(2, Some(vec![(0, 70)]), false);
        let plan = g.graph_before_launch(1, || Some(0)).unwrap();
        driver_maps::<2>(60);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 60);
        // Graph 2 needs 70: the pool holds 60, all associated with graph 1, so 70 more would not
        // fit; the guard trims (graph 1's idle mapping goes back) and graph 2 fits.
        let plan = g.graph_before_launch(2, || Some(0)).unwrap();
        assert_eq!(POOLS[2].trims.load(Ordering::SeqCst), 1);
        assert!(
            !g.accounts[0].warned.load(Ordering::SeqCst),
            "no out-of-memory warning for a launch the trim made fit"
        );
        assert_eq!(g.graph_charged(0), 0, "the trim was charged off");
        driver_maps::<2>(70);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 70);
        // Graph 1 was mapped before the trim: its next launch is checked again (and refused:
        // 60 more do not fit beside graph 2's 70 even after another trim that frees nothing).
        POOLS[2].trim_works.store(false, Ordering::SeqCst);
        assert!(matches!(
            g.graph_before_launch(1, || Some(0)),
            Err(GraphRefusal::OverLimit(_))
        ));
        assert_eq!(g.used(0), 70);
        assert!(
            g.accounts[0].warned.load(Ordering::SeqCst),
            "a refusal is logged"
        );
    }

    #[test]
    fn user_trims_and_unknown_graphs_follow_the_pool() {
        let g = guard_on::<3>(100);
        // A graph the guard did not see instantiated: nothing in advance, re-read after.
        let plan = g.graph_before_launch(42, || Some(0)).unwrap();
        assert_eq!(plan.reserved_in_advance(), 0);
        POOLS[3].set(30, 30);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 30, "charged what the pool holds");
        POOLS[3].set(0, 0);
        g.graph_trimmed(0);
        assert_eq!(g.used(0), 0, "a trim gives it back");
        // A mapping the driver made after the guard read the pool is charged on the next
        // re-read (memory information, or memory short).
        POOLS[3].set(20, 20);
        g.reconcile_graph_pools();
        assert_eq!(g.used(0), 20);
        // Memory short: the slow path re-reads graph pools too.
        POOLS[3].set(50, 0);
        g.graph_trimmed(0);
        assert_eq!(g.used(0), 50);
        POOLS[3].set(10, 0);
        g.reserve(0, 90).unwrap();
        assert_eq!(g.graph_charged(0), 10);
        assert_eq!(g.used(0), 100);
    }

    #[test]
    fn instantiation_with_upload_is_checked_and_counts_as_mapped() {
        let g = guard_on::<4>(100);
        let needs = vec![(0, 50)];
        let plan = g.graph_before_upload(&needs).unwrap();
        assert_eq!(plan.reserved_in_advance(), 50);
        driver_maps::<4>(50);
        g.graph_instantiated(5, Some(needs), true);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 50);
        let plan = g.graph_before_launch(5, || Some(0)).unwrap();
        assert_eq!(
            plan.reserved_in_advance(),
            0,
            "already mapped by the upload"
        );
        g.graph_after_mapping(plan, true);
        g.graph_destroyed(5);
        assert_eq!(
            g.used(0),
            50,
            "destroying a graph leaves its memory in the pool"
        );
        // 60 more do not fit beside the 50 the pool keeps: the pool is trimmed, then they fit.
        let plan = g.graph_before_upload(&vec![(0, 60)]).unwrap();
        assert_eq!(POOLS[4].trims.load(Ordering::SeqCst), 1);
        assert_eq!(plan.reserved_in_advance(), 60);
        assert_eq!((g.graph_charged(0), g.used(0)), (0, 60));
        g.graph_after_mapping(plan, false);
        assert_eq!(g.used(0), 0);
    }

    #[test]
    fn per_gpu_limits_refuse_a_graph_on_a_device_without_an_entry() {
        POOLS[5].set(0, 0);
        let mut p = probes_on::<5>();
        p.graph_pool = |_| Some(GraphPoolReading::default());
        let g = Guard::new(
            vec![account("GPU-a", 100), account("GPU-b", 200)],
            Mapping::PerGpu,
            p,
        )
        .unwrap();
        g.graph_instantiated(3, Some(vec![(1, 150), (2, 10)]), false);
        assert_eq!(
            g.graph_before_launch(3, || Some(0)),
            Err(GraphRefusal::Device(2))
        );
        assert_eq!(g.used(1), 0, "device 1's advance was given back");
        g.graph_instantiated(4, Some(vec![(1, 150)]), false);
        let plan = g.graph_before_launch(4, || Some(0)).unwrap();
        assert_eq!((g.used(0), g.used(1)), (0, 150), "charged to GPU-b only");
        g.graph_after_mapping(plan, false);
        assert_eq!(
            g.used(1),
            0,
            "a failed launch keeps only what the pool holds"
        );
    }
}
