//! Prepared claims, kept in a checkpoint file so that a restarted plugin answers the kubelet's
//! repeated NodePrepareResources with the same devices and still knows what to unprepare.
//! Written whole to a temporary file, synced and renamed over the old one: a crash leaves the
//! old or the new checkpoint, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The checkpoint format's version.
pub const VERSION: u32 = 1;

/// One prepared device as the kubelet was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    /// The claim's requests it satisfies.
    pub request_names: Vec<String>,
    /// Pool (this node).
    pub pool: String,
    /// Device name in the slice.
    pub device: String,
    /// CDI device IDs to inject.
    pub cdi_device_ids: Vec<String>,
    /// Share ID of the allocation, when the device allows several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

/// One prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedClaim {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// GPU UUID → bytes granted, in the order the containers see the GPUs.
    pub limits: Vec<(String, u64)>,
    /// The pods the claim was reserved for when prepared.
    #[serde(default)]
    pub pods: Vec<PreparedPod>,
    /// Allocated with admin access (not counted by kube-scheduler; see
    /// [`vramslice_core::node::dra::ClaimUse::admin_access`]). A claim mixing admin and plain
    /// results counts as admin: its grant is not added back, the safe direction. `None` in
    /// checkpoints of earlier versions, until [`crate::driver::Driver::learn_admin_access`]
    /// reads the claim again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_access: Option<bool>,
    /// What the kubelet was told.
    pub devices: Vec<PreparedDevice>,
    /// The files written for it (removed at unprepare).
    pub files: PreparedFiles,
    /// The CDI spec as written, so that a restarted plugin writes it again when a reboot emptied
    /// the CDI directory (a tmpfs). Absent in checkpoints of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi_spec_text: Option<String>,
    /// The limit file as written, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_file_text: Option<String>,
}

/// A pod a claim is reserved for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedPod {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// Host files of a prepared claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedFiles {
    /// The CDI spec.
    pub cdi_spec: PathBuf,
    /// The read-only limit file.
    pub limit_file: PathBuf,
    /// The accounting directory.
    pub accounting_dir: PathBuf,
}

/// Every claim prepared on this node, by claim UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// Claim UID → claim.
    pub claims: BTreeMap<String, PreparedClaim>,
}

/// Why the checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a checkpoint this version understands.
    #[error("checkpoint {path} is unreadable: {detail}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

impl Checkpoint {
    /// An empty checkpoint of the current version.
    pub fn new() -> Self {
        Checkpoint {
            version: VERSION,
            claims: BTreeMap::new(),
        }
    }

    /// Load the checkpoint at `path`; a missing file is an empty checkpoint.
    ///
    /// # Errors
    /// [`CheckpointError`] when the file cannot be read or is not a valid checkpoint.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::new()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let invalid = |detail: String| CheckpointError::Invalid {
            path: path.display().to_string(),
            detail,
        };
        let checkpoint: Checkpoint =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if checkpoint.version != VERSION {
            return Err(invalid(format!(
                "version {} (this plugin reads version {VERSION})",
                checkpoint.version
            )));
        }
        Ok(checkpoint)
    }

    /// Write the checkpoint to `path` atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// [`CheckpointError::Io`] when any step fails; the previous checkpoint is then intact.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| CheckpointError::Invalid {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        write_atomically(path, &text).map_err(io)
    }
}

/// Write `bytes` to `path` through a synced temporary file renamed over it. The temporary file
/// is this call's own (the kubelet prepares a claim shared by two starting pods in two
/// concurrent calls, which write the same files), and is removed if the write fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    // The rename is durable only once the directory is: without this a power loss can bring
    // back the previous checkpoint. The file itself is in place already, so a directory that
    // cannot be synced (some filesystems refuse) is logged, not an error.
    if let Some(dir) = path.parent()
        && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
    {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot sync the directory after a rename");
    }
    Ok(())
}

/// The file `name` is a temporary of [`write_atomically`] for: `<base>.tmp.<pid>.<n>` gives
/// `<base>`. A crash between creating and renaming one leaves it behind.
pub fn leftover_temporary_base(name: &str) -> Option<&str> {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let (rest, n) = name.rsplit_once('.')?;
    let (rest, pid) = rest.rsplit_once('.')?;
    let base = rest.strip_suffix(".tmp")?;
    (digits(n) && digits(pid) && !base.is_empty()).then_some(base)
}

