//! The enforcement policy, in safe code: what to charge to which account, when to refuse, what
//! to give back.
//!
//! The guard keeps one account per limit ([`Account`]: a limit and the [`Ledger`] it is kept
//! in). Under one limit for the container there is one account and memory on every device counts
//! toward it ([`Mapping::Container`], the single-GPU case). Under per-GPU limits there is one
//! account per listed GPU UUID ([`Mapping::PerGpu`]); a device is mapped to its account by its
//! UUID, asked of the driver once per device, and a device whose UUID has no account is refused.
//!
//! The C entry points in `ffi` call these methods around each real driver call with plain
//! numbers (sizes, handles as integers, device ordinals); nothing here touches a pointer or the
//! driver itself. What the policy needs from the outside world — whether a process is alive, how
//! much a memory pool really holds, a device's UUID — comes in as function pointers ([`Probes`]).
//! CUDA graph memory nodes, charged when the driver maps them, have their own part
//! (`graphs`: [`Guard::graph_before_launch`] and what follows it), as do physical allocations,
//! charged while a handle reference or a mapping keeps them (`physical`).

mod graphs;
mod physical;
mod pools;

pub use graphs::{GraphMapping, GraphNeeds, GraphPoolReading, GraphRefusal};

use crate::ledger::{Ledger, Liveness, OverLimit};
use crate::tracker::{Entry, Kind, Tracker};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Dead processes are looked for at most this often (reading /proc costs microseconds per slot,
/// and a program may retry a refused allocation in a tight loop).
const REAP_INTERVAL_MS: u64 = 20;

/// Device ordinals whose account is remembered (real ordinals are far below this).
const DEVICE_CACHE: usize = 256;
/// Device cache word: not looked up yet.
const DEVICE_UNKNOWN: u32 = 0;
/// Device cache word: the device has no account (refused).
const DEVICE_REFUSED: u32 = u32::MAX;

/// Index of an account in the guard.
pub type AccountId = usize;

/// One limit and the ledger it is kept in.
pub struct Account {
    uuid: String,
    limit: u64,
    ledger: Ledger,
    warned: AtomicBool,
}

impl Account {
    /// The account of GPU `uuid` (empty for the container-wide account), enforcing `limit`.
    pub fn new(uuid: impl Into<String>, limit: u64, ledger: Ledger) -> Account {
        Account {
            uuid: uuid.into(),
            limit,
            ledger,
            warned: AtomicBool::new(false),
        }
    }

    /// The GPU UUID (empty for the container-wide account).
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

/// How devices map to accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// One limit for the container: every device counts toward account 0.
    Container,
    /// Per-GPU limits: a device counts toward the account of its UUID; without one it is refused.
    PerGpu,
}

/// Why the driver could not tell a device's UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UuidUnreadable {
    /// The driver's error code (`CUresult`), which the entry point returns in turn.
    pub code: i32,
    /// What happened, for the log.
    pub message: String,
}

/// What the policy asks of the outside world.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    /// Whether the process that claimed a slot as (pid, start time) still runs.
    pub liveness: fn(u32, u64) -> Liveness,
    /// What a memory pool really holds (`None`: unknown).
    pub pool_reserved: fn(u64) -> Option<u64>,
    /// The UUID of a device ordinal, formatted as NVIDIA does (`GPU-xxxxxxxx-...`).
    pub device_uuid: fn(i32) -> Result<String, UuidUnreadable>,
    /// What a device's graph memory pool holds (`None`: unknown).
    pub graph_pool: fn(i32) -> Option<GraphPoolReading>,
    /// Trims a device's graph memory pool (`cuDeviceGraphMemTrim`); whether the driver did.
    pub graph_trim: fn(i32) -> bool,
}

pub use pools::PoolState;
use pools::Pools;

thread_local! {
    static POOL_FORK_GUARD: RefCell<Option<MutexGuard<'static, Pools>>> = const { RefCell::new(None) };
}

/// The guard of one process.
pub struct Guard {
    accounts: Vec<Account>,
    mapping: Mapping,
    devices: Box<[AtomicU32]>,
    tracker: Tracker,
    pools: Mutex<Pools>,
    graphs: Mutex<graphs::GraphState>,
    epoch: Instant,
    last_reap_ms: AtomicU64,
    probes: Probes,
}

