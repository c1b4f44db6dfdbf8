//! Everything that touches raw pointers, C symbols, `mmap` and `fork`: the exported CUDA and
//! NVML entry points, the `dlsym`/`cuGetProcAddress` interposition, the real driver's table and
//! the accounting file's mapping. Each export turns its arguments into plain numbers, asks the
//! safe [`crate::guard::Guard`] what to do, and calls the real driver; each runs inside
//! [`boundary`], so a panic becomes a CUDA error code and never unwinds into C.

mod alloc;
mod context;
mod fork;
mod graph;
mod legacy;
mod real;
mod resolve;
mod shm;
pub mod types;
mod vmm;

use crate::config::{Config, Limits, read_limit_file};
use crate::guard::{Account, AccountId, Guard, Mapping, Probes, UuidUnreadable};
use crate::ledger::{Ledger, Liveness, private_words};
use crate::set_up::SetUp;
use std::panic::{AssertUnwindSafe, catch_unwind};
use types::*;
use vramslice_core::container::accounting::{
    ACCOUNTING_FILE_NAME, gpu_accounting_file_name, parse_proc_stat,
};

static CONFIG: SetUp<Config> = SetUp::new();
static GUARD: SetUp<Option<Guard>> = SetUp::new();

/// In a forked child: set-ups the parent's other threads were running start over.
fn forget_unfinished_set_ups() {
    CONFIG.forget_unfinished();
    GUARD.forget_unfinished();
    real::forget_unfinished_set_ups();
}

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
    let (pid, start) = own_identity();
    // (file name, UUID recorded, limit) of each account.
    let (mapping, wanted): (Mapping, Vec<(String, String, u64)>) = match &cfg.limits {
        Limits::Unlimited => return None,
        Limits::Single(limit) => (
            Mapping::Container,
            vec![(
                ACCOUNTING_FILE_NAME.to_owned(),
                cfg.gpu_uuid.clone(),
                *limit,
            )],
        ),
        Limits::PerGpu(gpus) => (
            Mapping::PerGpu,
            gpus.iter()
                .map(|(uuid, limit)| (gpu_accounting_file_name(uuid), uuid.to_owned(), limit))
                .collect(),
        ),
    };
    if cfg.accounting_dir.is_none() {
        let limits = match &cfg.limits {
            Limits::PerGpu(gpus) => format!("limits {gpus}"),
            _ => format!("limit {} bytes", wanted[0].2),
        };
        crate::log!(
            "vramslice-guard: VRAMSLICE_ACCOUNTING_DIR is not set: per-process accounting only ({limits})"
        );
    }
    let mut accounts = Vec::with_capacity(wanted.len());
    for (file, uuid, limit) in wanted {
        let (ledger, limit) = match &cfg.accounting_dir {
            Some(dir) => match shm::attach(dir, &file, limit, &uuid, pid, start) {
                Ok(ledger) => (ledger, limit),
                // Each process on a private account could take the whole limit: under the
                // plugin's limit file that breaks the container's limit, so refuse instead.
                Err(e) if cfg.shared_account_required => {
                    crate::log!(
                        "vramslice-guard: {e}; the container's shared account is required under its limit file: failing closed, every allocation{} is refused",
                        if uuid.is_empty() {
                            String::new()
                        } else {
                            format!(" on GPU {uuid}")
                        }
                    );
                    (private_ledger(0, &uuid, pid, start)?, 0)
                }
                Err(e) => {
                    crate::log!(
                        "vramslice-guard: {e}; per-process accounting only (other processes of the container are not counted)"
                    );
                    (private_ledger(limit, &uuid, pid, start)?, limit)
                }
            },
            None => (private_ledger(limit, &uuid, pid, start)?, limit),
        };
        let account_uuid = if mapping == Mapping::PerGpu {
            uuid
        } else {
            String::new()
        };
        accounts.push(Account::new(account_uuid, limit, ledger));
    }
    Guard::new(
        accounts,
        mapping,
        Probes {
            liveness,
            pool_reserved,
            device_uuid,
            graph_pool: graph::graph_pool,
            graph_trim: graph::graph_trim,
        },
    )
}

fn private_ledger(limit: u64, uuid: &str, pid: u32, start: u64) -> Option<Ledger> {
    let ledger = Ledger::new(private_words(limit, uuid))?;
    ledger.claim(pid, start);
    Some(ledger)
}

