//! Learned peaks, kept in memory and (when a directory is configured) on disk, shared by every
//! worker process that points at the same directory.
//!
//! One JSON file per job identity (see [`crate::profile_key`] for the name), e.g.
//! `dc1fd69a40726c97.json`:
//! `{"version":1,"key":"whisper","params":{"batch":"8"},"peak_bytes":3221225472}`.
//! A writer takes an exclusive lock on `<hash>.lock` beside it, re-reads the file, and only if its
//! peak is higher writes a uniquely named temporary file, fsyncs it, renames it over the profile
//! and fsyncs the directory. Readers take no lock: a rename is atomic, so they see the old or the
//! new file whole. A higher peak replaces a lower one, never the reverse.
//!
//! A raise after an out-of-memory error that struck while other jobs of the process ran is not
//! this job's alone to answer for (the others' allocations were in the same process): it is kept
//! in this process only, as a provisional peak ([`Profiles::raise_provisionally`]), until a
//! peak of the job is recorded, and is never written. Otherwise every neighbour's spike would
//! raise the victims' peaks on disk for good, and a busy server's reservations would only grow.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::profile_key::profile_file_name;

/// A profile directory that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Creating, locking, writing or renaming failed.
    #[error("profile directory {dir}: {what}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The stored form of one profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    /// Format version, 1.
    pub version: u32,
    /// The job key.
    pub key: String,
    /// The job parameters.
    pub params: BTreeMap<String, String>,
    /// Highest peak seen, in bytes.
    pub peak_bytes: u64,
}

/// Learned peaks: an in-memory map, backed by a directory when one is given.
#[derive(Debug)]
pub struct Profiles {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<Identity, u64>>,
    provisional: Mutex<HashMap<Identity, u64>>,
}

/// A job's identity in memory: its key and parameters themselves, not their hash (two
/// identities whose hashes collide must not share a peak).
type Identity = (String, BTreeMap<String, String>);

fn identity(key: &str, params: &BTreeMap<String, String>) -> Identity {
    (key.to_string(), params.clone())
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Profiles {
    /// Peaks kept in this process only.
    pub fn in_memory() -> Self {
        Self {
            dir: None,
            memory: Mutex::new(HashMap::new()),
            provisional: Mutex::new(HashMap::new()),
        }
    }

    /// Peaks persisted in `dir` (created if missing).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self, ProfileError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| ProfileError::Io {
            dir: dir.clone(),
            what: "create",
            source,
        })?;
        Ok(Self {
            dir: Some(dir),
            memory: Mutex::new(HashMap::new()),
            provisional: Mutex::new(HashMap::new()),
        })
    }

    /// The directory, if persisted.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn remember(&self, id: &Identity, peak: u64) -> u64 {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let slot = memory.entry(id.clone()).or_insert(0);
        *slot = (*slot).max(peak);
        *slot
    }

    /// The peak to reserve for `key` + `params`: the largest of this process's, the directory's
    /// and a provisional raise. A missing, unreadable or foreign file counts as unknown.
    pub fn peak(&self, key: &str, params: &BTreeMap<String, String>) -> Option<u64> {
        let id = identity(key, params);
        let provisional = self
            .provisional
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied();
        let recorded = self.recorded_peak(&id, key, params);
        recorded.max(provisional)
    }

    /// The recorded peak of `key` + `params` (this process's and the directory's), without a
    /// provisional raise.
    pub fn recorded(&self, key: &str, params: &BTreeMap<String, String>) -> Option<u64> {
        self.recorded_peak(&identity(key, params), key, params)
    }

    /// Raise the peak of `key` + `params` to `peak` in this process only, until a peak is next
    /// recorded for it ([`Profiles::record`]); returns the peak now reserved for it.
    pub fn raise_provisionally(
        &self,
        key: &str,
        params: &BTreeMap<String, String>,
        peak: u64,
    ) -> u64 {
        let id = identity(key, params);
        let mut provisional = self.provisional.lock().unwrap_or_else(|e| e.into_inner());
        let slot = provisional.entry(id).or_insert(0);
        *slot = (*slot).max(peak);
        let raised = *slot;
        drop(provisional);
        self.peak(key, params).unwrap_or(raised).max(raised)
    }

    fn recorded_peak(
        &self,
        id: &Identity,
        key: &str,
        params: &BTreeMap<String, String>,
    ) -> Option<u64> {
        let in_memory = self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied();
        let on_disk = self
            .dir
            .as_deref()
            .and_then(|dir| read_record(&dir.join(profile_file_name(key, params))))
            .filter(|r| r.key == key && &r.params == params)
            .map(|r| r.peak_bytes);
        match (in_memory, on_disk) {
            (Some(a), Some(b)) => Some(self.remember(id, a.max(b))),
            (a, b) => a.or(b),
        }
    }

    /// Record `peak` for `key` + `params` if it is higher than what is known, and end a
    /// provisional raise of it; returns the peak now stored.
    pub fn record(
        &self,
        key: &str,
        params: &BTreeMap<String, String>,
        peak: u64,
    ) -> Result<u64, ProfileError> {
        let id = identity(key, params);
        self.provisional
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let known = self.remember(&id, peak);
        let Some(dir) = self.dir.as_deref() else {
            return Ok(known);
        };
        let io = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| ProfileError::Io { dir, what, source }
        };
        let name = profile_file_name(key, params);
        let path = dir.join(&name);
        let lock_path = dir.join(format!("{}.lock", name.trim_end_matches(".json")));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open lock file"))?;
        lock.lock().map_err(io("lock"))?;
        let current = read_record(&path)
            .filter(|r| r.key == key && &r.params == params)
            .map(|r| r.peak_bytes);
        if let Some(current) = current
            && current >= known
        {
            return Ok(self.remember(&id, current));
        }
        let record = ProfileRecord {
            version: 1,
            key: key.to_string(),
            params: params.clone(),
            peak_bytes: known,
        };
        let body = serde_json::to_vec(&record).map_err(|e| ProfileError::Io {
            dir: dir.to_path_buf(),
            what: "encode",
            source: io::Error::other(e),
        })?;
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map_err(io("write"))?;
        drop(lock);
        Ok(known)
    }
}

