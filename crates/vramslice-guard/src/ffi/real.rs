//! The real driver: the real `dlsym`, the real `libcuda` (and NVML) loaded with `RTLD_LOCAL`,
//! and a table of its entry points typed as the CUDA headers declare them.
#![allow(non_snake_case)]

use super::types::*;
use crate::set_up::SetUp;
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Signature of `dlsym`.
pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// The C library's `dlsym`, found with `dlvsym(RTLD_NEXT, ...)` (never through the interposed
/// `dlsym`, so looking it up cannot recurse).
pub fn real_dlsym() -> Option<DlsymFn> {
    let mut p = REAL_DLSYM.load(Ordering::Acquire);
    if p == 0 {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: dlvsym with RTLD_NEXT and two NUL-terminated literals has no other precondition.
            let q = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !q.is_null() {
                p = q as usize;
                REAL_DLSYM.store(p, Ordering::Release);
                break;
            }
        }
    }
    // SAFETY: p is 0 or the address of glibc's dlsym, whose C signature is DlsymFn.
    (p != 0).then(|| unsafe { std::mem::transmute::<usize, DlsymFn>(p) })
}

/// Looks `name` up in `handle` with the real dlsym.
pub fn lookup(handle: *mut c_void, name: &CStr) -> *mut c_void {
    match real_dlsym() {
        // SAFETY: handle came from dlopen (or is a pseudo-handle); name is NUL-terminated.
        Some(f) => unsafe { f(handle, name.as_ptr()) },
        None => std::ptr::null_mut(),
    }
}

fn open(path: &str) -> Result<*mut c_void, String> {
    let c = CString::new(path).map_err(|_| format!("library path {path:?} contains a NUL byte"))?;
    // SAFETY: c is NUL-terminated; dlopen has no other precondition.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated message valid until the next dl call.
        let err = unsafe { libc::dlerror() };
        let msg = if err.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: non-null dlerror result is a NUL-terminated string.
            unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("cannot load {path}: {msg}"));
    }
    Ok(h)
}

macro_rules! real_table {
    ($( $name:ident : fn($($arg:ty),*) -> $ret:ty; )*) => {
        /// Entry points of the real driver (`None` where it does not export one).
        #[allow(non_snake_case)]
        pub struct Real {
            $( pub $name: Option<unsafe extern "C" fn($($arg),*) -> $ret>, )*
            /// Name and address of every entry point (0 when absent): to recognise what
            /// `cuGetProcAddress` returned.
            pub addrs: Vec<(&'static str, usize)>,
        }

        impl Real {
            fn load(handle: *mut c_void) -> Real {
                let mut addrs = Vec::new();
                $(
                    let $name = {
                        let name = concat!(stringify!($name), "\0");
                        let p = CStr::from_bytes_with_nul(name.as_bytes())
                            .map(|n| lookup(handle, n))
                            .unwrap_or(std::ptr::null_mut());
                        addrs.push((stringify!($name), p as usize));
                        // SAFETY: the symbol of this name in the CUDA driver has exactly this C
                        // signature (cuda.h); a null pointer stays None.
                        (!p.is_null()).then(|| unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(p)
                        })
                    };
                )*
                Real { $($name,)* addrs }
            }
        }
    };
}

