//! What the device plugin publishes about its node, and when.
//!
//! [`build_report`] turns GPU readings and the kubelet's allocation record into a [`NodeReport`]
//! (the plain-value twin of the `GpuNode` status: per-GPU readings, allocated units, per-pod
//! usage and limits, and summary strings for printer columns). [`publish_reason`] says whether a
//! new report must be written now: on the first report, when GPUs, health, units or allocations
//! change, when usage moves by at least the threshold, or when the heartbeat is due; otherwise
//! not, which keeps the API server write rate bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::device_id::DeviceId;
use crate::quantity::format_bytes;
use crate::units::VramUnit;

/// One GPU process as measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSample {
    /// Host PID.
    pub pid: u32,
    /// Device memory in use, bytes.
    pub used_bytes: u64,
    /// UID of the pod the process belongs to, when known.
    pub pod_uid: Option<String>,
}

/// One GPU's reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSample {
    /// Index on the node.
    pub index: u32,
    /// UUID.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// Total bytes.
    pub total_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Healthy or not.
    pub healthy: bool,
    /// Why not, when not.
    pub health_reason: Option<String>,
    /// Compute processes.
    pub processes: Vec<ProcessSample>,
}

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
    /// Units its containers hold on this GPU.
    pub allocated_units: u64,
    /// Its limit on this GPU: allocated units × unit bytes.
    pub limit_bytes: u64,
    /// What its processes use on this GPU, when its UID is known.
    pub used_bytes: Option<u64>,
}

