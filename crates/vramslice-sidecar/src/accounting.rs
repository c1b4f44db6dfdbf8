//! Adapter from the guard's accounting file format (`vramslice_core::accounting`) to a
//! [`UsageReading`](crate::usage::UsageReading).

use crate::usage::UsageReading;

/// Name of the accounting file inside `VRAMSLICE_ACCOUNTING_DIR`.
pub const FILE_NAME: &str = "usage";

/// Decode the accounting file's bytes.
pub fn reading(_bytes: &[u8]) -> Result<UsageReading, String> {
    Err("the accounting file parser (vramslice_core::accounting) is not available yet".to_string())
}
