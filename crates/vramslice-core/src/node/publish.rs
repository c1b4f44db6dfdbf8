//! What the device plugin publishes about its node, and when.
//!
//! [`build_report`] turns GPU readings and the kubelet's allocation record into a [`NodeReport`]
//! (the plain-value twin of the `GpuNode` status: per-GPU readings, allocated units, per-pod
//! usage and limits, and summary strings for printer columns). [`publish_reason`] says whether a
//! new report must be written now: on the first report, when GPUs, health, units, allocations or
//! pods' limits change, when usage moves by at least the threshold, or when the heartbeat is due;
//! otherwise not, which keeps the API server write rate bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::device_id::DeviceId;
use crate::quantity::format_bytes;
use crate::units::VramUnit;

pub use crate::node::sample::{GpuSample, Health, ProcessSample};

/// Device IDs of this node's resource held by one container, as the kubelet records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerAllocationRecord {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID, when the plugin could learn it.
    pub pod_uid: Option<String>,
    /// The device IDs (`<uuid>::<k>`).
    pub device_ids: Vec<String>,
}

/// A pod's share of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodReport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, when known.
    pub uid: Option<String>,
    /// Units its containers hold on this GPU, as the kubelet's record lists them.
    pub allocated_units: u64,
    /// Its limit on this GPU: allocated units × unit bytes, or more while a plain init container
    /// of it has not completed (`crate::node::init_limit`).
    pub limit_bytes: u64,
    /// What its processes use on this GPU, when its UID is known.
    pub used_bytes: Option<u64>,
    /// A plain init container of the pod may be running (`crate::node::init_limit`): its
    /// processes write accounting files the kubelet's record does not name, so the pod's
    /// self-report is not compared with what NVML measures.
    pub initialising: bool,
    /// Other pods whose use counts against this entry's limit (in DRA mode, pods sharing a claim
    /// with it on this GPU): their processes are judged, and acted on, together with its own.
    pub sharing_uids: Vec<String>,
}

/// A process on a GPU that belongs to no pod holding units of that GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayProcess {
    /// Host PID.
    pub pid: u32,
    /// Device memory in use, bytes, when the driver says.
    pub used_bytes: Option<u64>,
}

/// One GPU in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReport {
    /// Index.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Total bytes.
    pub total_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Free bytes (the extender's live free).
    pub free_bytes: u64,
    /// Units advertised.
    pub units: u64,
    /// Distinct units held by containers.
    pub allocated_units: u64,
    /// Healthy or not.
    pub healthy: bool,
    /// Why not, when not.
    pub health_reason: Option<String>,
    /// Pods holding units (or whose plain init container may: `crate::node::init_limit`), by
    /// namespace then name.
    pub pods: Vec<PodReport>,
    /// Processes not attributed to any pod listed here, by PID.
    pub processes_without_pod: Vec<StrayProcess>,
}

/// Node totals as printer columns show them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SummaryReport {
    /// Number of GPUs.
    pub gpus: u32,
    /// Total memory (`104 GiB`).
    pub total: String,
    /// Live free memory of healthy GPUs.
    pub live_free: String,
    /// Allocated memory (allocated units × unit bytes).
    pub allocated: String,
    /// Healthy out of all (`1/2`).
    pub healthy: String,
}

/// Everything published about a node, minus the time of observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Unit of the advertised resource.
    pub unit: VramUnit,
    /// GPUs by index.
    pub gpus: Vec<GpuReport>,
    /// Totals.
    pub summary: SummaryReport,
}

