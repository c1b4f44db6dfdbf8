//! How programs find the driver's functions without linking them: `dlsym` on a libcuda handle
//! and `cuGetProcAddress(_v2)`. Both are interposed so that a covered entry point always
//! resolves to the guard's wrapper — the exact ABI the caller asked for, recognised by the
//! address the real driver returned — and everything else to the real function.
#![allow(non_snake_case)]

use super::alloc::*;
use super::context::*;
use super::graph::*;
use super::legacy::*;
use super::real::{real, real_dlsym};
use super::types::*;
use super::vmm::*;
use super::{boundary, guard, read_out, real_fn};
use std::ffi::{CStr, c_char, c_int, c_void};

/// The guard's wrapper for an exported name, if it covers it.
fn wrapper_for_name(name: &[u8]) -> Option<*mut c_void> {
    let f: *const () = match name {
        b"cuGetProcAddress" => cuGetProcAddress as *const (),
        b"cuGetProcAddress_v2" => cuGetProcAddress_v2 as *const (),
        b"cuMemAlloc_v2" => cuMemAlloc_v2 as *const (),
        b"cuMemAlloc" => cuMemAlloc as *const (),
        b"cuMemAllocPitch" => cuMemAllocPitch as *const (),
        b"cuMemFree" => cuMemFree as *const (),
        b"cuMemGetInfo" => cuMemGetInfo as *const (),
        b"cuDeviceTotalMem" => cuDeviceTotalMem as *const (),
        b"cuMemAllocPitch_v2" => cuMemAllocPitch_v2 as *const (),
        b"cuMemAllocManaged" => cuMemAllocManaged as *const (),
        b"cuMemAllocAsync" => cuMemAllocAsync as *const (),
        b"cuMemAllocAsync_ptsz" => cuMemAllocAsync_ptsz as *const (),
        b"cuMemAllocFromPoolAsync" => cuMemAllocFromPoolAsync as *const (),
        b"cuMemAllocFromPoolAsync_ptsz" => cuMemAllocFromPoolAsync_ptsz as *const (),
        b"cuMemFree_v2" => cuMemFree_v2 as *const (),
        b"cuMemFreeAsync" => cuMemFreeAsync as *const (),
        b"cuMemFreeAsync_ptsz" => cuMemFreeAsync_ptsz as *const (),
        b"cuMemPoolTrimTo" => cuMemPoolTrimTo as *const (),
        b"cuMemPoolCreate" => cuMemPoolCreate as *const (),
        b"cuMemPoolDestroy" => cuMemPoolDestroy as *const (),
        b"cuMemCreate" => cuMemCreate as *const (),
        b"cuMemRelease" => cuMemRelease as *const (),
        b"cuMemRetainAllocationHandle" => cuMemRetainAllocationHandle as *const (),
        b"cuMemMap" => cuMemMap as *const (),
        b"cuMemUnmap" => cuMemUnmap as *const (),
        b"cuArrayCreate_v2" => cuArrayCreate_v2 as *const (),
        b"cuArray3DCreate_v2" => cuArray3DCreate_v2 as *const (),
        b"cuMipmappedArrayCreate" => cuMipmappedArrayCreate as *const (),
        b"cuArrayDestroy" => cuArrayDestroy as *const (),
        b"cuMipmappedArrayDestroy" => cuMipmappedArrayDestroy as *const (),
        b"cuMemGetInfo_v2" => cuMemGetInfo_v2 as *const (),
        b"cuDeviceTotalMem_v2" => cuDeviceTotalMem_v2 as *const (),
        b"cuCtxCreate" => cuCtxCreate as *const (),
        b"cuCtxDestroy" => cuCtxDestroy as *const (),
        b"cuArrayCreate" => cuArrayCreate as *const (),
        b"cuArray3DCreate" => cuArray3DCreate as *const (),
        b"cuCtxCreate_v2" => cuCtxCreate_v2 as *const (),
        b"cuCtxCreate_v3" => cuCtxCreate_v3 as *const (),
        b"cuCtxCreate_v4" => cuCtxCreate_v4 as *const (),
        b"cuCtxDestroy_v2" => cuCtxDestroy_v2 as *const (),
        b"cuDevicePrimaryCtxRetain" => cuDevicePrimaryCtxRetain as *const (),
        b"cuDevicePrimaryCtxRelease_v2" => cuDevicePrimaryCtxRelease_v2 as *const (),
        b"cuDevicePrimaryCtxReset_v2" => cuDevicePrimaryCtxReset_v2 as *const (),
        b"cuModuleLoad" => cuModuleLoad as *const (),
        b"cuModuleLoadData" => cuModuleLoadData as *const (),
        b"cuModuleLoadDataEx" => cuModuleLoadDataEx as *const (),
        b"cuModuleLoadFatBinary" => cuModuleLoadFatBinary as *const (),
        b"cuModuleUnload" => cuModuleUnload as *const (),
        b"cuLibraryLoadData" => cuLibraryLoadData as *const (),
        b"cuLibraryLoadFromFile" => cuLibraryLoadFromFile as *const (),
        b"cuLibraryUnload" => cuLibraryUnload as *const (),
        b"cuGraphInstantiate" => cuGraphInstantiate as *const (),
        b"cuGraphInstantiate_v2" => cuGraphInstantiate_v2 as *const (),
        b"cuGraphInstantiateWithFlags" => cuGraphInstantiateWithFlags as *const (),
        b"cuGraphInstantiateWithParams" => cuGraphInstantiateWithParams as *const (),
        b"cuGraphInstantiateWithParams_ptsz" => cuGraphInstantiateWithParams_ptsz as *const (),
        b"cuGraphExecDestroy" => cuGraphExecDestroy as *const (),
        b"cuGraphDestroy" => cuGraphDestroy as *const (),
        b"cuStreamEndCapture" => cuStreamEndCapture as *const (),
        b"cuStreamEndCapture_ptsz" => cuStreamEndCapture_ptsz as *const (),
        b"cuGraphLaunch" => cuGraphLaunch as *const (),
        b"cuGraphLaunch_ptsz" => cuGraphLaunch_ptsz as *const (),
        b"cuGraphUpload" => cuGraphUpload as *const (),
        b"cuGraphUpload_ptsz" => cuGraphUpload_ptsz as *const (),
        b"cuDeviceGraphMemTrim" => cuDeviceGraphMemTrim as *const (),
        b"nvmlDeviceGetMemoryInfo" => nvmlDeviceGetMemoryInfo as *const (),
        b"nvmlDeviceGetMemoryInfo_v2" => nvmlDeviceGetMemoryInfo_v2 as *const (),
        _ => return None,
    };
    Some(f.cast_mut().cast())
}

