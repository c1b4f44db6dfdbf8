//! C types and constants of the CUDA driver API and NVML that the guard touches.

use std::ffi::{c_int, c_uint, c_void};

/// `CUresult`.
pub type CUresult = c_int;
/// `CUdevice`.
pub type CUdevice = c_int;
/// `CUdeviceptr`.
pub type CUdeviceptr = u64;
/// Any opaque handle (`CUcontext`, `CUstream`, `CUmodule`, `CUarray`, `CUmemoryPool`...).
pub type Handle = *mut c_void;

/// `CUDA_SUCCESS`.
pub const CUDA_SUCCESS: CUresult = 0;
/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
/// `CUDA_ERROR_NOT_INITIALIZED`.
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
/// `CUDA_ERROR_NOT_FOUND`.
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
/// `CUDA_ERROR_UNKNOWN`: what a caught panic becomes.
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;
/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`.
pub const CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: c_int = 5;
/// `NVML_ERROR_UNINITIALIZED`.
pub const NVML_ERROR_UNINITIALIZED: c_int = 1;
/// `NVML_SUCCESS`.
pub const NVML_SUCCESS: c_int = 0;
/// Bytes of the buffer `nvmlDeviceGetUUID` needs (`NVML_DEVICE_UUID_V2_BUFFER_SIZE`).
pub const NVML_UUID_BUFFER: usize = 96;
/// `NVML_ERROR_UNKNOWN`.
pub const NVML_ERROR_UNKNOWN: c_int = 999;

/// `CUuuid`: a device's 16 UUID bytes.
#[repr(C)]
pub struct CUuuid {
    /// The bytes.
    pub bytes: [u8; 16],
}

/// The leading fields of `CUmemAllocationProp` and of `CUmemPoolProps` (all the guard reads;
/// both begin with the allocation type, the handle types and the location).
#[repr(C)]
pub struct MemAllocationProp {
    /// `CUmemAllocationType`.
    pub alloc_type: c_int,
    /// `CUmemAllocationHandleType`.
    pub handle_types: c_int,
    /// `CUmemLocation.type`.
    pub location_type: c_int,
    /// `CUmemLocation.id`.
    pub location_id: c_int,
}

/// `CUDA_ARRAY_DESCRIPTOR`.
#[repr(C)]
pub struct ArrayDescriptor {
    /// Width in elements.
    pub width: usize,
    /// Height in elements.
    pub height: usize,
    /// `CUarray_format`.
    pub format: c_int,
    /// Channels per element.
    pub num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR`.
#[repr(C)]
pub struct Array3dDescriptor {
    /// Width in elements.
    pub width: usize,
    /// Height in elements.
    pub height: usize,
    /// Depth in elements.
    pub depth: usize,
    /// `CUarray_format`.
    pub format: c_int,
    /// Channels per element.
    pub num_channels: c_uint,
    /// Flags.
    pub flags: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    /// Total bytes.
    pub total: u64,
    /// Free bytes.
    pub free: u64,
    /// Used bytes.
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    /// Struct version.
    pub version: c_uint,
    /// Total bytes.
    pub total: u64,
    /// Reserved bytes.
    pub reserved: u64,
    /// Free bytes.
    pub free: u64,
    /// Used bytes.
    pub used: u64,
}