impl Guard {
    /// A guard enforcing each account's limit; under [`Mapping::Container`] only account 0 is
    /// used. Returns `None` with no account.
    pub fn new(accounts: Vec<Account>, mapping: Mapping, probes: Probes) -> Option<Guard> {
        if accounts.is_empty() {
            return None;
        }
        Some(Guard {
            accounts,
            mapping,
            devices: (0..DEVICE_CACHE)
                .map(|_| AtomicU32::new(DEVICE_UNKNOWN))
                .collect(),
            tracker: Tracker::default(),
            pools: Mutex::new(Pools::new()),
            graphs: Mutex::default(),
            epoch: Instant::now(),
            last_reap_ms: AtomicU64::new(0),
            probes,
        })
    }

    /// How devices map to accounts.
    #[inline]
    pub fn mapping(&self) -> Mapping {
        self.mapping
    }

    /// The accounts.
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// The limit of account `a` in bytes.
    pub fn limit(&self, a: AccountId) -> u64 {
        self.accounts[a].limit
    }

    /// Bytes the container holds in account `a`.
    pub fn used(&self, a: AccountId) -> u64 {
        self.accounts[a].ledger.used()
    }

    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The account of GPU `uuid`: account 0 under one limit for the container; under per-GPU
    /// limits the GPU's own, or `None` when it has none.
    pub fn account_of_uuid(&self, uuid: &str) -> Option<AccountId> {
        match self.mapping {
            Mapping::Container => Some(0),
            Mapping::PerGpu => self.accounts.iter().position(|a| a.uuid == uuid),
        }
    }

    /// The account of device ordinal `dev`: `Ok(None)` when its memory must be refused (per-GPU
    /// limits with no entry for its UUID), `Err` with the driver's code when the driver cannot
    /// tell its UUID now (an ordinal it does not know, a driver not initialised yet): the entry
    /// point fails with that code, as the real call would, and the next call asks again. An
    /// answer is remembered per device; the first refusal of a device is logged once, naming
    /// its UUID.
    #[inline]
    pub fn device_account(&self, dev: i32) -> Result<Option<AccountId>, i32> {
        if self.mapping == Mapping::Container {
            return Ok(Some(0));
        }
        let Some(slot) = usize::try_from(dev).ok().and_then(|i| self.devices.get(i)) else {
            // Past the remembered ordinals: no driver has that many, so it answers the error.
            return (self.probes.device_uuid)(dev)
                .map(|uuid| self.account_of_uuid(&uuid))
                .map_err(|e| e.code);
        };
        match slot.load(Ordering::Acquire) {
            DEVICE_UNKNOWN => self.look_up_device(dev, slot),
            DEVICE_REFUSED => Ok(None),
            v => Ok(Some(v as usize - 1)),
        }
    }

    /// [`Guard::device_account`] where the driver's error needs no passing on: `None` for a
    /// device refused or not known.
    #[inline]
    pub fn account_of_device(&self, dev: i32) -> Option<AccountId> {
        self.device_account(dev).ok().flatten()
    }

