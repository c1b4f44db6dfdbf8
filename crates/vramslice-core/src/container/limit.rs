//! The container's memory limit: the text of the read-only limit file the device plugin writes
//! at Allocate, and the one rule that combines that file with the environment. The guard
//! (which enforces the limit) and the sidecar runtime (which admits jobs within it) both decide
//! their limit here, so they cannot disagree.
//!
//! A limit file holds either one limit for the container (`limit=<bytes>`, optionally
//! `gpu=<uuid>`) or a limit per GPU (`limits=<uuid>:<bytes>,<uuid>:<bytes>,...`, see
//! [`GpuLimits`]). The rule is [`resolve_limits`].
//!
//! Data enters as file texts already read ([`FileRead`]) and the environment's values
//! ([`LimitEnv`]); it leaves as [`ResolvedLimits`] and messages for the caller to print. No I/O
//! happens here.

mod gpus;
mod resolve;

pub use gpus::{GPU_UUID_MAX_LEN, GpuLimits, GpuLimitsError};
pub use resolve::{LimitEnv, Limits, ResolvedLimits, resolve_limits};

use std::path::PathBuf;

use crate::names::env;
use crate::node::allocation::{ACCOUNTING_CONTAINER_DIR, LIMIT_FILE_CONTAINER_PATH};

/// What the plugin's limit file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitFile {
    /// `limit=<bytes>` (and `gpu=<uuid>`): one limit for the whole container, whatever device.
    Single {
        /// The container's limit in bytes.
        limit_bytes: u64,
        /// The GPU the limit is on (empty when the file names none).
        gpu_uuid: String,
    },
    /// `limits=<uuid>:<bytes>,...`: a limit per GPU; a GPU not listed gets nothing.
    PerGpu(GpuLimits),
}

/// Why a limit file's text is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitFileError {
    /// Neither a `limit=` nor a `limits=` line.
    #[error("limit file has no \"limit=<bytes>\" or \"limits=<uuid>:<bytes>,...\" line")]
    MissingLimit,
    /// The limit is not a decimal byte count.
    #[error("limit file's limit {0:?} is not a decimal byte count")]
    BadLimit(String),
    /// The `limits=` value is not a valid per-GPU list.
    #[error("limit file's limits= value is invalid: {0}")]
    BadLimits(GpuLimitsError),
    /// Both forms in one file: `limits=` with `limit=` or `gpu=`.
    #[error(
        "limit file line {line} ({key}=) conflicts with its {other}= line: a limit file holds either limit= (with gpu=) or limits=, not both"
    )]
    Conflict {
        /// 1-based line number of the later of the two.
        line: usize,
        /// The later line's key.
        key: String,
        /// The earlier conflicting key.
        other: String,
    },
    /// A line that is not `key=value`, an unknown key, or a key given twice.
    #[error("limit file line {line} is invalid: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// Longer than any file the plugin writes.
    #[error("limit file is {0} bytes, longer than any the plugin writes")]
    TooLong(usize),
}

/// Largest limit file accepted (the plugin writes well under 200 bytes per GPU).
pub const LIMIT_FILE_MAX_BYTES: usize = 4096;

/// The text of a single-GPU allocation's limit file: `limit=<bytes>` and `gpu=<uuid>` lines.
pub fn limit_file_content(limit_bytes: u64, gpu_uuid: &str) -> String {
    format!("limit={limit_bytes}\ngpu={gpu_uuid}\n")
}

/// The text of a limit file giving each GPU its limit: `limits=<uuid>:<bytes>,...` on one line.
/// A single entry is written in the single-GPU form ([`limit_file_content`]), which readers of
/// the old form understand (one limit for the container and its one accounting file).
///
/// # Errors
/// [`GpuLimitsError`]: no entry, an invalid UUID, or a UUID twice.
pub fn limits_file_content<S: AsRef<str>>(limits: &[(S, u64)]) -> Result<String, GpuLimitsError> {
    let gpus = GpuLimits::new(limits.iter().map(|(u, b)| (u.as_ref(), *b)))?;
    Ok(gpu_limits_file_content(&gpus))
}

/// [`limits_file_content`] of an already valid list.
pub fn gpu_limits_file_content(gpus: &GpuLimits) -> String {
    if gpus.len() == 1 {
        let (uuid, bytes) = gpus.first();
        limit_file_content(bytes, uuid)
    } else {
        format!("limits={gpus}\n")
    }
}

