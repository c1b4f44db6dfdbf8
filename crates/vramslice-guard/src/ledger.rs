//! The container's account: atomic operations on the words of the accounting file
//! (layout in `vramslice_core::accounting`), shared by every process of the container.
//!
//! Admission is one compare-and-swap loop on the container total, which never lets the total
//! pass the limit; the process's own slot is updated after it. Order on release is the
//! reverse: the slot first, then the total. A process killed between the two steps of a
//! reservation leaves at most that one request counted in the total with no owner (never the
//! other way round), so the error is always on the safe side.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use vramslice_core::accounting::{self as layout, header, slot};

/// Sentinel for "this process has no slot".
const NO_SLOT: usize = usize::MAX;

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
}

impl Ledger {
    /// Wraps words already holding a valid image (see `vramslice_core::accounting::parse`).
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
        })
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
    pub fn force_add(&self, n: u64) {
        self.w(header::USED).fetch_add(n, Ordering::AcqRel);
        self.slot_add(n);
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
        if let Some(s) = self.own_slot() {
            saturating_sub(self.w(layout::slot_word(s, slot::BYTES)), n);
        }
        saturating_sub(self.w(header::USED), n);
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
            {
                self.reap_slot(i, p);
            }
        }
        for i in 0..self.slot_count {
            let pid_word = self.w(layout::slot_word(i, slot::PID));
            if pid_word
                .compare_exchange(0, u64::from(pid), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
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
                self.own.store(i, Ordering::Relaxed);
                return Some(i);
            }
        }
        self.own.store(NO_SLOT, Ordering::Relaxed);
        None
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
            if probe(pid, start) == Liveness::Dead {
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
        let bytes = self
            .w(layout::slot_word(i, slot::BYTES))
            .swap(0, Ordering::AcqRel);
        saturating_sub(self.w(header::USED), bytes);
        self.w(layout::slot_word(i, slot::START_TIME))
            .store(0, Ordering::Relaxed);
        pid_word.store(0, Ordering::Release);
        bytes
    }

    /// Re-validates the container total against the slots (at attach, under the file lock, after
    /// [`Ledger::reap`]): a total below what the slots hold was lowered by someone (tampering) and
    /// is raised to their sum; a total more than `limit` above it is absurd (no orphaned
    /// requests can add up to that) and is lowered to the sum. Returns the correction made as
    /// (old total, new total), or `None` when the total was plausible.
    pub fn revalidate(&self, limit: u64) -> Option<(u64, u64)> {
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
        let total = self.w(header::USED);
        let mut cur = total.load(Ordering::Acquire);
        loop {
            if cur >= sum && cur <= sum.saturating_add(limit) {
                return None;
            }
            let want = sum;
            match total.compare_exchange(cur, want, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((cur, want)),
                Err(actual) => cur = actual,
            }
        }
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

/// Process start time (clock ticks since boot) from the text of `/proc/<pid>/stat`, and whether
/// the process is a zombie. The command name may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, bool)> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    let start = fields.nth(18)?.parse().ok()?; // field 22
    Some((start, state == "Z" || state == "X"))
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

    #[test]
    fn proc_stat_start_time_and_zombie() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_proc_stat(line), Some((98765, false)));
        let z = line.replace(") S ", ") Z ");
        assert_eq!(parse_proc_stat(&z), Some((98765, true)));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("1 (x) S 1"), None);
    }
}
