//! The enforcement policy, in safe code: what to charge, when to refuse, what to give back.
//!
//! The C entry points in `ffi` call these methods around each real driver call with plain
//! numbers (sizes, handles as integers); nothing here touches a pointer or the driver itself.
//! The two things the policy needs from the outside world — whether a process is alive, and
//! how much a memory pool really holds — come in as function pointers.

use crate::ledger::{Ledger, Liveness, OverLimit};
use crate::tracker::{Entry, Kind, Tracker};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Dead processes are looked for at most this often (reading /proc costs microseconds per slot,
/// and a program may retry a refused allocation in a tight loop).
const REAP_INTERVAL_MS: u64 = 20;

/// Bytes a pool holds for this process: charged to the account, in use or kept for reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Bytes of live allocations from the pool.
    pub in_use: u64,
    /// Bytes freed into the pool and still charged (the pool may keep them).
    pub retained: u64,
}

type Pools = HashMap<u64, PoolState>;

thread_local! {
    static POOL_FORK_GUARD: RefCell<Option<MutexGuard<'static, Pools>>> = const { RefCell::new(None) };
}

/// The guard of one process.
pub struct Guard {
    limit: u64,
    ledger: Ledger,
    tracker: Tracker,
    pools: Mutex<Pools>,
    warned: AtomicBool,
    epoch: Instant,
    last_reap_ms: AtomicU64,
    liveness: fn(u32, u64) -> Liveness,
    pool_reserved: fn(u64) -> Option<u64>,
}

