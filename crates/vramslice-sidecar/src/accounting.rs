//! Adapter from the guard's accounting file (layout and parser in
//! `vramslice_core::accounting`) to a [`UsageReading`]: the
//! container's reserved total is the live usage, the limit the guard recorded is the total.

use crate::usage::UsageReading;

/// Name of the accounting file inside `VRAMSLICE_ACCOUNTING_DIR`.
pub const FILE_NAME: &str = vramslice_core::accounting::ACCOUNTING_FILE_NAME;

/// Decode the accounting file's bytes.
pub fn reading(bytes: &[u8]) -> Result<UsageReading, String> {
    let snapshot = vramslice_core::accounting::parse(bytes).map_err(|e| e.to_string())?;
    Ok(UsageReading {
        used: snapshot.used_bytes,
        total: (snapshot.limit_bytes > 0).then_some(snapshot.limit_bytes),
        peak: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{AccountingFile, UsageSource};
    use vramslice_core::accounting::{header, initial_image};

    #[test]
    fn reads_used_and_limit_from_the_guard_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = AccountingFile::in_dir(dir.path());
        // No file yet: nothing allocated.
        assert_eq!(source.read().unwrap(), UsageReading::default());
        let mut image = initial_image(4 << 30, "GPU-1234", 4);
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&(3u64 << 29).to_le_bytes());
        std::fs::write(dir.path().join(FILE_NAME), &image).unwrap();
        let r = source.read().unwrap();
        assert_eq!(r.used, 3 << 29);
        assert_eq!(r.total, Some(4 << 30));
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not an accounting file").unwrap();
        let err = AccountingFile::in_dir(dir.path()).read().unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
