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

/// Whether a `CUmemLocationType` is host memory: `CU_MEM_LOCATION_TYPE_HOST` (2),
/// `_HOST_NUMA` (3) or `_HOST_NUMA_CURRENT` (4).
pub fn is_host_location(kind: c_int) -> bool {
    (2..=4).contains(&kind)
}
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`.
pub const CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: c_int = 5;
/// `CU_GRAPH_NODE_TYPE_GRAPH` (a child graph node).
pub const CU_GRAPH_NODE_TYPE_GRAPH: c_int = 4;
/// `CU_GRAPH_NODE_TYPE_MEM_ALLOC`.
pub const CU_GRAPH_NODE_TYPE_MEM_ALLOC: c_int = 10;
/// `CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT`.
pub const CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT: c_int = 0;
/// `CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`.
pub const CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT: c_int = 2;
/// `CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD`: instantiation also uploads (maps) the graph.
pub const CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD: u64 = 2;
/// `CU_STREAM_CAPTURE_STATUS_NONE`.
pub const CU_STREAM_CAPTURE_STATUS_NONE: c_int = 0;
/// `CU_STREAM_PER_THREAD`: the calling thread's default stream, as a handle.
pub const CU_STREAM_PER_THREAD: u64 = 0x2;
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

/// `CUDA_MEM_ALLOC_NODE_PARAMS` (v1 and v2 share this layout): `CUmemPoolProps` (88 bytes),
/// then the access descriptors, the size and the address.
#[repr(C)]
pub struct MemAllocNodeParams {
    /// `poolProps.allocType`, `handleTypes`, `location.type`, `location.id`.
    pub pool: MemAllocationProp,
    /// `poolProps.win32SecurityAttributes`.
    pub win32_security_attributes: *mut c_void,
    /// `poolProps.maxSize`.
    pub max_size: usize,
    /// `poolProps.usage`.
    pub usage: u16,
    /// `poolProps.reserved`.
    pub reserved: [u8; 54],
    /// `accessDescs`.
    pub access_descs: *const c_void,
    /// `accessDescCount`.
    pub access_desc_count: usize,
    /// `bytesize`.
    pub bytesize: usize,
    /// `dptr`.
    pub dptr: CUdeviceptr,
}

const _: () = assert!(std::mem::size_of::<MemAllocNodeParams>() == 120);
const _: () = assert!(std::mem::offset_of!(MemAllocNodeParams, access_descs) == 88);
const _: () = assert!(std::mem::offset_of!(MemAllocNodeParams, bytesize) == 104);

impl MemAllocNodeParams {
    /// All zero, for the driver to fill.
    pub fn zeroed() -> MemAllocNodeParams {
        MemAllocNodeParams {
            pool: MemAllocationProp {
                alloc_type: 0,
                handle_types: 0,
                location_type: 0,
                location_id: 0,
            },
            win32_security_attributes: std::ptr::null_mut(),
            max_size: 0,
            usage: 0,
            reserved: [0; 54],
            access_descs: std::ptr::null(),
            access_desc_count: 0,
            bytesize: 0,
            dptr: 0,
        }
    }
}

/// `CUDA_GRAPH_INSTANTIATE_PARAMS`.
#[repr(C)]
pub struct GraphInstantiateParams {
    /// `flags` (`CUDA_GRAPH_INSTANTIATE_FLAG_*`).
    pub flags: u64,
    /// `hUploadStream`.
    pub upload_stream: Handle,
    /// `hErrNode_out`.
    pub err_node_out: Handle,
    /// `result_out`.
    pub result_out: c_int,
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

/// `CUDA_ARRAY_DESCRIPTOR_v1` (32-bit dimensions).
#[repr(C)]
pub struct ArrayDescriptorV1 {
    /// Width in elements.
    pub width: c_uint,
    /// Height in elements.
    pub height: c_uint,
    /// `CUarray_format`.
    pub format: c_int,
    /// Channels per element.
    pub num_channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR_v1` (32-bit dimensions).
#[repr(C)]
pub struct Array3dDescriptorV1 {
    /// Width in elements.
    pub width: c_uint,
    /// Height in elements.
    pub height: c_uint,
    /// Depth in elements.
    pub depth: c_uint,
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
