//! Example inference server for the vramslice sidecar runtime.
//!
//! Requests (`POST /v1/infer {"batch": 8, "seed": 1}`) enter through axum, are admitted by the
//! runtime by memory (their need learned per batch size), run a forward pass of a small
//! deterministic model on CUDA (cudarc, driver loaded at run time) or on the CPU, and leave as
//! JSON. Out-of-memory errors are retried by the runtime; `/metrics` serves its metrics.

pub mod app;
pub mod device;
pub mod model;
