//! vramslice's DRA kubelet plugin (DRA mode, beside the device-plugin mode).
//!
//! Data enters from three sides: GPU samples from the `GpuBackend` (NVML or fake), the
//! kubelet's gRPC calls (plugin registration, then NodePrepareResources /
//! NodeUnprepareResources for claims of driver `vramslice.io`), and `ResourceClaim`s read from
//! the API server. It leaves as the node's `ResourceSlice` (each GPU one device whose
//! `memory` capacity follows the measurement, by [`vramslice_core::effective_free`]; an
//! unhealthy one tainted), and per
//! prepared claim a CDI spec, a read-only limit file and an accounting directory, which the
//! container runtime turns into the guard, its per-GPU limits and the visible GPUs.
//!
//! The decisions (slice content, when to publish, what a claim gets) are the core's
//! ([`vramslice_core::node::dra`]); this crate is the shell: [`driver`] does the files and the
//! checkpoint, [`grpc`] and [`registration`] adapt the kubelet's protocol, [`slices`] writes
//! the slice, [`serve`] binds the sockets
//! ([`authority`] fixes the `:authority` the kubelet's plugin watcher sends).

pub mod authority;
pub mod cdi;
pub mod checkpoint;
pub mod claims;
pub mod driver;
pub mod grpc;
pub mod registration;
pub mod serve;
pub mod slices;

/// Generated from the kubelet's protos under `proto/`.
pub mod proto {
    /// Plugin registration (`pluginregistration`, v1).
    pub mod registration {
        tonic::include_proto!("pluginregistration");
    }
    /// The DRA plugin service (`k8s.io.kubelet.pkg.apis.dra.v1`).
    pub mod dra {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }
}
