//! vramslice's scheduler extender: kube-scheduler calls it to filter and score nodes by the
//! *effective free* VRAM of each GPU (declared units, live readings, memory assigned pods may
//! still take, headroom, staleness, health) and to bind pods, choosing the GPU.
//!
//! Data enters from three sides: kube-scheduler's HTTP calls (extender v1 JSON, see [`wire`]),
//! watches of pods and `GpuNode` objects that keep the [`vramslice_core::cluster::ledger::Ledger`] current
//! ([`watch`]), and the YAML configuration ([`config`]). It leaves as HTTP answers, the pod's
//! Binding carrying the annotations `vramslice.io/gpu-uuid` / `vramslice.io/assigned-at`
//! (through the [`cluster::ClusterApi`] trait), and Prometheus metrics. The decisions themselves
//! live in `vramslice-core`; this crate is the adapter around them.

pub mod cluster;
pub mod config;
pub mod convert;
pub mod extender;
#[cfg(feature = "test-support")]
pub mod fake;
pub mod http;
pub mod metrics;
pub mod pending;
pub mod serve;
pub mod watch;
pub mod wire;

pub use config::{Config, ConfigError};
pub use extender::{BadRequest, Clock, Extender};