/// Build the report from readings and the kubelet's allocation record. Device IDs that are
/// malformed, name GPUs not in the readings, or name units past a GPU's advertised count are
/// ignored (the kubelet may still list units of a GPU that has vanished or shrunk).
pub fn build_report(
    unit: VramUnit,
    samples: &[GpuSample],
    allocations: &[ContainerAllocationRecord],
) -> NodeReport {
    // GPU uuid -> (namespace, pod) -> (uid, set of units)
    type PodKey = (String, String);
    type Holding = (Option<String>, BTreeSet<u64>);
    let mut held: BTreeMap<&str, BTreeMap<PodKey, Holding>> = BTreeMap::new();
    for record in allocations {
        for raw in &record.device_ids {
            let Ok(id) = raw.parse::<DeviceId>() else {
                continue;
            };
            let Some(sample) = samples
                .iter()
                .find(|s| s.uuid == id.gpu_uuid && id.unit < unit.units_in(s.total_bytes))
            else {
                continue;
            };
            let entry = held
                .entry(sample.uuid.as_str())
                .or_default()
                .entry((record.namespace.clone(), record.pod.clone()))
                .or_insert_with(|| (None, BTreeSet::new()));
            if entry.0.is_none() {
                entry.0.clone_from(&record.pod_uid);
            }
            entry.1.insert(id.unit);
        }
    }

    let mut gpus: Vec<GpuReport> = samples
        .iter()
        .map(|sample| {
            let pods_here = held.get(sample.uuid.as_str());
            let mut all_units: BTreeSet<u64> = BTreeSet::new();
            let pods: Vec<PodReport> = pods_here
                .into_iter()
                .flatten()
                .map(|((namespace, name), (uid, units))| {
                    all_units.extend(units.iter().copied());
                    let used_bytes = uid
                        .as_ref()
                        .and_then(|uid| sample.used_by(|p| p.pod_uid.as_ref() == Some(uid)));
                    let allocated_units = units.len() as u64;
                    PodReport {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        uid: uid.clone(),
                        allocated_units,
                        limit_bytes: unit.bytes_for(allocated_units),
                        used_bytes,
                        initialising: false,
                        sharing_uids: Vec::new(),
                    }
                })
                .collect();
            let known_uids: BTreeSet<&str> = pods.iter().filter_map(|p| p.uid.as_deref()).collect();
            let mut processes_without_pod: Vec<StrayProcess> = sample
                .listed_processes()
                .iter()
                .filter(|p| !p.pod_uid.as_deref().is_some_and(|u| known_uids.contains(u)))
                .map(|p| StrayProcess {
                    pid: p.pid,
                    used_bytes: p.used_bytes,
                })
                .collect();
            processes_without_pod.sort_by_key(|p| p.pid);
            GpuReport {
                index: sample.index,
                uuid: sample.uuid.clone(),
                model: sample.model.clone(),
                total_bytes: sample.total_bytes,
                used_bytes: sample.used_bytes,
                free_bytes: sample.free_bytes,
                units: unit.units_in(sample.total_bytes),
                allocated_units: all_units.len() as u64,
                healthy: sample.health.is_healthy(),
                health_reason: sample.health.reason().map(str::to_string),
                pods,
                processes_without_pod,
            }
        })
        .collect();
    gpus.sort_by(|a, b| a.index.cmp(&b.index).then_with(|| a.uuid.cmp(&b.uuid)));
    let summary = summarize(unit, &gpus);
    NodeReport {
        unit,
        gpus,
        summary,
    }
}

/// A prepared DRA claim's grant on one GPU, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHolding {
    /// The claim's namespace (its pods').
    pub namespace: String,
    /// The claim's name.
    pub claim: String,
    /// The pods it is reserved for: (name, UID).
    pub pods: Vec<(String, String)>,
    /// The GPU.
    pub gpu_uuid: String,
    /// Bytes granted on that GPU.
    pub bytes: u64,
}

