//! Unit tests of `ledger`.

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
    // Its own mark and nobody holds the lock: its owner ended, or dropped its lock while alive
    // (it closed a descriptor of the lock file): its pid decides.
    own_slot_of(77, layout::slot_lock_mark(77));
    assert_eq!(ledger.reap(|_, _| Liveness::Alive), 0);
    assert_eq!(ledger.used(), 10);
    assert_eq!(ledger.reap(|_, _| Liveness::Dead), 10);
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
