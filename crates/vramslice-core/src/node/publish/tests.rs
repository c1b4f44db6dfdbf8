//! Unit and property tests of the publish report and rule.

use super::*;
use crate::node::sample::total_used;
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
        health: Health::Healthy,
        processes: Some(Vec::new()),
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
        used_bytes: Some(bytes),
        pod_uid: uid.map(Into::into),
    }
}

fn two_gpu_node() -> (Vec<GpuSample>, Vec<ContainerAllocationRecord>) {
    let mut a = gpu(0, "GPU-a", 80 * GIB, 10 * GIB);
    a.processes = Some(vec![
        process(200, 3 * GIB, Some("uid-web")),
        process(100, 2 * GIB, Some("uid-web")),
        process(300, GIB, None),
        process(400, GIB, Some("uid-elsewhere")),
    ]);
    let mut b = gpu(1, "GPU-b", 24 * GIB + 5, 0);
    b.health = Health::Unhealthy {
        reason: "XID 79".into(),
    };
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
            initialising: false,
            sharing_uids: Vec::new(),
        }]
    );
    assert_eq!(
        a.processes_without_pod,
        vec![
            StrayProcess {
                pid: 300,
                used_bytes: Some(GIB)
            },
            StrayProcess {
                pid: 400,
                used_bytes: Some(GIB)
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
        min_interval: Duration::ZERO,
    }
}

#[test]
fn usage_alone_is_written_at_most_every_min_interval_and_structure_at_once() {
    let p = PublishPolicy {
        min_interval: Duration::from_secs(5),
        ..policy()
    };
    let total = 80u64 << 30;
    let before = build_report(VramUnit::Gib1, &[gpu(0, "G", total, 1 << 30)], &[]);
    let swung = build_report(VramUnit::Gib1, &[gpu(0, "G", total, 9 << 30)], &[]);
    let soon = Duration::from_millis(500);
    assert_eq!(publish_reason(&p, Some(&before), soon, &swung), None);
    assert!(matches!(
        publish_reason(&p, Some(&before), Duration::from_secs(5), &swung),
        Some(PublishReason::UsageChanged { .. })
    ));
    // A GPU falling unhealthy is not held back.
    let mut sick = before.clone();
    sick.gpus[0].healthy = false;
    assert_eq!(
        publish_reason(&p, Some(&before), soon, &sick),
        Some(PublishReason::HealthChanged)
    );
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
        case(|s, _| s[0].health = Health::Healthy),
        Some(PublishReason::HealthChanged)
    );
    assert_eq!(
        case(|s, _| {
            s[0].health = Health::Unhealthy {
                reason: "ECC".into(),
            }
        }),
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
    // Same units, another limit (a plain init container of the pod completed): published.
    let mut lower = base.clone();
    lower.gpus[1].pods[0].limit_bytes += GIB;
    assert_eq!(
        publish_reason(&p, Some(&lower), now, &base),
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
        case(|s, _| {
            let p = &mut s[1].processes.as_mut().expect("listed")[0];
            p.used_bytes = p.used_bytes.map(|b| b + GIB);
        }),
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
        let p = PublishPolicy { threshold_bytes: threshold, heartbeat: Duration::from_secs(30), min_interval: Duration::ZERO };
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

#[test]
fn dra_claims_show_as_their_pods_with_grant_and_use() {
    let mut a = gpu(0, "GPU-a", 80 * GIB, 12 * GIB);
    a.processes = Some(vec![
        process(10, 5 * GIB, Some("pod-x")),
        process(11, 7 * GIB, None),
    ]);
    let samples = vec![a];
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    assert_eq!(report.gpus[0].processes_without_pod.len(), 2);
    add_claim_holdings(
        &mut report,
        &samples,
        &[
            ClaimHolding {
                namespace: "ml".into(),
                claim: "llm-vram".into(),
                pods: vec![("llm-0".into(), "pod-x".into())],
                gpu_uuid: "GPU-a".into(),
                bytes: 6 * GIB,
            },
            ClaimHolding {
                namespace: "ml".into(),
                claim: "gone".into(),
                pods: Vec::new(),
                gpu_uuid: "GPU-zz".into(),
                bytes: GIB,
            },
        ],
    );
    let g = &report.gpus[0];
    assert_eq!(g.allocated_units, 6);
    assert_eq!(
        g.pods,
        [PodReport {
            namespace: "ml".into(),
            name: "llm-0".into(),
            uid: Some("pod-x".into()),
            allocated_units: 6,
            limit_bytes: 6 * GIB,
            used_bytes: Some(5 * GIB),
            initialising: false,
            sharing_uids: Vec::new(),
        }]
    );
    assert_eq!(
        g.processes_without_pod,
        [StrayProcess {
            pid: 11,
            used_bytes: Some(7 * GIB)
        }]
    );
    assert_eq!(report.summary.allocated, "6 GiB");
}

#[test]
fn a_pods_usage_is_unknown_when_one_of_its_processes_is() {
    let (mut samples, allocs) = two_gpu_node();
    samples[1].processes.as_mut().expect("listed")[0].used_bytes = None; // PID 200 of uid-web
    samples[1].processes.as_mut().expect("listed")[2].used_bytes = None; // PID 300, of no pod
    let r = build_report(VramUnit::Gib1, &samples, &allocs);
    let a = &r.gpus[0];
    assert_eq!(a.pods[0].used_bytes, None, "not 2 GiB, nor 0");
    assert_eq!(
        a.processes_without_pod,
        [
            StrayProcess {
                pid: 300,
                used_bytes: None
            },
            StrayProcess {
                pid: 400,
                used_bytes: Some(GIB)
            }
        ]
    );
    assert_eq!(total_used(&[]), Some(0));
}

#[test]
fn a_process_list_the_driver_could_not_read_leaves_usage_unknown_not_zero() {
    let (mut samples, allocs) = two_gpu_node();
    samples[1].processes = None;
    let r = build_report(VramUnit::Gib1, &samples, &allocs);
    let a = &r.gpus[0];
    assert_eq!(a.pods[0].used_bytes, None, "not 0 bytes");
    assert_eq!(a.pods[0].limit_bytes, 3 * GIB, "the grant is still known");
    assert!(a.processes_without_pod.is_empty());

    // A DRA claim's use on that GPU is unknown too.
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    add_claim_holdings(
        &mut report,
        &samples,
        &[ClaimHolding {
            namespace: "ml".into(),
            claim: "llm-vram".into(),
            pods: vec![("llm-0".into(), "uid-web".into())],
            gpu_uuid: "GPU-a".into(),
            bytes: 6 * GIB,
        }],
    );
    assert_eq!(report.gpus[0].pods[0].used_bytes, None);
}

#[test]
fn dra_claims_on_one_gpu_that_share_a_pod_are_one_entry_with_their_grants_summed() {
    let mut a = gpu(0, "GPU-a", 80 * GIB, 20 * GIB);
    a.processes = Some(vec![
        process(10, 7 * GIB, Some("uid-1")),
        process(11, 2 * GIB, Some("uid-2")),
        process(12, 3 * GIB, Some("uid-3")),
    ]);
    let mut b = gpu(1, "GPU-b", 80 * GIB, 0);
    b.processes = Some(Vec::new());
    let samples = vec![a, b];
    let holding = |claim: &str, gpu: &str, pods: &[&str], gib: u64| ClaimHolding {
        namespace: "ml".into(),
        claim: claim.into(),
        pods: pods
            .iter()
            .map(|uid| (format!("pod-{uid}"), (*uid).to_string()))
            .collect(),
        gpu_uuid: gpu.into(),
        bytes: gib * GIB,
    };
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    add_claim_holdings(
        &mut report,
        &samples,
        &[
            // Two containers of pod uid-1, a claim each, both on GPU-a.
            holding("first", "GPU-a", &["uid-1"], 4),
            // A claim shared by uid-2 and uid-3; then one of uid-3 links uid-1's group to it.
            holding("shared", "GPU-a", &["uid-2", "uid-3"], 2),
            holding("second", "GPU-a", &["uid-1"], 4),
            holding("bridge", "GPU-a", &["uid-3", "uid-1"], 1),
            // The same pod on another GPU is that GPU's entry.
            holding("other-gpu", "GPU-b", &["uid-1"], 3),
            // Claims reserved for no pod stay alone.
            holding("orphan-1", "GPU-a", &[], 1),
            holding("orphan-2", "GPU-a", &[], 1),
        ],
    );
    let on_a: Vec<(&str, Option<&str>, u64, Option<u64>)> = report.gpus[0]
        .pods
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.uid.as_deref(),
                p.limit_bytes / GIB,
                p.used_bytes.map(|u| u / GIB),
            )
        })
        .collect();
    assert_eq!(
        on_a,
        [
            ("pod-uid-1", Some("uid-1"), 11, Some(12)),
            ("orphan-1", None, 1, Some(0)),
            ("orphan-2", None, 1, Some(0)),
        ]
    );
    assert_eq!(report.gpus[0].allocated_units, 13);
    assert!(report.gpus[0].processes_without_pod.is_empty());
    let on_b = &report.gpus[1].pods;
    assert_eq!((on_b.len(), on_b[0].limit_bytes), (1, 3 * GIB));
}
