//! Memory pools (`cuMemAllocAsync`, `cuMemAllocFromPoolAsync`): what each pool holds for this
//! process, and when its bytes are charged.
//!
//! An asynchronous allocation is charged to its pool's account (the pool's device, fixed at
//! first use). Freed into the pool it stays charged as *retained*: the pool may keep it, and the
//! next asynchronous allocation from the pool reuses it first (and the pool is read right after
//! such a reuse: the driver may have mapped new memory instead). Retained bytes go back when a trim
//! or a reconciliation reads that the pool holds less (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`);
//! a reconciliation that reads it holds more (a pool reserves in chunks larger than the bytes
//! asked, and rounds each allocation) charges the difference as *slack*, whatever the limit: the
//! driver has taken that memory, but it may not serve the next allocation, so nothing is taken
//! from the slack in place of a new charge (the next reading settles what it became). The
//! reading is taken outside the pools' lock (a fork handler takes that lock, and must never
//! wait on a driver call) and applied only if nothing changed the pool meanwhile (its
//! generation); allocations reserved but not yet made are apart (`pending`), so a reading
//! during one is not taken for less memory held. A pool being destroyed is not read.
//! A destroyed pool gives back what it retained at once, and what was still allocated from it as
//! that is freed; a pool located on the host holds host memory and is never charged. A pool
//! handle the driver hands out again starts over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{AccountId, Guard};
use crate::ledger::OverLimit;
use crate::tracker::{Entry, Kind};

/// Bytes a pool holds for this process: charged to the pool's account, in use or kept for reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Bytes of live allocations from the pool.
    pub in_use: u64,
    /// Bytes reserved for allocations from the pool whose real call has not returned yet.
    pub pending: u64,
    /// Bumped by every change a reading could race with (allocations, frees, trims, a destroy).
    pub generation: u64,
    /// Readings of the pool under way outside the lock: a destroy waits for them.
    pub reading: u32,
    /// Bytes freed into the pool and still charged (the pool may keep them).
    pub retained: u64,
    /// Bytes the pool holds beyond its live allocations and the retained bytes, as last read:
    /// charged, never counted as reusable.
    pub slack: u64,
    /// The account the pool's bytes are charged to (its device's, fixed at first use).
    pub account: AccountId,
    /// A pool located on the host: its memory is not device memory and is never charged.
    pub host: bool,
    /// Destroyed while allocations from it were outstanding: the driver gives each back as it
    /// is freed, so nothing is retained any more.
    pub destroyed: bool,
    /// A `cuMemPoolDestroy` of it is under way: its handle is not read any more.
    pub closing: bool,
}

impl PoolState {
    /// What the pool's account is charged beyond the live allocations.
    fn held_beyond_use(&self) -> u64 {
        self.retained.saturating_add(self.slack)
    }
}

impl PoolState {
    fn new(account: AccountId) -> PoolState {
        PoolState {
            account,
            ..PoolState::default()
        }
    }
}

pub(super) type Pools = HashMap<u64, PoolState>;

/// Whether a pool's growth past the credited reuse has taken an account over its limit yet.
static POOL_OVERRUN_LOGGED: AtomicBool = AtomicBool::new(false);

impl Guard {
    /// A free of pool memory succeeded: retained by its pool, or given back when the pool was
    /// destroyed.
    pub(super) fn freed_into_pool(&self, entry: Entry) {
        let mut pools = self.pools();
        let st = pools
            .entry(entry.extra)
            .or_insert_with(|| PoolState::new(entry.account));
        st.in_use = st.in_use.saturating_sub(entry.bytes);
        st.generation = st.generation.wrapping_add(1);
        if !st.destroyed {
            st.retained = st.retained.saturating_add(entry.bytes);
            return;
        }
        if st.in_use == 0 {
            pools.remove(&entry.extra);
        }
        drop(pools);
        self.release(entry.account, entry.bytes);
    }

    /// Reserves an asynchronous allocation of `n` from `pool`, reusing what the pool retains
    /// first. The pool's bytes count toward the account it was first used with (`a` for a new
    /// pool: its device's). Returns that account and the bytes taken from the retained amount
    /// (give both to [`Guard::async_failed`] if the real call fails).
    ///
    /// # Errors
    /// [`OverLimit`] when the new part does not fit.
    pub fn reserve_async(
        &self,
        a: AccountId,
        pool: u64,
        n: u64,
    ) -> Result<(AccountId, u64), OverLimit> {
        let (account, reused) = {
            let mut pools = self.pools();
            let st = pools.entry(pool).or_insert_with(|| PoolState::new(a));
            let t = st.retained.min(n);
            st.retained -= t;
            st.pending = st.pending.saturating_add(n);
            st.generation = st.generation.wrapping_add(1);
            (st.account, t)
        };
        self.reserve(account, n - reused)
            .inspect_err(|_| self.async_failed(pool, account, n, reused, false))?;
        Ok((account, reused))
    }