/// A process on a GPU that belongs to no pod holding units of that GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayProcess {
    /// Host PID.
    pub pid: u32,
    /// Device memory in use, bytes.
    pub used_bytes: u64,
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
    /// Pods holding units, by namespace then name.
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
                    let used_bytes = uid.as_ref().map(|uid| {
                        sample
                            .processes
                            .iter()
                            .filter(|p| p.pod_uid.as_ref() == Some(uid))
                            .fold(0u64, |acc, p| acc.saturating_add(p.used_bytes))
                    });
                    let allocated_units = units.len() as u64;
                    PodReport {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        uid: uid.clone(),
                        allocated_units,
                        limit_bytes: unit.bytes_for(allocated_units),
                        used_bytes,
                    }
                })
                .collect();
            let known_uids: BTreeSet<&str> = pods.iter().filter_map(|p| p.uid.as_deref()).collect();
            let mut processes_without_pod: Vec<StrayProcess> = sample
                .processes
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
                healthy: sample.healthy,
                health_reason: sample.health_reason.clone(),
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
    /// Allocated units or the pods holding them changed.
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
    let holders = |g: &GpuReport| -> Vec<(String, String, Option<String>, u64)> {
        g.pods
            .iter()
            .map(|p| {
                (
                    p.namespace.clone(),
                    p.name.clone(),
                    p.uid.clone(),
                    p.allocated_units,
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
    if let Some((gpu, delta_bytes)) = biggest {
        return Some(PublishReason::UsageChanged { gpu, delta_bytes });
    }
    (since_last >= policy.heartbeat).then_some(PublishReason::HeartbeatDue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn gpu(index: u32, uuid: &str, total: u64, used: u64) -> GpuSample {
        GpuSample {
            index,
            uuid: uuid.into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            total_bytes: total,
            used_bytes: used,
            free_bytes: total - used,
            healthy: true,
            health_reason: None,
            processes: Vec::new(),
        }
    }

    fn record(ns: &str, pod: &str, uid: Option<&str>, ids: &[&str]) -> ContainerAllocationRecord {
        ContainerAllocationRecord {
            namespace: ns.into(),
            pod: pod.into(),
            pod_uid: uid.map(Into::into),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn process(pid: u32, bytes: u64, uid: Option<&str>) -> ProcessSample {
        ProcessSample {
            pid,
            used_bytes: bytes,
            pod_uid: uid.map(Into::into),
        }
    }

    fn two_gpu_node() -> (Vec<GpuSample>, Vec<ContainerAllocationRecord>) {
        let mut a = gpu(0, "GPU-a", 80 * GIB, 10 * GIB);
        a.processes = vec![
            process(200, 3 * GIB, Some("uid-web")),
            process(100, 2 * GIB, Some("uid-web")),
            process(300, GIB, None),
            process(400, GIB, Some("uid-elsewhere")),
        ];
        let mut b = gpu(1, "GPU-b", 24 * GIB + 5, 0);
        b.healthy = false;
        b.health_reason = Some("XID 79".into());
        let allocs = vec![
            record("default", "web", Some("uid-web"), &["GPU-a::0", "GPU-a::1"]),
            // A second container of the same pod on the same GPU.
            record("default", "web", Some("uid-web"), &["GPU-a::2"]),
            record("ml", "batch", None, &["GPU-b::3"]),
            // Ignored: a vanished GPU and a malformed ID.
            record("ml", "ghost", None, &["GPU-gone::0", "junk"]),
        ];
        (vec![b, a], allocs)
    }

    #[test]
    fn report_carries_readings_allocations_and_usage() {
        let (samples, allocs) = two_gpu_node();
        let r = build_report(VramUnit::Gib1, &samples, &allocs);
        assert_eq!(r.gpus.len(), 2);
        let a = &r.gpus[0];
        assert_eq!(
            (a.index, a.uuid.as_str(), a.units, a.allocated_units),
            (0, "GPU-a", 80, 3)
        );
        assert_eq!(
            a.pods,
            vec![PodReport {
                namespace: "default".into(),
                name: "web".into(),
                uid: Some("uid-web".into()),
                allocated_units: 3,
                limit_bytes: 3 * GIB,
                used_bytes: Some(5 * GIB),
            }]
        );
        assert_eq!(
            a.processes_without_pod,
            vec![
                StrayProcess {
                    pid: 300,
                    used_bytes: GIB
                },
                StrayProcess {
                    pid: 400,
                    used_bytes: GIB
                }
            ]
        );
        let b = &r.gpus[1];
        assert_eq!((b.units, b.allocated_units, b.healthy), (24, 1, false));
        assert_eq!(b.health_reason.as_deref(), Some("XID 79"));
        assert_eq!(
            b.pods[0].used_bytes, None,
            "unknown UID: usage not measured"
        );
        assert_eq!(
            r.summary,
            SummaryReport {
                gpus: 2,
                total: format_bytes(104 * GIB + 5),
                live_free: "70 GiB".into(),
                allocated: "4 GiB".into(),
                healthy: "1/2".into(),
            }
        );
    }

    #[test]
    fn duplicate_ids_count_once() {
        let samples = vec![gpu(0, "GPU-a", 8 * GIB, 0)];
        let allocs = vec![
            record("ns", "p", None, &["GPU-a::1", "GPU-a::1"]),
            record("ns", "q", None, &["GPU-a::1", "GPU-a::8"]),
        ];
        let r = build_report(VramUnit::Gib1, &samples, &allocs);
        assert_eq!(r.gpus[0].allocated_units, 1);
        assert_eq!(r.gpus[0].pods.len(), 2);
    }

    fn policy() -> PublishPolicy {
        PublishPolicy {
            threshold_bytes: 256 << 20,
            heartbeat: Duration::from_secs(30),
        }
    }

    fn report_with(
        f: impl FnOnce(&mut Vec<GpuSample>, &mut Vec<ContainerAllocationRecord>),
    ) -> NodeReport {
        let (mut samples, mut allocs) = two_gpu_node();
        f(&mut samples, &mut allocs);
        build_report(VramUnit::Gib1, &samples, &allocs)
    }

    #[test]
    fn first_report_is_always_published() {
        let r = report_with(|_, _| {});
        assert_eq!(
            publish_reason(&policy(), None, Duration::ZERO, &r),
            Some(PublishReason::First)
        );
    }

    #[test]
    fn nothing_changed_means_no_write_until_the_heartbeat() {
        let r = report_with(|_, _| {});
        let p = policy();
        assert_eq!(
            publish_reason(&p, Some(&r), Duration::from_secs(29), &r),
            None
        );
        assert_eq!(
            publish_reason(&p, Some(&r), Duration::from_secs(30), &r),
            Some(PublishReason::HeartbeatDue)
        );
    }

    #[test]
    fn each_kind_of_change_is_named() {
        let p = policy();
        let base = report_with(|_, _| {});
        let now = Duration::from_secs(1);
        let case = |f: fn(&mut Vec<GpuSample>, &mut Vec<ContainerAllocationRecord>)| {
            publish_reason(&p, Some(&base), now, &report_with(f))
        };
        assert_eq!(
            case(|s, _| {
                s.pop();
            }),
            Some(PublishReason::GpusChanged)
        );
        assert_eq!(
            case(|s, _| s[0].index = 7),
            Some(PublishReason::GpusChanged)
        );
        assert_eq!(
            case(|s, _| s[0].healthy = true),
            Some(PublishReason::HealthChanged)
        );
        assert_eq!(
            case(|s, _| s[0].health_reason = Some("ECC".into())),
            Some(PublishReason::HealthChanged)
        );
        assert_eq!(
            case(|s, _| s[1].total_bytes = 79 * GIB),
            Some(PublishReason::UnitsChanged)
        );
        assert_eq!(
            case(|_, a| {
                a.remove(1);
            }),
            Some(PublishReason::AllocationsChanged)
        );
        assert_eq!(
            case(|_, a| a[2].pod = "other".into()),
            Some(PublishReason::AllocationsChanged)
        );
        // Same units, now with a UID: the holder changed.
        assert_eq!(
            case(|_, a| a[2].pod_uid = Some("u".into())),
            Some(PublishReason::AllocationsChanged)
        );
        assert_eq!(
            case(|s, _| {
                s[1].used_bytes += 256 << 20;
                s[1].free_bytes -= 256 << 20;
            }),
            Some(PublishReason::UsageChanged {
                gpu: "GPU-a".into(),
                delta_bytes: 256 << 20
            })
        );
        // A pod's own usage moving counts too.
        assert_eq!(
            case(|s, _| s[1].processes[0].used_bytes += GIB),
            Some(PublishReason::UsageChanged {
                gpu: "GPU-a".into(),
                delta_bytes: GIB
            })
        );
        // Below the threshold: no write.
        assert_eq!(
            case(|s, _| {
                s[1].used_bytes += 255 << 20;
                s[1].free_bytes -= 255 << 20;
            }),
            None
        );
    }

    #[test]
    fn reasons_have_labels_and_text() {
        let r = PublishReason::UsageChanged {
            gpu: "GPU-a".into(),
            delta_bytes: 512 << 20,
        };
        assert_eq!(r.label(), "usage");
        assert_eq!(r.to_string(), "usage on GPU-a changed by 512 MiB");
        assert_eq!(PublishReason::HeartbeatDue.to_string(), "heartbeat");
    }

    proptest! {
        #[test]
        fn usage_rule_is_exactly_the_threshold(
            used in 0u64..(80 << 30), delta in 0u64..(4 << 30), threshold in 0u64..(2 << 30), grow in any::<bool>()
        ) {
            let p = PublishPolicy { threshold_bytes: threshold, heartbeat: Duration::from_secs(30) };
            let total = 80u64 << 30;
            let next = if grow { (used + delta).min(total) } else { used.saturating_sub(delta) };
            let before = build_report(VramUnit::Gib1, &[gpu(0, "G", total, used)], &[]);
            let after = build_report(VramUnit::Gib1, &[gpu(0, "G", total, next)], &[]);
            let moved = used.abs_diff(next);
            let reason = publish_reason(&p, Some(&before), Duration::from_secs(1), &after);
            if moved > 0 && moved >= threshold {
                prop_assert_eq!(reason, Some(PublishReason::UsageChanged { gpu: "G".into(), delta_bytes: moved }));
            } else {
                prop_assert_eq!(reason, None);
            }
        }

        #[test]
        fn allocated_units_never_exceed_advertised_distinct_ids(
            ids in proptest::collection::vec((0u64..30, 0usize..3), 0..40)
        ) {
            let samples = vec![gpu(0, "GPU-a", 24 * GIB, 0)];
            let allocs: Vec<ContainerAllocationRecord> = ids.iter().map(|(k, pod)| ContainerAllocationRecord {
                namespace: "ns".into(),
                pod: format!("p{pod}"),
                pod_uid: None,
                device_ids: vec![format!("GPU-a::{k}")],
            }).collect();
            let r = build_report(VramUnit::Gib1, &samples, &allocs);
            let distinct: BTreeSet<u64> = ids.iter().map(|(k, _)| *k).filter(|k| *k < 24).collect();
            prop_assert!(r.gpus[0].allocated_units <= r.gpus[0].units);
            prop_assert_eq!(r.gpus[0].allocated_units, distinct.len() as u64);
            let per_pod: u64 = r.gpus[0].pods.iter().map(|p| p.allocated_units).sum();
            prop_assert!(per_pod >= r.gpus[0].allocated_units);
            prop_assert!(r.gpus[0].pods.iter().all(|p| p.limit_bytes == p.allocated_units * GIB));
        }
    }
}