/// Parses a limit file strictly: `key=value` lines, blank lines and `#` comments ignored. Keys:
/// `limit` (with an optional `gpu`), or `limits` alone; each at most once. Never panics.
///
/// # Errors
/// [`LimitFileError`] naming the first problem.
pub fn parse_limit_file(text: &str) -> Result<LimitFile, LimitFileError> {
    if text.len() > LIMIT_FILE_MAX_BYTES {
        return Err(LimitFileError::TooLong(text.len()));
    }
    let mut limit: Option<u64> = None;
    let mut gpu: Option<String> = None;
    let mut limits: Option<GpuLimits> = None;
    // The first single-form key seen, and whether `limits` came first.
    let mut single_key: Option<&'static str> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || LimitFileError::BadLine {
            line: i + 1,
            text: raw.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let key = key.trim();
        let conflict = |other: &str| LimitFileError::Conflict {
            line: i + 1,
            key: key.to_string(),
            other: other.to_string(),
        };
        match key {
            "limit" | "gpu" if limits.is_some() => return Err(conflict("limits")),
            "limits" if limits.is_none() => {
                if let Some(other) = single_key {
                    return Err(conflict(other));
                }
                limits = Some(GpuLimits::parse(value).map_err(LimitFileError::BadLimits)?);
            }
            "limit" if limit.is_none() => {
                let value = value.trim();
                limit = Some(
                    gpus::decimal_bytes(value)
                        .map_err(|_| LimitFileError::BadLimit(value.to_string()))?,
                );
                single_key.get_or_insert("limit");
            }
            "gpu" if gpu.is_none() => {
                gpu = Some(value.trim().to_string());
                single_key.get_or_insert("gpu");
            }
            _ => return Err(bad()),
        }
    }
    if let Some(gpus) = limits {
        return Ok(LimitFile::PerGpu(gpus));
    }
    Ok(LimitFile::Single {
        limit_bytes: limit.ok_or(LimitFileError::MissingLimit)?,
        gpu_uuid: gpu.unwrap_or_default(),
    })
}

/// What reading one limit file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRead {
    /// No such file (the normal case outside a vramslice container).
    Missing,
    /// The file's text.
    Text(String),
    /// It exists but cannot be read (the error's text).
    Error(String),
}

impl FileRead {
    /// The outcome of a read (`std::fs::read_to_string`): not found is [`FileRead::Missing`].
    pub fn from_io(read: std::io::Result<String>) -> FileRead {
        match read {
            Ok(text) => FileRead::Text(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileRead::Missing,
            Err(e) => FileRead::Error(e.to_string()),
        }
    }
}

/// The limit files to read: always [`LIMIT_FILE_CONTAINER_PATH`] (a process that renames or
/// clears `VRAMSLICE_LIMIT_FILE` cannot escape the file the plugin mounted there), plus the file
/// `VRAMSLICE_LIMIT_FILE` names (`env_limit_file`) when set and different.
pub fn limit_file_paths(env_limit_file: Option<&str>) -> Vec<String> {
    let mut paths = vec![LIMIT_FILE_CONTAINER_PATH.to_owned()];
    if let Some(p) =
        env_limit_file.filter(|p| !p.trim().is_empty() && !paths.iter().any(|q| q == p))
    {
        paths.push(p.to_owned());
    }
    paths
}

/// Where a container's processes share their account, as [`account_dir`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDir {
    /// The accounting directory; `None`: each process on its own.
    pub dir: Option<PathBuf>,
    /// The device plugin's limit file is there, so the account must be shared: without it the
    /// guard refuses every allocation rather than give each process the whole limit.
    pub required: bool,
    /// Why `VRAMSLICE_ACCOUNTING_DIR` was overruled, when it was.
    pub note: Option<String>,
}

/// The one rule for the accounting directory, from the limit files read (as for
/// [`resolve_limits`]) and `VRAMSLICE_ACCOUNTING_DIR` (`env_dir`). Under the device plugin's
/// limit file ([`LIMIT_FILE_CONTAINER_PATH`] exists, readable or not) the account is the
/// directory the plugin mounts beside it ([`ACCOUNTING_CONTAINER_DIR`]) whatever the variable
/// says: a process that clears or repoints it (a launcher starting workers with a clean
/// environment) still shares its container's account. Otherwise the variable decides.
pub fn account_dir(files: &[(String, FileRead)], env_dir: Option<&str>) -> AccountDir {
    let env_dir = env_dir.map(str::trim).filter(|d| !d.is_empty());
    let plugin_file = files
        .iter()
        .any(|(path, read)| path == LIMIT_FILE_CONTAINER_PATH && *read != FileRead::Missing);
    if !plugin_file {
        return AccountDir {
            dir: env_dir.map(PathBuf::from),
            required: false,
            note: None,
        };
    }
    AccountDir {
        dir: Some(PathBuf::from(ACCOUNTING_CONTAINER_DIR)),
        required: true,
        note: env_dir.filter(|d| *d != ACCOUNTING_CONTAINER_DIR).map(|other| {
            format!(
                "{}={other:?} is ignored under the limit file: the account is in {ACCOUNTING_CONTAINER_DIR}",
                env::ACCOUNTING_DIR
            )
        }),
    }
}

#[cfg(test)]
mod tests;
