//! The guard's accounting file as a usage source (layout and parser in
//! `vramslice_core::container::accounting`): the container's reserved total is the live usage, the limit
//! the guard recorded is the total, and this process's slot is its own usage.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vramslice_core::container::accounting::{AccountingError, parse_proc_stat};

use super::{UsageError, UsageReading, UsageSource};

/// Name of the accounting file inside `VRAMSLICE_ACCOUNTING_DIR`.
pub const FILE_NAME: &str = vramslice_core::container::accounting::ACCOUNTING_FILE_NAME;

/// This process as the guard records it in a slot: its pid and its start time (clock ticks
/// since boot, field 22 of `/proc/self/stat`; `None` when it cannot be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The pid.
    pub pid: u32,
    /// The start time.
    pub start_time: Option<u64>,
}

impl ProcessIdentity {
    /// This process.
    pub fn current() -> Self {
        let start_time = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| parse_proc_stat(&stat))
            .map(|(start, _)| start);
        ProcessIdentity {
            pid: std::process::id(),
            start_time,
        }
    }

    /// Whether a slot is this process's: its pid, and its start time when both are known (a
    /// dead process's slot with the same pid, not yet reaped, is not).
    fn owns(&self, slot: &vramslice_core::container::accounting::SlotSnapshot) -> bool {
        slot.pid == self.pid
            && !slot.reaping
            && match (self.start_time, slot.start_time) {
                (Some(mine), recorded) if recorded != 0 => mine == recorded,
                _ => true,
            }
    }
}

/// Decode the accounting file's bytes as process `me` reads them (its own usage is what its
/// slots hold: 0 before it has one, since the guard claims a slot at the process's first CUDA
/// call).
pub fn reading(bytes: &[u8], me: ProcessIdentity) -> Result<UsageReading, AccountingError> {
    reading_and_high_water(bytes, me).map(|(reading, _)| reading)
}

/// [`reading`], and the high-water mark of this process's slots (the most each held since it
/// was claimed, summed): it only ever rises while the process lives.
fn reading_and_high_water(
    bytes: &[u8],
    me: ProcessIdentity,
) -> Result<(UsageReading, u64), AccountingError> {
    let snapshot = vramslice_core::container::accounting::parse(bytes)?;
    let (own, high_water) = snapshot
        .slots
        .iter()
        .filter(|s| me.owns(s))
        .fold((0u64, 0u64), |(own, high), s| {
            (own.saturating_add(s.bytes), high.saturating_add(s.peak))
        });
    let reading = UsageReading {
        used: snapshot.used_bytes,
        total: (snapshot.limit_bytes > 0).then_some(snapshot.limit_bytes),
        peak: None,
        own: Some(own),
        own_peak: None,
    };
    Ok((reading, high_water))
}

/// How often a file caught half-written is read again before it is an error.
const PARTIAL_READ_TRIES: u32 = 3;

/// The guard's per-container accounting file in `VRAMSLICE_ACCOUNTING_DIR`, read through the
/// parser in `vramslice_core::container::accounting`. A directory with no file yet (nothing allocated so
/// far) reads as zero.
#[derive(Debug, Clone)]
pub struct AccountingFile {
    path: PathBuf,
    me: ProcessIdentity,
    /// The highest high-water mark of this process any read saw: when a read finds it higher,
    /// this process held that much since.
    high_water: Arc<AtomicU64>,
}

