//! Exported context, module and memory-information entry points (driver API and NVML).
//!
//! Contexts and modules take device memory the caller never names; the guard measures it as the
//! drop in the real free memory across the call, and charges it to the account of the device it
//! is on (the context's device; a module's current context's device). A context created while no
//! context of its device is current cannot be measured (the driver answers memory queries only
//! inside a context, for that context's device) and is charged an estimate instead: 3.25 MiB
//! per multiprocessor of the device, at least 256 MiB ([`crate::config::Config::context_charge`];
//! `VRAMSLICE_CONTEXT_ESTIMATE_BYTES` may raise it). Under per-GPU limits, a context or module on a
//! device without a limit is refused with `CUDA_ERROR_OUT_OF_MEMORY`.
//!
//! Memory information (`cuMemGetInfo`, `cuDeviceTotalMem`, NVML) shows the slice of the device
//! asked about: its account's limit as the total.
#![allow(non_snake_case)]

use super::types::*;
use super::{On, account_on, account_or_refuse, boundary, config, guard, read_out, real_fn};
use crate::guard::Mapping;
use crate::tracker::Kind;
use std::ffi::{c_char, c_int, c_uint, c_void};

/// Real free bytes of the current context's device, if a context is current.
fn real_free() -> Option<u64> {
    let f = super::real::real()?.cuMemGetInfo_v2?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two out-pointers to live locals.
    let rc = unsafe { f(&raw mut free, &raw mut total) };
    (rc == CUDA_SUCCESS).then_some(free as u64)
}

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const MULTIPROCESSOR_COUNT: c_int = 16;

/// The multiprocessors of `dev`, when the driver says (no context needed).
fn multiprocessors(dev: CUdevice) -> Option<u32> {
    let f = super::real::real()?.cuDeviceGetAttribute?;
    let mut count: c_int = 0;
    // SAFETY: an out-pointer to a live local; the attribute and device are plain values.
    let rc = unsafe { f(&raw mut count, MULTIPROCESSOR_COUNT, dev) };
    (rc == CUDA_SUCCESS)
        .then(|| u32::try_from(count).ok())
        .flatten()
}

/// Real free bytes of the device `on` before a call, when they can be measured: a context is
/// current and it is on that device.
fn free_before(on: On) -> Option<u64> {
    match on {
        On::Current => real_free(),
        On::Device(d) => (super::current_device() == Ok(d)).then(real_free).flatten(),
    }
}

fn measured_bytes(before: Option<u64>, estimate: u64) -> u64 {
    match (before, real_free()) {
        (Some(b), Some(a)) => b.saturating_sub(a),
        _ => estimate,
    }
}

/// Measures what `call` takes on the device `on` and charges it to that device's account and
/// the handle it produced.
#[inline(always)]
fn measured(
    kind: Kind,
    estimate: u64,
    on: On,
    call: impl FnOnce() -> CUresult,
    out: impl FnOnce() -> Option<u64>,
) -> CUresult {
    let Some(g) = guard() else { return call() };
    let a = match account_or_refuse(g, on) {
        Ok(a) => a,
        Err(rc) => return rc,
    };
    let before = free_before(on);
    let rc = call();
    if rc == CUDA_SUCCESS
        && let Some(h) = out()
    {
        g.charge(kind, h, a, measured_bytes(before, estimate));
    }
    rc
}

fn released(kind: Kind, handle: Handle, call: impl FnOnce() -> CUresult) -> CUresult {
    let Some(g) = guard() else { return call() };
    let key = handle as usize as u64;
    let entry = g.untrack(kind, key);
    let rc = call();
    if let Some(e) = entry {
        if rc == CUDA_SUCCESS {
            g.freed(e)
        } else {
            g.retrack(kind, key, e)
        }
    }
    rc
}

macro_rules! ctx_create {
    ($name:ident ( $($arg:ident : $ty:ty),* ), on $dev:ident) => {
        /// Interposed context creation: the context's memory is measured and charged to its
        /// device's account.
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ctx: *mut Handle, $($arg: $ty),*) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                let estimate = config().context_charge(multiprocessors($dev));
                // SAFETY: arguments forwarded unchanged; ctx read only after success.
                measured(Kind::Context, estimate, On::Device($dev), || unsafe { f(ctx, $($arg),*) }, || unsafe { read_out(ctx) }.map(|h| h as usize as u64))
            })
        }
    };
}
ctx_create!(cuCtxCreate(flags: c_uint, dev: CUdevice), on dev);
ctx_create!(cuCtxCreate_v2(flags: c_uint, dev: CUdevice), on dev);
ctx_create!(cuCtxCreate_v3(params: *mut c_void, n: c_int, flags: c_uint, dev: CUdevice), on dev);
ctx_create!(cuCtxCreate_v4(params: *mut c_void, flags: c_uint, dev: CUdevice), on dev);

