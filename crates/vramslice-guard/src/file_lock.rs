//! Whole-file `flock`s that a signal does not break.

use std::os::fd::RawFd;

/// Take an exclusive `flock` on `fd`, waiting for it. A signal whose handler was installed
/// without `SA_RESTART` (CPython's, a DataLoader's `SIGCHLD`) interrupts the wait: it is waited
/// again, or a process would lose its shared account for good over a signal.
pub(crate) fn lock_exclusive(fd: RawFd) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor has no memory-safety preconditions (a bad one is EBADF).
        if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    extern "C" fn ignore(_: libc::c_int) {}

    /// A signal whose handler does not restart system calls, arriving while another open file
    /// holds the lock, leaves the waiter waiting; it locks once the holder lets go.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_signal_during_the_wait_does_not_fail_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acct");
        std::fs::write(&path, b"").unwrap();
        let holder = File::open(&path).unwrap();
        lock_exclusive(holder.as_raw_fd()).unwrap();
        // SAFETY: a zeroed sigaction is valid; the handler does nothing, and is installed
        // without SA_RESTART so that a blocked flock returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        let done = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let file = File::open(&path).unwrap();
            let result = lock_exclusive(file.as_raw_fd()).map_err(|e| e.to_string());
            finished.store(true, Ordering::SeqCst);
            result
        });
        // Signal only once the waiter sleeps in flock (a signal before it would test nothing).
        let tid = tid_rx.recv().unwrap();
        let state = || {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !state() {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never blocked"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..3 {
            // SAFETY: the waiter thread is alive (blocked in flock until `holder` is closed).
            unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGUSR2) };
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "locked while another file held the lock"
        );
        drop(holder);
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }
}