real_table! {
    cuGetProcAddress: fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;
    cuGetProcAddress_v2: fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
    cuMemAlloc_v2: fn(*mut CUdeviceptr, usize) -> CUresult;
    cuMemAllocPitch_v2: fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
    cuMemAllocManaged: fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
    cuMemAllocAsync: fn(*mut CUdeviceptr, usize, Handle) -> CUresult;
    cuMemAllocAsync_ptsz: fn(*mut CUdeviceptr, usize, Handle) -> CUresult;
    cuMemAllocFromPoolAsync: fn(*mut CUdeviceptr, usize, Handle, Handle) -> CUresult;
    cuMemAllocFromPoolAsync_ptsz: fn(*mut CUdeviceptr, usize, Handle, Handle) -> CUresult;
    cuMemFree_v2: fn(CUdeviceptr) -> CUresult;
    cuMemAlloc: fn(*mut c_uint, c_uint) -> CUresult;
    cuMemAllocPitch: fn(*mut c_uint, *mut c_uint, c_uint, c_uint, c_uint) -> CUresult;
    cuMemFree: fn(c_uint) -> CUresult;
    cuMemGetInfo: fn(*mut c_uint, *mut c_uint) -> CUresult;
    cuDeviceTotalMem: fn(*mut c_uint, CUdevice) -> CUresult;
    cuMemFreeAsync: fn(CUdeviceptr, Handle) -> CUresult;
    cuMemFreeAsync_ptsz: fn(CUdeviceptr, Handle) -> CUresult;
    cuMemPoolTrimTo: fn(Handle, usize) -> CUresult;
    cuMemCreate: fn(*mut u64, usize, *const MemAllocationProp, u64) -> CUresult;
    cuMemRelease: fn(u64) -> CUresult;
    cuMemRetainAllocationHandle: fn(*mut u64, *mut c_void) -> CUresult;
    cuMemMap: fn(CUdeviceptr, usize, usize, u64, u64) -> CUresult;
    cuMemUnmap: fn(CUdeviceptr, usize) -> CUresult;
    cuArrayCreate_v2: fn(*mut Handle, *const ArrayDescriptor) -> CUresult;
    cuArray3DCreate_v2: fn(*mut Handle, *const Array3dDescriptor) -> CUresult;
    cuMipmappedArrayCreate: fn(*mut Handle, *const Array3dDescriptor, c_uint) -> CUresult;
    cuArrayCreate: fn(*mut Handle, *const ArrayDescriptorV1) -> CUresult;
    cuArray3DCreate: fn(*mut Handle, *const Array3dDescriptorV1) -> CUresult;
    cuArrayDestroy: fn(Handle) -> CUresult;
    cuMipmappedArrayDestroy: fn(Handle) -> CUresult;
    cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> CUresult;
    cuDeviceTotalMem_v2: fn(*mut usize, CUdevice) -> CUresult;
    cuCtxCreate_v2: fn(*mut Handle, c_uint, CUdevice) -> CUresult;
    cuCtxCreate_v3: fn(*mut Handle, *mut c_void, c_int, c_uint, CUdevice) -> CUresult;
    cuCtxCreate_v4: fn(*mut Handle, *mut c_void, c_uint, CUdevice) -> CUresult;
    cuCtxDestroy_v2: fn(Handle) -> CUresult;
    cuCtxCreate: fn(*mut Handle, c_uint, CUdevice) -> CUresult;
    cuCtxDestroy: fn(Handle) -> CUresult;
    cuDevicePrimaryCtxRetain: fn(*mut Handle, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRelease_v2: fn(CUdevice) -> CUresult;
    cuDevicePrimaryCtxReset_v2: fn(CUdevice) -> CUresult;
    cuModuleLoad: fn(*mut Handle, *const c_char) -> CUresult;
    cuModuleLoadData: fn(*mut Handle, *const c_void) -> CUresult;
    cuModuleLoadDataEx: fn(*mut Handle, *const c_void, c_uint, *mut c_void, *mut *mut c_void) -> CUresult;
    cuModuleLoadFatBinary: fn(*mut Handle, *const c_void) -> CUresult;
    cuModuleUnload: fn(Handle) -> CUresult;
    cuLibraryLoadData: fn(*mut Handle, *const c_void, *mut c_void, *mut *mut c_void, c_uint, *mut c_void, *mut *mut c_void, c_uint) -> CUresult;
    cuLibraryLoadFromFile: fn(*mut Handle, *const c_char, *mut c_void, *mut *mut c_void, c_uint, *mut c_void, *mut *mut c_void, c_uint) -> CUresult;
    cuLibraryUnload: fn(Handle) -> CUresult;
    cuCtxGetDevice: fn(*mut CUdevice) -> CUresult;
    cuCtxPushCurrent_v2: fn(Handle) -> CUresult;
    cuCtxPopCurrent_v2: fn(*mut Handle) -> CUresult;
    cuStreamGetCtx: fn(Handle, *mut Handle) -> CUresult;
    cuStreamGetDevice: fn(Handle, *mut CUdevice) -> CUresult;
    cuDeviceGetCount: fn(*mut c_int) -> CUresult;
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CUdevice) -> CUresult;
    cuDeviceGetUuid: fn(*mut CUuuid, CUdevice) -> CUresult;
    cuDeviceGetUuid_v2: fn(*mut CUuuid, CUdevice) -> CUresult;
    cuDeviceGetMemPool: fn(*mut Handle, CUdevice) -> CUresult;
    cuDeviceGetDefaultMemPool: fn(*mut Handle, CUdevice) -> CUresult;
    cuMemPoolCreate: fn(*mut Handle, *const MemAllocationProp) -> CUresult;
    cuMemPoolDestroy: fn(Handle) -> CUresult;
    cuMemPoolGetAttribute: fn(Handle, c_int, *mut c_void) -> CUresult;
    cuStreamIsCapturing: fn(Handle, *mut c_int) -> CUresult;
    cuStreamIsCapturing_ptsz: fn(Handle, *mut c_int) -> CUresult;
    cuStreamEndCapture: fn(Handle, *mut Handle) -> CUresult;
    cuStreamEndCapture_ptsz: fn(Handle, *mut Handle) -> CUresult;
    cuStreamGetCaptureInfo_v2: fn(Handle, *mut c_int, *mut u64, *mut Handle, *mut *const Handle, *mut usize) -> CUresult;
    cuStreamGetCaptureInfo_v2_ptsz: fn(Handle, *mut c_int, *mut u64, *mut Handle, *mut *const Handle, *mut usize) -> CUresult;
    cuStreamGetCaptureInfo_v3: fn(Handle, *mut c_int, *mut u64, *mut Handle, *mut *const Handle, *mut *const c_void, *mut usize) -> CUresult;
    cuStreamGetCaptureInfo_v3_ptsz: fn(Handle, *mut c_int, *mut u64, *mut Handle, *mut *const Handle, *mut *const c_void, *mut usize) -> CUresult;
    cuGraphDestroy: fn(Handle) -> CUresult;
    cuGraphGetNodes: fn(Handle, *mut Handle, *mut usize) -> CUresult;
    cuGraphNodeGetType: fn(Handle, *mut c_int) -> CUresult;
    cuGraphMemAllocNodeGetParams: fn(Handle, *mut MemAllocNodeParams) -> CUresult;
    cuGraphChildGraphNodeGetGraph: fn(Handle, *mut Handle) -> CUresult;
    cuGraphInstantiate: fn(*mut Handle, Handle, *mut Handle, *mut c_char, usize) -> CUresult;
    cuGraphInstantiate_v2: fn(*mut Handle, Handle, *mut Handle, *mut c_char, usize) -> CUresult;
    cuGraphInstantiateWithFlags: fn(*mut Handle, Handle, u64) -> CUresult;
    cuGraphInstantiateWithParams: fn(*mut Handle, Handle, *mut GraphInstantiateParams) -> CUresult;
    cuGraphInstantiateWithParams_ptsz: fn(*mut Handle, Handle, *mut GraphInstantiateParams) -> CUresult;
    cuGraphExecDestroy: fn(Handle) -> CUresult;
    cuGraphLaunch: fn(Handle, Handle) -> CUresult;
    cuGraphLaunch_ptsz: fn(Handle, Handle) -> CUresult;
    cuGraphUpload: fn(Handle, Handle) -> CUresult;
    cuGraphUpload_ptsz: fn(Handle, Handle) -> CUresult;
    cuDeviceGetGraphMemAttribute: fn(CUdevice, c_int, *mut c_void) -> CUresult;
    cuDeviceGraphMemTrim: fn(CUdevice) -> CUresult;
}

