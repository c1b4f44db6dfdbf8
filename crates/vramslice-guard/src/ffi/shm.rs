//! The shared accounting file: create or validate it under an exclusive `flock` (held only while
//! attaching, never per allocation), map it shared, and claim this process's slot.

use crate::ledger::{Ledger, SlotLocks};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use vramslice_core::container::accounting as layout;

/// The descriptor whose `flock` an attach in progress holds (-1: none). A child forked meanwhile
/// shares that lock through its copy of the descriptor, which it never uses (its own set-up
/// starts over): it closes the copy ([`close_inherited_lock`]), so that the lock cannot outlive
/// the parent in it.
static LOCKED_FD: AtomicI32 = AtomicI32::new(-1);

struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn new(file: &'a File) -> Result<Self, String> {
        crate::file_lock::lock_exclusive(file.as_raw_fd())
            .map_err(|e| format!("cannot lock the accounting file: {e}"))?;
        LOCKED_FD.store(file.as_raw_fd(), Ordering::SeqCst);
        Ok(Locked(file))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        LOCKED_FD.store(-1, Ordering::SeqCst);
        // SAFETY: as above; unlocking a lock we hold.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// In a forked child: close the copy of the descriptor an attach of the parent's was holding
/// its lock with (that attach has no thread here, and the child attaches anew).
pub(super) fn close_inherited_lock() {
    let fd = LOCKED_FD.swap(-1, Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: fd is the child's copy of a descriptor only the parent's attach used; nothing
        // in the child refers to it (the thread that owned it does not exist here).
        unsafe { libc::close(fd) };
    }
}

/// Opens `path` in the shared accounting directory with `flags` (plus `O_CLOEXEC` and
/// `O_NOFOLLOW`), creating it (mode 0666 less the umask) when it is missing, but never with
/// `O_CREAT` on a file that exists: the plugin makes the directory world-writable and sticky
/// (01777), where the kernel's `fs.protected_regular` (1 under systemd, 2 on Ubuntu) refuses an
/// `O_CREAT` open of a file another user owns, root included; the second user of an account
/// would be refused it.
fn open_shared(path: &Path, flags: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte"))?;
    let flags = flags | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    let mut last = std::io::Error::from_raw_os_error(libc::ENOENT);
    // A file removed between the two opens, or created by another process between them, sends
    // the loop round again; a few rounds settle any real race.
    for _ in 0..4 {
        // SAFETY: c is NUL-terminated; open has no other precondition.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: fd was just opened and is owned by nothing else.
            return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        last = std::io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::ENOENT) {
            return Err(last);
        }
        // SAFETY: as above; the mode is passed as the variadic unsigned int open expects.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                flags | libc::O_CREAT | libc::O_EXCL,
                0o666 as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: as above.
            return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        }
        last = std::io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EEXIST) {
            return Err(last);
        }
    }
    Err(last)
}

/// Opens (creating) the slot lock file beside the accounting file `path`, for reading: its
/// descriptor stays open for the life of the process (closing any descriptor of it would drop
/// the process's locks), and closes at `exec`, which ends the slot as the process image ends.
fn open_slot_locks(path: &Path) -> Result<i32, String> {
    let mut name = path.as_os_str().to_owned();
    name.push(layout::SLOT_LOCK_SUFFIX);
    let name = std::path::PathBuf::from(name);
    // O_NONBLOCK: a FIFO put in the file's place must not make the open wait for a writer (it
    // is refused just below).
    let fd = open_shared(&name, libc::O_RDONLY | libc::O_NONBLOCK)
        .map_err(|e| format!("cannot open slot lock file {}: {e}", name.display()))?;
    let file = File::from(fd);
    let plain = file.metadata().ok().filter(|m| m.is_file());
    let Some(meta) = plain else {
        return Err(format!(
            "slot lock file {} is not a plain file",
            name.display()
        ));
    };
    // Readable by every user of the account whatever the creator's umask: a process that cannot
    // open it has its slot judged by pid, which another container's process namespace cannot
    // see. Changed only by its owner.
    // SAFETY: geteuid has no preconditions.
    if meta.uid() == unsafe { libc::geteuid() } {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    Ok(fd)
}

/// Opens (creating or rebuilding when invalid) the accounting file `name` in `dir` (one per
/// account: `vramslice-accounting.v1`, or one per GPU under per-GPU limits), maps it, reaps dead
/// processes' slots and claims one for (`pid`, `start`).
pub fn attach(
    dir: &Path,
    name: &str,
    limit: u64,
    uuid: &str,
    pid: u32,
    start: u64,
) -> Result<Ledger, String> {
    let path = dir.join(name);
    let file = File::from(
        open_shared(&path, libc::O_RDWR)
            .map_err(|e| format!("cannot open accounting file {}: {e}", path.display()))?,
    );
    // The directory is shared: a link or special file planted in place of the account is not
    // followed (O_NOFOLLOW) nor written (only a plain file with one name).
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot examine accounting file {}: {e}", path.display()))?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(format!(
            "accounting file {} is not a plain file with one name",
            path.display()
        ));
    }
    // Readable and writable by every user of the container whatever the creator's umask: an
    // entrypoint running as root often starts workers as another user, and they share the
    // account. Changed only by its owner (for anyone else it is already so, or not).
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() == euid {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
    }
    let lock = Locked::new(&file)?;
    let mut bytes = Vec::new();
    (&file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let len = match layout::parse(&bytes) {
        Ok(snap) => layout::file_len(snap.slot_count),
        Err(e) => {
            if !bytes.is_empty() {
                crate::log!("vramslice-guard: {}: {e}; rebuilding it", path.display());
            }
            // Rewritten in place, never shortened: other processes may have the file mapped, and
            // a mapping past the end of a file faults (SIGBUS) when touched.
            let image = layout::initial_image(limit, uuid, layout::DEFAULT_SLOT_COUNT);
            file.write_all_at(&image, 0)
                .map_err(|e| format!("cannot write accounting file {}: {e}", path.display()))?;
            image.len()
        }
    };
    // SAFETY: mapping `len` bytes of a file at least that long, shared and read-write; the
    // mapping is never unmapped, so the words live for the rest of the process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "cannot map {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: p is page aligned (so 8-byte aligned), valid for `len` bytes for 'static, and
    // AtomicU64 has the layout of u64; all access from here on is atomic.
    let words: &'static [AtomicU64] =
        unsafe { std::slice::from_raw_parts(p.cast::<AtomicU64>(), len / 8) };
    let mut ledger =
        Ledger::new(words).ok_or_else(|| format!("{}: inconsistent size", path.display()))?;
    match open_slot_locks(&path).and_then(|fd| {
        SlotLocks::new(fd)
            .ok_or_else(|| format!("cannot examine the slot lock file of {}", path.display()))
    }) {
        Ok(locks) => ledger = ledger.with_slot_locks(locks),
        Err(e) => crate::log!(
            "vramslice-guard: {e}; slots are judged by pid (processes of other containers sharing this account may be taken for dead)"
        ),
    }
    ledger.reap(super::liveness);
    if !ledger.reset_if_unowned()
        && let Some((old, new)) = ledger.revalidate(limit)
    {
        crate::log!(
            "vramslice-guard: {}: the container total said {old} bytes but the live processes' slots hold {new}; corrected",
            path.display()
        );
    }
    if ledger.claim(pid, start).is_none() {
        crate::log!(
            "vramslice-guard: every slot of {} is taken; this process is counted in the total only",
            path.display()
        );
    }
    drop(lock);
    Ok(ledger)
}
