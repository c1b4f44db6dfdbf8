//! Names fixed by the design contract: `vramslice_core::names`, re-exported for the crates that
//! speak Kubernetes. Use these constants; never spell the strings elsewhere.

pub use vramslice_core::names::*;