/// The wrapper for the real function at `addr`: matched by address, so the caller gets the
/// wrapper of exactly the ABI version (and per-thread-stream variant) the driver chose.
fn wrapper_for_real(addr: usize) -> Option<*mut c_void> {
    if addr == 0 {
        return None;
    }
    let (name, _) = real()?.addrs.iter().find(|(_, a)| *a == addr)?;
    wrapper_for_name(name.as_bytes())
}

/// Decides an interposed `dlsym` call: returns the wrapper to hand out, or null to let the real
/// `dlsym` answer (it is then entered with the caller's own return address, so `RTLD_NEXT`
/// keeps its meaning). Also stores the real `dlsym`'s address in `*real_out`.
extern "C" fn dlsym_decide(
    handle: *mut c_void,
    name: *const c_char,
    real_out: *mut usize,
) -> *mut c_void {
    std::panic::catch_unwind(|| {
        let real_fn = real_dlsym()?;
        // SAFETY: real_out points at the naked trampoline's stack slot.
        unsafe { real_out.write(real_fn as usize) };
        if name.is_null() {
            return None;
        }
        // SAFETY: dlsym's contract: name is a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(name) }.to_bytes();
        if !(bytes.starts_with(b"cu") || bytes.starts_with(b"nvml")) {
            return None;
        }
        let wrapper = wrapper_for_name(bytes)?;
        guard()?;
        // Hand out the wrapper only where the real lookup finds the symbol at all.
        // SAFETY: forwarding the caller's handle and name to the real dlsym.
        if handle != libc::RTLD_NEXT && unsafe { real_fn(handle, name) }.is_null() {
            return None;
        }
        Some(wrapper)
    })
    .ok()
    .flatten()
    .unwrap_or(std::ptr::null_mut())
}

/// Interposed `dlsym`: a trampoline that asks [`dlsym_decide`] and otherwise tail-jumps to the
/// real `dlsym` with the original arguments and return address.
///
/// # Safety
/// As `dlsym(3)` requires.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // Stack: entry rsp ≡ 8 (mod 16); two pushes and 24 bytes make it 16-aligned for the call,
    // with [rsp] as the out-slot for the real dlsym's address.
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 24",
        "mov qword ptr [rsp], 0",
        "mov rdx, rsp",
        "call {decide}",
        "mov rcx, qword ptr [rsp]",
        "add rsp, 24",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jnz 2f",
        "test rcx, rcx",
        "jz 2f",
        "jmp rcx",
        "2:",
        "ret",
        decide = sym dlsym_decide,
    )
}

