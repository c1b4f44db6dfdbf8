//! Everything that touches raw pointers, C symbols, `mmap` and `fork`: the exported CUDA and
//! NVML entry points, the `dlsym`/`cuGetProcAddress` interposition, the real driver's table and
//! the accounting file's mapping. Each export turns its arguments into plain numbers, asks the
//! safe [`crate::guard::Guard`] what to do, and calls the real driver; each runs inside
//! [`boundary`], so a panic becomes a CUDA error code and never unwinds into C.

mod alloc;
mod context;
mod real;
mod resolve;
mod shm;
pub mod types;

use crate::config::{Config, read_limit_file};
use crate::guard::Guard;
use crate::ledger::{Ledger, Liveness, parse_proc_stat, private_words};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use types::*;

static CONFIG: OnceLock<Config> = OnceLock::new();
static GUARD: OnceLock<Option<Guard>> = OnceLock::new();

/// The settings, read from the environment once (messages printed once).
pub fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let (config, msgs) = Config::from_lookup(|k| std::env::var(k).ok(), read_limit_file);
        for m in msgs {
            crate::log!("vramslice-guard: {m}");
        }
        config
    })
}

/// The guard, or `None` in pass-through mode (no limit).
#[inline]
pub fn guard() -> Option<&'static Guard> {
    GUARD.get_or_init(init_guard).as_ref()
}

fn init_guard() -> Option<Guard> {
    let cfg = config();
    let limit = cfg.limit?;
    let (pid, start) = own_identity();
    let ledger = match &cfg.accounting_dir {
        Some(dir) => match shm::attach(dir, limit, &cfg.gpu_uuid, pid, start) {
            Ok(ledger) => ledger,
            Err(e) => {
                crate::log!(
                    "vramslice-guard: {e}; per-process accounting only (other processes of the container are not counted)"
                );
                private_ledger(limit, &cfg.gpu_uuid, pid, start)?
            }
        },
        None => {
            crate::log!(
                "vramslice-guard: VRAMSLICE_ACCOUNTING_DIR is not set: per-process accounting only (limit {limit} bytes)"
            );
            private_ledger(limit, &cfg.gpu_uuid, pid, start)?
        }
    };
    // SAFETY: the three handlers are extern "C" fns taking no arguments, as pthread_atfork wants.
    let rc =
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    if rc != 0 {
        crate::log!(
            "vramslice-guard: pthread_atfork failed ({rc}): forked children share their parent's slot"
        );
    }
    Some(Guard::new(limit, ledger, liveness, pool_reserved))
}

fn private_ledger(limit: u64, uuid: &str, pid: u32, start: u64) -> Option<Ledger> {
    let ledger = Ledger::new(private_words(limit, uuid))?;
    ledger.claim(pid, start);
    Some(ledger)
}

/// This process's pid and start time.
fn own_identity() -> (u32, u64) {
    let pid = std::process::id();
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_proc_stat(&t))
        .map_or(0, |(s, _)| s);
    (pid, start)
}

/// Whether the process that claimed a slot as (`pid`, `start`) still runs.
fn liveness(pid: u32, start: u64) -> Liveness {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return Liveness::Dead;
    };
    if pid_t <= 0 {
        return Liveness::Dead;
    }
    // SAFETY: signal 0 only checks for existence; pid_t > 0 names one process.
    let rc = unsafe { libc::kill(pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Liveness::Dead;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_proc_stat(&t))
    {
        Some((_, true)) => Liveness::Dead,
        Some((s, false)) if start != 0 && s != start => Liveness::Dead,
        _ => Liveness::Alive,
    }
}

/// What a memory pool really holds (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`).
fn pool_reserved(pool: u64) -> Option<u64> {
    let f = real::real()?.cuMemPoolGetAttribute?;
    let mut value: u64 = 0;
    // SAFETY: the attribute is a cuuint64_t written to `value`; `pool` is a handle the driver gave.
    let rc = unsafe {
        f(
            pool as usize as Handle,
            CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            (&raw mut value).cast(),
        )
    };
    (rc == CUDA_SUCCESS).then_some(value)
}

extern "C" fn fork_prepare() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            g.prepare_fork();
        }
    });
}

extern "C" fn fork_parent() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            g.parent_after_fork();
        }
    });
}

extern "C" fn fork_child() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            let (pid, start) = own_identity();
            if g.child_after_fork(pid, start).is_none() {
                crate::log!("vramslice-guard: no free accounting slot for forked process {pid}");
            }
        }
    });
}

/// Runs an export's body; a panic becomes `CUDA_ERROR_UNKNOWN` instead of unwinding into C.
#[inline(always)]
fn boundary(f: impl FnOnce() -> CUresult) -> CUresult {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(CUDA_ERROR_UNKNOWN)
}

/// Reads a handle the real driver wrote through an out-pointer.
///
/// # Safety
/// `p` is null or valid for reads of `T`.
#[inline]
unsafe fn read_out<T: Copy>(p: *const T) -> Option<T> {
    // SAFETY: guaranteed by the caller.
    (!p.is_null()).then(|| unsafe { p.read() })
}

/// The real entry point `$name`, or return the error that says why there is none.
macro_rules! real_fn {
    ($name:ident) => {
        match crate::ffi::real::real() {
            None => return crate::ffi::types::CUDA_ERROR_NOT_INITIALIZED,
            Some(r) => match r.$name {
                Some(f) => f,
                None => return crate::ffi::types::CUDA_ERROR_NOT_FOUND,
            },
        }
    };
}
use real_fn;