    #[cold]
    fn look_up_device(&self, dev: i32, slot: &AtomicU32) -> Result<Option<AccountId>, i32> {
        let uuid = (self.probes.device_uuid)(dev).map_err(|e| e.code)?;
        let found = self.account_of_uuid(&uuid);
        let word = found.map_or(DEVICE_REFUSED, |a| {
            u32::try_from(a).map_or(DEVICE_REFUSED, |a| a.saturating_add(1))
        });
        if slot
            .compare_exchange(DEVICE_UNKNOWN, word, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && found.is_none()
        {
            let listed: Vec<&str> = self.accounts.iter().map(|a| a.uuid.as_str()).collect();
            crate::log!(
                "vramslice-guard: device {dev} ({uuid}) has no entry in the per-GPU limits (limits for {}); every allocation on it is refused with CUDA_ERROR_OUT_OF_MEMORY",
                listed.join(", ")
            );
        }
        Ok(found)
    }

    /// Reserves `n` bytes in account `a` before the real allocator runs. On refusal it first
    /// reclaims dead processes' slots and memory pools' unused bytes, then tries once more; a
    /// final refusal is logged once per process and account.
    ///
    /// # Errors
    /// [`OverLimit`] with the numbers.
    #[inline]
    pub fn reserve(&self, a: AccountId, n: u64) -> Result<(), OverLimit> {
        let account = &self.accounts[a];
        match account.ledger.try_reserve(n, account.limit) {
            Ok(()) => Ok(()),
            Err(_) => self.reserve_slow(a, n),
        }
    }

    #[cold]
    fn reserve_slow(&self, a: AccountId, n: u64) -> Result<(), OverLimit> {
        let account = &self.accounts[a];
        self.reserve_reclaiming(a, n)
            .inspect_err(|e| self.warn_once(account, e))
    }

    /// [`Guard::reserve`] without the warning: tries, reclaims dead processes' slots and pools'
    /// unused bytes, tries once more.
    fn reserve_reclaiming(&self, a: AccountId, n: u64) -> Result<(), OverLimit> {
        let account = &self.accounts[a];
        if account.ledger.try_reserve(n, account.limit).is_ok() {
            return Ok(());
        }
        self.reap_dead();
        self.reconcile_pools();
        self.reconcile_graph_pools();
        account.ledger.try_reserve(n, account.limit)
    }

    /// Gives back the slots of processes that died holding memory (OOM-killed, crashed), in
    /// every account; at most once per [`REAP_INTERVAL_MS`], whoever asks.
    fn reap_dead(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(REAP_INTERVAL_MS);
        let last = self.last_reap_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= REAP_INTERVAL_MS
            && self
                .last_reap_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            for account in &self.accounts {
                account.ledger.reap(self.probes.liveness);
            }
        }
    }

    fn warn_once(&self, account: &Account, e: &OverLimit) {
        if account.warned.swap(true, Ordering::Relaxed) {
            return;
        }
        match self.mapping {
            Mapping::Container => crate::log!(
                "vramslice-guard: out of memory: requested {} bytes, the container uses {} of its limit {} bytes; \
                 returning CUDA_ERROR_OUT_OF_MEMORY (logged once per process)",
                e.requested,
                e.used,
                e.limit
            ),
            Mapping::PerGpu => crate::log!(
                "vramslice-guard: out of memory on GPU {}: requested {} bytes, the container uses {} of its limit {} bytes on that GPU; \
                 returning CUDA_ERROR_OUT_OF_MEMORY (logged once per process and GPU)",
                account.uuid,
                e.requested,
                e.used,
                e.limit
            ),
        }
    }

    /// Returns `n` bytes to account `a` (a reservation whose real call failed).
    #[inline]
    pub fn release(&self, a: AccountId, n: u64) {
        self.accounts[a].ledger.release(n);
    }

    /// Records a successful allocation of `bytes` already reserved in account `a`.
    #[inline]
    pub fn track(&self, kind: Kind, handle: u64, a: AccountId, bytes: u64) {
        if let Some(old) = self.tracker.insert(kind, handle, Entry::new(bytes, a)) {
            self.release(old.account, old.bytes);
        }
    }

    /// Charges memory the driver already took (contexts, modules) to account `a`, whatever the
    /// limit.
    pub fn charge(&self, kind: Kind, handle: u64, a: AccountId, bytes: u64) {
        self.accounts[a].ledger.force_add(bytes);
        self.track(kind, handle, a, bytes);
    }

    /// Takes a handle out before the real free runs (so a concurrent allocation that gets the
    /// same address cannot be forgotten by mistake).
    #[inline]
    pub fn untrack(&self, kind: Kind, handle: u64) -> Option<Entry> {
        self.tracker.remove(kind, handle)
    }

    /// Puts a handle back after the real free failed.
    pub fn retrack(&self, kind: Kind, handle: u64, entry: Entry) {
        self.tracker.insert(kind, handle, entry);
    }

    /// The real free succeeded: give the bytes back (pool memory stays charged as retained,
    /// unless its pool was destroyed: `Guard::freed_into_pool`).
    #[inline]
    pub fn freed(&self, entry: Entry) {
        if entry.extra == 0 {
            self.release(entry.account, entry.bytes);
        } else {
            self.freed_into_pool(entry);
        }
    }