/// Add DRA claims to a report (DRA mode has no device IDs in the kubelet's record). Claims on
/// a GPU that share a pod are one entry: a pod's processes cannot be told apart by claim, so
/// each claim alone would be judged (by the watchdog, too) against all its pods' use there
/// while holding only its own grant, and a pod with two claims on one GPU would read as over
/// both. The entry is named after the group's first pod (the first claim's name when it has
/// none), with the group's grants as its limit, the grants in whole units as allocated, and the
/// use of all its pods' processes on that GPU, which then no longer count as processes without
/// a pod. The summary is recomputed.
pub fn add_claim_holdings(
    report: &mut NodeReport,
    samples: &[GpuSample],
    holdings: &[ClaimHolding],
) {
    for group in linked_holdings(holdings) {
        let Some(gpu) = report.gpus.iter_mut().find(|g| g.uuid == group.gpu_uuid) else {
            continue;
        };
        let uids: BTreeSet<&str> = group.pods.iter().map(|(_, uid)| uid.as_str()).collect();
        let is_theirs = |p: &ProcessSample| p.pod_uid.as_deref().is_some_and(|u| uids.contains(u));
        let sample = samples.iter().find(|s| s.uuid == group.gpu_uuid);
        let used = sample.and_then(|s| s.used_by(is_theirs));
        let claim_pids: BTreeSet<u32> = sample
            .map(GpuSample::listed_processes)
            .unwrap_or_default()
            .iter()
            .filter(|p| is_theirs(p))
            .map(|p| p.pid)
            .collect();
        gpu.processes_without_pod
            .retain(|p| !claim_pids.contains(&p.pid));
        let units = group.bytes / report.unit.bytes();
        gpu.allocated_units = gpu.allocated_units.saturating_add(units);
        let (name, uid) = match group.pods.first() {
            Some((name, uid)) => (name.clone(), Some(uid.clone())),
            None => (group.claim.clone(), None),
        };
        gpu.pods.push(PodReport {
            namespace: group.namespace.clone(),
            name,
            uid,
            allocated_units: units,
            limit_bytes: group.bytes,
            used_bytes: used,
            initialising: false,
            sharing_uids: group
                .pods
                .iter()
                .skip(1)
                .map(|(_, uid)| uid.clone())
                .collect(),
        });
    }
    report.summary = summarize(report.unit, &report.gpus);
}

/// Holdings on one GPU that share a pod (directly or through another holding), merged: their
/// bytes summed, their pods in first-seen order, the first one's claim and namespace. Holdings
/// reserved for no pod stay alone.
fn linked_holdings(holdings: &[ClaimHolding]) -> Vec<ClaimHolding> {
    let mut groups: Vec<ClaimHolding> = Vec::new();
    for holding in holdings {
        let linked = |group: &ClaimHolding| {
            group.gpu_uuid == holding.gpu_uuid
                && group
                    .pods
                    .iter()
                    .any(|(_, uid)| holding.pods.iter().any(|(_, u)| u == uid))
        };
        // Groups are disjoint, so one holding may join several: they become the first one.
        let mut joined: Option<usize> = None;
        let mut i = 0;
        while i < groups.len() {
            if !linked(&groups[i]) {
                i += 1;
                continue;
            }
            match joined {
                None => {
                    joined = Some(i);
                    i += 1;
                }
                Some(at) => {
                    let later = groups.remove(i);
                    absorb(&mut groups[at], later);
                }
            }
        }
        match joined {
            Some(at) => absorb(&mut groups[at], holding.clone()),
            None => groups.push(holding.clone()),
        }
    }
    groups
}

fn absorb(group: &mut ClaimHolding, other: ClaimHolding) {
    group.bytes = group.bytes.saturating_add(other.bytes);
    for pod in other.pods {
        if !group.pods.contains(&pod) {
            group.pods.push(pod);
        }
    }
}

fn summarize(unit: VramUnit, gpus: &[GpuReport]) -> SummaryReport {
    let sum = |f: &dyn Fn(&GpuReport) -> u64| gpus.iter().fold(0u64, |a, g| a.saturating_add(f(g)));
    let healthy = gpus.iter().filter(|g| g.healthy).count();
    SummaryReport {
        gpus: u32::try_from(gpus.len()).unwrap_or(u32::MAX),
        total: format_bytes(sum(&|g| g.total_bytes)),
        live_free: format_bytes(sum(&|g| if g.healthy { g.free_bytes } else { 0 })),
        allocated: format_bytes(unit.bytes_for(sum(&|g| g.allocated_units))),
        healthy: format!("{healthy}/{}", gpus.len()),
    }
}

/// When to write a new report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishPolicy {
    /// A change in a GPU's used or free bytes, or a pod's used bytes, of at least this many
    /// bytes is worth a write (0: any change is).
    pub threshold_bytes: u64,
    /// Write at least this often even when nothing changed, so readers can tell fresh from stale.
    pub heartbeat: Duration,
    /// A change of usage alone is written at most this often (a pod whose usage swings by the
    /// threshold every poll would otherwise write every poll); changes of GPUs, health, units
    /// or allocations are written at once.
    pub min_interval: Duration,
}

