//! The ledger's plain input and output values.

use std::time::SystemTime;

use super::Rejection;
use crate::cluster::placement::PodRequest;
use crate::units::VramUnit;

/// A pod bound to a node, as the API server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    /// Pod UID (the ledger's key).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The node the pod is bound to.
    pub node: String,
    /// The `vramslice.io/gpu-uuid` annotation, when present (several UUIDs comma-separated for
    /// a pod spanning GPUs).
    pub gpu_uuid: Option<String>,
    /// The `vramslice.io/assigned-at` annotation, when present and readable.
    pub assigned_at: Option<SystemTime>,
    /// The pod's VRAM request.
    pub request: PodRequest,
}

/// One node's readings (from `GpuNode` status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReading {
    /// When the readings were taken.
    pub observed_at: SystemTime,
    /// The unit the node advertises in.
    pub unit: VramUnit,
    /// The node's GPUs.
    pub gpus: Vec<PublishedGpu>,
}

/// One GPU as its node's `GpuNode` status published it (what the extender places by).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedGpu {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Live free memory (NVML), bytes.
    pub free_bytes: u64,
    /// Units advertised.
    pub units: u64,
    /// Whether the GPU may take work.
    pub healthy: bool,
    /// Why not, when unhealthy.
    pub health_reason: Option<String>,
    /// Pods the kubelet has allocated units of this GPU to.
    pub pods: Vec<ListedPod>,
}

/// A pod listed in a GPU's reading (the kubelet's truth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPod {
    /// Pod UID, when the plugin knows it.
    pub uid: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod's limit on this GPU, bytes.
    pub limit_bytes: u64,
    /// Measured usage, bytes, when known.
    pub used_bytes: Option<u64>,
}

/// One GPU's books: the numbers behind its effective free memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Whether the GPU may take work.
    pub healthy: bool,
    /// Why not, when unhealthy.
    pub health_reason: Option<String>,
    /// Advertised units × unit bytes.
    pub advertised_bytes: u64,
    /// Bytes assigned to pods (declared).
    pub assigned_bytes: u64,
    /// `advertised − assigned`, never below zero.
    pub declared_free: u64,
    /// Live free bytes from the reading.
    pub live_free: u64,
    /// Bytes assigned pods may still take that the reading cannot show.
    pub unobserved: u64,
    /// `min(declared_free, live_free − unobserved − headroom)`, never below zero.
    pub effective_free: u64,
}

/// Where a reservation landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node.
    pub node: String,
    /// The chosen GPU's UUID; for a pod spanning several GPUs, their UUIDs comma-separated by
    /// index (the `vramslice.io/gpu-uuid` annotation's value).
    pub gpu_uuid: String,
    /// The chosen GPU's index (the lowest, for a pod spanning several).
    pub gpu_index: u32,
    /// Every chosen GPU's UUID, by index (one for a single-GPU pod).
    pub gpu_uuids: Vec<String>,
    /// Every chosen GPU's index, ascending.
    pub gpu_indices: Vec<u32>,
}

/// A pod to reserve room for (a bind in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pod's VRAM request.
    pub request: PodRequest,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// The pod is already bound (the API server shows it on a node).
    #[error("pod {pod} is already bound to node {node}")]
    AlreadyBound {
        /// `namespace/name`.
        pod: String,
        /// Its node.
        node: String,
    },
    /// Another bind of the same pod holds a reservation.
    #[error("pod {pod} already has a bind in flight to node {node}")]
    InFlight {
        /// `namespace/name`.
        pod: String,
        /// The node of the other bind.
        node: String,
    },
    /// An earlier bind of the same pod ended without knowing whether its Binding took: its
    /// reservation stands until the API server shows the pod bound, the caller finds it not
    /// bound and releases it ([`super::Ledger::release`]), or it expires.
    #[error("pod {pod}'s earlier bind to node {node} ended without knowing whether it took")]
    Unsettled {
        /// `namespace/name`.
        pod: String,
        /// The node of the earlier bind.
        node: String,
    },
    /// The node cannot take the pod (after an unpaired swap, also when the GPU the device
    /// plugin may send it to lacks room: `GpuRejection::Owed`).
    #[error("{0}")]
    NoFit(#[from] Rejection),
}

/// What the ledger knows about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The node.
    pub node: String,
    /// The GPU it counts against, or the GPUs comma-separated for a pod spanning several
    /// (`None`: unknown, counts against every GPU of the node).
    pub gpu_uuid: Option<String>,
    /// The request.
    pub request: PodRequest,
    /// A reservation not yet confirmed by the API server.
    pub reserved: bool,
}
