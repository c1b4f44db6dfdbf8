//! The container's account: atomic operations on the words of the accounting file
//! (layout in `vramslice_core::container::accounting`), shared by every process of the container.
//!
//! Admission is one compare-and-swap loop on the container total, which never lets the total
//! pass the limit; the process's own slot is updated after it. Order on release is the
//! reverse: the slot first, then the total. So at every instant the total is at least the sum
//! of the slots. A process killed between the two steps of a reservation leaves at most that
//! one request counted in the total with no owner (never the other way round), so the error is
//! always on the safe side.
//!
//! Reading "the sum of the slots" takes many loads, and the slots keep changing meanwhile: a
//! release seen in a slot but not yet in the total (or the reverse order of reads) makes an
//! honest total look too low. Every update that lowers a slot (release, reap, claim, forced
//! charge) is therefore bracketed by the slot's update counter (`slot::OPS`: updates in flight
//! in the low half, completed ones in the high half); [`Ledger::revalidate`] corrects the total
//! only from a view during which no such update was in flight or completed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use vramslice_core::container::accounting::{self as layout, header, slot};

/// Sentinel for "this process has no slot".
const NO_SLOT: usize = usize::MAX;

/// One completed update in a slot's update counter (the high half).
const OPS_DONE: u64 = 1 << 32;
/// The updates-in-flight half of a slot's update counter.
const OPS_IN_FLIGHT: u64 = OPS_DONE - 1;
/// How many views [`Ledger::revalidate`] takes before giving up on a busy container.
const REVALIDATE_TRIES: usize = 200;

/// What a liveness probe says about the owner of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The process with that pid and start time is running.
    Alive,
    /// It is gone (no such pid, a zombie, or the pid now belongs to a process with another start time).
    Dead,
}

/// A refused reservation: the numbers for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Bytes requested.
    pub requested: u64,
    /// Bytes the container held when refused.
    pub used: u64,
    /// The limit.
    pub limit: u64,
}

/// Operations on an accounting image held in shared (or private) memory.
pub struct Ledger {
    words: &'static [AtomicU64],
    slot_count: usize,
    own: AtomicUsize,
    /// The slot lock file (see [`slot::LOCKED`]), when it could be opened.
    locks: Option<SlotLocks>,
}

/// Byte-range read locks on the slot lock file: a slot's owner holds byte `<index>` for its
/// life. Read locks need only read access, so processes of containers running as different
/// users can all take them.
#[derive(Debug, Clone, Copy)]
pub struct SlotLocks {
    fd: i32,
    /// The file's (device, inode) when opened: an application that closes descriptors it does
    /// not own (`closefrom`) drops the locks and frees the number for another file.
    identity: (u64, u64),
}

impl SlotLocks {
    /// Locks on the file open (for reading at least) as `fd`, kept open for the process's life;
    /// `None` when the descriptor cannot be examined.
    pub fn new(fd: i32) -> Option<SlotLocks> {
        Some(SlotLocks {
            fd,
            identity: file_identity(fd)?,
        })
    }

    /// Whether `fd` is still the file the locks were taken on.
    fn intact(&self) -> bool {
        file_identity(self.fd) == Some(self.identity)
    }

    fn fcntl(&self, cmd: libc::c_int, kind: libc::c_int, index: usize) -> Option<libc::flock> {
        // SAFETY: a zeroed flock is a valid value of this plain C struct.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = kind as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = libc::off_t::try_from(index).ok()?;
        lock.l_len = 1;
        // SAFETY: fcntl with a lock command reads and writes only `lock`, a valid flock.
        let rc = unsafe { libc::fcntl(self.fd, cmd, &mut lock as *mut libc::flock) };
        (rc == 0).then_some(lock)
    }

    /// Take this process's lock on slot `index` (never waits).
    fn take(&self, index: usize) -> bool {
        self.intact() && self.fcntl(libc::F_SETLK, libc::F_RDLCK, index).is_some()
    }

    /// Whether another process holds slot `index` (`None`: the kernel could not say).
    fn held_by_another(&self, index: usize) -> Option<bool> {
        if !self.intact() {
            return None;
        }
        self.fcntl(libc::F_GETLK, libc::F_WRLCK, index)
            .map(|l| l.l_type != libc::F_UNLCK as libc::c_short)
    }
}

/// The (device, inode) of the file open as `fd`.
fn file_identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: a zeroed stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only `st`, a valid stat; a closed fd is an error, not UB.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    (rc == 0).then_some((st.st_dev as u64, st.st_ino as u64))
}