    /// The real asynchronous allocation failed: undo [`Guard::reserve_async`].
    pub fn async_failed(&self, pool: u64, a: AccountId, n: u64, reused: u64, release_new: bool) {
        let mut pools = self.pools();
        let st = pools.entry(pool).or_insert_with(|| PoolState::new(a));
        st.pending = st.pending.saturating_sub(n);
        st.retained = st.retained.saturating_add(reused);
        st.generation = st.generation.wrapping_add(1);
        drop(pools);
        if release_new {
            self.release(a, n - reused);
        }
    }

    /// The account `pool`'s memory counts toward, once the pool has been used or created.
    pub fn pool_account(&self, pool: u64) -> Option<AccountId> {
        self.pools().get(&pool).map(|st| st.account)
    }

    /// A pool was created on a device of account `a` (a pool of the same handle before it is
    /// gone: what it still retained is given back).
    pub fn pool_created(&self, pool: u64, a: AccountId) {
        self.replace_pool(pool, PoolState::new(a));
    }

    /// A pool was created on the host: allocations from it are not device memory.
    pub fn host_pool_created(&self, pool: u64) {
        self.replace_pool(
            pool,
            PoolState {
                host: true,
                ..PoolState::default()
            },
        );
    }

    /// Whether `pool` was created on the host ([`Guard::host_pool_created`]).
    pub fn is_host_pool(&self, pool: u64) -> bool {
        self.pools().get(&pool).is_some_and(|st| st.host)
    }

    /// Before the real `cuMemPoolTrimTo(pool)`: a reading under way may be stale now.
    pub fn pool_trimming(&self, pool: u64) {
        if let Some(st) = self.pools().get_mut(&pool) {
            st.generation = st.generation.wrapping_add(1);
        }
    }

    fn replace_pool(&self, pool: u64, mut state: PoolState) {
        let mut pools = self.pools();
        if let Some(old) = pools.get(&pool) {
            // A reading of the old pool must not apply to the new one.
            state.generation = old.generation.wrapping_add(1);
        }
        let old = pools.insert(pool, state);
        drop(pools);
        if let Some(old) = old {
            self.release(old.account, old.held_beyond_use());
        }
    }

    /// Before the real `cuMemPoolDestroy(pool)`: its handle is not read from now on.
    pub fn pool_closing(&self, pool: u64) {
        match self.pools().get_mut(&pool) {
            Some(st) => {
                st.closing = true;
                st.generation = st.generation.wrapping_add(1);
            }
            None => return,
        }
        // A reading under way outside the lock is let finish first (one attribute read), so
        // the driver is never asked about a handle it is destroying.
        let mut waits = 0u32;
        while self.pools().get(&pool).is_some_and(|st| st.reading > 0) && waits < 100_000 {
            std::thread::yield_now();
            waits += 1;
        }
    }

    /// The real `cuMemPoolDestroy(pool)` failed: the pool lives on.
    pub fn pool_not_closed(&self, pool: u64) {
        if let Some(st) = self.pools().get_mut(&pool) {
            st.closing = false;
        }
    }

    /// `pool` was destroyed: the driver releases what it retained now, and each allocation
    /// still outstanding when that is freed. The handle may name a new pool later.
    pub fn pool_destroyed(&self, pool: u64) {
        let mut pools = self.pools();
        let Some(st) = pools.get_mut(&pool) else {
            return;
        };
        let account = st.account;
        let retained = std::mem::take(&mut st.retained) + std::mem::take(&mut st.slack);
        if st.in_use == 0 || st.host {
            pools.remove(&pool);
        } else {
            st.destroyed = true;
        }
        drop(pools);
        self.release(account, retained);
    }