macro_rules! ctx_destroy {
    ($name:ident) => {
        /// Interposed context destruction: the context's charge goes back.
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(ctx: Handle) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: argument forwarded unchanged.
                released(Kind::Context, ctx, || unsafe { f(ctx) })
            })
        }
    };
}
ctx_destroy!(cuCtxDestroy);
ctx_destroy!(cuCtxDestroy_v2);

/// Interposed `cuDevicePrimaryCtxRetain`: the first retain of a device is measured and charged
/// to the device's account.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, dev: CUdevice) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuDevicePrimaryCtxRetain);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(ctx, dev) };
        let Some(g) = guard() else { return call() };
        let a = match account_or_refuse(g, On::Device(dev)) {
            Ok(a) => a,
            Err(rc) => return rc,
        };
        let before = free_before(On::Device(dev));
        let rc = call();
        if rc == CUDA_SUCCESS {
            g.primary_retained(dev as u64, a, || {
                measured_bytes(before, config().context_charge(multiprocessors(dev)))
            });
        }
        rc
    })
}

/// Interposed `cuDevicePrimaryCtxRelease_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuDevicePrimaryCtxRelease_v2);
        // SAFETY: argument forwarded unchanged.
        let rc = unsafe { f(dev) };
        if rc == CUDA_SUCCESS
            && let Some(g) = guard()
        {
            g.primary_released(dev as u64, false);
        }
        rc
    })
}

/// Interposed `cuDevicePrimaryCtxReset_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuDevicePrimaryCtxReset_v2);
        // SAFETY: argument forwarded unchanged.
        let rc = unsafe { f(dev) };
        if rc == CUDA_SUCCESS
            && let Some(g) = guard()
        {
            g.primary_released(dev as u64, true);
        }
        rc
    })
}

/// A library load (`cuLibraryLoad*`, context-independent since CUDA 12): with a context current,
/// measured and charged like a module; with none, nothing can be measured and the driver takes
/// no device memory until a context uses the library, so it is passed through uncharged (under
/// per-GPU limits the current device cannot be known then, which must not fail the load).
#[inline(always)]
fn library_load(call: impl FnOnce() -> CUresult, out: impl FnOnce() -> Option<u64>) -> CUresult {
    if guard().is_some_and(|g| g.mapping() == Mapping::PerGpu) && super::current_device().is_err() {
        return call();
    }
    measured(Kind::Library, 0, On::Current, call, out)
}

macro_rules! module_load {
    ($name:ident, Kind::Module, ( $($arg:ident : $ty:ty),* )) => {
        /// Interposed module load: the memory it takes is measured and charged.
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(out: *mut Handle, $($arg: $ty),*) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged; out read only after success.
                measured(Kind::Module, 0, On::Current, || unsafe { f(out, $($arg),*) }, || unsafe { read_out(out) }.map(|h| h as usize as u64))
            })
        }
    };
    ($name:ident, Kind::Library, ( $($arg:ident : $ty:ty),* )) => {
        /// Interposed library load ([`library_load`]).
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(out: *mut Handle, $($arg: $ty),*) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged; out read only after success.
                library_load(|| unsafe { f(out, $($arg),*) }, || unsafe { read_out(out) }.map(|h| h as usize as u64))
            })
        }
    };
}
module_load!(cuModuleLoad, Kind::Module, (fname: *const c_char));
module_load!(cuModuleLoadData, Kind::Module, (image: *const c_void));
module_load!(cuModuleLoadDataEx, Kind::Module, (image: *const c_void, n: c_uint, opts: *mut c_void, vals: *mut *mut c_void));
module_load!(cuModuleLoadFatBinary, Kind::Module, (image: *const c_void));
module_load!(cuLibraryLoadData, Kind::Library, (code: *const c_void, jo: *mut c_void, jv: *mut *mut c_void, nj: c_uint, lo: *mut c_void, lv: *mut *mut c_void, nl: c_uint));
module_load!(cuLibraryLoadFromFile, Kind::Library, (file: *const c_char, jo: *mut c_void, jv: *mut *mut c_void, nj: c_uint, lo: *mut c_void, lv: *mut *mut c_void, nl: c_uint));

/// Interposed `cuModuleUnload`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(m: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuModuleUnload);
        // SAFETY: argument forwarded unchanged.
        released(Kind::Module, m, || unsafe { f(m) })
    })
}

