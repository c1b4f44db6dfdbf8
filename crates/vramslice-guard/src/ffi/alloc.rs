//! Exported allocation and free entry points of the driver API.
#![allow(non_snake_case)]

use super::graph::{capture_graph, capturing};
use super::types::*;
use super::{On, account_or_refuse, after_success, boundary, config, guard, read_out, real_fn};
use crate::guard::{AccountId, Guard, Mapping};
use crate::sizes;
use crate::tracker::Kind;
use std::ffi::{c_int, c_uint};

/// Reserve in the account of the device the memory is `on`, call the real allocator, then track
/// the handle it produced (or undo the reservation). A refused device gets
/// `CUDA_ERROR_OUT_OF_MEMORY` without reaching the driver.
#[inline(always)]
pub(super) fn counted(
    on: On,
    bytes: u64,
    kind: Kind,
    call: impl FnOnce() -> CUresult,
    out: impl FnOnce() -> Option<u64>,
) -> CUresult {
    let Some(g) = guard() else { return call() };
    let a = match account_or_refuse(g, on) {
        Ok(a) => a,
        Err(rc) => return rc,
    };
    if g.reserve(a, bytes).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = call();
    match (rc == CUDA_SUCCESS).then(out).flatten() {
        Some(handle) => g.track(kind, handle, a, bytes),
        None => g.release(a, bytes),
    }
    rc
}

/// Take the handle out, call the real free, then give its bytes back (or put it back on failure).
#[inline(always)]
pub(super) fn freeing(kind: Kind, handle: u64, call: impl FnOnce() -> CUresult) -> CUresult {
    let Some(g) = guard() else { return call() };
    let entry = g.untrack(kind, handle);
    let rc = call();
    if let Some(e) = entry {
        if rc == CUDA_SUCCESS {
            g.freed(e);
        } else {
            g.retrack(kind, handle, e);
        }
    }
    rc
}

/// The memory pool `cuMemAllocAsync` on `stream` draws from: the current pool of the stream's
/// device (not always the current context's: a stream made on another device's context).
fn stream_pool(stream: Handle) -> u64 {
    let Some(r) = super::real::real() else {
        return 1;
    };
    let (Some(get_pool), Some(dev)) = (r.cuDeviceGetMemPool, stream_device(r, stream)) else {
        return 1;
    };
    let mut pool: Handle = std::ptr::null_mut();
    // SAFETY: one out-pointer to a live local of the declared type.
    let ok = unsafe { get_pool(&raw mut pool, dev) } == CUDA_SUCCESS;
    if ok { (pool as usize as u64).max(1) } else { 1 }
}

/// The device `stream`'s work runs on. The default streams (null, `CU_STREAM_LEGACY` = 1,
/// `CU_STREAM_PER_THREAD` = 2) are the current context's; another stream's is its own context's,
/// from `cuStreamGetDevice` (CUDA 12.8) or else by making the stream's context current for a
/// moment (`cuStreamGetCtx`, push, `cuCtxGetDevice`, pop).
fn stream_device(r: &super::real::Real, stream: Handle) -> Option<CUdevice> {
    if (stream as usize) <= 2 {
        return super::current_device().ok();
    }
    let mut dev: CUdevice = 0;
    if let Some(get_device) = r.cuStreamGetDevice
        // SAFETY: the caller's stream handle and one out-pointer to a live local.
        && unsafe { get_device(stream, &raw mut dev) } == CUDA_SUCCESS
    {
        return Some(dev);
    }
    let (Some(get_ctx), Some(push), Some(pop), Some(get_dev)) = (
        r.cuStreamGetCtx,
        r.cuCtxPushCurrent_v2,
        r.cuCtxPopCurrent_v2,
        r.cuCtxGetDevice,
    ) else {
        return super::current_device().ok();
    };
    let mut ctx: Handle = std::ptr::null_mut();
    // SAFETY: the caller's stream handle and one out-pointer to a live local.
    if unsafe { get_ctx(stream, &raw mut ctx) } != CUDA_SUCCESS || ctx.is_null() {
        return super::current_device().ok();
    }
    // SAFETY: ctx is the live context the driver just named; pushing it and popping it again
    // leaves the thread's context stack as it was.
    unsafe {
        if push(ctx) != CUDA_SUCCESS {
            return super::current_device().ok();
        }
        let found = get_dev(&raw mut dev) == CUDA_SUCCESS;
        let mut popped: Handle = std::ptr::null_mut();
        pop(&raw mut popped);
        found.then_some(dev)
    }
}

