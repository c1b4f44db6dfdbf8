//! The container's memory limit: the text of the read-only limit file the device plugin writes
//! at Allocate, and the one rule that combines that file with the environment. The guard
//! (which enforces the limit) and the sidecar runtime (which admits jobs within it) both decide
//! their limit here, so they cannot disagree.
//!
//! Data enters as file texts already read ([`FileRead`]) and the environment's value; it leaves
//! as a [`ResolvedLimit`] and messages for the caller to print. No I/O happens here.

use crate::names::env;
use crate::node::allocation::LIMIT_FILE_CONTAINER_PATH;

/// What the plugin's limit file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitFile {
    /// The container's limit in bytes.
    pub limit_bytes: u64,
    /// The GPU the limit is on.
    pub gpu_uuid: String,
}

/// Why a limit file's text is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitFileError {
    /// No `limit=` line.
    #[error("limit file has no \"limit=<bytes>\" line")]
    MissingLimit,
    /// The limit is not a decimal byte count.
    #[error("limit file's limit {0:?} is not a decimal byte count")]
    BadLimit(String),
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

/// Largest limit file accepted (the plugin writes well under 200 bytes).
pub const LIMIT_FILE_MAX_BYTES: usize = 4096;

/// The text of an allocation's limit file: `limit=<bytes>` and `gpu=<uuid>` lines.
pub fn limit_file_content(limit_bytes: u64, gpu_uuid: &str) -> String {
    format!("limit={limit_bytes}\ngpu={gpu_uuid}\n")
}

/// Parses a limit file strictly: `key=value` lines (`limit` required, `gpu` optional, each at
/// most once), blank lines and `#` comments ignored. Never panics.
///
/// # Errors
/// [`LimitFileError`] naming the first problem.
pub fn parse_limit_file(text: &str) -> Result<LimitFile, LimitFileError> {
    if text.len() > LIMIT_FILE_MAX_BYTES {
        return Err(LimitFileError::TooLong(text.len()));
    }
    let mut limit: Option<u64> = None;
    let mut gpu: Option<String> = None;
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
        match key.trim() {
            "limit" if limit.is_none() => {
                let value = value.trim();
                let parsed = if value.bytes().all(|b| b.is_ascii_digit()) {
                    value.parse::<u64>().ok()
                } else {
                    None
                };
                limit = Some(parsed.ok_or_else(|| LimitFileError::BadLimit(value.to_string()))?);
            }
            "gpu" if gpu.is_none() => gpu = Some(value.trim().to_string()),
            _ => return Err(bad()),
        }
    }
    Ok(LimitFile {
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

/// Where the limit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLimit {
    /// The limit; `None` = no limit (pass-through).
    pub limit: Option<u64>,
    /// GPU UUID a valid limit file named (empty when none did).
    pub file_gpu_uuid: String,
}

/// The one rule deciding the limit, from the environment's `VRAMSLICE_VRAM_LIMIT_BYTES` and each
/// limit file read (path, outcome). Messages for the caller to print go to `msgs`.
///
/// - Each limit file that exists must parse: its limit counts; one that cannot be read or
///   parsed fails closed (counts as limit 0, with a message). Missing files do not count.
/// - With at least one file counted, the limit is the smallest file limit, lowered further by a
///   valid environment limit; an environment limit above it is ignored (with a message).
/// - With no file, the environment alone decides: unset or empty = no limit, malformed = no
///   limit with a message.
pub fn resolve_limit(
    env_limit: Option<&str>,
    files: &[(String, FileRead)],
    msgs: &mut Vec<String>,
) -> ResolvedLimit {
    let mut file_limit: Option<u64> = None;
    let mut file_gpu_uuid = String::new();
    for (path, read) in files {
        let this = match read {
            FileRead::Missing => continue,
            FileRead::Error(e) => {
                msgs.push(format!(
                    "limit file {path} cannot be read ({e}); failing closed: every allocation is refused"
                ));
                0
            }
            FileRead::Text(text) => match parse_limit_file(text) {
                Ok(parsed) => {
                    if file_gpu_uuid.is_empty() {
                        file_gpu_uuid = parsed.gpu_uuid;
                    }
                    parsed.limit_bytes
                }
                Err(e) => {
                    msgs.push(format!(
                        "limit file {path}: {e}; failing closed: every allocation is refused"
                    ));
                    0
                }
            },
        };
        file_limit = Some(file_limit.map_or(this, |l| l.min(this)));
    }
    let name = env::VRAM_LIMIT_BYTES;
    let env = match env_limit {
        None => None,
        Some(v) if v.trim().is_empty() => None,
        Some(v) => Some(
            crate::parse_bytes(v.trim()).map_err(|e| format!("{name}={v:?} is malformed: {e}")),
        ),
    };
    let limit = match (file_limit, env) {
        (None, None) => None,
        (None, Some(Ok(bytes))) => Some(bytes),
        (None, Some(Err(e))) => {
            msgs.push(format!("{e}; the limit is NOT enforced (pass-through)"));
            None
        }
        (Some(file), None) => Some(file),
        (Some(file), Some(Ok(bytes))) => {
            if bytes > file {
                msgs.push(format!(
                    "{name}={bytes} is above the limit file's {file} bytes and is ignored (the environment can only lower the limit)"
                ));
            }
            Some(file.min(bytes))
        }
        (Some(file), Some(Err(e))) => {
            msgs.push(format!("{e}; using the limit file's {file} bytes"));
            Some(file)
        }
    };
    ResolvedLimit {
        limit,
        file_gpu_uuid,
    }
}

#[cfg(test)]
mod tests;
