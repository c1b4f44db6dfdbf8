use super::*;
use crate::VramUnit;
use crate::node::publish::{ContainerAllocationRecord, ProcessSample, StrayProcess, build_report};
use crate::node::sample::Health;
use crate::node::watchdog::{WatchdogEvent, WatchdogPolicy, WatchdogState, evaluate};
use std::collections::BTreeMap;
use std::time::Duration;

const GIB: u64 = 1 << 30;

fn gpu(uuid: &str, index: u32, processes: Vec<ProcessSample>) -> GpuSample {
    GpuSample {
        index,
        uuid: uuid.into(),
        model: "m".into(),
        total_bytes: 24 * GIB,
        used_bytes: 0,
        free_bytes: 24 * GIB,
        health: Health::Healthy,
        processes: Some(processes),
    }
}

fn process(pid: u32, used: u64, uid: &str) -> ProcessSample {
    ProcessSample {
        pid,
        used_bytes: Some(used),
        pod_uid: Some(uid.into()),
    }
}

fn record(ids: &[&str]) -> ContainerAllocationRecord {
    ContainerAllocationRecord {
        namespace: "ml".into(),
        pod: "trt".into(),
        pod_uid: Some("uid-trt".into()),
        device_ids: ids.iter().map(|s| s.to_string()).collect(),
    }
}

/// Pod ml/trt: app containers of `app` units, then `init` (plain unless marked sidecar),
/// annotated with `gpus`.
fn trt(app: &[u64], init: &[(u64, bool)], gpus: &[&str]) -> InitPhasePod {
    InitPhasePod {
        namespace: "ml".into(),
        name: "trt".into(),
        uid: Some("uid-trt".into()),
        annotated_gpus: gpus.iter().map(|g| g.to_string()).collect(),
        app: app.to_vec(),
        init: init
            .iter()
            .map(|&(units, sidecar)| InitUnits { units, sidecar })
            .collect(),
    }
}

/// Limits per (GPU, pod name) in the report.
fn limits(report: &NodeReport) -> Vec<(String, String, u64)> {
    report
        .gpus
        .iter()
        .flat_map(|g| {
            g.pods
                .iter()
                .map(|p| (g.uuid.clone(), p.name.clone(), p.limit_bytes / GIB))
        })
        .collect()
}

fn breaches(report: &NodeReport, samples: &[GpuSample]) -> Vec<WatchdogEvent> {
    evaluate(
        &WatchdogPolicy::default(),
        &WatchdogState::default(),
        Duration::ZERO,
        report,
        samples,
        &BTreeMap::new(),
    )
    .events
}

/// The case that killed a container within its own guard limit: the app holds 4 units, the
/// init container 8 and it uses them. While it runs, the pod's limit is 8 GiB: no breach. Once
/// it has completed (no longer passed), the app's 4 GiB is the limit again.
#[test]
fn an_unfinished_init_container_raises_its_pods_limit_until_it_completes() {
    let samples = vec![gpu("GPU-a", 0, vec![process(7, 8 * GIB, "uid-trt")])];
    let records = [record(&["GPU-a::0", "GPU-a::1", "GPU-a::2", "GPU-a::3"])];
    let mut report = build_report(VramUnit::Gib1, &samples, &records);
    apply_init_limits(
        &mut report,
        &samples,
        &[trt(&[4], &[(8, false)], &["GPU-a"])],
    );
    assert_eq!(limits(&report), [("GPU-a".into(), "trt".into(), 8)]);
    assert_eq!(report.gpus[0].pods[0].allocated_units, 4, "units as listed");
    assert!(breaches(&report, &samples).is_empty());

    let mut after = build_report(VramUnit::Gib1, &samples, &records);
    apply_init_limits(&mut after, &samples, &[]);
    assert_eq!(limits(&after), [("GPU-a".into(), "trt".into(), 4)]);
    assert!(matches!(
        breaches(&after, &samples).as_slice(),
        [WatchdogEvent::BreachStarted(b)] if b.limit_bytes == 4 * GIB
    ));
}

/// App containers asking for no VRAM: PodResources lists none of the pod's units, so it is
/// added on its annotated GPU with the init container's limit, and its process is its own, not
/// a process without a pod. Without an annotation the GPU is unknown and nothing changes.
#[test]
fn a_pod_listed_nowhere_is_added_on_its_annotated_gpu() {
    let samples = vec![
        gpu("GPU-a", 0, vec![process(7, 8 * GIB, "uid-trt")]),
        gpu("GPU-b", 1, vec![]),
    ];
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    assert_eq!(
        report.gpus[0].processes_without_pod,
        [StrayProcess {
            pid: 7,
            used_bytes: Some(8 * GIB)
        }]
    );
    let unannotated = trt(&[0], &[(8, false)], &[]);
    apply_init_limits(&mut report, &samples, &[unannotated]);
    assert!(limits(&report).is_empty());

    apply_init_limits(
        &mut report,
        &samples,
        &[trt(&[], &[(8, false)], &["GPU-a"])],
    );
    assert_eq!(limits(&report), [("GPU-a".into(), "trt".into(), 8)]);
    let pod = &report.gpus[0].pods[0];
    assert_eq!(
        (pod.allocated_units, pod.used_bytes, pod.uid.as_deref()),
        (0, Some(8 * GIB), Some("uid-trt"))
    );
    assert!(report.gpus[0].processes_without_pod.is_empty());
    assert!(breaches(&report, &samples).is_empty());
}

