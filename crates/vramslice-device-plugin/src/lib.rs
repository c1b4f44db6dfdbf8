//! The vramslice device plugin: advertises each GPU's memory to the kubelet as units of the
//! `vramslice.io/vram-*` extended resource (one device `<uuid>::<k>` per unit), answers
//! GetPreferredAllocation and Allocate, and publishes live readings as the node's `GpuNode`.
//!
//! Data enters from the GPU backend ([`vramslice_gpu`], polled by [`poller`]), from the kubelet
//! (gRPC over Unix sockets: DevicePlugin calls in, PodResources answers), and from the API
//! server (one watch of the node's pods: pending pods, pod UIDs). It leaves as ListAndWatch updates and Allocate answers
//! ([`grpc`] over [`logic`]), `GpuNode` status writes ([`publisher`]), and Prometheus metrics
//! ([`metrics`]), the [`watchdog`]'s Events, kills and evictions, and the [`sweeper`]'s removal
//! of ended allocations' accounting files. Decisions live in
//! `vramslice-core` (`allocation`, `publish`, `inventory`, `watchdog`, `sweep`);
//! [`runner`] owns the socket and the registration; [`app`] wires it all. With `mode: dra` the
//! node serves the kubelet's DRA plugin API instead ([`dra_mode`] over `vramslice-dra`) and keeps
//! the node's ResourceSlice.

pub mod app;
pub mod cli;
pub mod config;
pub mod dra_mode;
pub mod grpc;
pub mod logic;
pub mod metrics;
pub mod podresources;
pub mod pods;
pub mod poller;
pub mod publisher;
pub mod runner;
pub mod sweeper;
pub mod telemetry;
pub mod uds;
pub mod watchdog;

/// Generated gRPC code for the kubelet APIs under the repository's `proto/`.
pub mod proto {
    /// Device-plugin API v1beta1 (Registration, DevicePlugin).
    #[allow(
        missing_docs,
        clippy::all,
        clippy::pedantic,
        rustdoc::invalid_html_tags
    )]
    pub mod deviceplugin {
        tonic::include_proto!("v1beta1");
    }
    /// PodResources API v1 (PodResourcesLister).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod podresources {
        tonic::include_proto!("v1");
    }
}