/// The device whose current or default memory pool `pool` is, if any.
fn pool_device(pool: u64) -> Option<CUdevice> {
    let r = super::real::real()?;
    let count = r.cuDeviceGetCount?;
    let mut n: c_int = 0;
    // SAFETY: one out-pointer to a live local.
    if unsafe { count(&raw mut n) } != CUDA_SUCCESS {
        return None;
    }
    let getters = [r.cuDeviceGetMemPool, r.cuDeviceGetDefaultMemPool];
    (0..n).find(|&dev| {
        getters.iter().flatten().any(|get| {
            let mut p: Handle = std::ptr::null_mut();
            // SAFETY: one out-pointer to a live local; dev is an ordinal below the device count.
            unsafe { get(&raw mut p, dev) == CUDA_SUCCESS && (p as usize as u64).max(1) == pool }
        })
    })
}

/// The account memory from `pool` counts toward: the one it was first charged to; for a new pool
/// its device's (a device's current or default pool, one `cuMemPoolCreate` made), else the
/// current device's.
fn pool_account(g: &Guard, pool: u64) -> Result<AccountId, CUresult> {
    if g.mapping() == Mapping::Container {
        return Ok(0);
    }
    if let Some(a) = g.pool_account(pool) {
        return Ok(a);
    }
    account_or_refuse(g, pool_device(pool).map_or(On::Current, On::Device))
}

#[inline(always)]
fn async_counted(
    pool: u64,
    bytes: u64,
    dptr: *mut CUdeviceptr,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(g) = guard() else { return call() };
    let pool = pool.max(1);
    if g.is_host_pool(pool) {
        return call();
    }
    let a = match pool_account(g, pool) {
        Ok(a) => a,
        Err(rc) => return rc,
    };
    let Ok((a, reused)) = g.reserve_async(a, pool, bytes) else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    let rc = call();
    let out = (rc == CUDA_SUCCESS).then(|| {
        // SAFETY: dptr is the caller's out-pointer, written by the driver on success.
        unsafe { read_out(dptr) }
    });
    match out.flatten() {
        Some(p) => g.async_made(p, pool, a, bytes, reused),
        None => g.async_failed(pool, a, bytes, reused, true),
    }
    rc
}

/// Interposed `cuMemAlloc_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemAlloc_v2);
        // SAFETY: the caller's arguments are passed unchanged to the real function of this
        // signature; dptr is read only after the driver reported success.
        counted(
            On::Current,
            size as u64,
            Kind::DevicePtr,
            || unsafe { f(dptr, size) },
            || unsafe { read_out(dptr) },
        )
    })
}

/// Interposed `cuMemAllocManaged` (counted unless `VRAMSLICE_COUNT_MANAGED=0`).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    size: usize,
    flags: c_uint,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemAllocManaged);
        // SAFETY: arguments forwarded unchanged to the real function of this signature.
        let call = || unsafe { f(dptr, size, flags) };
        if !config().count_managed {
            return call();
        }
        // SAFETY: dptr is read only after the driver reported success.
        counted(On::Current, size as u64, Kind::DevicePtr, call, || unsafe {
            read_out(dptr)
        })
    })
}

/// The row alignment a pitched allocation is reserved for before the driver chooses its pitch:
/// drivers pad rows to 512 bytes or less (`cudaMallocPitch`'s usual pitch). A wider pitch is
/// reserved after the call; a narrower one gives the difference back.
const ASSUMED_PITCH_ALIGNMENT: u64 = 512;

