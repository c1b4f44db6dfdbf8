//! Live usage from the CUDA driver's `cuMemGetInfo`, with the driver loaded at run time (no CUDA
//! toolkit at build time, no hard dependency at run time).
//!
//! The library opened is `$VRAMSLICE_SIDECAR_LIBCUDA` or `libcuda.so.1`, with `RTLD_GLOBAL`.
//! Symbols are then looked up in the process's global scope, so when the guard is preloaded its
//! `cuMemGetInfo` answers (limit as total, limit − used as free); otherwise the driver's does.
//! Queries run in device 0's primary context (the one frameworks share), retained once and
//! made current only for the call (the thread's previous context is restored).

use std::ffi::{c_int, c_uint, c_void};

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW, Symbol};

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;

type CuInit = unsafe extern "C" fn(c_uint) -> CuResult;
type CuDeviceGet = unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult;
type CuPrimaryCtxRetain = unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult;
type CuCtxSet = unsafe extern "C" fn(CuContext) -> CuResult;
type CuCtxGet = unsafe extern "C" fn(*mut CuContext) -> CuResult;
type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;

/// Environment variable naming the driver library to open.
pub const LIBCUDA_ENV: &str = vramslice_core::names::env::SIDECAR_LIBCUDA;

/// `cuMemGetInfo` through a dynamically loaded CUDA driver.
pub struct CudaMemInfo {
    // Keeps the driver mapped for as long as the function pointers below live.
    _driver: Library,
    ctx: CuContext,
    set_current: CuCtxSet,
    get_current: CuCtxGet,
    mem_get_info: CuMemGetInfo,
}

// SAFETY: a CUDA context handle may be made current on any thread (the driver API is
// thread-safe), and the function pointers are plain code addresses.
unsafe impl Send for CudaMemInfo {}
// SAFETY: as above; every use makes the context current on the calling thread only and
// restores that thread's previous context.
unsafe impl Sync for CudaMemInfo {}

impl std::fmt::Debug for CudaMemInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMemInfo").finish_non_exhaustive()
    }
}

/// The CUDA driver could not be loaded, lacks an entry point, or answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CudaDriverError(String);

fn check(what: &str, r: CuResult) -> Result<(), CudaDriverError> {
    if r == 0 {
        Ok(())
    } else {
        Err(CudaDriverError(format!("{what} returned CUDA error {r}")))
    }
}

fn symbol<T: Copy>(global: &Library, name: &str) -> Result<T, CudaDriverError> {
    let cname = format!("{name}\0");
    // SAFETY: each caller names a CUDA driver entry point and gives `T` the C signature the
    // CUDA driver API documents for it.
    let sym: Result<Symbol<T>, _> = unsafe { global.get(cname.as_bytes()) };
    sym.map(|s| *s)
        .map_err(|e| CudaDriverError(format!("symbol {name} not found: {e}")))
}

impl CudaMemInfo {
    /// Open the driver, initialise it and retain device 0's primary context.
    pub fn load() -> Result<Self, CudaDriverError> {
        let path = std::env::var(LIBCUDA_ENV).unwrap_or_else(|_| "libcuda.so.1".to_string());
        // SAFETY: loading the CUDA driver runs its initialisers, which have no preconditions.
        let driver = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| CudaDriverError(format!("cannot load {path}: {e}")))?;
        let global = Library::this();
        let init: CuInit = symbol(&global, "cuInit").or_else(|_| symbol(&driver, "cuInit"))?;
        let device_get: CuDeviceGet =
            symbol(&global, "cuDeviceGet").or_else(|_| symbol(&driver, "cuDeviceGet"))?;
        let retain: CuPrimaryCtxRetain = symbol(&global, "cuDevicePrimaryCtxRetain")
            .or_else(|_| symbol(&driver, "cuDevicePrimaryCtxRetain"))?;
        let set_current: CuCtxSet =
            symbol(&global, "cuCtxSetCurrent").or_else(|_| symbol(&driver, "cuCtxSetCurrent"))?;
        let get_current: CuCtxGet =
            symbol(&global, "cuCtxGetCurrent").or_else(|_| symbol(&driver, "cuCtxGetCurrent"))?;
        let mem_get_info: CuMemGetInfo =
            symbol(&global, "cuMemGetInfo_v2").or_else(|_| symbol(&driver, "cuMemGetInfo_v2"))?;
        // SAFETY: cuInit takes flags 0 and has no other preconditions.
        check("cuInit", unsafe { init(0) })?;
        let mut device: CuDevice = 0;
        // SAFETY: `device` is a valid out-pointer for the call's duration.
        check("cuDeviceGet", unsafe { device_get(&mut device, 0) })?;
        let mut ctx: CuContext = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer; `device` came from cuDeviceGet.
        check("cuDevicePrimaryCtxRetain", unsafe {
            retain(&mut ctx, device)
        })?;
        Ok(Self {
            _driver: driver,
            ctx,
            set_current,
            get_current,
            mem_get_info,
        })
    }
}

impl CudaMemInfo {
    /// `cuMemGetInfo` on device 0's primary context: (free, total) bytes. The calling thread's
    /// current context is restored afterwards.
    pub fn mem_get_info(&self) -> Result<(u64, u64), CudaDriverError> {
        let (mut free, mut total) = (0usize, 0usize);
        let mut previous: CuContext = std::ptr::null_mut();
        // SAFETY: `previous` is a valid out-pointer for the call.
        check("cuCtxGetCurrent", unsafe {
            (self.get_current)(&mut previous)
        })?;
        // SAFETY: `self.ctx` is a retained primary context, valid until the process exits
        // (it is never released); making it current affects only the calling thread.
        check("cuCtxSetCurrent", unsafe { (self.set_current)(self.ctx) })?;
        // SAFETY: both out-pointers are valid for the call; a context is current.
        let r = unsafe { (self.mem_get_info)(&mut free, &mut total) };
        // SAFETY: restores the thread's previous context (possibly none), as it was.
        let _ = unsafe { (self.set_current)(previous) };
        check("cuMemGetInfo", r)?;
        Ok((free as u64, total as u64))
    }
}
