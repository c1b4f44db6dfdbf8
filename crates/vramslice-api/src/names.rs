//! Names fixed by the design contract. Use these constants; never spell the strings elsewhere.

/// API group of vramslice's resources.
pub const GROUP: &str = "vramslice.io";
/// API version of vramslice's resources.
pub const VERSION: &str = "v1alpha1";

/// Annotation the extender writes at bind: UUID of the GPU the pod was placed on.
pub const ANNOTATION_GPU_UUID: &str = "vramslice.io/gpu-uuid";
/// Annotation the extender writes at bind: when the pod was assigned (RFC 3339).
pub const ANNOTATION_ASSIGNED_AT: &str = "vramslice.io/assigned-at";
/// Pod annotation choosing the placement policy for that pod: `binpack` or `spread`.
pub const ANNOTATION_POLICY: &str = "vramslice.io/policy";

/// Scheduler name of the bundled kube-scheduler.
pub const SCHEDULER_NAME: &str = "vramslice-scheduler";

/// Env: the container's limit in bytes (units × unit bytes).
pub const ENV_VRAM_LIMIT_BYTES: &str = "VRAMSLICE_VRAM_LIMIT_BYTES";
/// Env: UUID of the container's GPU.
pub const ENV_GPU_UUID: &str = "VRAMSLICE_GPU_UUID";
/// Env: in-container path of the container's accounting directory.
pub const ENV_ACCOUNTING_DIR: &str = "VRAMSLICE_ACCOUNTING_DIR";
/// Env: path of the real CUDA driver library the guard forwards to.
pub const ENV_REAL_LIBCUDA: &str = "VRAMSLICE_REAL_LIBCUDA";
/// Env: which GPUs the NVIDIA container runtime exposes.
pub const ENV_NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";

/// File name of the guard library.
pub const GUARD_LIBRARY: &str = "libvramslice_guard.so";