/// A pod spanning two GPUs takes an even share of the request on each, whether its GPUs come
/// from its listed units or from its annotation; sidecars started before the init container
/// count with it, as Kubernetes' effective request counts them.
#[test]
fn a_spanning_pod_takes_an_even_share_and_sidecars_count() {
    let samples = vec![gpu("GPU-a", 0, vec![]), gpu("GPU-b", 1, vec![])];
    let records = [record(&["GPU-a::0", "GPU-b::0"])];
    let mut report = build_report(VramUnit::Gib1, &samples, &records);
    // app 2 (1 per GPU), then a 2-unit sidecar, then an 8-unit init: max(2 + 2, 2 + 8) = 10.
    let pod = trt(&[2], &[(2, true), (8, false)], &["GPU-b", "GPU-a"]);
    assert_eq!(pod.units(), 10);
    apply_init_limits(&mut report, &samples, std::slice::from_ref(&pod));
    assert_eq!(
        limits(&report),
        [
            ("GPU-a".into(), "trt".into(), 5),
            ("GPU-b".into(), "trt".into(), 5)
        ]
    );
    let mut bare = build_report(VramUnit::Gib1, &samples, &[]);
    apply_init_limits(&mut bare, &samples, &[pod]);
    assert_eq!(limits(&bare), limits(&report));
}

/// Limits are only raised; a pod whose unfinished init containers ask for nothing (or only
/// sidecars remain) is left alone; a pod of the same name in another namespace is another pod;
/// an added pod keeps the list sorted by namespace and name.
#[test]
fn only_raises_and_only_the_pods_own_entry() {
    let samples = vec![gpu("GPU-a", 0, vec![])];
    let rec = |ns: &str, pod: &str, uid: &str, ids: &[&str]| ContainerAllocationRecord {
        namespace: ns.into(),
        pod: pod.into(),
        pod_uid: Some(uid.into()),
        device_ids: ids.iter().map(|s| s.to_string()).collect(),
    };
    let records = [
        rec(
            "ml",
            "big",
            "uid-big",
            &["GPU-a::0", "GPU-a::1", "GPU-a::2"],
        ),
        rec("ml", "zz", "uid-zz", &["GPU-a::3"]),
        rec("other", "trt", "uid-x", &["GPU-a::4"]),
    ];
    let base = build_report(VramUnit::Gib1, &samples, &records);
    let mut report = base.clone();
    let mut small = trt(&[3], &[(1, false)], &["GPU-a"]);
    small.name = "big".into();
    small.uid = Some("uid-big".into());
    let no_units = trt(&[1], &[(0, false), (4, true)], &["GPU-a"]);
    apply_init_limits(&mut report, &samples, &[small, no_units]);
    // Nothing raised: only the flag that keeps big's self-report from being compared.
    let mut flagged = base.clone();
    flagged.gpus[0].pods[0].initialising = true;
    assert_eq!(report, flagged);
    let mut report = base.clone();

    apply_init_limits(
        &mut report,
        &samples,
        &[trt(&[], &[(6, false)], &["GPU-a"])],
    );
    let names: Vec<(String, String, u64)> = report.gpus[0]
        .pods
        .iter()
        .map(|p| (p.namespace.clone(), p.name.clone(), p.limit_bytes / GIB))
        .collect();
    assert_eq!(
        names,
        [
            ("ml".into(), "big".into(), 3),
            ("ml".into(), "trt".into(), 6),
            ("ml".into(), "zz".into(), 1),
            ("other".into(), "trt".into(), 1)
        ]
    );
}

#[test]
fn a_spanning_pods_init_units_go_to_every_assigned_gpu_though_it_is_listed_on_one() {
    // Regression: ml/trt spans GPUs a and b; its 4-unit sidecar took another pod's place, all
    // on GPU b, while its 8-unit plain init container runs 4 + 4. The raise went to GPU b alone
    // (12), and the init container's processes on GPU a belonged to no listed pod.
    let samples = vec![
        gpu("GPU-a", 0, vec![process(7, 3 * GIB, "uid-trt")]),
        gpu("GPU-b", 1, vec![]),
    ];
    let mut report = build_report(
        VramUnit::Gib1,
        &samples,
        &[record(&["GPU-b::0", "GPU-b::1", "GPU-b::2", "GPU-b::3"])],
    );
    let pod = trt(&[], &[(4, true), (8, false)], &["GPU-a", "GPU-b"]);
    apply_init_limits(&mut report, &samples, &[pod]);
    assert_eq!(
        limits(&report),
        [
            ("GPU-a".into(), "trt".into(), 6),
            ("GPU-b".into(), "trt".into(), 6)
        ]
    );
    assert!(report.gpus[0].processes_without_pod.is_empty());
}