/// Interposed `cuLibraryUnload`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLibraryUnload(l: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuLibraryUnload);
        // SAFETY: argument forwarded unchanged.
        released(Kind::Library, l, || unsafe { f(l) })
    })
}

/// Interposed `cuMemGetInfo_v2`, for the current context's device: total = its limit (at most
/// the card's), free = min(limit − used, real free); a refused device shows 0 and 0.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemGetInfo_v2);
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(free, total) };
        if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
            return rc;
        }
        if let Some(g) = guard() {
            g.reconcile_pools();
            g.reconcile_graph_pools();
            let a = account_on(g, On::Current).ok().flatten();
            // SAFETY: both pointers are non-null and were just written by the driver.
            unsafe {
                let (fr, to) = g.mem_info(a, *free as u64, *total as u64);
                *free = usize::try_from(fr).unwrap_or(usize::MAX);
                *total = usize::try_from(to).unwrap_or(usize::MAX);
            }
        }
        rc
    })
}

/// Interposed `cuDeviceTotalMem_v2`: at most the device's limit (0 for a refused device).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuDeviceTotalMem_v2);
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(bytes, dev) };
        if rc == CUDA_SUCCESS
            && !bytes.is_null()
            && let Some(g) = guard()
        {
            let limit = account_on(g, On::Device(dev))
                .ok()
                .flatten()
                .map_or(0, |a| g.limit(a));
            // SAFETY: non-null and just written by the driver.
            unsafe { *bytes = (*bytes).min(usize::try_from(limit).unwrap_or(usize::MAX)) };
        }
        rc
    })
}

fn nvml_boundary(f: impl FnOnce() -> c_int) -> c_int {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(NVML_ERROR_UNKNOWN)
}

/// The UUID NVML gives device handle `dev`.
fn nvml_uuid(dev: *mut c_void) -> Option<String> {
    let f = super::real::real_nvml()?.get_uuid?;
    let mut buf = [0u8; NVML_UUID_BUFFER];
    // SAFETY: dev is the caller's NVML handle; buf is a live buffer of the length passed.
    let rc = unsafe { f(dev, buf.as_mut_ptr().cast(), NVML_UUID_BUFFER as c_uint) };
    if rc != NVML_SUCCESS {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_owned)
}

/// (total, free, used) as the slice of NVML device `dev` shows them, from NVML's real free and
/// total bytes. Under per-GPU limits the device is found by its UUID; a device without a limit (or
/// whose UUID NVML does not tell) shows an empty slice.
fn nvml_view(dev: *mut c_void, real_free: u64, real_total: u64) -> Option<(u64, u64, u64)> {
    if !config().virtualize_nvml {
        return None;
    }
    let g = guard()?;
    let a = match g.mapping() {
        Mapping::Container => Some(0),
        Mapping::PerGpu => nvml_uuid(dev).and_then(|u| g.account_of_uuid(&u)),
    };
    let (free, total) = g.mem_info(a, real_free, real_total);
    Some((total, free, a.map_or(0, |a| g.used(a))))
}

/// Interposed `nvmlDeviceGetMemoryInfo` (virtualised unless `VRAMSLICE_VIRTUALIZE_NVML=0`).
///
/// # Safety
/// As NVML requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(dev: *mut c_void, mem: *mut NvmlMemory) -> c_int {
    nvml_boundary(|| {
        let Some(f) = super::real::real_nvml().and_then(|n| n.get_memory_info) else {
            return NVML_ERROR_UNINITIALIZED;
        };
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(dev, mem) };
        // SAFETY: mem is null or valid, per the API, and was written on success.
        if let (0, Some(m)) = (rc, unsafe { mem.as_mut() })
            && let Some((total, free, used)) = nvml_view(dev, m.free, m.total)
        {
            (m.total, m.free, m.used) = (total, free, used);
        }
        rc
    })
}

/// Interposed `nvmlDeviceGetMemoryInfo_v2`.
///
/// # Safety
/// As NVML requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    dev: *mut c_void,
    mem: *mut NvmlMemoryV2,
) -> c_int {
    nvml_boundary(|| {
        let Some(f) = super::real::real_nvml().and_then(|n| n.get_memory_info_v2) else {
            return NVML_ERROR_UNINITIALIZED;
        };
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(dev, mem) };
        // SAFETY: mem is null or valid, per the API, and was written on success.
        if let (0, Some(m)) = (rc, unsafe { mem.as_mut() })
            && let Some((total, free, used)) = nvml_view(dev, m.free, m.total)
        {
            (m.total, m.free, m.used, m.reserved) = (total, free, used, 0);
        }
        rc
    })
}