/// Interposed `dlsym` (see the x86-64 version).
///
/// # Safety
/// As `dlsym(3)` requires.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-48]!",
        "mov x29, sp",
        "stp x0, x1, [sp, #16]",
        "str xzr, [sp, #32]",
        "add x2, sp, #32",
        "bl {decide}",
        "ldr x16, [sp, #32]",
        "cbnz x0, 2f",
        "ldp x0, x1, [sp, #16]",
        "ldp x29, x30, [sp], #48",
        "cbz x16, 3f",
        "br x16",
        "3:",
        "mov x0, xzr",
        "ret",
        "2:",
        "ldp x29, x30, [sp], #48",
        "ret",
        decide = sym dlsym_decide,
    )
}

/// Suffixes the driver's ABI versions and per-thread-default-stream variants add to a name.
const VARIANT_SUFFIXES: [&[u8]; 6] = [b"", b"_v2", b"_v3", b"_ptsz", b"_ptds", b"_v2_ptds"];

/// Driver functions that take device memory (by base name): an unknown entry point for one of
/// these leaves memory uncounted. (Others the guard wraps, such as the primary-context release,
/// have old versions it deliberately leaves alone.)
const ALLOCATING: [&[u8]; 6] = [
    b"cuMemAlloc",
    b"cuMemCreate",
    b"cuArrayCreate",
    b"cuArray3DCreate",
    b"cuMipmappedArrayCreate",
    b"cuMemAllocFromPoolAsync",
];

/// Whether `symbol` (as `cuGetProcAddress` is asked: the base name, without version suffix) is
/// an allocating driver function some variant of which the guard wraps.
fn covers(symbol: &[u8]) -> bool {
    let allocating = ALLOCATING.iter().any(|a| symbol.starts_with(a));
    allocating
        && VARIANT_SUFFIXES.iter().any(|suffix| {
            let mut name = symbol.to_vec();
            name.extend_from_slice(suffix);
            wrapper_for_name(&name).is_some()
        })
}

/// Names already logged by [`substitute`], so each is logged once.
static UNKNOWN_LOGGED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn substitute(symbol: *const c_char, version: c_int, pfn: *mut *mut c_void) {
    if guard().is_none() {
        return;
    }
    // SAFETY: pfn is non-null (checked by callers) and was just written by the driver.
    let Some(real_fn) = (unsafe { read_out(pfn) }).filter(|f| !f.is_null()) else {
        return;
    };
    if let Some(w) = wrapper_for_real(real_fn as usize) {
        // SAFETY: as above; writing the same type back.
        unsafe { pfn.write(w) };
        return;
    }
    if symbol.is_null() {
        return;
    }
    // SAFETY: the caller passed a NUL-terminated symbol name, which the driver just read.
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    if !covers(name) {
        return;
    }
    // A variant of a function the guard wraps, at an address none of the variants it knows
    // has (a newer ABI version): it cannot be wrapped without its signature, so say so.
    let first = {
        let mut logged = UNKNOWN_LOGGED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = !logged.iter().any(|n| n == name);
        if first {
            logged.push(name.to_vec());
        }
        first
    };
    // Logged outside the lock (a fork while it is held must not leave it held in the child).
    if first {
        crate::log!(
            "vramslice-guard: cuGetProcAddress(\"{}\", version {version}) returned an entry point the guard does not know (a newer ABI version?); what it allocates is not counted by the guard (the device plugin's watchdog still sees it in NVML)",
            String::from_utf8_lossy(name)
        );
    }
}

/// Interposed `cuGetProcAddress_v2` (CUDA 12).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    boundary(|| {
        let f = real_fn!(cuGetProcAddress_v2);
        // SAFETY: arguments forwarded unchanged.
        let rc = unsafe { f(symbol, pfn, version, flags, status) };
        if rc == CUDA_SUCCESS && !pfn.is_null() {
            substitute(symbol, version, pfn);
        }
        rc
    })
}

/// Interposed `cuGetProcAddress` (CUDA 11 signature).
///
/// # Safety
/// As the CUDA driver API requires.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    boundary(|| {
        let rc = match real().and_then(|r| r.cuGetProcAddress) {
            // SAFETY: arguments forwarded unchanged.
            Some(f) => unsafe { f(symbol, pfn, version, flags) },
            None => {
                let f = real_fn!(cuGetProcAddress_v2);
                // SAFETY: the v2 ABI with a null status pointer is the v1 call.
                unsafe { f(symbol, pfn, version, flags, std::ptr::null_mut()) }
            }
        };
        if rc == CUDA_SUCCESS && !pfn.is_null() {
            substitute(symbol, version, pfn);
        }
        rc
    })
}
