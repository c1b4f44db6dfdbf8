//! Per-GPU limits: a small ordered map GPU UUID → bytes, written `<uuid>:<bytes>,<uuid>:<bytes>`
//! (the limit file's `limits=` value and `VRAMSLICE_VRAM_LIMITS`). The order is the writer's and
//! is kept: "the first GPU" means the first entry.

use std::fmt;

/// Longest GPU UUID accepted (`GPU-` + 36 characters is 40).
pub const GPU_UUID_MAX_LEN: usize = 64;

/// The limit of each GPU a container sees, by GPU UUID, in the order written. Never empty, no
/// UUID twice, every UUID a safe file-name component (letters, digits, `-`, `_`, `.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuLimits {
    entries: Vec<(String, u64)>,
}

/// Why a per-GPU limit list is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuLimitsError {
    /// No entry at all.
    #[error("no GPU entries (expected <uuid>:<bytes>,<uuid>:<bytes>,...)")]
    Empty,
    /// An entry without the `:` between UUID and bytes.
    #[error("entry {0:?} is not <uuid>:<bytes>")]
    BadEntry(String),
    /// A UUID that is empty, too long, or has a character other than letters, digits, `-`,
    /// `_` and `.`.
    #[error(
        "GPU UUID {0:?} is invalid: expected 1 to {GPU_UUID_MAX_LEN} letters, digits, '-', '_' or '.'"
    )]
    BadUuid(String),
    /// A byte count that cannot be read.
    #[error("GPU {uuid}: {value:?} is not a byte count ({reason})")]
    BadBytes {
        /// The entry's GPU.
        uuid: String,
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A UUID listed twice.
    #[error("GPU {0} is listed twice")]
    Duplicate(String),
}

fn valid_uuid(uuid: &str) -> bool {
    !uuid.is_empty()
        && uuid.len() <= GPU_UUID_MAX_LEN
        && uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A strict decimal byte count, as the limit file writes them.
pub(crate) fn decimal_bytes(value: &str) -> Result<u64, String> {
    if value.is_empty() {
        return Err("empty".into());
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number of bytes".into());
    }
    value
        .parse::<u64>()
        .map_err(|_| "larger than 2^64 - 1".into())
}

fn quantity_bytes(value: &str) -> Result<u64, String> {
    crate::parse_bytes(value).map_err(|e| e.to_string())
}

impl GpuLimits {
    /// Builds the list from (UUID, bytes) pairs, in order.
    ///
    /// # Errors
    /// [`GpuLimitsError`]: no entry, an invalid UUID, or a UUID twice.
    pub fn new<S: AsRef<str>>(
        entries: impl IntoIterator<Item = (S, u64)>,
    ) -> Result<GpuLimits, GpuLimitsError> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for (uuid, bytes) in entries {
            let uuid = uuid.as_ref();
            if !valid_uuid(uuid) {
                return Err(GpuLimitsError::BadUuid(uuid.to_owned()));
            }
            if out.iter().any(|(u, _)| u == uuid) {
                return Err(GpuLimitsError::Duplicate(uuid.to_owned()));
            }
            out.push((uuid.to_owned(), bytes));
        }
        if out.is_empty() {
            return Err(GpuLimitsError::Empty);
        }
        Ok(GpuLimits { entries: out })
    }

    /// Parses `<uuid>:<bytes>,...` with decimal byte counts (the limit file's `limits=` value).
    /// Blanks around entries, UUIDs and numbers are ignored. Never panics.
    ///
    /// # Errors
    /// [`GpuLimitsError`] naming the first problem.
    pub fn parse(text: &str) -> Result<GpuLimits, GpuLimitsError> {
        Self::parse_with(text, decimal_bytes)
    }

    /// Parses `<uuid>:<bytes>,...` where each byte count may also be a quantity such as `2Gi`
    /// (`VRAMSLICE_VRAM_LIMITS`, like `VRAMSLICE_VRAM_LIMIT_BYTES`). Never panics.
    ///
    /// # Errors
    /// [`GpuLimitsError`] naming the first problem.
    pub fn parse_env(text: &str) -> Result<GpuLimits, GpuLimitsError> {
        Self::parse_with(text, quantity_bytes)
    }

    fn parse_with(
        text: &str,
        bytes: fn(&str) -> Result<u64, String>,
    ) -> Result<GpuLimits, GpuLimitsError> {
        if text.trim().is_empty() {
            return Err(GpuLimitsError::Empty);
        }
        let mut pairs = Vec::new();
        for entry in text.split(',') {
            let (uuid, value) = entry
                .split_once(':')
                .ok_or_else(|| GpuLimitsError::BadEntry(entry.trim().to_owned()))?;
            let (uuid, value) = (uuid.trim(), value.trim());
            if !valid_uuid(uuid) {
                return Err(GpuLimitsError::BadUuid(uuid.to_owned()));
            }
            let n = bytes(value).map_err(|reason| GpuLimitsError::BadBytes {
                uuid: uuid.to_owned(),
                value: value.to_owned(),
                reason,
            })?;
            pairs.push((uuid, n));
        }
        GpuLimits::new(pairs)
    }

    /// The limit of GPU `uuid`, if listed.
    pub fn get(&self, uuid: &str) -> Option<u64> {
        self.entries
            .iter()
            .find_map(|(u, b)| (u == uuid).then_some(*b))
    }

    /// Whether GPU `uuid` is listed.
    pub fn contains(&self, uuid: &str) -> bool {
        self.get(uuid).is_some()
    }

    /// The entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, u64)> + '_ {
        self.entries.iter().map(|(u, b)| (u.as_str(), *b))
    }

    /// Number of GPUs listed (at least 1).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always `false` (a list has at least one entry); for symmetry with [`GpuLimits::len`].
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first GPU listed and its limit.
    pub fn first(&self) -> (&str, u64) {
        // `new` refuses an empty list.
        let (u, b) = &self.entries[0];
        (u.as_str(), *b)
    }

    /// Each entry's limit replaced by `f(uuid, limit)`.
    pub(crate) fn map(&self, mut f: impl FnMut(&str, u64) -> u64) -> GpuLimits {
        GpuLimits {
            entries: self
                .entries
                .iter()
                .map(|(u, b)| (u.clone(), f(u, *b)))
                .collect(),
        }
    }

    /// Only the entries `keep` accepts (in order); `None` when none is left.
    pub(crate) fn filter(&self, mut keep: impl FnMut(&str, u64) -> bool) -> Option<GpuLimits> {
        let entries: Vec<(String, u64)> = self
            .entries
            .iter()
            .filter(|(u, b)| keep(u, *b))
            .cloned()
            .collect();
        (!entries.is_empty()).then_some(GpuLimits { entries })
    }
}

impl fmt::Display for GpuLimits {
    /// `<uuid>:<bytes>,<uuid>:<bytes>` with decimal bytes: what [`GpuLimits::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (u, b)) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{u}:{b}")?;
        }
        Ok(())
    }
}
