//! `GpuNode` (`gpunodes.vramslice.io/v1alpha1`, cluster-scoped, name = node name, owned by its
//! Node): the live readings of one node's GPUs, written by that node's device plugin.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Full name of the CRD.
pub const GPUNODE_CRD_NAME: &str = "gpunodes.vramslice.io";

/// Desired state of a `GpuNode`. The object is a report, so the spec only names the node.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vramslice.io",
    version = "v1alpha1",
    kind = "GpuNode",
    plural = "gpunodes",
    singular = "gpunode",
    shortname = "gn",
    status = "GpuNodeStatus",
    category = "vramslice",
    printcolumn = r#"{"name":"GPUs","type":"integer","jsonPath":".status.summary.gpus"}"#,
    printcolumn = r#"{"name":"Total","type":"string","jsonPath":".status.summary.total"}"#,
    printcolumn = r#"{"name":"Live Free","type":"string","jsonPath":".status.summary.liveFree"}"#,
    printcolumn = r#"{"name":"Allocated","type":"string","jsonPath":".status.summary.allocated"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.summary.healthy"}"#,
    printcolumn = r#"{"name":"Unit","type":"string","jsonPath":".status.unit","priority":1}"#,
    printcolumn = r#"{"name":"Observed","type":"date","jsonPath":".status.observedAt","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// Name of the Node this report is about (equal to the object's name).
    pub node_name: String,
}

/// Live readings of a node's GPUs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// The unit the node advertises in (`1Gi`, `512Mi`, `256Mi`, `128Mi`).
    pub unit: String,
    /// The extended resource name advertised (`vramslice.io/vram-gib`, ...).
    pub resource_name: String,
    /// When these readings were taken (RFC 3339). The extender treats older readings as stale.
    pub observed_at: String,
    /// One entry per GPU, by index.
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// Totals for `kubectl get gpunodes`.
    #[serde(default)]
    pub summary: GpuNodeSummary,
}

/// One GPU's readings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    /// NVML index on the node.
    pub index: u32,
    /// NVML UUID (`GPU-...`).
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Total memory, bytes.
    pub total_bytes: u64,
    /// Used memory (all processes and driver reservations), bytes.
    pub used_bytes: u64,
    /// Free memory as NVML reports it, bytes: the extender's `live_free`.
    pub free_bytes: u64,
    /// Units advertised: floor(total / unit).
    pub units: u64,
    /// Units held by containers according to the kubelet (PodResources).
    pub allocated_units: u64,
    /// Whether the GPU may take new work.
    pub healthy: bool,
    /// Why the GPU is unhealthy (XID, ECC, GPU lost, MIG mode on), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Pods holding units of this GPU, with their live usage when known.
    #[serde(default)]
    pub pods: Vec<PodUsage>,
    /// GPU processes that belong to no pod (they count against live free memory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes_without_pod: Vec<ProcessUsage>,
}

/// A pod's share of one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodUsage {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Units the kubelet allocated to the pod's containers on this GPU.
    pub allocated_units: u64,
    /// The pod's limit on this GPU, bytes: allocated units × unit bytes, or more while a plain
    /// init container of the pod may run (`initialising`).
    pub limit_bytes: u64,
    /// Memory the pod's processes use on this GPU, bytes, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Whether the pod's self-reported usage (the guard's accounting file) agrees with what
    /// NVML measures, within the watchdog's tolerance; `false` means tampered accounting or a
    /// process outside the guard. Absent when there is nothing to compare.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_report_trusted: Option<bool>,
    /// A plain init container of the pod may be running: `limitBytes` includes what it may
    /// use, and an entry with no `allocatedUnits` is that limit alone, on the GPU the pod's
    /// `vramslice.io/gpu-uuid` annotation names, not a placement the kubelet recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub initialising: bool,
}

/// A GPU process and its memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessUsage {
    /// Host PID.
    pub pid: u32,
    /// Device memory in use, bytes; absent when the driver does not report it (MIG, some
    /// virtualised GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
}

/// Node totals, pre-formatted for printer columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSummary {
    /// Number of GPUs.
    pub gpus: u32,
    /// Total memory, human units (`160 GiB`).
    pub total: String,
    /// Live free memory, human units.
    pub live_free: String,
    /// Allocated memory, human units.
    pub allocated: String,
    /// Healthy GPUs out of all (`2/2`).
    pub healthy: String,
}

/// The CRD as YAML, exactly as committed under `charts/` and `manifests/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    let crd = GpuNode::crd();
    let body = serde_saphyr::to_string(&crd)?;
    Ok(format!(
        "# Generated by `cargo run -p vramslice-api --bin crdgen`. Do not edit by hand.\n{body}"
    ))
}
