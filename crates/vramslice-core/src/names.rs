//! Names fixed by the design contract, in one place: the API group, annotations, the bundled
//! scheduler's name, the guard library's file name and every environment variable vramslice
//! reads or sets. `vramslice_api::names` re-exports this module; never spell the strings
//! elsewhere.

/// API group of vramslice's resources.
pub const GROUP: &str = "vramslice.io";
/// API version of vramslice's resources.
pub const VERSION: &str = "v1alpha1";

/// Annotation the extender writes at bind: UUID of the GPU the pod was placed on; for a pod
/// spanning several GPUs (`vramslice.io/gpus`), their UUIDs comma-separated, by GPU index.
pub const ANNOTATION_GPU_UUID: &str = "vramslice.io/gpu-uuid";
/// Pod annotation spreading the pod's VRAM evenly over that many distinct GPUs of one node
/// (`"2"`: half of every container's units on each of two GPUs). Absent means 1.
pub const ANNOTATION_GPUS: &str = "vramslice.io/gpus";
/// Annotation the extender writes at bind: when the pod was assigned (RFC 3339).
pub const ANNOTATION_ASSIGNED_AT: &str = "vramslice.io/assigned-at";
/// Pod annotation choosing the placement policy for that pod: `binpack` or `spread`.
pub const ANNOTATION_POLICY: &str = "vramslice.io/policy";
/// Pod annotation that keeps the pod's scheduler name untouched (the webhook) when `"true"`.
pub const ANNOTATION_KEEP_SCHEDULER: &str = "vramslice.io/keep-scheduler-name";

/// Scheduler name of the bundled kube-scheduler.
pub const SCHEDULER_NAME: &str = "vramslice-scheduler";

/// File name of the guard library.
pub const GUARD_LIBRARY: &str = "libvramslice_guard.so";

/// The DRA driver name: the driver of vramslice's ResourceSlices and allocation results.
pub const DRA_DRIVER: &str = "vramslice.io";
/// The DeviceClass that selects vramslice's GPUs in DRA mode.
pub const DRA_DEVICE_CLASS: &str = "vram.vramslice.io";
/// The consumable capacity a DRA device publishes its memory as.
pub const DRA_CAPACITY_MEMORY: &str = "memory";

/// Environment variables: what the device plugin's Allocate sets, what the guard and the
/// sidecar runtime read.
pub mod env {
    /// The container's limit in bytes (units × unit bytes); with a limit file it only lowers.
    pub const VRAM_LIMIT_BYTES: &str = "VRAMSLICE_VRAM_LIMIT_BYTES";
    /// Per-GPU limits, `<uuid>:<bytes>,<uuid>:<bytes>,...` (bytes or quantities); with a limit
    /// file each only lowers that GPU's limit.
    pub const VRAM_LIMITS: &str = "VRAMSLICE_VRAM_LIMITS";
    /// In-container path of the read-only limit file.
    pub const LIMIT_FILE: &str = "VRAMSLICE_LIMIT_FILE";
    /// UUID of the container's GPU.
    pub const GPU_UUID: &str = "VRAMSLICE_GPU_UUID";
    /// In-container path of the container's accounting directory.
    pub const ACCOUNTING_DIR: &str = "VRAMSLICE_ACCOUNTING_DIR";
    /// Which GPUs the NVIDIA container runtime exposes.
    pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
    /// The dynamic loader's preload list.
    pub const LD_PRELOAD: &str = "LD_PRELOAD";

    /// Guard: path or soname of the real CUDA driver library it forwards to.
    pub const REAL_LIBCUDA: &str = "VRAMSLICE_REAL_LIBCUDA";
    /// Guard: path or soname of the real NVML library.
    pub const REAL_LIBNVML: &str = "VRAMSLICE_REAL_LIBNVML";
    /// Guard: `0` stops counting `cuMemAllocManaged`.
    pub const COUNT_MANAGED: &str = "VRAMSLICE_COUNT_MANAGED";
    /// Guard: `0` stops virtualising NVML's memory info.
    pub const VIRTUALIZE_NVML: &str = "VRAMSLICE_VIRTUALIZE_NVML";
    /// Guard: bytes charged for a context when the driver cannot be asked before it exists.
    pub const CONTEXT_ESTIMATE_BYTES: &str = "VRAMSLICE_CONTEXT_ESTIMATE_BYTES";

    /// Sidecar: where learned peaks persist.
    pub const PROFILE_DIR: &str = "VRAMSLICE_PROFILE_DIR";
    /// Sidecar: fraction of the limit admitted at once.
    pub const HIGH_WATER: &str = "VRAMSLICE_HIGH_WATER";
    /// Sidecar: reservation of a job with no known peak, as a fraction of the limit.
    pub const FIRST_RUN_FRACTION: &str = "VRAMSLICE_FIRST_RUN_FRACTION";
    /// Sidecar: reservation = learned peak × this.
    pub const PEAK_MARGIN: &str = "VRAMSLICE_PEAK_MARGIN";
    /// Sidecar: most jobs waiting at once.
    pub const QUEUE_MAX: &str = "VRAMSLICE_QUEUE_MAX";
    /// Sidecar: longest wait for admission.
    pub const QUEUE_TIMEOUT: &str = "VRAMSLICE_QUEUE_TIMEOUT";
    /// Sidecar: retries after out-of-memory.
    pub const OOM_RETRIES: &str = "VRAMSLICE_OOM_RETRIES";
    /// Sidecar: first backoff wait after out-of-memory.
    pub const OOM_BACKOFF: &str = "VRAMSLICE_OOM_BACKOFF";
    /// Sidecar: whose growth a job's peak is, `process` or `container`.
    pub const PEAK_SCOPE: &str = "VRAMSLICE_PEAK_SCOPE";
    /// Sidecar: `host:port` to serve `/metrics` on.
    pub const METRICS_ADDR: &str = "VRAMSLICE_METRICS_ADDR";
    /// Sidecar: the CUDA driver library it asks for memory info (tests point it at a fake).
    pub const SIDECAR_LIBCUDA: &str = "VRAMSLICE_SIDECAR_LIBCUDA";
}
