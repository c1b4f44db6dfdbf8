//! The Kubernetes-facing vocabulary of vramslice: the `GpuNode` custom resource (published by the
//! device plugin, read by the extender and `kubectl vramslice`), and the fixed names of
//! annotations and environment variables from the design contract (defined once in
//! `vramslice_core::names`, re-exported as [`names`]).
//!
//! Data enters as Rust values built by the device plugin and leaves as JSON through the API
//! server; the CRD YAML under `charts/` and `manifests/` is generated from these types by
//! `cargo run -p vramslice-api --bin crdgen` and checked for drift by a test.

pub mod convert;
pub mod gpunode;
pub mod names;

pub use gpunode::{
    GPUNODE_CRD_NAME, GpuNode, GpuNodeSpec, GpuNodeStatus, GpuNodeSummary, GpuStatus, PodUsage,
    ProcessUsage, crd_yaml,
};
