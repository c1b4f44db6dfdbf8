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

/// What the policy asks of the outside world.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    /// Whether the process that claimed a slot as (pid, start time) still runs.
    pub liveness: fn(u32, u64) -> Liveness,
    /// What a memory pool really holds (`None`: unknown).
    pub pool_reserved: fn(u64) -> Option<u64>,
    /// The UUID of a device ordinal, formatted as NVIDIA does (`GPU-xxxxxxxx-...`).
    pub device_uuid: fn(i32) -> Result<String, String>,
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

    /// The account of device ordinal `dev`, or `None` when its memory must be refused (per-GPU
    /// limits with no entry for its UUID, or a UUID the driver cannot tell). Looked up once per
    /// device; the first refusal of a device is logged once, naming its UUID.
    #[inline]
    pub fn account_of_device(&self, dev: i32) -> Option<AccountId> {
        if self.mapping == Mapping::Container {
            return Some(0);
        }
        let slot = usize::try_from(dev)
            .ok()
            .and_then(|i| self.devices.get(i))?;
        match slot.load(Ordering::Acquire) {
            DEVICE_UNKNOWN => self.look_up_device(dev, slot),
            DEVICE_REFUSED => None,
            v => Some(v as usize - 1),
        }
    }

    #[cold]
    fn look_up_device(&self, dev: i32, slot: &AtomicU32) -> Option<AccountId> {
        let found = match (self.probes.device_uuid)(dev) {
            Ok(uuid) => self.account_of_uuid(&uuid).ok_or_else(|| {
                let listed: Vec<&str> = self.accounts.iter().map(|a| a.uuid.as_str()).collect();
                format!(
                    "device {dev} ({uuid}) has no entry in the per-GPU limits (limits for {})",
                    listed.join(", ")
                )
            }),
            Err(e) => Err(format!("cannot read the UUID of device {dev} ({e})")),
        };
        let word = match &found {
            Ok(a) => u32::try_from(*a).map_or(DEVICE_REFUSED, |a| a.saturating_add(1)),
            Err(_) => DEVICE_REFUSED,
        };
        if slot
            .compare_exchange(DEVICE_UNKNOWN, word, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && let Err(why) = &found
        {
            crate::log!(
                "vramslice-guard: {why}; every allocation on it is refused with CUDA_ERROR_OUT_OF_MEMORY"
            );
        }
        found.ok()
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
        self.reconcile_pools();
        self.reconcile_graph_pools();
        account.ledger.try_reserve(n, account.limit)
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
    /// unless its pool was destroyed: [`Guard::freed_into_pool`]).
    #[inline]
    pub fn freed(&self, entry: Entry) {
        if entry.extra == 0 {
            self.release(entry.account, entry.bytes);
        } else {
            self.freed_into_pool(entry);
        }
    }

    /// `cuMemGetInfo`'s answer for a device of account `a`: (free, total) of its slice. A
    /// refused device (`None`) shows an empty slice.
    pub fn mem_info(&self, a: Option<AccountId>, real_free: u64) -> (u64, u64) {
        match a {
            None => (0, 0),
            Some(a) => {
                let limit = self.limit(a);
                (limit.saturating_sub(self.used(a)).min(real_free), limit)
            }
        }
    }

    /// Charges a primary context retain of device `device` to account `a`: once per device
    /// until released.
    pub fn primary_retained(&self, device: u64, a: AccountId, bytes: impl FnOnce() -> u64) {
        let mut charged = 0;
        self.tracker.update(Kind::Primary, device, |e| match e {
            Some(e) => Some(Entry {
                extra: e.extra + 1,
                ..e
            }),
            None => {
                charged = bytes();
                Some(Entry {
                    bytes: charged,
                    extra: 1,
                    account: a,
                })
            }
        });
        self.accounts[a].ledger.force_add(charged);
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
mod tests {
    use super::*;
    use crate::ledger::private_words;

    pub(crate) fn probes_with(pool_reserved: fn(u64) -> Option<u64>) -> Probes {
        Probes {
            liveness: |_, _| Liveness::Alive,
            pool_reserved,
            device_uuid: |dev| match dev {
                0 => Ok("GPU-a".into()),
                1 => Ok("GPU-b".into()),
                2 => Ok("GPU-c".into()),
                _ => Err("CUDA error 101".into()),
            },
            graph_pool: |_| Some(GraphPoolReading::default()),
            graph_trim: |_| true,
        }
    }

    #[test]
    fn a_forked_child_reaps_exited_processes_slots_when_the_table_is_full() {
        let ledger = Ledger::new(private_words(1 << 30, "")).unwrap();
        // Every slot taken by helpers that have exited (pids from 1000 up).
        let mut pid = 1000;
        while ledger.claim(pid, 1).is_some() {
            pid += 1;
        }
        ledger.disown();
        let mut probes = probes_with(|_| Some(0));
        probes.liveness = |pid, _| {
            if pid >= 1000 {
                Liveness::Dead
            } else {
                Liveness::Alive
            }
        };
        let g = Guard::new(
            vec![Account::new("", 1 << 30, ledger)],
            Mapping::Container,
            probes,
        )
        .unwrap();
        assert!(g.child_after_fork(7, 7).is_empty(), "the child has a slot");
        assert!(g.accounts[0].ledger.own_slot().is_some());
    }

    pub(crate) fn account(uuid: &str, limit: u64) -> Account {
        let l = Ledger::new(private_words(limit, uuid)).unwrap();
        l.claim(1, 1);
        Account::new(uuid, limit, l)
    }

    /// A guard with one account (one limit for the container) of `limit` bytes.
    pub(crate) fn guard(limit: u64) -> Guard {
        Guard::new(
            vec![account("", limit)],
            Mapping::Container,
            probes_with(|_| Some(0)),
        )
        .unwrap()
    }

    /// GPU-a limited to 100, GPU-b to 200; GPU-c (device 2) has no entry.
    fn per_gpu() -> Guard {
        Guard::new(
            vec![account("GPU-a", 100), account("GPU-b", 200)],
            Mapping::PerGpu,
            probes_with(|_| Some(0)),
        )
        .unwrap()
    }

    #[test]
    fn alloc_free_cycle() {
        let g = guard(100);
        g.reserve(0, 60).unwrap();
        g.track(Kind::DevicePtr, 0xa, 0, 60);
        assert!(g.reserve(0, 41).is_err());
        let e = g.untrack(Kind::DevicePtr, 0xa).unwrap();
        g.freed(e);
        assert_eq!(g.used(0), 0);
        assert_eq!(g.mem_info(Some(0), 1000), (100, 100));
        assert_eq!(g.mem_info(Some(0), 30), (30, 100));
    }

    #[test]
    fn one_limit_for_the_container_maps_every_device_to_one_account() {
        let g = guard(100);
        assert_eq!(g.mapping(), Mapping::Container);
        for dev in [0, 1, 7, -1, 100_000] {
            assert_eq!(g.account_of_device(dev), Some(0), "device {dev}");
        }
        assert_eq!(g.account_of_uuid("GPU-anything"), Some(0));
    }

    #[test]
    fn per_gpu_limits_hold_independently() {
        let g = per_gpu();
        let (a, b) = (
            g.account_of_device(0).unwrap(),
            g.account_of_device(1).unwrap(),
        );
        assert_ne!(a, b);
        g.reserve(a, 100).unwrap();
        assert!(g.reserve(a, 1).is_err(), "GPU-a is full");
        g.reserve(b, 200).unwrap();
        assert!(g.reserve(b, 1).is_err(), "GPU-b is full at its own limit");
        g.release(a, 40);
        assert!(
            g.reserve(b, 1).is_err(),
            "freeing on GPU-a does not help GPU-b"
        );
        g.reserve(a, 40).unwrap();
        assert_eq!(g.mem_info(Some(a), u64::MAX), (0, 100));
        g.release(b, 50);
        assert_eq!(g.mem_info(Some(b), u64::MAX), (50, 200));
        assert_eq!(
            g.mem_info(Some(b), 10),
            (10, 200),
            "the real free still caps"
        );
    }

    #[test]
    fn per_gpu_device_without_an_entry_is_refused_and_remembered() {
        let g = per_gpu();
        assert_eq!(g.account_of_device(2), None, "GPU-c has no entry");
        assert_eq!(g.account_of_device(2), None, "remembered");
        assert_eq!(g.account_of_device(5), None, "UUID unreadable");
        assert_eq!(g.account_of_device(-1), None);
        assert_eq!(g.account_of_device(100_000), None);
        assert_eq!(g.mem_info(None, 1000), (0, 0));
        assert_eq!(g.account_of_uuid("GPU-b"), Some(1));
        assert_eq!(g.account_of_uuid("GPU-c"), None);
        assert_eq!(g.account_of_device(1), Some(1));
        assert_eq!(g.account_of_device(1), Some(1), "cached");
    }

    #[test]
    fn frees_go_back_to_the_account_charged() {
        let g = per_gpu();
        g.reserve(1, 150).unwrap();
        g.track(Kind::DevicePtr, 0x10, 1, 150);
        g.charge(Kind::Module, 0x20, 0, 30);
        assert_eq!((g.used(0), g.used(1)), (30, 150));
        g.freed(g.untrack(Kind::DevicePtr, 0x10).unwrap());
        assert_eq!((g.used(0), g.used(1)), (30, 0));
        g.freed(g.untrack(Kind::Module, 0x20).unwrap());
        assert_eq!((g.used(0), g.used(1)), (0, 0));
        // A handle reused without a free releases the old charge where it was made.
        g.reserve(0, 10).unwrap();
        g.track(Kind::DevicePtr, 0x30, 0, 10);
        g.reserve(1, 20).unwrap();
        g.track(Kind::DevicePtr, 0x30, 1, 20);
        assert_eq!((g.used(0), g.used(1)), (0, 20));
    }

    #[test]
    fn pools_stay_with_their_account() {
        let g = per_gpu();
        let (acct, reused) = g.reserve_async(1, 7, 120).unwrap();
        assert_eq!((acct, reused), (1, 0));
        g.track_async(0xb, 7, acct, 120);
        g.freed(g.untrack(Kind::DevicePtr, 0xb).unwrap());
        assert_eq!((g.used(0), g.used(1)), (0, 120), "retained on GPU-b");
        let (acct, reused) = g.reserve_async(0, 7, 100).unwrap();
        assert_eq!(
            (acct, reused),
            (1, 100),
            "the pool's account, its retained bytes"
        );
        g.async_failed(7, acct, 100, reused, true);
        g.reconcile_pool(7, Some(0));
        assert_eq!((g.used(0), g.used(1)), (0, 0));
    }

    #[test]
    fn primary_contexts_are_charged_to_their_device() {
        let g = per_gpu();
        g.primary_retained(1, 1, || 70);
        g.primary_retained(1, 1, || 70);
        g.primary_retained(0, 0, || 5);
        assert_eq!((g.used(0), g.used(1)), (5, 70));
        g.primary_released(1, true);
        assert_eq!((g.used(0), g.used(1)), (5, 0));
    }

    #[test]
    fn pool_memory_stays_charged_until_reconciled() {
        let g = guard(100);
        let (a, reused) = g.reserve_async(0, 7, 40).unwrap();
        assert_eq!(reused, 0);
        g.track_async(0xb, 7, a, 40);
        let e = g.untrack(Kind::DevicePtr, 0xb).unwrap();
        g.freed(e);
        assert_eq!(g.used(0), 40, "freed into the pool: still charged");
        assert_eq!(
            g.reserve_async(0, 7, 30).unwrap(),
            (0, 30),
            "reuses retained bytes"
        );
        g.track_async(0xc, 7, 0, 30);
        g.freed(g.untrack(Kind::DevicePtr, 0xc).unwrap());
        // a synchronous allocation that needs the retained bytes: reconciled (pool holds 0)
        g.reserve(0, 90).unwrap();
        assert_eq!(g.used(0), 90);
    }

    #[test]
    fn destroyed_pools_give_back_what_they_retain_and_late_frees() {
        // The driver no longer answers for a destroyed pool: reconciling cannot help.
        let g = Guard::new(
            vec![account("", 100)],
            Mapping::Container,
            probes_with(|_| None),
        )
        .unwrap();
        g.pool_created(5, 0);
        for (ptr, n) in [(0x1, 30), (0x2, 50)] {
            g.reserve_async(0, 5, n).unwrap();
            g.track_async(ptr, 5, 0, n);
        }
        g.freed(g.untrack(Kind::DevicePtr, 0x1).unwrap());
        assert_eq!(g.used(0), 80, "30 retained, 50 in use");
        g.pool_destroyed(5);
        assert_eq!(g.used(0), 50, "the retained 30 went with the pool");
        g.freed(g.untrack(Kind::DevicePtr, 0x2).unwrap());
        assert_eq!(g.used(0), 0, "a free after the destruction is not retained");
        assert_eq!(g.pool_account(5), None, "the handle is forgotten");
        // The same handle as a host pool: nothing of it is charged; destroyed, forgotten.
        g.host_pool_created(5);
        assert!(g.is_host_pool(5));
        g.pool_destroyed(5);
        assert!(!g.is_host_pool(5));
        // And as a device pool again: an ordinary pool.
        g.pool_created(5, 0);
        assert!(!g.is_host_pool(5));
        assert!(g.reserve_async(0, 5, 101).is_err());
    }

    #[test]
    fn trim_keeps_at_most_requested() {
        let l = Ledger::new(private_words(100, "")).unwrap();
        let g = Guard::new(
            vec![Account::new("", 100, l)],
            Mapping::Container,
            probes_with(|_| None),
        )
        .unwrap();
        g.reserve_async(0, 3, 50).unwrap();
        g.track_async(0x1, 3, 0, 50);
        g.freed(g.untrack(Kind::DevicePtr, 0x1).unwrap());
        g.reconcile_pool(3, Some(20));
        assert_eq!(g.used(0), 20);
        g.reconcile_pool(3, Some(0));
        assert_eq!(g.used(0), 0);
    }

    #[test]
    fn primary_context_charged_once() {
        let g = guard(1000);
        g.primary_retained(0, 0, || 100);
        g.primary_retained(0, 0, || 100);
        assert_eq!(g.used(0), 100);
        g.primary_released(0, false);
        assert_eq!(g.used(0), 100);
        g.primary_released(0, false);
        assert_eq!(g.used(0), 0);
        g.primary_retained(0, 0, || 50);
        g.primary_released(0, true);
        assert_eq!(g.used(0), 0);
    }

    #[test]
    fn charge_may_exceed_limit_and_then_refuses() {
        let g = guard(100);
        g.charge(Kind::Context, 9, 0, 150);
        assert_eq!(g.reserve(0, 1).unwrap_err().used, 150);
        g.freed(g.untrack(Kind::Context, 9).unwrap());
        assert!(g.reserve(0, 100).is_ok());
    }

    #[test]
    fn no_account_no_guard() {
        assert!(Guard::new(Vec::new(), Mapping::PerGpu, probes_with(|_| None)).is_none());
    }
}
