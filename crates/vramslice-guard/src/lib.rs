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
/// the guard must not fail a CUDA call because the program closed its stderr).
#[macro_export]
#[doc(hidden)]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod config;
pub mod device;
#[cfg(not(test))]
mod ffi;
pub mod guard;
pub mod ledger;
mod set_up;
pub mod sizes;
pub mod tracker;
