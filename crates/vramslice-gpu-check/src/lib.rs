//! The Rust helpers of the real-GPU check (`scripts/gpu-check.sh`, `docs/gpu-check.md`).
//!
//! - [`kubelet`]: a test kubelet. It serves `kubelet.sock` in a device-plugin directory, and when
//!   the real plugin binary registers it does what the kubelet's device manager does: dial the
//!   plugin back, ask its options, follow ListAndWatch, and (when asked) Allocate units. What it
//!   sees is written as a JSON [`kubelet::Report`] the check program reads.
//! - [`nvml`]: one reading of every GPU through [`vramslice_gpu::NvmlBackend`], as JSON.
//!
//! Data enters over gRPC (from the plugin) and from NVML, and leaves as JSON files or stdout.

pub mod kubelet;
pub mod nvml;
