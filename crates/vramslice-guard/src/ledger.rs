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
                Some(false) => Liveness::Dead,
                None => probe(pid, start),
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
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ledger() -> Ledger {
        Ledger::new(private_words(1000, "GPU-x")).unwrap()
    }

    fn snapshot(words: &[AtomicU64]) -> layout::AccountingSnapshot {
        let bytes: Vec<u8> = words
            .iter()
            .flat_map(|w| w.load(Ordering::SeqCst).to_le_bytes())
            .collect();
        layout::parse(&bytes).unwrap()
    }

    fn set(words: &[AtomicU64], index: usize, v: u64) {
        words[index].store(v, Ordering::SeqCst);
    }

    #[test]
    fn a_slot_is_judged_by_its_lock_only_when_the_mark_is_its_owners() {
        use std::os::fd::IntoRawFd;
        let file = tempfile::tempfile().unwrap();
        let locks = SlotLocks::new(file.into_raw_fd()).unwrap();
        let words = private_words(1000, "GPU-x");
        let ledger = Ledger::new(words).unwrap().with_slot_locks(locks);
        let own_slot_of = |pid: u64, mark: u64| {
            set(words, layout::slot_word(0, slot::PID), pid);
            set(words, layout::slot_word(0, slot::START_TIME), 1);
            set(words, layout::slot_word(0, slot::BYTES), 10);
            set(words, layout::slot_word(0, slot::LOCKED), mark);
            set(words, header::USED, 10);
        };
        // A mark another owner left (an earlier version claimed the slot since): the lock
        // says nothing of this owner, the pid does.
        own_slot_of(77, layout::slot_lock_mark(99));
        assert_eq!(ledger.reap(|_, _| Liveness::Alive), 0);
        assert_eq!(ledger.used(), 10);
        // Its own mark and nobody holds the lock: dead, whatever its pid says.
        own_slot_of(77, layout::slot_lock_mark(77));
        assert_eq!(ledger.reap(|_, _| Liveness::Alive), 10);
        assert_eq!(ledger.used(), 0);
        // A claim marks the slot with its own pid.
        let i = ledger.claim(5, 1).unwrap();
        assert_eq!(
            words[layout::slot_word(i, slot::LOCKED)].load(Ordering::SeqCst),
            layout::slot_lock_mark(5)
        );
        assert_eq!(
            words[layout::slot_word(i, slot::PID)].load(Ordering::SeqCst),
            5
        );
    }

    #[test]
    fn revalidate_raises_a_lowered_total_and_lowers_an_absurd_one() {
        let words = private_words(1000, "GPU-x");
        let l = Ledger::new(words).unwrap();
        l.claim(10, 5);
        l.try_reserve(300, 1000).unwrap();
        assert_eq!(l.revalidate(1000), None, "consistent");
        set(words, header::USED, 0); // a workload zeroed the total to escape the limit
        assert_eq!(l.revalidate(1000), Some((0, 300)));
        assert_eq!(l.used(), 300);
        assert!(
            l.try_reserve(701, 1000).is_err(),
            "the slot's bytes count again"
        );
        set(words, header::USED, 300 + 1000); // orphaned requests up to one limit: plausible
        assert_eq!(l.revalidate(1000), None);
        set(words, header::USED, u64::MAX);
        assert_eq!(l.revalidate(1000), Some((u64::MAX, 300)));
        // absurd slot bytes: the sum saturates, the total follows it, nothing panics
        set(words, layout::slot_word(5, slot::PID), 77);
        set(words, layout::slot_word(5, slot::BYTES), u64::MAX);
        assert_eq!(l.revalidate(1000), Some((300, u64::MAX)));
        assert!(l.try_reserve(1, 1000).is_err());
    }

    #[test]
    fn revalidate_ignores_a_release_between_its_slot_scan_and_its_total_read() {
        let words = private_words(1000, "GPU-x");
        let attacher = Ledger::new(words).unwrap();
        let busy = Ledger::new(words).unwrap();
        busy.claim(10, 5);
        busy.try_reserve(300, 1000).unwrap();
        let mut once = Some(());
        let corrected = attacher.revalidate_observed(1000, || {
            if once.take().is_some() {
                busy.release(120); // slot step, then total step: both after the scan read the slot
            }
        });
        assert_eq!(corrected, None, "nothing was tampered with");
        assert_eq!(attacher.used(), 180, "total = what the slot holds");
        assert_eq!(snapshot(words).slot_bytes_sum(), 180);
    }

    #[test]
    fn revalidate_ignores_a_reap_between_its_slot_scan_and_its_total_read() {
        let words = private_words(1000, "GPU-x");
        let attacher = Ledger::new(words).unwrap();
        let reaper = Ledger::new(words).unwrap();
        let dead = Ledger::new(words).unwrap();
        dead.claim(11, 5);
        dead.try_reserve(250, 1000).unwrap();
        reaper.claim(12, 5);
        reaper.try_reserve(100, 1000).unwrap();
        let mut once = Some(());
        let corrected = attacher.revalidate_observed(1000, || {
            if once.take().is_some() {
                let back = reaper.reap(|pid, _| {
                    if pid == 11 {
                        Liveness::Dead
                    } else {
                        Liveness::Alive
                    }
                });
                assert_eq!(back, 250);
            }
        });
        assert_eq!(corrected, None, "nothing was tampered with");
        assert_eq!(attacher.used(), 100);
        assert_eq!(snapshot(words).slot_bytes_sum(), 100);
    }

    #[test]
    fn revalidate_waits_for_a_quiet_view_and_then_corrects_tampering() {
        let words = private_words(1000, "GPU-x");
        let l = Ledger::new(words).unwrap();
        let s = l.claim(10, 5).unwrap();
        l.try_reserve(300, 1000).unwrap();
        l.release(100);
        let ops = layout::slot_word(s, slot::OPS);
        assert_eq!(
            words[ops].load(Ordering::SeqCst),
            2 * OPS_DONE,
            "claim and release counted, none in flight"
        );
        set(words, header::USED, 0); // tampering
        set(words, ops, 2 * OPS_DONE + 1); // a release of this slot in flight
        assert_eq!(l.revalidate(1000), None, "no quiet view: nothing corrected");
        assert_eq!(l.used(), 0);
        set(words, ops, 3 * OPS_DONE);
        assert_eq!(l.revalidate(1000), Some((0, 200)));
        // a reaper clears what a dead owner left in flight
        set(words, ops, 3 * OPS_DONE + 1);
        let reaper = Ledger::new(words).unwrap();
        reaper.claim(11, 5);
        assert_eq!(reaper.reap(|_, _| Liveness::Dead), 200);
        assert_eq!(words[ops].load(Ordering::SeqCst), 4 * OPS_DONE);
        assert_eq!(reaper.used(), 0);
    }

    #[test]
    fn reserve_respects_limit_and_release_returns() {
        let l = ledger();
        assert_eq!(l.claim(10, 5), Some(0));
        assert!(l.try_reserve(600, 1000).is_ok());
        assert_eq!(
            l.try_reserve(401, 1000),
            Err(OverLimit {
                requested: 401,
                used: 600,
                limit: 1000
            })
        );
        assert!(l.try_reserve(400, 1000).is_ok());
        assert_eq!(l.used(), 1000);
        l.release(1000);
        assert_eq!(l.used(), 0);
        l.release(5);
        assert_eq!(l.used(), 0, "release saturates");
        assert!(l.try_reserve(u64::MAX, u64::MAX).is_ok());
        assert!(l.try_reserve(1, u64::MAX).is_err(), "no wrap-around");
    }

    #[test]
    fn slots_record_bytes_and_peak() {
        let l = ledger();
        l.claim(10, 5);
        l.try_reserve(300, 1000).unwrap();
        l.release(100);
        l.force_add(50);
        let snap = snapshot(l.words);
        assert_eq!(snap.slots.len(), 1);
        assert_eq!(snap.slots[0].pid, 10);
        assert_eq!(snap.slots[0].bytes, 250);
        assert_eq!(snap.slots[0].peak, 300);
        assert_eq!(snap.used_bytes, 250);
        assert_eq!(snap.generation, 1);
    }

    #[test]
    fn dead_slots_are_reaped_and_live_ones_kept() {
        let words = private_words(1000, "");
        let a = Ledger::new(words).unwrap();
        let b = Ledger::new(words).unwrap();
        let c = Ledger::new(words).unwrap();
        a.claim(1, 1);
        b.claim(2, 2);
        c.claim(3, 3);
        a.try_reserve(100, 1000).unwrap();
        b.try_reserve(200, 1000).unwrap();
        c.try_reserve(300, 1000).unwrap();
        let reclaimed = c.reap(|pid, _| {
            if pid == 2 {
                Liveness::Dead
            } else {
                Liveness::Alive
            }
        });
        assert_eq!(reclaimed, 200);
        assert_eq!(c.used(), 400);
        let snap = snapshot(words);
        assert_eq!(
            snap.slots.iter().map(|s| s.pid).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(c.claim(4, 4), Some(1), "freed slot is reused");
    }

    #[test]
    fn own_slot_never_reaped_and_exec_leftover_is() {
        let words = private_words(1000, "");
        let old = Ledger::new(words).unwrap();
        old.claim(7, 70);
        old.try_reserve(100, 1000).unwrap();
        assert_eq!(old.reap(|_, _| Liveness::Dead), 0);
        let new = Ledger::new(words).unwrap();
        assert_eq!(
            new.claim(7, 70),
            Some(0),
            "same pid+start: previous image before exec"
        );
        assert_eq!(new.used(), 0);
    }

    #[test]
    fn full_table_gives_no_slot_but_still_counts_total() {
        let words = private_words(1000, "");
        for pid in 1..=layout::DEFAULT_SLOT_COUNT as u32 {
            Ledger::new(words).unwrap().claim(pid, 1).unwrap();
        }
        let l = Ledger::new(words).unwrap();
        assert_eq!(l.claim(9999, 1), None);
        l.try_reserve(10, 1000).unwrap();
        assert_eq!(l.used(), 10);
        assert!(!l.reset_if_unowned());
    }

    #[test]
    fn threads_racing_never_exceed_limit() {
        let l = Arc::new(ledger());
        l.claim(1, 1);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if l.try_reserve(7, 1000).is_ok() {
                            assert!(l.used() <= 1000);
                            l.release(7);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(l.used(), 0);
    }
}