/// The device of the calling thread's current context (`cuCtxGetDevice`), or the driver's error.
fn current_device() -> Result<CUdevice, CUresult> {
    let f = real::real()
        .ok_or(CUDA_ERROR_NOT_INITIALIZED)?
        .cuCtxGetDevice
        .ok_or(CUDA_ERROR_NOT_FOUND)?;
    let mut dev: CUdevice = 0;
    // SAFETY: one out-pointer to a live local.
    match unsafe { f(&raw mut dev) } {
        CUDA_SUCCESS => Ok(dev),
        rc => Err(rc),
    }
}

/// The UUID of device `dev` from the driver (`cuDeviceGetUuid_v2`, else `cuDeviceGetUuid`).
fn device_uuid(dev: CUdevice) -> Result<String, UuidUnreadable> {
    let unreadable = |code, message: &str| UuidUnreadable {
        code,
        message: message.to_owned(),
    };
    let r = real::real()
        .ok_or_else(|| unreadable(CUDA_ERROR_NOT_INITIALIZED, "the CUDA driver is not loaded"))?;
    let f = r
        .cuDeviceGetUuid_v2
        .or(r.cuDeviceGetUuid)
        .ok_or_else(|| unreadable(CUDA_ERROR_NOT_FOUND, "the driver has no cuDeviceGetUuid"))?;
    let mut uuid = CUuuid { bytes: [0; 16] };
    // SAFETY: one out-pointer to a live CUuuid (16 bytes, as cuda.h declares it).
    match unsafe { f(&raw mut uuid, dev) } {
        CUDA_SUCCESS => Ok(crate::device::format_gpu_uuid(&uuid.bytes)),
        rc => Err(unreadable(
            rc,
            &format!("cuDeviceGetUuid of device {dev} returned CUDA error {rc}"),
        )),
    }
}

/// Which device an entry point's memory is on.
#[derive(Clone, Copy)]
enum On {
    /// The calling thread's current context's device.
    Current,
    /// A device the caller named.
    Device(CUdevice),
}

/// The account memory on `on` counts toward: `Ok(None)` when the device is refused (per-GPU
/// limits with no entry for it), `Err` with the driver's error when the current device or its
/// UUID cannot be known (the real call would fail the same way). Under one limit for the container the driver
/// is not asked at all.
#[inline]
fn account_on(g: &Guard, on: On) -> Result<Option<AccountId>, CUresult> {
    if g.mapping() == Mapping::Container {
        return Ok(Some(0));
    }
    let dev = match on {
        On::Current => current_device()?,
        On::Device(d) => d,
    };
    g.device_account(dev)
}

/// [`account_on`] as an entry point answers it: the account, or the code to return at once
/// (`CUDA_ERROR_OUT_OF_MEMORY` for a refused device).
#[inline]
fn account_or_refuse(g: &Guard, on: On) -> Result<AccountId, CUresult> {
    match account_on(g, on) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(CUDA_ERROR_OUT_OF_MEMORY),
        Err(rc) => Err(rc),
    }
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

/// What a memory pool really holds (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`). Key 1 stands for
/// "the pool could not be known" and is never handed to the driver.
fn pool_reserved(pool: u64) -> Option<u64> {
    if pool <= 1 {
        return None;
    }
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

fn fork_prepare() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            g.prepare_fork();
        }
    });
}

fn fork_parent() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            g.parent_after_fork();
        }
    });
}

fn fork_child() {
    let _ = catch_unwind(|| {
        if let Some(Some(g)) = GUARD.get() {
            let (pid, start) = own_identity();
            for uuid in g.child_after_fork(pid, start) {
                let of = if uuid.is_empty() {
                    String::new()
                } else {
                    format!(" of GPU {uuid}")
                };
                crate::log!(
                    "vramslice-guard: no free accounting slot{of} for forked process {pid}"
                );
            }
        }
    });
}

/// Runs an export's body; a panic becomes `CUDA_ERROR_UNKNOWN` instead of unwinding into C.
#[inline(always)]
fn boundary(f: impl FnOnce() -> CUresult) -> CUresult {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(CUDA_ERROR_UNKNOWN)
}

/// Returns the real call's `rc`, first telling the guard (if enforcing) when it succeeded.
#[inline]
fn after_success(rc: CUresult, tell: impl FnOnce(&Guard)) -> CUresult {
    if rc == CUDA_SUCCESS
        && let Some(g) = guard()
    {
        tell(g);
    }
    rc
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
