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
//!
//! A stream-ordered free of an ordinary allocation captured into a graph is a free node: the
//! memory is freed when the graph runs, not when the free is captured. It stays charged until a
//! graph instantiated from that capture is first launched (never, if no such graph runs).

use super::{AccountId, Guard};
use crate::ledger::OverLimit;
use crate::tracker::Kind;
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
    /// The ticket of the latest-started reading applied: one started earlier is older, and is
    /// dropped when it ends after it.
    applied: u64,
}

/// What the guard knows of one executable graph.
#[derive(Debug, Clone, Default)]
struct ExecRecord {
    /// Its memory nodes' needs per device; `None` when they could not be read.
    needs: Option<Vec<DeviceNeed>>,
    /// Ordinary allocations its free nodes free when it first runs.
    frees: Vec<u64>,
}

/// Graph state of one process.
#[derive(Debug, Default)]
pub struct GraphState {
    /// Executable graph handle → what it needs and frees.
    execs: HashMap<u64, ExecRecord>,
    /// Graph handle → ordinary allocations freed by free nodes captured into it.
    captured_frees: HashMap<u64, Vec<u64>>,
    pools: HashMap<i32, DevicePool>,
    /// Readings of graph pools started so far: each reading's ticket.
    readings: u64,
    /// Capture key (`ffi::graph::capture_key`: the stream) → the graph its capture goes into,
    /// as seen at a captured free: how `cuStreamEndCapture` finds an invalidated capture's
    /// graph, which the driver no longer tells.
    capturing: HashMap<u64, u64>,
}

/// Device `dev`'s trim epoch (0 before its pool is first read).
fn epoch(pools: &HashMap<i32, DevicePool>, dev: i32) -> u64 {
    pools.get(&dev).map_or(0, |p| p.epoch)
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
    /// A launch (the graph runs, so its free nodes free), not an upload.
    runs: bool,
}

impl GraphMapping {
    /// Bytes reserved in advance, over all devices.
    #[cfg(test)]
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

    /// An executable graph was made from `graph`, whose memory nodes need `needs` (`None`: they
    /// could not be read; the graph is then re-read after each launch on the current device).
    /// `mapped`: the instantiation also uploaded it.
    pub fn graph_instantiated(
        &self,
        exec: u64,
        graph: u64,
        needs: Option<GraphNeeds>,
        mapped: bool,
    ) {
        let mut guard = self.graphs();
        let st = &mut *guard;
        let needs = needs.map(|needs| {
            needs
                .into_iter()
                .map(|(device, bytes)| DeviceNeed {
                    device,
                    bytes,
                    mapped_in: mapped.then(|| epoch(&st.pools, device)),
                })
                .collect()
        });
        let frees = st.captured_frees.get(&graph).cloned().unwrap_or_default();
        st.execs.insert(exec, ExecRecord { needs, frees });
    }

    /// An executable graph was destroyed (its memory stays in the pool until a trim).
    pub fn graph_destroyed(&self, exec: u64) {
        self.graphs().execs.remove(&exec);
    }

    /// A stream-ordered free of `ptr` was captured into `graph` by the capture keyed
    /// `capture`. An ordinary allocation the guard tracks stays charged until a graph
    /// instantiated from `graph` runs; returns whether `ptr` is one (anything else, a graph
    /// allocation, is not charged).
    pub fn graph_free_captured(&self, capture: u64, graph: u64, ptr: u64) -> bool {
        if !self.tracker.contains(Kind::DevicePtr, ptr) {
            return false;
        }
        let mut st = self.graphs();
        st.capturing.insert(capture, graph);
        st.captured_frees.entry(graph).or_default().push(ptr);
        true
    }

    /// The stream capture keyed `capture` ended: the frees captured into its graph belong to
    /// the graph it `made`, or, when it made none (the capture was invalidated, and the driver
    /// destroyed the graph), are forgotten before another graph gets that handle.
    pub fn graph_capture_ended(&self, capture: u64, made: Option<u64>) {
        let mut st = self.graphs();
        let Some(capturing) = st.capturing.remove(&capture) else {
            return;
        };
        let frees = st.captured_frees.remove(&capturing);
        if let (Some(made), Some(frees)) = (made, frees) {
            st.captured_frees.entry(made).or_default().extend(frees);
        }
    }