/// A pitched allocation: reserves the rows padded to [`ASSUMED_PITCH_ALIGNMENT`] first (a
/// narrow, tall request really takes a whole aligned row per line: 4-byte rows of a million
/// lines take 512 MiB), then settles on the pitch the driver chose (`call` returns its code and,
/// on success, the pointer and the pitch; `free` undoes it when a wider padding does not fit).
#[inline(always)]
pub(super) fn pitch_counted(
    width: u64,
    height: u64,
    call: impl FnOnce() -> (CUresult, Option<(u64, u64)>),
    free: impl FnOnce(u64),
) -> CUresult {
    let Some(g) = guard() else { return call().0 };
    let a = match account_or_refuse(g, On::Current) {
        Ok(a) => a,
        Err(rc) => return rc,
    };
    let padded_row = width
        .div_ceil(ASSUMED_PITCH_ALIGNMENT)
        .saturating_mul(ASSUMED_PITCH_ALIGNMENT);
    let first = padded_row.saturating_mul(height);
    if g.reserve(a, first).is_err() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let (rc, out) = call();
    let Some((p, real_pitch)) = out.filter(|_| rc == CUDA_SUCCESS) else {
        g.release(a, first);
        return rc;
    };
    let total = real_pitch.max(width).saturating_mul(height);
    if total > first {
        if g.reserve(a, total - first).is_err() {
            free(p);
            g.release(a, first);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    } else {
        g.release(a, first - total);
    }
    g.track(Kind::DevicePtr, p, a, total);
    rc
}

/// Interposed `cuMemAllocPitch_v2`: reserves width × height first, then the padding the driver chose.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemAllocPitch_v2);
        let call = || {
            // SAFETY: arguments forwarded unchanged to the real function of this signature.
            let rc = unsafe { f(dptr, pitch, width, height, elem) };
            // SAFETY: both out-pointers are read only after the driver reported success.
            let out = (rc == CUDA_SUCCESS)
                .then(|| unsafe { read_out(dptr).zip(read_out(pitch)) })
                .flatten();
            (rc, out.map(|(p, q)| (p, q as u64)))
        };
        let free = |p| {
            if let Some(free) = super::real::real().and_then(|r| r.cuMemFree_v2) {
                // SAFETY: p is the allocation the driver just made; nobody else has seen it.
                unsafe { free(p) };
            }
        };
        pitch_counted(width as u64, height as u64, call, free)
    })
}

/// Interposed `cuMemFree_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemFree_v2);
        // SAFETY: argument forwarded unchanged.
        freeing(Kind::DevicePtr, dptr, || unsafe { f(dptr) })
    })
}

macro_rules! alloc_async {
    ($name:ident, $ptsz:literal) => {
        /// Interposed asynchronous allocation from the current pool (on a capturing stream: a
        /// graph memory node, passed through and charged when the graph is mapped).
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            size: usize,
            stream: Handle,
        ) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                let call = || unsafe { f(dptr, size, stream) };
                if guard().is_none() || capturing(stream, $ptsz) {
                    return call();
                }
                async_counted(stream_pool(stream), size as u64, dptr, call)
            })
        }
    };
}
alloc_async!(cuMemAllocAsync, false);
alloc_async!(cuMemAllocAsync_ptsz, true);

macro_rules! alloc_from_pool {
    ($name:ident, $ptsz:literal) => {
        /// Interposed asynchronous allocation from a given pool (on a capturing stream: a graph
        /// memory node, passed through).
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            size: usize,
            pool: Handle,
            stream: Handle,
        ) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                let call = || unsafe { f(dptr, size, pool, stream) };
                if guard().is_none() || capturing(stream, $ptsz) {
                    return call();
                }
                async_counted(pool as usize as u64, size as u64, dptr, call)
            })
        }
    };
}
alloc_from_pool!(cuMemAllocFromPoolAsync, false);
alloc_from_pool!(cuMemAllocFromPoolAsync_ptsz, true);

macro_rules! free_async {
    ($name:ident, $ptsz:literal) => {
        /// Interposed asynchronous free (the bytes stay charged to the pool until it is trimmed
        /// or found to have released them). Captured into a graph, it frees when the graph runs:
        /// the allocation stays charged until then.
        ///
        /// # Safety
        /// As the CUDA driver API requires.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dptr: CUdeviceptr, stream: Handle) -> CUresult {
            boundary(|| {
                let f = real_fn!($name);
                // SAFETY: arguments forwarded unchanged.
                let call = || unsafe { f(dptr, stream) };
                let Some(g) = guard() else { return call() };
                if let Some(graph) = capture_graph(stream, $ptsz) {
                    let rc = call();
                    if rc == CUDA_SUCCESS {
                        g.graph_free_captured(
                            super::graph::capture_key(stream, $ptsz),
                            graph as usize as u64,
                            dptr,
                        );
                    }
                    return rc;
                }
                freeing(Kind::DevicePtr, dptr, call)
            })
        }
    };
}
free_async!(cuMemFreeAsync, false);
free_async!(cuMemFreeAsync_ptsz, true);

/// Interposed `cuMemPoolTrimTo`: afterwards the pool's retained bytes are re-read.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolTrimTo(pool: Handle, keep: usize) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemPoolTrimTo);
        if let Some(g) = guard() {
            g.pool_trimming((pool as usize as u64).max(1));
        }
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(pool, keep) };
        after_success(rc, |g| {
            g.reconcile_pool((pool as usize as u64).max(1), Some(keep as u64));
        })
    })
}