    /// `cuMemGetInfo`'s answer for a device of account `a` whose driver says `real_free` of
    /// `real_total`: (free, total) of its slice, never more than the device has (a limit above
    /// the card, or one account over devices of different sizes, shows the card). A refused
    /// device (`None`) shows an empty slice. Dead processes' memory is given back first: a
    /// server that sizes itself from free memory after a worker was OOM-killed sees it free.
    pub fn mem_info(&self, a: Option<AccountId>, real_free: u64, real_total: u64) -> (u64, u64) {
        match a {
            None => (0, 0),
            Some(a) => {
                self.reap_dead();
                let limit = self.limit(a);
                (
                    limit.saturating_sub(self.used(a)).min(real_free),
                    limit.min(real_total),
                )
            }
        }
    }

    /// Charges a primary context retain of device `device` to account `a`: once per device
    /// until released. `bytes` (which may ask the driver) is called at most once, and never
    /// with the tracker's lock held: a fork handler waits on that lock, and must never wait on
    /// the driver.
    pub fn primary_retained(&self, device: u64, a: AccountId, bytes: impl FnOnce() -> u64) {
        let mut measure = Some(bytes);
        let mut measured: Option<u64> = None;
        loop {
            let (mut charged, mut unmeasured) = (0, false);
            self.tracker
                .update(Kind::Primary, device, |e| match (e, measured) {
                    (Some(e), _) => Some(Entry {
                        extra: e.extra + 1,
                        ..e
                    }),
                    (None, Some(b)) => {
                        charged = b;
                        Some(Entry {
                            bytes: b,
                            extra: 1,
                            account: a,
                        })
                    }
                    (None, None) => {
                        unmeasured = true;
                        None
                    }
                });
            if !unmeasured {
                self.accounts[a].ledger.force_add(charged);
                return;
            }
            measured = Some(measure.take().map_or(0, |f| f()));
        }
    }

    /// A primary context release (`reset`: all references at once).
    pub fn primary_released(&self, device: u64, reset: bool) {
        let mut freed = None;
        self.tracker.update(Kind::Primary, device, |e| {
            let e = e?;
            if reset || e.extra <= 1 {
                freed = Some(e);
                None
            } else {
                Some(Entry {
                    extra: e.extra - 1,
                    ..e
                })
            }
        });
        if let Some(e) = freed {
            self.release(e.account, e.bytes);
        }
    }

    /// Before `fork`.
    pub fn prepare_fork(&'static self) {
        self.tracker.lock_for_fork();
        POOL_FORK_GUARD.with(|g| *g.borrow_mut() = Some(self.pools()));
        self.graphs_prepare_fork();
    }

    /// After `fork`, in the parent.
    pub fn parent_after_fork(&self) {
        Guard::graphs_parent_after_fork();
        POOL_FORK_GUARD.with(|g| *g.borrow_mut() = None);
        self.tracker.unlock_after_fork_parent();
    }

    /// After `fork`, in the child: nothing of the parent's is ours; take our own slot in every
    /// account. Returns the accounts whose slot table was full.
    pub fn child_after_fork(&self, pid: u32, start_time: u64) -> Vec<&str> {
        POOL_FORK_GUARD.with(|g| {
            if let Some(mut p) = g.borrow_mut().take() {
                p.clear();
            }
        });
        Guard::graphs_child_after_fork();
        self.tracker.unlock_after_fork_child();
        let mut full = Vec::new();
        for account in &self.accounts {
            account.warned.store(false, Ordering::Relaxed);
            account.ledger.disown();
            // A table full of exited processes' slots (a server that forked many helpers)
            // would leave this child counted in the total only, where its memory is never
            // reclaimed if it is killed: reap the dead first, as attaching does.
            let claimed = account.ledger.claim(pid, start_time).or_else(|| {
                account.ledger.reap(self.probes.liveness);
                account.ledger.claim(pid, start_time)
            });
            if claimed.is_none() {
                full.push(account.uuid.as_str());
            }
        }
        full
    }
}

#[cfg(test)]
mod tests;
