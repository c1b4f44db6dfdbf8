//! Exported v1 entry points: the CUDA 3.1 ABI with 32-bit device pointers and sizes
//! (`cuMemAlloc`, `cuMemFree`, `cuMemAllocPitch`, `cuMemGetInfo`, `cuDeviceTotalMem`,
//! `cuArrayCreate`, `cuArray3DCreate` without `_v2`; the v1 `cuCtxCreate` and `cuCtxDestroy`,
//! whose signatures did not change, are with their successors in `context.rs`). The driver
//! still exports them and `cuGetProcAddress` hands them out for versions before 3020, so a
//! program could otherwise allocate past its limit through them. They are counted and shown the
//! slice exactly as their `_v2` forms (through the same helpers); a 32-bit pointer is tracked as
//! the same number a 64-bit one would be.
#![allow(non_snake_case)]

use super::alloc::{array_counted, counted, freeing, pitch_counted};
use super::context::{cuDeviceTotalMem_v2, cuMemGetInfo_v2};
use super::types::*;
use super::{On, boundary, read_out, real_fn};
use crate::sizes;
use crate::tracker::Kind;
use std::ffi::c_uint;

/// Interposed `cuMemAlloc` (v1).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut c_uint, bytes: c_uint) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemAlloc);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(dptr, bytes) };
        // SAFETY: dptr is read only after the driver reported success.
        let out = || unsafe { read_out(dptr) }.map(u64::from);
        counted(On::Current, u64::from(bytes), Kind::DevicePtr, call, out)
    })
}

/// Interposed `cuMemFree` (v1).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree(dptr: c_uint) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemFree);
        // SAFETY: argument forwarded unchanged.
        freeing(Kind::DevicePtr, u64::from(dptr), || unsafe { f(dptr) })
    })
}

/// Interposed `cuMemAllocPitch` (v1): as `cuMemAllocPitch_v2`.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch(
    dptr: *mut c_uint,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    elem: c_uint,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemAllocPitch);
        let call = || {
            // SAFETY: arguments forwarded unchanged to the real function of this signature.
            let rc = unsafe { f(dptr, pitch, width, height, elem) };
            // SAFETY: both out-pointers are read only after the driver reported success.
            let out = (rc == CUDA_SUCCESS)
                .then(|| unsafe { read_out(dptr).zip(read_out(pitch)) })
                .flatten();
            (rc, out.map(|(p, q)| (u64::from(p), u64::from(q))))
        };
        let free = |p: u64| {
            if let (Some(free), Ok(p)) = (
                super::real::real().and_then(|r| r.cuMemFree),
                c_uint::try_from(p),
            ) {
                // SAFETY: p is the allocation the driver just made; nobody else has seen it.
                unsafe { free(p) };
            }
        };
        pitch_counted(u64::from(width), u64::from(height), call, free)
    })
}

fn clamp(v: usize) -> c_uint {
    c_uint::try_from(v).unwrap_or(c_uint::MAX)
}

/// Interposed `cuMemGetInfo` (v1): the slice, as `cuMemGetInfo_v2` reports it, capped at 4 GiB
/// like the driver's own v1.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    boundary(|| {
        if free.is_null() || total.is_null() {
            let f = real_fn!(cuMemGetInfo);
            // SAFETY: arguments forwarded unchanged: the driver reports the invalid value.
            return unsafe { f(free, total) };
        }
        let (mut fr, mut to) = (0usize, 0usize);
        // SAFETY: two out-pointers to live locals.
        let rc = unsafe { cuMemGetInfo_v2(&raw mut fr, &raw mut to) };
        if rc == CUDA_SUCCESS {
            // SAFETY: both pointers are non-null, per the check above, and the caller's.
            unsafe {
                free.write(clamp(fr));
                total.write(clamp(to));
            }
        }
        rc
    })
}

/// Interposed `cuDeviceTotalMem` (v1): at most the device's limit, capped at 4 GiB.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, dev: CUdevice) -> CUresult {
    boundary(|| {
        if bytes.is_null() {
            let f = real_fn!(cuDeviceTotalMem);
            // SAFETY: arguments forwarded unchanged: the driver reports the invalid value.
            return unsafe { f(bytes, dev) };
        }
        let mut total = 0usize;
        // SAFETY: one out-pointer to a live local.
        let rc = unsafe { cuDeviceTotalMem_v2(&raw mut total, dev) };
        if rc == CUDA_SUCCESS {
            // SAFETY: non-null, per the check above, and the caller's.
            unsafe { bytes.write(clamp(total)) };
        }
        rc
    })
}

/// Interposed `cuArrayCreate` (v1 descriptor).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate(
    array: *mut Handle,
    desc: *const ArrayDescriptorV1,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuArrayCreate);
        // SAFETY: desc is null or a valid descriptor, per the API.
        let bytes = unsafe { desc.as_ref() }.map(|d| {
            let (w, h) = (u64::from(d.width), u64::from(d.height));
            sizes::array_bytes(w, h, 0, d.format, d.num_channels)
        });
        // SAFETY: arguments forwarded unchanged.
        array_counted(array, bytes, || unsafe { f(array, desc) })
    })
}

/// Interposed `cuArray3DCreate` (v1 descriptor).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate(
    array: *mut Handle,
    desc: *const Array3dDescriptorV1,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuArray3DCreate);
        // SAFETY: desc is null or a valid descriptor, per the API.
        let bytes = unsafe { desc.as_ref() }.map(|d| {
            let (w, h, depth) = (u64::from(d.width), u64::from(d.height), u64::from(d.depth));
            sizes::array_bytes(w, h, depth, d.format, d.num_channels)
        });
        // SAFETY: arguments forwarded unchanged.
        array_counted(array, bytes, || unsafe { f(array, desc) })
    })
}
