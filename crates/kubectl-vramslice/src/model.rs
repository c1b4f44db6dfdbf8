//! What the plugin shows, computed from API objects with no I/O: one row per GPU (`nodes`), one
//! row per VRAM pod (`pods`). The same ledger the extender uses supplies effective free memory.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use vramslice_api::GpuNode;
use vramslice_api::convert::{PodFate, bound_pod_request, node_reading, parse_time, pod_fate};
use vramslice_api::names::ANNOTATION_GPU_UUID;
use vramslice_core::VramUnit;
use vramslice_core::cluster::ledger::{Ledger, LedgerConfig};
use vramslice_core::cluster::placement::gpu_uuids;

/// The ledger over the cluster's readings and bound pods, as the extender would build it.
pub fn build_ledger(gpunodes: &[GpuNode], pods: &[Pod], config: LedgerConfig) -> Ledger {
    let mut ledger = Ledger::new(config);
    ledger.replace_readings(
        gpunodes
            .iter()
            .map(|g| {
                let (node, reading) = node_reading(g);
                (node, reading.map_err(|e| e.to_string()))
            })
            .collect(),
    );
    let records = pods
        .iter()
        .filter_map(|p| match pod_fate(p, &VramUnit::ALL) {
            PodFate::Bound(record) => Some(record),
            _ => None,
        })
        .collect();
    ledger.replace_pods(records);
    ledger
}

/// One node and its GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    /// Node name.
    pub node: String,
    /// Unit the node advertises in.
    pub unit: String,
    /// When the reading was taken (RFC 3339), as published.
    pub observed_at: String,
    /// Age of the reading in seconds, when readable.
    pub reading_age_seconds: Option<u64>,
    /// Whether the extender treats the reading as too old.
    pub stale: bool,
    /// The GPUs.
    pub gpus: Vec<GpuRow>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuRow {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Total memory, bytes.
    pub total_bytes: u64,
    /// Live used memory, bytes.
    pub used_bytes: u64,
    /// Memory the kubelet allocated to containers, bytes.
    pub allocated_bytes: u64,
    /// Live free memory, bytes.
    pub free_bytes: u64,
    /// Effective free memory by the extender's rule, bytes (absent when the reading is unusable).
    pub effective_free_bytes: Option<u64>,
    /// Whether the GPU may take work.
    pub healthy: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Pods holding units of this GPU.
    pub pods: usize,
}

fn age(observed_at: &str, now: SystemTime) -> Option<Duration> {
    let t = parse_time(observed_at).ok()?;
    Some(now.duration_since(t).unwrap_or(Duration::ZERO))
}