    /// Records a successful asynchronous allocation of `n` from `pool` charged to account `a`,
    /// `reused` of it taken from the pool's retained bytes ([`Guard::reserve_async`]). When
    /// some was, the pool is read again at once: the driver reuses a freed block only when one
    /// is large enough and safe for the allocating stream, and otherwise maps new memory that
    /// the credit did not charge. Any such growth is charged now (as slack, whatever the
    /// limit: the driver has taken it), so that later allocations and `cuMemGetInfo` see it;
    /// the first time it takes the account past its limit, that is logged.
    pub fn async_made(&self, handle: u64, pool: u64, a: AccountId, n: u64, reused: u64) {
        self.track_async(handle, pool, a, n);
        if reused == 0 {
            return;
        }
        let grown = self.reconcile_pool(pool.max(1), None);
        let account = &self.accounts[a];
        let used = account.ledger.used();
        if grown > 0 && used > account.limit && !POOL_OVERRUN_LOGGED.swap(true, Ordering::Relaxed) {
            crate::log!(
                "vramslice-guard: a memory pool mapped new memory for an allocation of {n} bytes that the guard expected it to serve from {reused} bytes it had freed (another stream's, or too fragmented): the container now uses {used} bytes of its limit {} bytes; later allocations are refused until the pool is trimmed (logged once per process)",
                account.limit
            );
        }
    }

    /// Records a successful asynchronous allocation charged to account `a`.
    pub fn track_async(&self, handle: u64, pool: u64, a: AccountId, n: u64) {
        let pool = pool.max(1); // extra = 0 means "not from a pool"
        if let Some(st) = self.pools().get_mut(&pool) {
            st.pending = st.pending.saturating_sub(n);
            st.in_use = st.in_use.saturating_add(n);
            st.generation = st.generation.wrapping_add(1);
        }
        if let Some(old) = self.tracker.insert(
            Kind::DevicePtr,
            handle,
            Entry {
                bytes: n,
                extra: pool,
                account: a,
            },
        ) {
            self.freed(old);
        }
    }

    /// After a trim of `pool` (`keep_at_most`: what the trim was asked to keep, which caps the
    /// charge only when the pool cannot be read) or on a reconciliation (`None`): set what the
    /// pool's account is charged beyond the live allocations to what the pool really holds
    /// beyond them. Less is given back (the retained bytes first kept, the slack first lost);
    /// more is charged as slack, but only on a reconciliation (a trim only ever gives back). A
    /// pool destroyed, being destroyed or on the host is not read (its handle is no longer
    /// valid, or its memory is never charged).
    pub fn reconcile_pool(&self, pool: u64, keep_at_most: Option<u64>) -> u64 {
        let readable = |st: &PoolState| !st.destroyed && !st.closing && !st.host;
        let generation = {
            let mut pools = self.pools();
            let Some(st) = pools.get_mut(&pool).filter(|st| readable(st)) else {
                return 0;
            };
            st.reading += 1;
            st.generation
        };
        // Read outside the lock: a fork handler takes it and must never wait on the driver.
        let reserved = (self.probes.pool_reserved)(pool);
        let mut pools = self.pools();
        let Some(st) = pools.get_mut(&pool) else {
            return 0;
        };
        st.reading = st.reading.saturating_sub(1);
        if !readable(st) || st.generation != generation {
            // Something changed the pool meanwhile: the reading may be stale.
            return 0;
        }
        let before = st.held_beyond_use();
        match (reserved, keep_at_most) {
            // What the pool holds beyond its live allocations (a trim may keep more than it
            // was asked to: chunks that back live allocations stay).
            (Some(reserved), keep) => {
                let beyond = reserved.saturating_sub(st.in_use);
                st.retained = st.retained.min(beyond);
                // A trim only ever gives back; so does a reading while another thread's
                // allocation is under way (the driver may have made it, its bytes not yet in
                // `in_use`: they would be charged twice as slack).
                let give_back_only = keep.is_some() || st.pending > 0;
                st.slack = if give_back_only {
                    st.slack.min(beyond - st.retained)
                } else {
                    beyond - st.retained
                };
            }
            // Unknown: a trim still keeps at most what it was asked to.
            (None, Some(keep)) => {
                st.retained = st.retained.min(keep);
                st.slack = st.slack.min(keep - st.retained);
            }
            (None, None) => return 0,
        }
        let (after, account) = (st.held_beyond_use(), st.account);
        drop(pools);
        if after >= before {
            self.accounts[account].ledger().force_add(after - before);
            after - before
        } else {
            self.release(account, before - after);
            0
        }
    }

    /// Reconciles every pool this process used (see [`Guard::reconcile_pool`]).
    pub fn reconcile_pools(&self) {
        let keys: Vec<u64> = self.pools().keys().copied().collect();
        for pool in keys {
            let _ = self.reconcile_pool(pool, None);
        }
    }
}