/// Why a report is written now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishReason {
    /// Nothing was published yet.
    First,
    /// A GPU appeared, vanished or changed index.
    GpusChanged,
    /// A GPU's health or health reason changed.
    HealthChanged,
    /// The unit or a GPU's unit count changed.
    UnitsChanged,
    /// Allocated units, the pods holding them, or their limits changed.
    AllocationsChanged,
    /// Usage moved by at least the threshold on this GPU.
    UsageChanged {
        /// The GPU.
        gpu: String,
        /// The largest change seen, bytes.
        delta_bytes: u64,
    },
    /// The heartbeat is due.
    HeartbeatDue,
}

impl PublishReason {
    /// A short, fixed label (for metrics).
    pub fn label(&self) -> &'static str {
        match self {
            PublishReason::First => "first",
            PublishReason::GpusChanged => "gpus",
            PublishReason::HealthChanged => "health",
            PublishReason::UnitsChanged => "units",
            PublishReason::AllocationsChanged => "allocations",
            PublishReason::UsageChanged { .. } => "usage",
            PublishReason::HeartbeatDue => "heartbeat",
        }
    }
}

impl fmt::Display for PublishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishReason::UsageChanged { gpu, delta_bytes } => {
                write!(
                    f,
                    "usage on {gpu} changed by {}",
                    format_bytes(*delta_bytes)
                )
            }
            other => f.write_str(other.label()),
        }
    }
}

/// Whether `current` must be published, given what was last published `since_last` ago.
pub fn publish_reason(
    policy: &PublishPolicy,
    last: Option<&NodeReport>,
    since_last: Duration,
    current: &NodeReport,
) -> Option<PublishReason> {
    let Some(last) = last else {
        return Some(PublishReason::First);
    };
    let ids = |r: &NodeReport| -> Vec<(u32, String)> {
        r.gpus.iter().map(|g| (g.index, g.uuid.clone())).collect()
    };
    if ids(last) != ids(current) {
        return Some(PublishReason::GpusChanged);
    }
    let pairs = || last.gpus.iter().zip(&current.gpus);
    if pairs().any(|(a, b)| a.healthy != b.healthy || a.health_reason != b.health_reason) {
        return Some(PublishReason::HealthChanged);
    }
    if last.unit != current.unit || pairs().any(|(a, b)| a.units != b.units) {
        return Some(PublishReason::UnitsChanged);
    }
    // A pod's limit can change with its units unchanged (`crate::node::init_limit`).
    let holders = |g: &GpuReport| -> Vec<(String, String, Option<String>, u64, u64)> {
        g.pods
            .iter()
            .map(|p| {
                (
                    p.namespace.clone(),
                    p.name.clone(),
                    p.uid.clone(),
                    p.allocated_units,
                    p.limit_bytes,
                )
            })
            .collect()
    };
    if pairs().any(|(a, b)| a.allocated_units != b.allocated_units || holders(a) != holders(b)) {
        return Some(PublishReason::AllocationsChanged);
    }
    let mut biggest: Option<(String, u64)> = None;
    for (a, b) in pairs() {
        let mut delta = a
            .used_bytes
            .abs_diff(b.used_bytes)
            .max(a.free_bytes.abs_diff(b.free_bytes));
        for (pa, pb) in a.pods.iter().zip(&b.pods) {
            delta = delta.max(match (pa.used_bytes, pb.used_bytes) {
                (Some(x), Some(y)) => x.abs_diff(y),
                (None, None) => 0,
                (Some(x), None) | (None, Some(x)) => x.max(1),
            });
        }
        if delta > 0
            && delta >= policy.threshold_bytes
            && biggest.as_ref().is_none_or(|(_, d)| delta > *d)
        {
            biggest = Some((b.uuid.clone(), delta));
        }
    }
    if let Some((gpu, delta_bytes)) = biggest
        && since_last >= policy.min_interval
    {
        return Some(PublishReason::UsageChanged { gpu, delta_bytes });
    }
    (since_last >= policy.heartbeat).then_some(PublishReason::HeartbeatDue)
}

#[cfg(test)]
mod tests;
