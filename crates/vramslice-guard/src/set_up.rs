//! [`SetUp`]: a value set up once, on first use, that a forked child can start over. The
//! guard keeps its lazy state (settings, real driver, accounts) in these rather than in
//! `OnceLock`s: a fork while another thread is inside a set-up hands the child a cell marked
//! "being set up" by a thread it does not have, on which a `OnceLock` would make the child's
//! first CUDA call wait forever ([`SetUp::forget_unfinished`], called by the fork child handler
//! in `ffi::fork`). A set-up that comes back into its own cell on the same thread (a library
//! the set-up loads calling an interposed entry point) panics with a message instead of
//! waiting for itself forever; the entry point's panic boundary turns that into an error code
//! for the inner call alone.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::time::Duration;

const EMPTY: u8 = 0;
const RUNNING: u8 = 1;
const READY: u8 = 2;

/// A value set up once, on first use, by whichever thread gets there first; the others wait.
pub(crate) struct SetUp<T> {
    state: AtomicU8,
    /// The kernel thread ID of the thread setting it up (0 when none).
    owner: AtomicI64,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// The calling thread's kernel thread ID (`gettid(2)` through `syscall`: glibc's wrapper came
/// only in 2.30, above the guard's floor).
fn thread_id() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    i64::from(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
}

// SAFETY: the value is written only by the one thread that moved the state from EMPTY to
// RUNNING, before it publishes READY with Release ordering; it is read only after an Acquire
// load saw READY, and never written again while READY. So shared references handed to any
// thread are sound when T may be sent and shared between threads.
unsafe impl<T: Send + Sync> Sync for SetUp<T> {}

impl<T> SetUp<T> {
    /// An empty cell.
    pub(crate) const fn new() -> Self {
        SetUp {
            state: AtomicU8::new(EMPTY),
            owner: AtomicI64::new(0),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The value, once set up.
    pub(crate) fn get(&self) -> Option<&T> {
        (self.state.load(Ordering::Acquire) == READY).then(|| {
            // SAFETY: READY is stored (Release) only after the value was written, and seen here
            // with Acquire; the value is never written again while READY.
            unsafe { (*self.value.get()).assume_init_ref() }
        })
    }

    /// The value, set up by `set_up` on this thread when no thread has yet; waits while another
    /// thread sets it up. A panic in `set_up` leaves the cell empty for the next caller.
    ///
    /// # Panics
    /// When `set_up`, on this thread, asks for the same cell again: it can never be ready for
    /// it. Every exported entry point catches panics, so the inner call fails with an error
    /// code and the outer set-up goes on.
    pub(crate) fn get_or_init(&self, set_up: impl FnOnce() -> T) -> &T {
        let mut waits: u32 = 0;
        loop {
            if let Some(value) = self.get() {
                return value;
            }
            if self
                .state
                .compare_exchange(EMPTY, RUNNING, Ordering::Acquire, Ordering::Acquire)
                .is_ok()
            {
                struct BackToEmpty<'a>(&'a AtomicU8, &'a AtomicI64);
                impl Drop for BackToEmpty<'_> {
                    fn drop(&mut self) {
                        self.1.store(0, Ordering::Relaxed);
                        self.0.store(EMPTY, Ordering::Release);
                    }
                }
                self.owner.store(thread_id(), Ordering::Relaxed);
                let unwinding = BackToEmpty(&self.state, &self.owner);
                let value = set_up();
                // SAFETY: this thread alone moved the state to RUNNING, so no other thread
                // writes the value or reads it (readers wait for READY).
                unsafe { (*self.value.get()).write(value) };
                std::mem::forget(unwinding);
                self.owner.store(0, Ordering::Relaxed);
                self.state.store(READY, Ordering::Release);
                // SAFETY: written just above by this thread, and READY from now on.
                return unsafe { (*self.value.get()).assume_init_ref() };
            }
            // Another thread sets it up (unless this one does, further up its stack); set-ups
            // happen once, but one may wait on the accounting file's lock, so do not spin hot
            // for long.
            if waits == 0 && self.owner.load(Ordering::Relaxed) == thread_id() {
                panic!(
                    "vramslice-guard: a CUDA or NVML call came from inside the guard's own set-up on the same thread (a library it loads calls back); that call fails"
                );
            }
            if waits < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
            waits = waits.saturating_add(1);
        }
    }

    /// In a forked child: a set-up another thread of the parent was running will never finish
    /// here, so the next use starts it over (what it had done is left behind, unused).
    pub(crate) fn forget_unfinished(&self) {
        if self
            .state
            .compare_exchange(RUNNING, EMPTY, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.owner.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn set_up_once_by_one_thread_while_the_others_wait() {
        static CELL: SetUp<u64> = SetUp::new();
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    *CELL.get_or_init(|| {
                        CALLS.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        42
                    })
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().ok(), Some(42));
        }
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);
        assert_eq!(CELL.get(), Some(&42));
    }

    #[test]
    fn an_unfinished_set_up_is_started_over_and_a_panicking_one_leaves_it_empty() {
        let cell: SetUp<String> = SetUp::new();
        // As a child sees a set-up its parent's other thread was running.
        cell.state.store(RUNNING, Ordering::SeqCst);
        cell.forget_unfinished();
        assert_eq!(cell.get_or_init(|| "again".into()), "again");
        // A finished one is kept.
        cell.forget_unfinished();
        assert_eq!(cell.get().map(String::as_str), Some("again"));

        let cell: SetUp<u8> = SetUp::new();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cell.get_or_init(|| panic!("set-up failed"));
        }));
        assert!(panicked.is_err());
        assert_eq!(cell.get(), None);
        assert_eq!(*cell.get_or_init(|| 7), 7);
    }

    #[test]
    fn a_set_up_asking_for_its_own_cell_fails_the_inner_call_instead_of_waiting_forever() {
        static CELL: SetUp<u32> = SetUp::new();
        let (done, finished) = std::sync::mpsc::channel();
        // On its own thread, so a regression (waiting forever) fails the test by timeout
        // below rather than hanging the test binary's main thread.
        std::thread::spawn(move || {
            let value = *CELL.get_or_init(|| {
                let inner = std::panic::catch_unwind(|| *CELL.get_or_init(|| 1));
                if inner.is_err() { 2 } else { 3 }
            });
            let _ = done.send(value);
        });
        let value = finished.recv_timeout(Duration::from_secs(20));
        assert_eq!(
            value,
            Ok(2),
            "the inner call failed and the outer set-up finished"
        );
        assert_eq!(CELL.get(), Some(&2));
    }
}
