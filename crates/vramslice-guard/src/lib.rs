//! `libvramslice_guard.so`: preloaded into a container's processes, it enforces the container's
//! VRAM limit at the CUDA driver API.
//!
//! Data enters through the limit file and the environment (`VRAMSLICE_VRAM_LIMIT_BYTES`,
//! `VRAMSLICE_VRAM_LIMITS`, `VRAMSLICE_ACCOUNTING_DIR`, `VRAMSLICE_REAL_LIBCUDA`, see [`config`])
//! and through every interposed driver call (sizes, handles, devices and their UUIDs); it leaves
//! as the real driver's results, `CUDA_ERROR_OUT_OF_MEMORY` for requests past a limit,
//! virtualised memory information per device, and the shared accounting files whose layout is
//! `vramslice_core::container::accounting` (read by the device plugin and the sidecar).
//!
//! Safe modules decide ([`config`], [`ledger`], [`tracker`], [`guard`], [`sizes`], [`device`]);
//! the one module `ffi` owns every raw pointer, exported symbol, `dlsym` lookup and `mmap`.
#![deny(unsafe_op_in_unsafe_fn)]

/// Writes one line to stderr, ignoring failure (`eprintln!` panics when stderr is closed, and
/// the guard must not fail a CUDA call because the program closed its stderr). The line goes
/// out with one `write(2)` on descriptor 2, not through `std::io::stderr()`, whose lock a
/// thread the process no longer has (after a `fork`) could be holding.
#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("{}\n", format_args!($($arg)*));
        $crate::write_stderr(line.as_bytes());
    }};
}

/// Writes `bytes` to descriptor 2 as one `write(2)` (retried where it was cut short), ignoring
/// failure.
#[doc(hidden)]
pub fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: bytes is a live slice of that many bytes; write only reads it.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        let Ok(n) = usize::try_from(n) else { return };
        if n == 0 {
            return;
        }
        bytes = &bytes[n.min(bytes.len())..];
    }
}

pub mod config;
pub mod device;
#[cfg(not(test))]
mod ffi;
mod file_lock;
pub mod guard;
pub mod ledger;
mod set_up;
pub mod sizes;
pub mod tracker;