/// NVML's memory queries, and the device UUID query that maps them to an account.
pub struct RealNvml {
    /// `nvmlDeviceGetUUID`.
    pub get_uuid: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, c_uint) -> c_int>,
    /// `nvmlDeviceGetMemoryInfo`.
    pub get_memory_info: Option<unsafe extern "C" fn(*mut c_void, *mut NvmlMemory) -> c_int>,
    /// `nvmlDeviceGetMemoryInfo_v2`.
    pub get_memory_info_v2: Option<unsafe extern "C" fn(*mut c_void, *mut NvmlMemoryV2) -> c_int>,
}

static REAL: SetUp<Option<Real>> = SetUp::new();
static REAL_NVML: SetUp<Option<RealNvml>> = SetUp::new();

/// In a forked child: loads the parent's other threads were running start over.
pub(super) fn forget_unfinished_set_ups() {
    REAL.forget_unfinished();
    REAL_NVML.forget_unfinished();
}

/// The real driver, loaded on first use from `VRAMSLICE_REAL_LIBCUDA`.
pub fn real() -> Option<&'static Real> {
    REAL.get_or_init(|| {
        let path = &super::config().real_libcuda;
        match open(path).and_then(|h| not_the_guard(h, path, c"cuMemAlloc_v2")) {
            Ok(h) => Some(Real::load(h)),
            Err(e) => {
                crate::log!(
                    "vramslice-guard: {e}; CUDA calls fail with CUDA_ERROR_NOT_INITIALIZED"
                );
                None
            }
        }
    })
    .as_ref()
}