/// Read and decode one profile file; `None` when missing, not a version-1 record, or holding
/// a peak of 0 (which would reserve nothing: no measured job takes no memory, so the file is
/// damaged or hand-made).
pub fn read_record(path: &Path) -> Option<ProfileRecord> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice::<ProfileRecord>(&bytes) {
        Ok(r) if r.version == 1 && r.peak_bytes > 0 => Some(r),
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "ignoring unreadable profile file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(batch: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("batch".to_string(), batch.to_string())])
    }

    #[test]
    fn higher_replaces_lower_never_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profiles::in_dir(dir.path()).unwrap();
        assert_eq!(p.peak("m", &params("8")), None);
        assert_eq!(p.record("m", &params("8"), 100).unwrap(), 100);
        assert_eq!(p.record("m", &params("8"), 50).unwrap(), 100);
        assert_eq!(p.record("m", &params("8"), 300).unwrap(), 300);
        assert_eq!(p.peak("m", &params("8")), Some(300));
        assert_eq!(p.peak("m", &params("16")), None);
        // A fresh process (fresh memory) reads it back from disk.
        let again = Profiles::in_dir(dir.path()).unwrap();
        assert_eq!(again.peak("m", &params("8")), Some(300));
        assert_eq!(again.record("m", &params("8"), 200).unwrap(), 300);
        let file = dir.path().join(profile_file_name("m", &params("8")));
        let rec = read_record(&file).unwrap();
        assert_eq!(rec.peak_bytes, 300);
        assert_eq!(rec.key, "m");
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn foreign_or_torn_files_read_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profiles::in_dir(dir.path()).unwrap();
        let file = dir.path().join(profile_file_name("m", &params("8")));
        fs::write(
            &file,
            b"{\"version\":1,\"key\":\"other\",\"params\":{},\"peak_bytes\":9}",
        )
        .unwrap();
        assert_eq!(p.peak("m", &params("8")), None);
        fs::write(&file, b"{\"version\":1,\"ke").unwrap();
        assert_eq!(p.peak("m", &params("8")), None);
        // A peak of 0 would reserve nothing: read as unknown too.
        fs::write(
            &file,
            b"{\"version\":1,\"key\":\"m\",\"params\":{\"batch\":\"8\"},\"peak_bytes\":0}",
        )
        .unwrap();
        assert_eq!(p.peak("m", &params("8")), None);
        // and a record replaces the junk
        assert_eq!(p.record("m", &params("8"), 7).unwrap(), 7);
        assert_eq!(read_record(&file).unwrap().peak_bytes, 7);
    }

    #[test]
    fn a_provisional_raise_is_never_written_and_ends_with_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profiles::in_dir(dir.path()).unwrap();
        assert_eq!(p.raise_provisionally("m", &params("8"), 40), 40);
        assert_eq!(p.peak("m", &params("8")), Some(40));
        assert!(
            Profiles::in_dir(dir.path())
                .unwrap()
                .peak("m", &params("8"))
                .is_none(),
            "another process (or this one restarted) does not see it"
        );
        p.record("m", &params("8"), 10).unwrap();
        assert_eq!(
            p.raise_provisionally("m", &params("8"), 5),
            10,
            "never lowers"
        );
        assert_eq!(p.raise_provisionally("m", &params("8"), 30), 30);
        assert_eq!(
            p.raise_provisionally("m", &params("8"), 20),
            30,
            "the highest raise"
        );
        // A recorded peak, even lower, replaces it: it was measured.
        assert_eq!(p.record("m", &params("8"), 12).unwrap(), 12);
        assert_eq!(p.peak("m", &params("8")), Some(12));
        assert_eq!(p.peak("m", &params("16")), None);
    }

    #[test]
    fn identities_are_told_apart_in_memory_by_themselves_not_their_hash() {
        // Two identities are one only when key and parameters are equal, whatever their
        // hashes: the in-memory maps are keyed by the identity (files check it when read).
        let p = Profiles::in_memory();
        p.record("m", &params("8"), 10 << 30).unwrap();
        assert_eq!(p.peak("m", &params("16")), None);
        assert_eq!(p.peak("m8", &BTreeMap::new()), None);
        assert_eq!(
            p.raise_provisionally("m", &params("16"), 1),
            1,
            "nor raises"
        );
        assert_eq!(p.peak("m", &params("8")), Some(10 << 30));
    }

    #[test]
    fn memory_only_profiles_still_learn() {
        let p = Profiles::in_memory();
        p.record("m", &BTreeMap::new(), 5).unwrap();
        p.record("m", &BTreeMap::new(), 3).unwrap();
        assert_eq!(p.peak("m", &BTreeMap::new()), Some(5));
        assert!(p.dir().is_none());
    }
}