impl AccountingFile {
    /// The accounting file inside `dir` (one limit for the container).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
            me: ProcessIdentity::current(),
            high_water: Arc::default(),
        }
    }

    /// The accounting file of GPU `gpu` inside `dir` under per-GPU limits (one file per GPU);
    /// with no GPU, the container's one file ([`AccountingFile::in_dir`]).
    pub fn in_dir_for(dir: &Path, gpu: Option<&str>) -> Self {
        match gpu {
            Some(uuid) => Self {
                path: dir
                    .join(vramslice_core::container::accounting::gpu_accounting_file_name(uuid)),
                me: ProcessIdentity::current(),
                high_water: Arc::default(),
            },
            None => Self::in_dir(dir),
        }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl UsageSource for AccountingFile {
    /// A file that does not exist yet, or is still empty (the guard creates it, then writes
    /// it), reads as zero, this process's share too: nothing can be counted before it is
    /// written. One caught half-written
    /// (the guard writing or rebuilding it) is read again, briefly, before it is an error.
    fn read(&self) -> Result<UsageReading, UsageError> {
        let mut tries = 0;
        loop {
            let nothing = UsageReading {
                own: Some(0),
                ..UsageReading::default()
            };
            let bytes = match std::fs::read(&self.path) {
                Ok(b) if b.is_empty() => return Ok(nothing),
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(nothing),
                Err(source) => {
                    return Err(UsageError::AccountingRead {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
            // A forked child reads as itself.
            let me = if self.me.pid == std::process::id() {
                self.me
            } else {
                ProcessIdentity::current()
            };
            match reading_and_high_water(&bytes, me) {
                Err(AccountingError::TooShort { .. } | AccountingError::Truncated { .. })
                    if tries + 1 < PARTIAL_READ_TRIES =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Ok((mut reading, high_water)) => {
                    // Risen above what any read saw: this process held that much since
                    // (an allocation made and freed between two samples). The highest seen is
                    // kept (reads race from several threads: an older one must not lower it,
                    // or the next would take the lifetime mark for a new rise).
                    let before = self.high_water.fetch_max(high_water, Ordering::Relaxed);
                    reading.own_peak = (high_water > before).then_some(high_water);
                    return Ok(reading);
                }
                Err(source) => {
                    return Err(UsageError::AccountingContent {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_core::container::accounting::{header, initial_image};

    #[test]
    fn reads_used_and_limit_from_the_guard_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = AccountingFile::in_dir(dir.path());
        // No file yet: nothing allocated, by anyone.
        let nothing = UsageReading {
            own: Some(0),
            ..UsageReading::default()
        };
        assert_eq!(source.read().unwrap(), nothing);
        let mut image = initial_image(4 << 30, "GPU-1234", 4);
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&(3u64 << 29).to_le_bytes());
        std::fs::write(dir.path().join(FILE_NAME), &image).unwrap();
        let r = source.read().unwrap();
        assert_eq!(r.used, 3 << 29);
        assert_eq!(r.total, Some(4 << 30));
    }

    #[test]
    fn per_gpu_limits_read_their_gpus_file() {
        let dir = tempfile::tempdir().unwrap();
        let name = vramslice_core::container::accounting::gpu_accounting_file_name("GPU-b");
        let mut image = initial_image(2 << 30, "GPU-b", 4);
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        std::fs::write(dir.path().join(&name), &image).unwrap();
        std::fs::write(dir.path().join(FILE_NAME), initial_image(9 << 30, "", 4)).unwrap();
        let source = AccountingFile::in_dir_for(dir.path(), Some("GPU-b"));
        assert_eq!(source.path(), dir.path().join(&name));
        let r = source.read().unwrap();
        assert_eq!((r.used, r.total), (1 << 30, Some(2 << 30)));
        assert_eq!(
            AccountingFile::in_dir_for(dir.path(), None).path(),
            dir.path().join(FILE_NAME)
        );
    }

    #[test]
    fn own_usage_is_what_this_processs_slots_hold() {
        use vramslice_core::container::accounting::{slot, slot_word};
        let mut image = initial_image(4 << 30, "GPU-1", 4);
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&(3u64 << 30).to_le_bytes());
        let pid = |pid| ProcessIdentity {
            pid,
            start_time: None,
        };
        assert_eq!(
            reading(&image, pid(42)).unwrap().own,
            Some(0),
            "no slot yet: nothing"
        );
        let mut put = |index: usize, pid: u64, bytes: u64| {
            for (field, value) in [(slot::PID, pid), (slot::BYTES, bytes)] {
                let at = slot_word(index, field) * 8;
                image[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
        };
        put(0, 42, 1 << 30);
        put(1, 7, 2 << 30);
        let r = reading(&image, pid(42)).unwrap();
        assert_eq!((r.used, r.own), (3 << 30, Some(1 << 30)));
        assert_eq!(reading(&image, pid(7)).unwrap().own, Some(2 << 30));
        // A dead process's slot with this pid (another start time, not reaped yet) is not ours.
        let at = slot_word(0, slot::START_TIME) * 8;
        image[at..at + 8].copy_from_slice(&1234u64.to_le_bytes());
        let me = |start| ProcessIdentity {
            pid: 42,
            start_time: Some(start),
        };
        assert_eq!(reading(&image, me(999)).unwrap().own, Some(0));
        assert_eq!(reading(&image, me(1234)).unwrap().own, Some(1 << 30));
    }

    /// Writes this process's slot (index 0) into the accounting file in `dir`: `bytes` held
    /// now, `peak` the most held since it was claimed.
    pub(crate) fn write_own_slot(dir: &Path, bytes: u64, peak: u64) {
        use vramslice_core::container::accounting::{slot, slot_word};
        let me = ProcessIdentity::current();
        let mut image = initial_image(4 << 30, "GPU-1", 4);
        for (field, value) in [
            (slot::PID, u64::from(me.pid)),
            (slot::START_TIME, me.start_time.unwrap_or(0)),
            (slot::BYTES, bytes),
            (slot::PEAK, peak),
        ] {
            let at = slot_word(0, field) * 8;
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&bytes.to_le_bytes());
        std::fs::write(dir.join(FILE_NAME), &image).unwrap();
    }

    /// The guard keeps each process's high-water mark: when it rose between two reads, the
    /// process held that much in between, though it holds less at both.
    #[test]
    fn a_rise_of_the_guards_high_water_mark_is_a_peak_between_reads() {
        let dir = tempfile::tempdir().unwrap();
        let source = AccountingFile::in_dir(dir.path());
        write_own_slot(dir.path(), 1 << 30, 1 << 30);
        let r = source.read().unwrap();
        assert_eq!((r.own, r.own_peak), (Some(1 << 30), Some(1 << 30)));
        assert_eq!(source.read().unwrap().own_peak, None, "no rise: no peak");
        // 3 GiB allocated and freed between two reads.
        write_own_slot(dir.path(), 1 << 30, 4 << 30);
        let r = source.read().unwrap();
        assert_eq!((r.own, r.own_peak), (Some(1 << 30), Some(4 << 30)));
        assert_eq!(source.read().unwrap().own_peak, None);
    }

    #[test]
    fn this_process_knows_its_start_time() {
        let me = ProcessIdentity::current();
        assert_eq!(me.pid, std::process::id());
        assert!(me.start_time.is_some_and(|t| t > 0));
    }

    #[test]
    fn a_file_the_guard_is_still_creating_reads_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"").unwrap();
        let source = AccountingFile::in_dir(dir.path());
        assert_eq!(source.read().unwrap().used, 0);
        // Half a header stays an error once the reads again find it so.
        std::fs::write(dir.path().join(FILE_NAME), [0u8; 12]).unwrap();
        let err = source.read().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not an accounting file").unwrap();
        let err = AccountingFile::in_dir(dir.path()).read().unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