impl Guard {
    /// A guard enforcing `limit` over `ledger`.
    pub fn new(
        limit: u64,
        ledger: Ledger,
        liveness: fn(u32, u64) -> Liveness,
        pool_reserved: fn(u64) -> Option<u64>,
    ) -> Guard {
        Guard {
            limit,
            ledger,
            tracker: Tracker::default(),
            pools: Mutex::new(Pools::new()),
            warned: AtomicBool::new(false),
            epoch: Instant::now(),
            last_reap_ms: AtomicU64::new(0),
            liveness,
            pool_reserved,
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes the container holds.
    pub fn used(&self) -> u64 {
        self.ledger.used()
    }

    /// The account (for tests and the fork handler).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `n` bytes before the real allocator runs. On refusal it first reclaims dead
    /// processes' slots and memory pools' unused bytes, then tries once more; a final refusal is
    /// logged once per process.
    ///
    /// # Errors
    /// [`OverLimit`] with the numbers.
    #[inline]
    pub fn reserve(&self, n: u64) -> Result<(), OverLimit> {
        match self.ledger.try_reserve(n, self.limit) {
            Ok(()) => Ok(()),
            Err(_) => self.reserve_slow(n),
        }
    }

    #[cold]
    fn reserve_slow(&self, n: u64) -> Result<(), OverLimit> {
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
            self.ledger.reap(self.liveness);
        }
        self.reconcile_pools();
        self.ledger
            .try_reserve(n, self.limit)
            .inspect_err(|e| self.warn_once(e))
    }

    fn warn_once(&self, e: &OverLimit) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            crate::log!(
                "vramslice-guard: out of memory: requested {} bytes, the container uses {} of its limit {} bytes; \
                 returning CUDA_ERROR_OUT_OF_MEMORY (logged once per process)",
                e.requested,
                e.used,
                e.limit
            );
        }
    }

    /// Returns `n` bytes (a reservation whose real call failed).
    #[inline]
    pub fn release(&self, n: u64) {
        self.ledger.release(n);
    }

    /// Records a successful allocation of `bytes` already reserved.
    #[inline]
    pub fn track(&self, kind: Kind, handle: u64, bytes: u64) {
        if let Some(old) = self.tracker.insert(kind, handle, Entry { bytes, extra: 0 }) {
            self.ledger.release(old.bytes);
        }
    }

    /// Charges memory the driver already took (contexts, modules), whatever the limit.
    pub fn charge(&self, kind: Kind, handle: u64, bytes: u64) {
        self.ledger.force_add(bytes);
        self.track(kind, handle, bytes);
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

    /// The real free succeeded: give the bytes back (pool memory stays charged as retained).
    #[inline]
    pub fn freed(&self, entry: Entry) {
        if entry.extra == 0 {
            self.ledger.release(entry.bytes);
        } else {
            let mut pools = self.pools();
            let st = pools.entry(entry.extra).or_default();
            st.in_use = st.in_use.saturating_sub(entry.bytes);
            st.retained = st.retained.saturating_add(entry.bytes);
        }
    }

    /// Reserves an asynchronous allocation of `n` from `pool`, reusing what the pool retains
    /// first; returns the bytes taken from the retained amount (give them to [`Guard::async_failed`]
    /// if the real call fails).
    ///
    /// # Errors
    /// [`OverLimit`] when the new part does not fit.
    pub fn reserve_async(&self, pool: u64, n: u64) -> Result<u64, OverLimit> {
        let reused = {
            let mut pools = self.pools();
            let st = pools.entry(pool).or_default();
            let t = st.retained.min(n);
            st.retained -= t;
            st.in_use = st.in_use.saturating_add(n);
            t
        };
        self.reserve(n - reused)
            .inspect_err(|_| self.async_failed(pool, n, reused, false))?;
        Ok(reused)
    }

    /// The real asynchronous allocation failed: undo [`Guard::reserve_async`].
    pub fn async_failed(&self, pool: u64, n: u64, reused: u64, release_new: bool) {
        let mut pools = self.pools();
        let st = pools.entry(pool).or_default();
        st.in_use = st.in_use.saturating_sub(n);
        st.retained = st.retained.saturating_add(reused);
        drop(pools);
        if release_new {
            self.ledger.release(n - reused);
        }
    }

    /// Records a successful asynchronous allocation.
    pub fn track_async(&self, handle: u64, pool: u64, n: u64) {
        let pool = pool.max(1); // extra = 0 means "not from a pool"
        if let Some(old) = self.tracker.insert(
            Kind::DevicePtr,
            handle,
            Entry {
                bytes: n,
                extra: pool,
            },
        ) {
            self.freed(old);
        }
    }

    /// After a trim of `pool` (or when memory is short): set the retained bytes to what the pool
    /// really holds beyond its live allocations, giving the difference back.
    pub fn reconcile_pool(&self, pool: u64, keep_at_most: Option<u64>) {
        let real = (self.pool_reserved)(pool);
        let mut pools = self.pools();
        let Some(st) = pools.get_mut(&pool) else {
            return;
        };
        let mut target = match real {
            Some(reserved) => reserved.saturating_sub(st.in_use),
            None => st.retained,
        };
        if let Some(keep) = keep_at_most {
            target = target.min(keep);
        }
        let target = target.min(st.retained);
        let give_back = st.retained - target;
        st.retained = target;
        drop(pools);
        self.ledger.release(give_back);
    }

    /// Reconciles every pool this process used (see [`Guard::reconcile_pool`]).
    pub fn reconcile_pools(&self) {
        let keys: Vec<u64> = self.pools().keys().copied().collect();
        for pool in keys {
            self.reconcile_pool(pool, None);
        }
    }

    /// `cuMemGetInfo`'s answer: (free, total) of the slice.
    pub fn mem_info(&self, real_free: u64) -> (u64, u64) {
        (
            self.limit.saturating_sub(self.used()).min(real_free),
            self.limit,
        )
    }

    /// Charges a primary context retain: once per device until released.
    pub fn primary_retained(&self, device: u64, bytes: impl FnOnce() -> u64) {
        let mut charged = 0;
        self.tracker.update(Kind::Primary, device, |e| match e {
            Some(e) => Some(Entry {
                bytes: e.bytes,
                extra: e.extra + 1,
            }),
            None => {
                charged = bytes();
                Some(Entry {
                    bytes: charged,
                    extra: 1,
                })
            }
        });
        self.ledger.force_add(charged);
    }

    /// A primary context release (`reset`: all references at once).
    pub fn primary_released(&self, device: u64, reset: bool) {
        let mut freed = 0;
        self.tracker.update(Kind::Primary, device, |e| {
            let e = e?;
            if reset || e.extra <= 1 {
                freed = e.bytes;
                None
            } else {
                Some(Entry {
                    bytes: e.bytes,
                    extra: e.extra - 1,
                })
            }
        });
        self.ledger.release(freed);
    }

    /// Before `fork`.
    pub fn prepare_fork(&'static self) {
        self.tracker.lock_for_fork();
        POOL_FORK_GUARD.with(|g| *g.borrow_mut() = Some(self.pools()));
    }

    /// After `fork`, in the parent.
    pub fn parent_after_fork(&self) {
        POOL_FORK_GUARD.with(|g| *g.borrow_mut() = None);
        self.tracker.unlock_after_fork_parent();
    }

    /// After `fork`, in the child: nothing of the parent's is ours; take our own slot.
    pub fn child_after_fork(&self, pid: u32, start_time: u64) -> Option<usize> {
        POOL_FORK_GUARD.with(|g| {
            if let Some(mut p) = g.borrow_mut().take() {
                p.clear();
            }
        });
        self.tracker.unlock_after_fork_child();
        self.warned.store(false, Ordering::Relaxed);
        self.ledger.disown();
        self.ledger.claim(pid, start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::private_words;

    fn guard(limit: u64) -> Guard {
        let l = Ledger::new(private_words(limit, "")).unwrap();
        l.claim(1, 1);
        Guard::new(limit, l, |_, _| Liveness::Alive, |_| Some(0))
    }

    #[test]
    fn alloc_free_cycle() {
        let g = guard(100);
        g.reserve(60).unwrap();
        g.track(Kind::DevicePtr, 0xa, 60);
        assert!(g.reserve(41).is_err());
        let e = g.untrack(Kind::DevicePtr, 0xa).unwrap();
        g.freed(e);
        assert_eq!(g.used(), 0);
        assert_eq!(g.mem_info(1000), (100, 100));
        assert_eq!(g.mem_info(30), (30, 100));
    }

    #[test]
    fn pool_memory_stays_charged_until_reconciled() {
        let g = guard(100);
        let reused = g.reserve_async(7, 40).unwrap();
        assert_eq!(reused, 0);
        g.track_async(0xb, 7, 40);
        let e = g.untrack(Kind::DevicePtr, 0xb).unwrap();
        g.freed(e);
        assert_eq!(g.used(), 40, "freed into the pool: still charged");
        assert_eq!(g.reserve_async(7, 30).unwrap(), 30, "reuses retained bytes");
        g.track_async(0xc, 7, 30);
        g.freed(g.untrack(Kind::DevicePtr, 0xc).unwrap());
        // a synchronous allocation that needs the retained bytes: reconciled (pool holds 0)
        g.reserve(90).unwrap();
        assert_eq!(g.used(), 90);
    }

    #[test]
    fn trim_keeps_at_most_requested() {
        let l = Ledger::new(private_words(100, "")).unwrap();
        let g = Guard::new(100, l, |_, _| Liveness::Alive, |_| None);
        g.reserve_async(3, 50).unwrap();
        g.track_async(0x1, 3, 50);
        g.freed(g.untrack(Kind::DevicePtr, 0x1).unwrap());
        g.reconcile_pool(3, Some(20));
        assert_eq!(g.used(), 20);
        g.reconcile_pool(3, Some(0));
        assert_eq!(g.used(), 0);
    }

    #[test]
    fn primary_context_charged_once() {
        let g = guard(1000);
        g.primary_retained(0, || 100);
        g.primary_retained(0, || 100);
        assert_eq!(g.used(), 100);
        g.primary_released(0, false);
        assert_eq!(g.used(), 100);
        g.primary_released(0, false);
        assert_eq!(g.used(), 0);
        g.primary_retained(0, || 50);
        g.primary_released(0, true);
        assert_eq!(g.used(), 0);
    }

    #[test]
    fn charge_may_exceed_limit_and_then_refuses() {
        let g = guard(100);
        g.charge(Kind::Context, 9, 150);
        assert_eq!(g.reserve(1).unwrap_err().used, 150);
        g.freed(g.untrack(Kind::Context, 9).unwrap());
        assert!(g.reserve(100).is_ok());
    }
}