    /// A graph (not an executable one) was destroyed: frees captured into it are forgotten.
    pub fn graph_source_destroyed(&self, graph: u64) {
        self.graphs().captured_frees.remove(&graph);
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
        let (known, needs) = match self.graphs().execs.get(&exec) {
            Some(r) => (true, r.needs.clone()),
            None => (false, None),
        };
        let exec = known.then_some(exec);
        let Some(needs) = needs else {
            let devices = current()
                .and_then(|dev| Some((dev, self.account_of_device(dev)?, 0)))
                .into_iter()
                .collect();
            return Ok(GraphMapping {
                devices,
                exec,
                runs: true,
            });
        };
        self.plan_mapping(needs, exec, true)
    }

    /// Before an instantiation that also uploads (maps) a graph needing `needs`.
    ///
    /// # Errors
    /// As [`Guard::graph_before_launch`].
    pub fn graph_before_instantiate_upload(
        &self,
        needs: &GraphNeeds,
    ) -> Result<GraphMapping, GraphRefusal> {
        let unmapped = needs.iter().map(|&(device, bytes)| DeviceNeed {
            device,
            bytes,
            mapped_in: None,
        });
        self.plan_mapping(unmapped.collect(), None, false)
    }

    /// The plan for mapping `needs`: a device the graph is still mapped on (no trim since) takes
    /// nothing in advance, any other reserves its growth; the first refusal undoes the rest.
    fn plan_mapping(
        &self,
        needs: Vec<DeviceNeed>,
        exec: Option<u64>,
        runs: bool,
    ) -> Result<GraphMapping, GraphRefusal> {
        let mut plan = GraphMapping {
            devices: Vec::with_capacity(needs.len()),
            exec,
            runs,
        };
        for need in needs {
            let dev = need.device;
            let step = if need.mapped_in == Some(epoch(&self.graphs().pools, dev)) {
                self.account_of_device(dev)
                    .map(|a| (dev, a, 0))
                    .ok_or(GraphRefusal::Device(dev))
            } else {
                self.reserve_graph_growth(dev, need.bytes)
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

    /// After the real call: each device's charge becomes what its pool reserves now, the advance
    /// reservations are given back, and a launched graph is remembered as mapped.
    pub fn graph_after_mapping(&self, plan: GraphMapping, succeeded: bool) {
        for &(dev, a, _) in &plan.devices {
            self.reconcile_graph_pool(dev, a);
        }
        self.undo_advance(&plan);
        let (true, Some(exec)) = (succeeded, plan.exec) else {
            return;
        };
        let frees = {
            let mut guard = self.graphs();
            let GraphState {
                execs,
                captured_frees,
                pools,
                ..
            } = &mut *guard;
            let Some(record) = execs.get_mut(&exec) else {
                return;
            };
            for need in record.needs.iter_mut().flatten() {
                need.mapped_in = Some(epoch(pools, need.device));
            }
            let frees = if plan.runs {
                std::mem::take(&mut record.frees)
            } else {
                Vec::new()
            };
            // A free runs once: no other graph of the same capture may free that address again
            // (by then it may belong to a new allocation).
            if !frees.is_empty() {
                let gone = |p: &u64| !frees.contains(p);
                execs.values_mut().for_each(|r| r.frees.retain(gone));
                captured_frees.values_mut().for_each(|f| f.retain(gone));
            }
            frees
        };
        for ptr in frees {
            if let Some(e) = self.untrack(Kind::DevicePtr, ptr) {
                self.freed(e);
            }
        }
    }

    /// [`Guard::graph_before_launch`] for an upload: the graph is mapped but does not run.
    ///
    /// # Errors
    /// As [`Guard::graph_before_launch`].
    pub fn graph_before_upload(
        &self,
        exec: u64,
        current: impl FnOnce() -> Option<i32>,
    ) -> Result<GraphMapping, GraphRefusal> {
        self.graph_before_launch(exec, current)
            .map(|plan| GraphMapping {
                runs: false,
                ..plan
            })
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
    #[cfg(test)]
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
    /// The pool is read outside the lock (a fork handler takes it, and must never wait on the
    /// driver), so readings of several threads may end in any order: the latest-started one
    /// stands, and one that ends after it is dropped (every mapping is followed by a reading
    /// started after it).
    fn reconcile_graph_pool(&self, dev: i32, a: AccountId) {
        let ticket = {
            let mut st = self.graphs();
            st.readings = st.readings.wrapping_add(1);
            st.readings
        };
        let Some(reading) = (self.probes.graph_pool)(dev) else {
            return;
        };
        let (account, old) = {
            let mut st = self.graphs();
            let pool = st.pools.entry(dev).or_insert(DevicePool {
                account: a,
                charged: 0,
                epoch: 0,
                applied: 0,
            });
            if ticket <= pool.applied {
                return;
            }
            pool.applied = ticket;
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
mod tests;
