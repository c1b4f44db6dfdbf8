//! Exported entry points of the virtual memory management API: physical allocations
//! (`cuMemCreate`), their handle references and their mappings. The charge is taken at
//! `cuMemCreate` and given back when the driver frees the memory: at the last `cuMemRelease` or
//! `cuMemUnmap`, whichever comes last (policy: `crate::guard` `physical`).
#![allow(non_snake_case)]

use super::alloc::counted;
use super::types::*;
use super::{On, after_success, boundary, guard, read_out, real_fn};
use crate::tracker::Kind;
use std::ffi::c_void;

/// Interposed `cuMemCreate`: counted when the location is a device.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    size: usize,
    prop: *const MemAllocationProp,
    flags: u64,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemCreate);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(handle, size, prop, flags) };
        // SAFETY: prop is null or points at a CUmemAllocationProp, whose first four ints we read.
        let device = unsafe { prop.as_ref() }
            .filter(|p| p.location_type == CU_MEM_LOCATION_TYPE_DEVICE)
            .map(|p| p.location_id);
        let Some(device) = device else {
            return call();
        };
        // SAFETY: handle is read only after the driver reported success.
        counted(
            On::Device(device),
            size as u64,
            Kind::Physical,
            call,
            || unsafe { read_out(handle) },
        )
    })
}

/// Interposed `cuMemRelease`: one reference fewer; the bytes go back when no mapping is left.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemRelease);
        // SAFETY: argument forwarded unchanged.
        let call = || unsafe { f(handle) };
        let Some(g) = guard() else { return call() };
        let plan = g.physical_release(handle);
        let rc = call();
        g.physical_done(plan, rc == CUDA_SUCCESS);
        rc
    })
}

/// Interposed `cuMemRetainAllocationHandle`: the handle it returns has one more reference.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRetainAllocationHandle(
    handle: *mut u64,
    addr: *mut c_void,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemRetainAllocationHandle);
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(handle, addr) };
        after_success(rc, |g| {
            // SAFETY: handle is read only after the driver reported success.
            if let Some(h) = unsafe { read_out(handle) } {
                g.physical_retained(h);
            }
        })
    })
}

/// Interposed `cuMemMap`: the mapping keeps its physical allocation alive.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: u64,
    flags: u64,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemMap);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(ptr, size, offset, handle, flags) };
        let Some(g) = guard() else { return call() };
        let pending = g.physical_map(handle);
        let rc = call();
        g.physical_map_done(pending, ptr, size as u64, rc == CUDA_SUCCESS);
        rc
    })
}

/// Interposed `cuMemUnmap`: every mapping in the range goes; allocations nothing else holds are
/// given back.
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuMemUnmap);
        // SAFETY: arguments forwarded unchanged.
        let call = || unsafe { f(ptr, size) };
        let Some(g) = guard() else { return call() };
        let plan = g.physical_unmap(ptr, size as u64);
        let rc = call();
        g.physical_done(plan, rc == CUDA_SUCCESS);
        rc
    })
}