/// Delete the temporaries [`write_atomically`] left in `dir` for files whose name `ours`
/// accepts; to be called before this process writes there, since any such file then belongs
/// to an earlier process (in a container, the same pid is likely). Returns how many were
/// deleted; a directory that does not exist has none.
///
/// # Errors
/// Listing the directory or deleting a leftover failed.
pub fn sweep_leftover_temporaries(
    dir: &Path,
    ours: impl Fn(&str) -> bool,
) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut deleted = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if leftover_temporary_base(name).is_some_and(&ours) && entry.file_type()?.is_file() {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_temporaries_are_recognised_by_their_whole_suffix() {
        assert_eq!(
            leftover_temporary_base("vramslice.io-ab.json.tmp.17.3"),
            Some("vramslice.io-ab.json")
        );
        assert_eq!(leftover_temporary_base("x.limit.tmp.1.0"), Some("x.limit"));
        for name in [
            "vramslice.io-ab.json",
            "x.limit.tmp",
            "x.tmp.17",
            "x.tmp.17.",
            "x.tmp..3",
            "x.tmp.1a.3",
            "x.tmpx.1.3",
            ".tmp.1.2",
            "x.tmp.1.2.3",
        ] {
            assert_eq!(leftover_temporary_base(name), None, "{name}");
        }
    }

    #[test]
    fn sweeping_deletes_only_our_leftover_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "vramslice.io-a.json",
            "vramslice.io-a.json.tmp.1.0",
            "vramslice.io-b.json.tmp.88.12",
            "other-vendor.json.tmp.1.0",
            "vramslice.io-c.json.tmp",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("vramslice.io-d.json.tmp.2.2")).unwrap();
        let ours = |base: &str| base.starts_with("vramslice.io-");
        assert_eq!(sweep_leftover_temporaries(dir.path(), ours).unwrap(), 2);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "other-vendor.json.tmp.1.0",
                "vramslice.io-a.json",
                "vramslice.io-c.json.tmp",
                "vramslice.io-d.json.tmp.2.2",
            ]
        );
        assert_eq!(
            sweep_leftover_temporaries(&dir.path().join("absent"), ours).unwrap(),
            0
        );
    }

    #[test]
    fn concurrent_writers_of_one_file_all_succeed_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::thread::scope(|scope| {
            for writer in 0..8u8 {
                let path = &path;
                scope.spawn(move || {
                    for _ in 0..100 {
                        write_atomically(path, &[writer; 64]).unwrap();
                    }
                });
            }
        });
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["spec.json"]);
        assert_eq!(std::fs::read(&path).unwrap().len(), 64);
    }

    fn claim() -> PreparedClaim {
        PreparedClaim {
            namespace: "ml".into(),
            name: "llm".into(),
            limits: vec![("GPU-0".into(), 6 << 30)],
            admin_access: Some(false),
            pods: vec![PreparedPod {
                name: "llm-0".into(),
                uid: "pod-1".into(),
            }],
            devices: vec![PreparedDevice {
                request_names: vec!["vram".into()],
                pool: "node-a".into(),
                device: "gpu-0".into(),
                cdi_device_ids: vec!["vramslice.io/claim=uid-1".into()],
                share_id: Some("s-1".into()),
            }],
            files: PreparedFiles {
                cdi_spec: "/var/run/cdi/vramslice.io-claim-uid-1.json".into(),
                limit_file: "/var/lib/vramslice/accounting/claim-uid-1.limit".into(),
                accounting_dir: "/var/lib/vramslice/accounting/claim-uid-1".into(),
            },
            cdi_spec_text: None,
            limit_file_text: None,
        }
    }

    #[test]
    fn a_saved_checkpoint_loads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/checkpoint.json");
        assert_eq!(
            Checkpoint::load(&path).expect("missing is empty"),
            Checkpoint::new()
        );
        let mut checkpoint = Checkpoint::new();
        checkpoint.claims.insert("uid-1".into(), claim());
        checkpoint.save(&path).expect("saved");
        assert_eq!(Checkpoint::load(&path).expect("loaded"), checkpoint);
        assert!(!dir.path().join("state/checkpoint.json.tmp").exists());
    }

    #[test]
    fn a_damaged_or_foreign_checkpoint_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, "{\"version\": 1, \"claims\": {\"x\": 3").expect("write");
        let err = Checkpoint::load(&path).expect_err("truncated");
        assert!(
            err.to_string().contains("checkpoint.json is unreadable"),
            "{err}"
        );
        std::fs::write(&path, "{\"version\": 9, \"claims\": {}}").expect("write");
        let err = Checkpoint::load(&path).expect_err("version");
        assert!(
            err.to_string()
                .contains("version 9 (this plugin reads version 1)"),
            "{err}"
        );
    }
}