impl Ledger {
    /// Wraps words already holding a valid image (see `vramslice_core::container::accounting::parse`).
    /// Returns `None` when the words are too few for the slot count they declare.
    pub fn new(words: &'static [AtomicU64]) -> Option<Ledger> {
        let slot_count =
            usize::try_from(words.get(header::SLOT_COUNT)?.load(Ordering::Relaxed)).ok()?;
        if slot_count > layout::MAX_SLOT_COUNT || words.len() * 8 < layout::file_len(slot_count) {
            return None;
        }
        Some(Ledger {
            words,
            slot_count,
            own: AtomicUsize::new(NO_SLOT),
            locks: None,
        })
    }

    /// Judge and hold slots by the slot lock file `locks` (see [`slot::LOCKED`]).
    pub fn with_slot_locks(mut self, locks: SlotLocks) -> Ledger {
        self.locks = Some(locks);
        self
    }

    fn w(&self, index: usize) -> &AtomicU64 {
        // Every index used is below file_len(slot_count) / 8, checked in `new`.
        &self.words[index]
    }

    /// Bytes the whole container holds.
    pub fn used(&self) -> u64 {
        self.w(header::USED).load(Ordering::Acquire)
    }

    /// Index of this process's slot, if it has one.
    pub fn own_slot(&self) -> Option<usize> {
        let s = self.own.load(Ordering::Relaxed);
        (s != NO_SLOT).then_some(s)
    }