/// The base address of the loaded object that holds `addr`, if any.
fn object_of(addr: *const c_void) -> Option<usize> {
    // SAFETY: a zeroed Dl_info is valid; dladdr only writes it, and reads nothing but `addr`.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr accepts any address; it answers 0 for one no loaded object holds.
    let found = unsafe { libc::dladdr(addr, &mut info) } != 0;
    (found && !info.dli_fbase.is_null()).then_some(info.dli_fbase as usize)
}

/// `h`, unless the library at `path` is this guard itself (a `VRAMSLICE_REAL_LIBCUDA` or
/// `_LIBNVML` naming the guard, or a link to it named like the driver): calling "the real"
/// entry points would then call the guard's own wrappers, each itself, until the stack runs
/// out and the program dies.
fn not_the_guard(h: *mut c_void, path: &str, probe: &CStr) -> Result<*mut c_void, String> {
    let theirs = lookup(h, probe);
    let ours = object_of(object_of as *const c_void);
    if !theirs.is_null() && ours.is_some() && object_of(theirs) == ours {
        return Err(format!(
            "{path} is the guard library itself, not the real driver (check VRAMSLICE_REAL_LIBCUDA / VRAMSLICE_REAL_LIBNVML)"
        ));
    }
    Ok(h)
}

/// The real NVML, loaded on first use from `VRAMSLICE_REAL_LIBNVML`.
pub fn real_nvml() -> Option<&'static RealNvml> {
    REAL_NVML.get_or_init(load_real_nvml).as_ref()
}

fn load_real_nvml() -> Option<RealNvml> {
    let path = &super::config().real_libnvml;
    let h = open(path)
        .and_then(|h| not_the_guard(h, path, c"nvmlDeviceGetMemoryInfo"))
        .inspect_err(|e| crate::log!("vramslice-guard: {e}"))
        .ok()?;
    let a = lookup(h, c"nvmlDeviceGetMemoryInfo");
    let b = lookup(h, c"nvmlDeviceGetMemoryInfo_v2");
    let u = lookup(h, c"nvmlDeviceGetUUID");
    // SAFETY: these NVML symbols have exactly these C signatures (nvml.h); null stays None.
    Some(unsafe {
        RealNvml {
            get_uuid: (!u.is_null()).then(|| std::mem::transmute::<*mut c_void, _>(u)),
            get_memory_info: (!a.is_null()).then(|| std::mem::transmute::<*mut c_void, _>(a)),
            get_memory_info_v2: (!b.is_null()).then(|| std::mem::transmute::<*mut c_void, _>(b)),
        }
    })
}