/// Interposed `cuMemPoolCreate`: a pool on a device remembers that device's account (under
/// per-GPU limits a device without one is refused); a pool on the host is remembered as such,
/// and its allocations are not charged. Either way a handle the driver hands out again starts
/// over.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolCreate(
    pool: *mut Handle,
    props: *const MemAllocationProp,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemPoolCreate);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(pool, props) };
        let Some(g) = guard() else {
            return call();
        };
        // SAFETY: props is null or points at a CUmemPoolProps, whose first four ints we read.
        let location = unsafe { props.as_ref() }.map(|p| (p.location_type, p.location_id));
        let made = match location {
            Some((CU_MEM_LOCATION_TYPE_DEVICE, device)) => {
                let a = match g.mapping() {
                    Mapping::Container => 0,
                    Mapping::PerGpu => match account_or_refuse(g, On::Device(device)) {
                        Ok(a) => a,
                        Err(rc) => return rc,
                    },
                };
                Some(a)
            }
            Some((kind, _)) if is_host_location(kind) => None,
            // Invalid properties: the driver says so.
            _ => return call(),
        };
        let rc = call();
        if rc == CUDA_SUCCESS
            // SAFETY: pool is read only after the driver reported success.
            && let Some(p) = unsafe { read_out(pool) }
        {
            let p = (p as usize as u64).max(1);
            match made {
                Some(a) => g.pool_created(p, a),
                None => g.host_pool_created(p),
            }
        }
        rc
    })
}

/// Interposed `cuMemPoolDestroy`: what the pool retained is given back, and what is still
/// allocated from it goes back as it is freed.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemPoolDestroy);
        let key = (pool as usize as u64).max(1);
        if let Some(g) = guard() {
            g.pool_closing(key);
        }
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(pool) };
        if rc != CUDA_SUCCESS
            && let Some(g) = guard()
        {
            g.pool_not_closed(key);
        }
        after_success(rc, |g| g.pool_destroyed(key))
    })
}

/// An array of `bytes` (`None`: no descriptor, the driver reports the invalid value), tracked by
/// the handle the driver writes to `array`.
#[inline(always)]
pub(super) fn array_counted(
    array: *mut Handle,
    bytes: Option<u64>,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(bytes) = bytes else { return call() };
    counted(On::Current, bytes, Kind::Array, call, || {
        // SAFETY: array is read only after the driver reported success.
        unsafe { read_out(array) }.map(|h| h as usize as u64)
    })
}

/// Interposed `cuArrayCreate_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    array: *mut Handle,
    desc: *const ArrayDescriptor,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuArrayCreate_v2);
        // SAFETY: desc is null or a valid descriptor, per the API.
        let bytes = unsafe { desc.as_ref() }.map(|d| {
            sizes::array_bytes(d.width as u64, d.height as u64, 0, d.format, d.num_channels)
        });
        // SAFETY: arguments forwarded unchanged.
        array_counted(array, bytes, || unsafe { f(array, desc) })
    })
}

/// Interposed `cuArray3DCreate_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    array: *mut Handle,
    desc: *const Array3dDescriptor,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuArray3DCreate_v2);
        // SAFETY: desc is null or a valid descriptor, per the API.
        let bytes = unsafe { desc.as_ref() }.map(|d| {
            let (w, h, depth) = (d.width as u64, d.height as u64, d.depth as u64);
            sizes::array_bytes(w, h, depth, d.format, d.num_channels)
        });
        // SAFETY: arguments forwarded unchanged.
        array_counted(array, bytes, || unsafe { f(array, desc) })
    })
}

/// Interposed `cuMipmappedArrayCreate`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    array: *mut Handle,
    desc: *const Array3dDescriptor,
    levels: c_uint,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMipmappedArrayCreate);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(array, desc, levels) };
        // SAFETY: desc is null or a valid descriptor, per the API.
        let Some(d) = (unsafe { desc.as_ref() }) else {
            return call();
        };
        let bytes = sizes::mipmapped_bytes(
            d.width as u64,
            d.height as u64,
            d.depth as u64,
            d.format,
            d.num_channels,
            levels,
            d.flags,
        );
        counted(On::Current, bytes, Kind::Mipmapped, call, || {
            // SAFETY: array is read only after the driver reported success.
            unsafe { read_out(array) }.map(|h| h as usize as u64)
        })
    })
}

/// Interposed `cuArrayDestroy`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(array: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuArrayDestroy);
        // SAFETY: argument forwarded unchanged.
        freeing(Kind::Array, array as usize as u64, || unsafe { f(array) })
    })
}

/// Interposed `cuMipmappedArrayDestroy`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(array: Handle) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMipmappedArrayDestroy);
        // SAFETY: argument forwarded unchanged.
        freeing(Kind::Mipmapped, array as usize as u64, || unsafe {
            f(array)
        })
    })
}