    /// Reserves `n` bytes if the container total stays within `limit`.
    ///
    /// # Errors
    /// [`OverLimit`] with the numbers when it would not.
    #[inline]
    pub fn try_reserve(&self, n: u64, limit: u64) -> Result<(), OverLimit> {
        let total = self.w(header::USED);
        let mut cur = total.load(Ordering::Relaxed);
        loop {
            let new = match cur.checked_add(n) {
                Some(v) if v <= limit => v,
                _ => {
                    return Err(OverLimit {
                        requested: n,
                        used: cur,
                        limit,
                    });
                }
            };
            match total.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.slot_add(n);
        Ok(())
    }

    /// Adds `n` bytes whatever the limit (memory the driver already took, such as a context).
    /// Bracketed (rare): a total pushed past the limit by it must not look absurd to a validator.
    pub fn force_add(&self, n: u64) {
        let own = self.own_slot();
        if let Some(s) = own {
            self.ops_begin(s);
        }
        self.w(header::USED).fetch_add(n, Ordering::AcqRel);
        self.slot_add(n);
        if let Some(s) = own {
            self.ops_end(s);
        }
    }

    /// Marks an update of slot `s` in flight; its writes come after this in every view.
    #[inline]
    fn ops_begin(&self, s: usize) {
        self.w(layout::slot_word(s, slot::OPS))
            .fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
    }

    /// Marks the update of slot `s` begun by [`Ledger::ops_begin`] completed.
    #[inline]
    fn ops_end(&self, s: usize) {
        self.w(layout::slot_word(s, slot::OPS))
            .fetch_add(OPS_DONE - 1, Ordering::Release);
    }

    /// Completes an update of slot `s` made by its sole writer (a reaper or claimer holding the
    /// pid word): counts it and clears whatever a dead owner left in flight.
    fn ops_end_exclusive(&self, s: usize) {
        let ops = self.w(layout::slot_word(s, slot::OPS));
        let cur = ops.load(Ordering::Relaxed);
        ops.store(
            (cur & !OPS_IN_FLIGHT).wrapping_add(OPS_DONE),
            Ordering::Release,
        );
    }

    #[inline]
    fn slot_add(&self, n: u64) {
        if let Some(s) = self.own_slot() {
            let now = self
                .w(layout::slot_word(s, slot::BYTES))
                .fetch_add(n, Ordering::Relaxed)
                .wrapping_add(n);
            let peak = self.w(layout::slot_word(s, slot::PEAK));
            if now > peak.load(Ordering::Relaxed) {
                peak.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Returns `n` bytes (saturating at zero so a damaged counter cannot wrap).
    #[inline]
    pub fn release(&self, n: u64) {
        match self.own_slot() {
            Some(s) => {
                self.ops_begin(s);
                saturating_sub(self.w(layout::slot_word(s, slot::BYTES)), n);
                saturating_sub(self.w(header::USED), n);
                self.ops_end(s);
            }
            None => saturating_sub(self.w(header::USED), n),
        }
    }

    /// Claims a free slot for `pid` (first reaping a stale slot of the same pid and start time:
    /// that is this process before an `exec`, whose device memory the driver has released).
    pub fn claim(&self, pid: u32, start_time: u64) -> Option<usize> {
        for i in 0..self.slot_count {
            let p = self
                .w(layout::slot_word(i, slot::PID))
                .load(Ordering::Acquire);
            if p == u64::from(pid)
                && self
                    .w(layout::slot_word(i, slot::START_TIME))
                    .load(Ordering::Acquire)
                    == start_time
                && self.held_by_lock(i, p) != Some(true)
            {
                self.reap_slot(i, p);
            }
        }
        for i in 0..self.slot_count {
            let pid_word = self.w(layout::slot_word(i, slot::PID));
            // Taken hidden (the reaping bit: reapers, and earlier versions, leave such a slot
            // alone) until it is set up: its lock and its mark first, so that no reaper ever
            // sees it owned and unlocked, nor with another owner's mark.
            if pid_word
                .compare_exchange(
                    0,
                    u64::from(pid) | layout::SLOT_REAPING_BIT,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            let mark = match &self.locks {
                Some(locks) if locks.take(i) => layout::slot_lock_mark(u64::from(pid)),
                _ => 0,
            };
            self.w(layout::slot_word(i, slot::LOCKED))
                .store(mark, Ordering::Release);
            self.ops_begin(i);
            let generation = self
                .w(header::GENERATION)
                .fetch_add(1, Ordering::AcqRel)
                .wrapping_add(1);
            self.w(layout::slot_word(i, slot::GENERATION))
                .store(generation, Ordering::Relaxed);
            self.w(layout::slot_word(i, slot::BYTES))
                .store(0, Ordering::Relaxed);
            self.w(layout::slot_word(i, slot::PEAK))
                .store(0, Ordering::Relaxed);
            self.w(layout::slot_word(i, slot::START_TIME))
                .store(start_time, Ordering::Release);
            self.ops_end_exclusive(i);
            pid_word.store(u64::from(pid), Ordering::Release);
            self.own.store(i, Ordering::Relaxed);
            return Some(i);
        }
        self.own.store(NO_SLOT, Ordering::Relaxed);
        None
    }

    /// Whether another process holds slot `i`, whose pid word is `p`, by its lock: `None` when
    /// the slot is not judged by a lock (no mark, or a mark of another owner, left by an earlier
    /// version) or the kernel cannot say. A slot judged by its lock is alive while another
    /// process holds it, whatever PID namespace that process is in (its pid may mean nothing,
    /// or someone else, here).
    fn held_by_lock(&self, i: usize, p: u64) -> Option<bool> {
        let locks = self.locks.as_ref()?;
        let mark = self
            .w(layout::slot_word(i, slot::LOCKED))
            .load(Ordering::Acquire);
        if mark != layout::slot_lock_mark(p) {
            return None;
        }
        locks.held_by_another(i)
    }

    /// Forgets the slot (after `fork`, the child must not write its parent's slot).
    pub fn disown(&self) {
        self.own.store(NO_SLOT, Ordering::Relaxed);
    }

    /// Returns the bytes of every slot whose owner `probe` says is dead; returns the bytes reclaimed.
    pub fn reap(&self, probe: impl Fn(u32, u64) -> Liveness) -> u64 {
        let own = self.own_slot();
        let mut reclaimed: u64 = 0;
        for i in 0..self.slot_count {
            if Some(i) == own {
                continue;
            }
            let p = self
                .w(layout::slot_word(i, slot::PID))
                .load(Ordering::Acquire);
            if p == 0 || p & layout::SLOT_REAPING_BIT != 0 {
                continue;
            }
            let start = self
                .w(layout::slot_word(i, slot::START_TIME))
                .load(Ordering::Acquire);
            let Ok(pid) = u32::try_from(p) else {
                reclaimed = reclaimed.saturating_add(self.reap_slot(i, p)); // not a pid at all: damaged slot
                continue;
            };
            let liveness = match self.held_by_lock(i, p) {
                Some(true) => Liveness::Alive,
                // Not held: its owner ended, or is alive and closed the lock file's descriptor
                // (`closefrom`, `close_range`, or opening and closing the file: POSIX drops all
                // of a process's locks on a file then). Its pid and start time decide.
                Some(false) | None => probe(pid, start),
            };
            if liveness == Liveness::Dead {
                reclaimed = reclaimed.saturating_add(self.reap_slot(i, p));
            }
        }
        reclaimed
    }

    /// Empties slot `i` if its pid word is still `expected`; returns the bytes given back.
    fn reap_slot(&self, i: usize, expected: u64) -> u64 {
        let pid_word = self.w(layout::slot_word(i, slot::PID));
        if pid_word
            .compare_exchange(
                expected,
                expected | layout::SLOT_REAPING_BIT,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return 0;
        }
        self.ops_begin(i);
        let bytes = self
            .w(layout::slot_word(i, slot::BYTES))
            .swap(0, Ordering::AcqRel);
        saturating_sub(self.w(header::USED), bytes);
        self.w(layout::slot_word(i, slot::START_TIME))
            .store(0, Ordering::Relaxed);
        self.w(layout::slot_word(i, slot::LOCKED))
            .store(0, Ordering::Relaxed);
        self.ops_end_exclusive(i);
        pid_word.store(0, Ordering::Release);
        bytes
    }

    /// Re-validates the container total against the slots (at attach, under the file lock, after
    /// [`Ledger::reap`]): a total below what the slots hold was lowered by someone (tampering) and
    /// is raised to their sum; a total more than `limit` above it is absurd (no orphaned
    /// requests can add up to that) and is lowered to the sum. Returns the correction made as
    /// (old total, new total), or `None` when the total was plausible — or when no quiet view
    /// could be had: other processes keep updating their slots while this runs, so the sum is
    /// only trusted from a view during which no slot-lowering update was in flight or completed
    /// (see the module doc); after `REVALIDATE_TRIES` busy views nothing is corrected. A
    /// correction drops reservations whose slot step was still pending (only ever made when the
    /// total was tampered with; the next attach raises the total again).
    pub fn revalidate(&self, limit: u64) -> Option<(u64, u64)> {
        self.revalidate_observed(limit, || {})
    }

    /// [`Ledger::revalidate`], calling `between` after scanning the slots and before reading the
    /// total (the window where a concurrent update used to be mistaken for tampering).
    fn revalidate_observed(&self, limit: u64, mut between: impl FnMut()) -> Option<(u64, u64)> {
        let ops = |i: usize| self.w(layout::slot_word(i, slot::OPS));
        let mut before = vec![0u64; self.slot_count];
        for _ in 0..REVALIDATE_TRIES {
            for (i, b) in before.iter_mut().enumerate() {
                *b = ops(i).load(Ordering::Acquire);
            }
            if before.iter().any(|b| b & OPS_IN_FLIGHT != 0) {
                std::thread::yield_now();
                continue;
            }
            let sum = (0..self.slot_count)
                .filter(|&i| {
                    self.w(layout::slot_word(i, slot::PID))
                        .load(Ordering::Acquire)
                        != 0
                })
                .fold(0u64, |acc, i| {
                    acc.saturating_add(
                        self.w(layout::slot_word(i, slot::BYTES))
                            .load(Ordering::Acquire),
                    )
                });
            between();
            let total = self.w(header::USED);
            let cur = total.load(Ordering::Acquire);
            fence(Ordering::Acquire);
            if (0..self.slot_count).any(|i| ops(i).load(Ordering::Relaxed) != before[i]) {
                continue; // a slot went down (or was freed) during the view
            }
            // A quiet view: slots only grew during it, and a slot grows after the total does,
            // so without tampering `cur` >= `sum` here.
            if cur >= sum && cur <= sum.saturating_add(limit) {
                return None;
            }
            // Moves made since the view change the total (they are deltas that commute with
            // this correction); any of them makes the swap fail and the view is taken again.
            if total
                .compare_exchange(cur, sum, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Some((cur, sum));
            }
        }
        None
    }

    /// Sets the total to zero when no slot is occupied (all owners gone): clears what killed
    /// processes may have left unattributed. Only safe while no other process can attach
    /// (the caller holds the file lock) — a live process always owns a slot.
    pub fn reset_if_unowned(&self) -> bool {
        let occupied = (0..self.slot_count).any(|i| {
            self.w(layout::slot_word(i, slot::PID))
                .load(Ordering::Acquire)
                != 0
        });
        if !occupied {
            self.w(header::USED).store(0, Ordering::Release);
        }
        !occupied
    }
}

fn saturating_sub(word: &AtomicU64, n: u64) {
    let mut cur = word.load(Ordering::Relaxed);
    loop {
        match word.compare_exchange_weak(
            cur,
            cur.saturating_sub(n),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// Builds a private (unshared) image: used when no accounting directory is given.
pub fn private_words(limit: u64, gpu_uuid: &str) -> &'static [AtomicU64] {
    let image = layout::initial_image(limit, gpu_uuid, layout::DEFAULT_SLOT_COUNT);
    let words: Vec<AtomicU64> = image
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            AtomicU64::new(u64::from_le_bytes(w))
        })
        .collect();
    Box::leak(words.into_boxed_slice())
}

#[cfg(test)]
mod tests;
