//! `fork`: the child is a copy of the process with one thread, the one that forked. The guard's
//! lazy state (settings, real driver, accounts) is set up in `OnceLock`s on first use; a fork
//! while another thread is inside one of those set-ups would hand the child a `OnceLock` marked
//! "being set up" by a thread it does not have, and the child's first CUDA call would wait on it
//! forever. So every set-up runs under one lock ([`setting_up`]), which the fork handlers take
//! across the fork: a fork waits for a set-up in progress, and no set-up starts during a fork.
//! The handlers are registered by a constructor, before anything can be set up.

use std::cell::UnsafeCell;

/// The set-up lock: a recursive pthread mutex (one set-up may start another: the accounts need
/// the settings and the real driver).
struct SetUpLock(UnsafeCell<libc::pthread_mutex_t>);

// SAFETY: the mutex is only ever touched through pthread_mutex_* (made for sharing between
// threads), and re-initialised in a forked child, which has one thread.
unsafe impl Sync for SetUpLock {}

static SET_UP: SetUpLock = SetUpLock(UnsafeCell::new(
    libc::PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP,
));

fn lock() {
    // SAFETY: a statically initialised recursive mutex that lives for the whole process.
    unsafe { libc::pthread_mutex_lock(SET_UP.0.get()) };
}

fn unlock() {
    // SAFETY: as above; called only by the thread that locked it (recursion count balanced).
    unsafe { libc::pthread_mutex_unlock(SET_UP.0.get()) };
}

/// Runs `set_up` (which fills one of the guard's `OnceLock`s) under the set-up lock. Call it
/// only when the `OnceLock` is still empty, so that the lock is not taken on every call.
pub(super) fn setting_up<T>(set_up: impl FnOnce() -> T) -> T {
    struct Unlock;
    impl Drop for Unlock {
        fn drop(&mut self) {
            unlock();
        }
    }
    lock();
    let _unlock = Unlock;
    set_up()
}

extern "C" fn prepare() {
    lock();
    super::fork_prepare();
}

extern "C" fn parent() {
    super::fork_parent();
    unlock();
}

extern "C" fn child() {
    // The mutex names the parent's thread as its owner (a thread ID the child's only thread
    // does not have), so unlocking would fail: make it new, as glibc does with its own locks.
    // SAFETY: the child runs one thread, and nothing else holds a reference to the mutex.
    unsafe {
        SET_UP
            .0
            .get()
            .write(libc::PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP)
    };
    super::fork_child();
}

extern "C" fn register() {
    // SAFETY: the three handlers are extern "C" fns taking no arguments, as pthread_atfork wants.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        crate::log!(
            "vramslice-guard: pthread_atfork failed ({rc}): forked children share their parent's slot"
        );
    }
}

/// Registers the fork handlers when the library is loaded, before any set-up can start.
// SAFETY: `.init_array` holds pointers to functions taking no arguments, which the dynamic
// loader calls once at load; `register` is one.
#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER: extern "C" fn() = register;