/// Rows for `kubectl vramslice nodes`, sorted by node name.
pub fn node_rows(
    gpunodes: &[GpuNode],
    ledger: &Ledger,
    config: LedgerConfig,
    now: SystemTime,
) -> Vec<NodeRow> {
    let mut rows: Vec<NodeRow> = gpunodes
        .iter()
        .map(|gn| {
            let node = gn.metadata.name.clone().unwrap_or_default();
            let status = gn.status.clone().unwrap_or_default();
            let unit = status.unit.parse::<VramUnit>().unwrap_or_default();
            let age = age(&status.observed_at, now);
            let views = ledger.gpu_views(&node).unwrap_or_default();
            let gpus = status
                .gpus
                .iter()
                .map(|g| GpuRow {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    total_bytes: g.total_bytes,
                    used_bytes: g.used_bytes,
                    allocated_bytes: unit.bytes_for(g.allocated_units),
                    free_bytes: g.free_bytes,
                    effective_free_bytes: views
                        .iter()
                        .find(|v| v.uuid == g.uuid)
                        .map(|v| v.effective_free),
                    healthy: g.healthy,
                    health_reason: g.health_reason.clone(),
                    pods: g.pods.len(),
                })
                .collect();
            NodeRow {
                node,
                unit: status.unit.clone(),
                observed_at: status.observed_at.clone(),
                reading_age_seconds: age.map(|a| a.as_secs()),
                stale: age.is_none_or(|a| a > config.staleness),
                gpus,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    rows
}

/// One pod that asks for VRAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRow {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Node, once bound.
    pub node: Option<String>,
    /// Index of the GPU, when known.
    pub gpu_index: Option<u32>,
    /// UUID of the GPU (the kubelet's placement when published, else the extender's annotation).
    pub gpu_uuid: Option<String>,
    /// The pod's VRAM limit, bytes.
    pub limit_bytes: u64,
    /// Live usage, bytes, when the device plugin measured it.
    pub used_bytes: Option<u64>,
    /// Pod phase (`Pending`, `Running`, ...).
    pub phase: String,
}

/// Rows for `kubectl vramslice pods`, sorted by namespace and name.
pub fn pod_rows(gpunodes: &[GpuNode], pods: &[Pod]) -> Vec<PodRow> {
    pod_rows_and_unreadable(gpunodes, pods).0
}

/// [`pod_rows`], and why each pod that asks for VRAM in a way that cannot be read (two VRAM
/// resources, a quantity that is no whole number of units) has no row: such a pod stays
/// Pending, and is what a user looks for.
pub fn pod_rows_and_unreadable(gpunodes: &[GpuNode], pods: &[Pod]) -> (Vec<PodRow>, Vec<String>) {
    let mut unreadable = Vec::new();
    let mut rows: Vec<PodRow> = pods
        .iter()
        .filter_map(|pod| {
            let request = match bound_pod_request(pod, &VramUnit::ALL) {
                Ok(request) => request?,
                Err(e) => {
                    unreadable.push(format!(
                        "{e}: not listed (kubectl vramslice explain tells more)"
                    ));
                    return None;
                }
            };
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            // The kubelet's record (published in GpuNode status) wins over the annotation.
            // A pod spanning several GPUs is listed on each: its GPUs joined, usage summed.
            let listed = node.as_deref().and_then(|n| {
                let found: Vec<(u32, String, Option<u64>)> = gpunodes
                    .iter()
                    .filter(|gn| gn.metadata.name.as_deref() == Some(n))
                    .flat_map(|gn| gn.status.iter().flat_map(|s| s.gpus.iter()))
                    .filter_map(|g| {
                        g.pods
                            .iter()
                            .find(|p| match (&p.uid, &uid) {
                                (Some(a), Some(b)) => a == b,
                                _ => p.namespace == namespace && p.name == name,
                            })
                            .map(|p| (g.index, g.uuid.clone(), p.used_bytes))
                    })
                    .collect();
                let (index, _, _) = found.first()?;
                let uuids: Vec<&str> = found.iter().map(|(_, u, _)| u.as_str()).collect();
                let used = found
                    .iter()
                    .map(|(_, _, used)| *used)
                    .try_fold(0u64, |acc, u| u.map(|u| acc.saturating_add(u)));
                Some((*index, uuids.join(","), used))
            });
            let annotated = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_GPU_UUID))
                .cloned();
            let (gpu_index, gpu_uuid, used_bytes) = match listed {
                Some((i, u, used)) => (Some(i), Some(u), used),
                None => {
                    // The annotation: one UUID, or several comma-separated (the first's index).
                    let first = annotated
                        .as_deref()
                        .and_then(|a| gpu_uuids(a).first().map(|s| s.to_string()));
                    let index = first.as_deref().and_then(|uuid| {
                        gpunodes
                            .iter()
                            .flat_map(|gn| gn.status.iter().flat_map(|s| s.gpus.iter()))
                            .find(|g| g.uuid == uuid)
                            .map(|g| g.index)
                    });
                    (index, annotated, None)
                }
            };
            Some(PodRow {
                namespace,
                name,
                node,
                gpu_index,
                gpu_uuid,
                limit_bytes: request.bytes(),
                used_bytes,
                phase: pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_else(|| "Unknown".into()),
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (rows, unreadable)
}
