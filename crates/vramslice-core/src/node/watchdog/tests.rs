use super::*;
use crate::VramUnit;
use crate::node::publish::{ContainerAllocationRecord, ProcessSample, build_report};
use crate::node::sample::Health;
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn proc_(pid: u32, used: u64, uid: Option<&str>) -> ProcessSample {
    ProcessSample {
        pid,
        used_bytes: Some(used),
        pod_uid: uid.map(str::to_string),
    }
}

fn sample(processes: Vec<ProcessSample>) -> GpuSample {
    GpuSample {
        index: 0,
        uuid: "GPU-a".into(),
        model: "m".into(),
        total_bytes: 80 * GIB,
        used_bytes: 0,
        free_bytes: 80 * GIB,
        health: Health::Healthy,
        processes: Some(processes),
    }
}

/// Pod "web" (uid-web) holds 2 units, pod "job" (uid-job) 4, pod "anon" (no UID) 1.
fn records() -> Vec<ContainerAllocationRecord> {
    let rec = |pod: &str, uid: Option<&str>, ids: &[&str]| ContainerAllocationRecord {
        namespace: "ml".into(),
        pod: pod.into(),
        pod_uid: uid.map(str::to_string),
        device_ids: ids.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        rec("web", Some("uid-web"), &["GPU-a::0", "GPU-a::1"]),
        rec("job", Some("uid-job"), &["GPU-a::2", "GPU-a::3"]),
        rec("job", Some("uid-job"), &["GPU-a::4", "GPU-a::5"]),
        rec("anon", None, &["GPU-a::6"]),
    ]
}

/// Readings as far apart as the steps of each test: an over reading credits the whole gap
/// since the last one ([`polled`] for a realistic reading interval).
fn policy(grace_s: u64, action: WatchdogAction) -> WatchdogPolicy {
    WatchdogPolicy {
        tolerance_bytes: 64 * MIB,
        grace: Duration::from_secs(grace_s),
        action,
        poll_interval: Duration::from_secs(3600),
    }
}

/// [`policy`] with readings every `poll_s` seconds.
fn polled(grace_s: u64, poll_s: u64) -> WatchdogPolicy {
    WatchdogPolicy {
        poll_interval: Duration::from_secs(poll_s),
        ..policy(grace_s, WatchdogAction::KillProcess)
    }
}

/// Pod web at 9 GiB (over its 2 GiB), at 1 GiB (within), and unmeasured.
fn over() -> Vec<ProcessSample> {
    vec![proc_(1, 9 * GIB, Some("uid-web"))]
}

fn within() -> Vec<ProcessSample> {
    vec![proc_(1, GIB, Some("uid-web"))]
}

fn unjudged() -> Vec<ProcessSample> {
    vec![ProcessSample {
        pid: 1,
        used_bytes: None,
        pod_uid: Some("uid-web".into()),
    }]
}

fn step(
    p: &WatchdogPolicy,
    state: &WatchdogState,
    t: u64,
    processes: Vec<ProcessSample>,
) -> Verdict {
    step_listing(p, state, t, Some(processes))
}

/// [`step`] with the process list as the driver gave it: `None` when it could not be read.
fn step_listing(
    p: &WatchdogPolicy,
    state: &WatchdogState,
    t: u64,
    processes: Option<Vec<ProcessSample>>,
) -> Verdict {
    let mut gpu = sample(Vec::new());
    gpu.processes = processes;
    let samples = vec![gpu];
    let report = build_report(VramUnit::Gib1, &samples, &records());
    evaluate(
        p,
        state,
        Duration::from_secs(t),
        &report,
        &samples,
        &BTreeMap::new(),
    )
}

fn web_key() -> PodOnGpu {
    PodOnGpu {
        gpu_uuid: "GPU-a".into(),
        pod_uid: "uid-web".into(),
    }
}

#[test]
fn tolerance_is_the_boundary() {
    let p = policy(30, WatchdogAction::Report);
    let s = WatchdogState::default();
    let at = step(
        &p,
        &s,
        0,
        vec![proc_(1, 2 * GIB + 64 * MIB, Some("uid-web"))],
    );
    assert!(at.events.is_empty(), "{:?}", at.events);
    let over = step(
        &p,
        &s,
        0,
        vec![proc_(1, 2 * GIB + 64 * MIB + 1, Some("uid-web"))],
    );
    let [WatchdogEvent::BreachStarted(b)] = over.events.as_slice() else {
        panic!("{:?}", over.events)
    };
    assert_eq!(b.used_bytes, 2 * GIB + 64 * MIB + 1);
    assert_eq!(b.limit_bytes, 2 * GIB);
    assert_eq!(b.tolerance_bytes, 64 * MIB);
    assert_eq!(
        (b.target.namespace.as_str(), b.target.name.as_str()),
        ("ml", "web")
    );
    assert_eq!(over.state.in_breach().collect::<Vec<_>>(), vec![&web_key()]);
}

#[test]
fn grace_then_act_on_exactly_the_offenders_processes_then_repeat_then_end() {
    let p = policy(30, WatchdogAction::KillProcess);
    let procs = || {
        vec![
            proc_(30, GIB, Some("uid-web")),
            proc_(10, 2 * GIB, Some("uid-web")),
            proc_(20, 3 * GIB, Some("uid-job")),
            proc_(40, GIB, None),
        ]
    };
    let v0 = step(&p, &WatchdogState::default(), 100, procs());
    assert!(matches!(v0.events[0], WatchdogEvent::BreachStarted(_)));
    assert!(
        !v0.events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::Act { .. }))
    );
    let v1 = step(&p, &v0.state, 129, procs());
    assert!(
        v1.events.iter().all(|e| !matches!(
            e,
            WatchdogEvent::Act { .. } | WatchdogEvent::BreachStarted(_)
        )),
        "{:?}",
        v1.events
    );
    let v2 = step(&p, &v1.state, 130, procs());
    let acts: Vec<&Breach> = v2
        .events
        .iter()
        .filter_map(|e| match e {
            WatchdogEvent::Act {
                action: WatchdogAction::KillProcess,
                breach,
            } => Some(breach),
            _ => None,
        })
        .collect();
    assert_eq!(acts.len(), 1, "{:?}", v2.events);
    assert_eq!(
        acts[0].processes,
        vec![(10, 2 * GIB), (30, GIB)],
        "only web's PIDs, by PID"
    );
    assert_eq!(acts[0].over_for, Duration::from_secs(30));
    assert_eq!(acts[0].used_bytes, 3 * GIB);
    // Still over: acted again one grace period after the last action, not before.
    let v3 = step(&p, &v2.state, 159, procs());
    assert!(
        !v3.events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::Act { .. }))
    );
    let v4 = step(&p, &v3.state, 160, procs());
    assert!(v4.events.iter().any(|e| matches!(e, WatchdogEvent::Act { breach, .. } if breach.over_for == Duration::from_secs(60))));
    // Back within: the breach lasts until it has been so for a grace period, then ends and is
    // forgotten; a new breach starts over with a new grace period.
    let within = || vec![proc_(10, GIB, Some("uid-web"))];
    let v5 = step(&p, &v4.state, 161, within());
    assert!(v5.events.is_empty(), "{:?}", v5.events);
    assert_eq!(v5.state.in_breach().count(), 1);
    let v5 = step(&p, &v5.state, 190, within());
    assert!(v5.events.is_empty(), "{:?}", v5.events);
    let v5 = step(&p, &v5.state, 191, within());
    assert_eq!(
        v5.events,
        vec![WatchdogEvent::BreachEnded {
            key: web_key(),
            used_bytes: GIB
        }]
    );
    assert_eq!(v5.state.in_breach().count(), 0);
    let v6 = step(&p, &v5.state, 162, procs());
    assert!(
        matches!(&v6.events[0], WatchdogEvent::BreachStarted(b) if b.over_for == Duration::ZERO)
    );
}

#[test]
fn a_dip_under_the_limit_neither_ends_the_breach_nor_counts_as_over() {
    let p = polled(30, 1);
    let acts = |v: &Verdict| {
        v.events
            .iter()
            .filter_map(|e| match e {
                WatchdogEvent::Act { breach, .. } => Some(breach.over_for),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Over every second to 25 s, one reading within, then over again.
    let mut v = step(&p, &WatchdogState::default(), 0, over());
    assert!(matches!(
        v.events.as_slice(),
        [WatchdogEvent::BreachStarted(_)]
    ));
    for t in 1..=25 {
        v = step(&p, &v.state, t, over());
    }
    v = step(&p, &v.state, 26, within());
    assert!(v.events.is_empty(), "no end, no Event: {:?}", v.events);
    v = step(&p, &v.state, 27, over());
    assert!(v.events.is_empty(), "no new breach: {:?}", v.events);
    // 25 s over before the dip; the second from the dip to 27 s counts (it went over in it);
    // the one from 25 s to the dip does not.
    for t in 28..=30 {
        v = step(&p, &v.state, t, over());
        assert!(acts(&v).is_empty(), "{t}: {:?}", v.events);
    }
    v = step(&p, &v.state, 31, over());
    assert_eq!(acts(&v), [Duration::from_secs(30)]);
    // Within for less than a grace period, then one reading over: no repeat, the repeat needs
    // a further grace period over.
    for t in 32..=60 {
        v = step(&p, &v.state, t, within());
        assert!(v.events.is_empty(), "{t}: {:?}", v.events);
    }
    v = step(&p, &v.state, 61, over());
    assert!(acts(&v).is_empty(), "{:?}", v.events);
}

#[test]
fn over_every_other_reading_adds_up_and_two_spikes_far_apart_do_not() {
    let p = polled(30, 1);
    let acted = |v: &Verdict| {
        v.events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::Act { .. }))
    };
    // Over at even seconds, within at odd ones: a second over per two seconds.
    let mut v = step(&p, &WatchdogState::default(), 0, over());
    let mut first_act = None;
    for t in 1..=70 {
        v = step(&p, &v.state, t, if t % 2 == 0 { over() } else { within() });
        if acted(&v) && first_act.is_none() {
            first_act = Some(t);
        }
    }
    assert_eq!(first_act, Some(60), "30 s over in 60 s");
    // One reading over, 28 s within, one over: 1 s over, not a grace period.
    let mut v = step(&p, &WatchdogState::default(), 100, over());
    for t in 101..=128 {
        v = step(&p, &v.state, t, within());
    }
    v = step(&p, &v.state, 129, over());
    assert!(!acted(&v), "{:?}", v.events);
    assert_eq!(v.state.in_breach().count(), 1);
}

#[test]
fn time_the_pod_could_not_be_judged_is_not_time_within_either() {
    let p = policy(30, WatchdogAction::Report);
    let mut v = step(&p, &WatchdogState::default(), 0, over());
    for t in 1..=25 {
        v = step(&p, &v.state, t, within());
    }
    v = step(&p, &v.state, 26, unjudged());
    // Within from 1 s, less the second from 25 s to 26 s it could not be judged: 30 s within
    // at 32 s, not 31 s.
    for t in 27..=31 {
        v = step(&p, &v.state, t, within());
        assert!(v.events.is_empty(), "{t}: {:?}", v.events);
    }
    v = step(&p, &v.state, 32, within());
    assert!(
        matches!(v.events.as_slice(), [WatchdogEvent::BreachEnded { .. }]),
        "{:?}",
        v.events
    );
}

#[test]
fn time_the_pod_could_not_be_judged_is_not_time_over() {
    let p = policy(30, WatchdogAction::KillProcess);
    let mut v = step(&p, &WatchdogState::default(), 0, over());
    for t in 1..=40 {
        v = step(&p, &v.state, t, unjudged());
    }
    assert_eq!(v.state.in_breach().count(), 1, "the breach stays as it was");
    v = step(&p, &v.state, 41, over());
    assert!(
        !v.events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::Act { .. })),
        "1 s over, not 41: {:?}",
        v.events
    );
}

#[test]
fn zero_grace_acts_at_once_and_the_action_is_the_configured_one() {
    for action in WatchdogAction::ALL {
        let v = step(
            &policy(0, action),
            &WatchdogState::default(),
            5,
            vec![proc_(1, 9 * GIB, Some("uid-job"))],
        );
        assert_eq!(v.events.len(), 2, "{:?}", v.events);
        assert!(
            matches!(&v.events[0], WatchdogEvent::BreachStarted(b) if b.limit_bytes == 4 * GIB && b.target.name == "job")
        );
        assert!(matches!(&v.events[1], WatchdogEvent::Act { action: a, .. } if *a == action));
        // Zero grace still never repeats an action within MIN_REPEAT.
        let p0 = policy(0, action);
        let again = step(&p0, &v.state, 14, vec![proc_(1, 9 * GIB, Some("uid-job"))]);
        assert!(again.events.is_empty(), "{:?}", again.events);
        let later = step(
            &p0,
            &again.state,
            15,
            vec![proc_(1, 9 * GIB, Some("uid-job"))],
        );
        assert!(
            matches!(later.events.as_slice(), [WatchdogEvent::Act { .. }]),
            "{:?}",
            later.events
        );
    }
}

#[test]
fn a_vanished_pod_ends_its_breach() {
    let p = policy(30, WatchdogAction::Report);
    let v0 = step(&p, &WatchdogState::default(), 0, over());
    let samples = vec![sample(vec![])];
    let report = build_report(VramUnit::Gib1, &samples, &[]);
    let v1 = evaluate(
        &p,
        &v0.state,
        Duration::from_secs(1),
        &report,
        &samples,
        &BTreeMap::new(),
    );
    assert_eq!(
        v1.events,
        vec![WatchdogEvent::BreachEnded {
            key: web_key(),
            used_bytes: 0
        }]
    );
}

#[test]
fn processes_without_a_pod_are_reported_once_while_they_last() {
    let p = policy(30, WatchdogAction::Report);
    // PID 7: no pod; PID 8: a pod that holds no units here; PID 9: the UID-less pod's.
    let procs = || {
        vec![
            proc_(7, GIB, None),
            proc_(8, MIB, Some("uid-other")),
            proc_(1, MIB, Some("uid-web")),
        ]
    };
    let v0 = step(&p, &WatchdogState::default(), 0, procs());
    let strays: Vec<u32> = v0
        .events
        .iter()
        .filter_map(|e| match e {
            WatchdogEvent::ProcessWithoutPod {
                pid,
                used_bytes,
                gpu_uuid,
            } => {
                assert_eq!(gpu_uuid, "GPU-a");
                assert!(used_bytes.is_some_and(|b| b > 0));
                Some(*pid)
            }
            _ => None,
        })
        .collect();
    assert_eq!(strays, vec![7, 8]);
    let v1 = step(&p, &v0.state, 1, procs());
    assert!(v1.events.is_empty(), "{:?}", v1.events);
    let v2 = step(&p, &v1.state, 2, vec![]);
    let v3 = step(&p, &v2.state, 3, procs());
    assert_eq!(v3.events.len(), 2, "back after vanishing: reported again");
}

#[test]
fn pods_without_a_uid_are_not_judged() {
    // "anon" has 1 unit and no UID: its usage cannot be attributed, so no breach for it.
    let v = step(
        &policy(0, WatchdogAction::KillProcess),
        &WatchdogState::default(),
        0,
        vec![proc_(5, 50 * GIB, None)],
    );
    assert!(
        v.events
            .iter()
            .all(|e| matches!(e, WatchdogEvent::ProcessWithoutPod { .. }))
    );
}

#[test]
fn self_reports_are_trusted_within_the_tolerance_only() {
    let p = policy(30, WatchdogAction::Report);
    let samples = vec![sample(vec![
        proc_(1, GIB, Some("uid-web")),
        proc_(2, GIB, Some("uid-job")),
    ])];
    let report = build_report(VramUnit::Gib1, &samples, &records());
    let job = PodOnGpu {
        gpu_uuid: "GPU-a".into(),
        pod_uid: "uid-job".into(),
    };
    let reported = BTreeMap::from([
        (web_key(), GIB - 64 * MIB),
        (job.clone(), GIB - 64 * MIB - 1),
    ]);
    let v = evaluate(
        &p,
        &WatchdogState::default(),
        Duration::ZERO,
        &report,
        &samples,
        &reported,
    );
    assert_eq!(
        v.self_reports[&web_key()],
        SelfReport {
            self_reported_bytes: GIB - 64 * MIB,
            measured_bytes: GIB,
            trusted: true
        }
    );
    assert!(!v.self_reports[&job].trusted);
    assert_eq!(v.self_reports.len(), 2);
    // While a plain init container of the job may run, its processes write an accounting file
    // the record does not name: no comparison, so no false 'untrusted'.
    let mut initialising = report.clone();
    for pod in &mut initialising.gpus[0].pods {
        pod.initialising = pod.uid.as_deref() == Some("uid-job");
    }
    let v = evaluate(
        &p,
        &WatchdogState::default(),
        Duration::ZERO,
        &initialising,
        &samples,
        &reported,
    );
    assert!(v.self_reports.contains_key(&web_key()));
    assert!(!v.self_reports.contains_key(&job));
}

#[test]
fn actions_parse_and_name_bad_words() {
    for a in WatchdogAction::ALL {
        assert_eq!(a.as_str().parse::<WatchdogAction>(), Ok(a));
        assert_eq!(a.to_string(), a.as_str());
    }
    assert_eq!(WatchdogAction::default(), WatchdogAction::Report);
    let e = "kill".parse::<WatchdogAction>().unwrap_err().to_string();
    assert_eq!(
        e,
        "unknown watchdog action \"kill\": expected one of report, kill-process, evict-pod"
    );
    assert_eq!(WatchdogPolicy::default().tolerance_bytes, 64 * MIB);
}

proptest! {
    /// Over random usage histories: an action happens only after the pod's breach lasted the
    /// whole grace period (a dip within shorter than that does not end it), names only that
    /// pod's PIDs, and never when it is within.
    #[test]
    fn acts_only_after_a_full_grace_period_over_the_limit(
        usages in proptest::collection::vec((0u64..5, 0u64..6), 1..60),
        grace in 0u64..14,
        poll in 1u64..4,
    ) {
        let p = polled(grace, poll);
        let mut state = WatchdogState::default();
        // The model: a breach lasts from its first over reading until a grace period within;
        // an over reading adds the time since the last reading, all of it after an over one,
        // up to two reading intervals after a within one.
        let mut in_breach = false;
        let mut over_total = 0u64;
        let mut last_judged = 0u64;
        let mut last_over = false;
        let mut within_since: Option<u64> = None;
        let mut acted_at: Option<u64> = None;
        let repeat = grace.max(MIN_REPEAT.as_secs());
        let times = usages.iter().scan(0u64, |t, (u, dt)| {
            *t += dt;
            Some((*t, *u))
        });
        for (t, web_gib) in times {
            let v = step(&p, &state, t, vec![proc_(1, web_gib * GIB, Some("uid-web")), proc_(2, MIB, Some("uid-job"))]);
            let over = web_gib * GIB > 2 * GIB + 64 * MIB;
            let mut started = false;
            if over {
                if !in_breach {
                    in_breach = true;
                    started = true;
                    over_total = 0;
                    acted_at = None;
                } else if last_over {
                    over_total += t - last_judged;
                } else {
                    over_total += (t - last_judged).min(2 * poll);
                }
                within_since = None;
            } else if in_breach {
                let since = *within_since.get_or_insert(t);
                if t - since >= grace {
                    in_breach = false;
                    within_since = None;
                }
            }
            last_judged = t;
            last_over = over;
            let due = over && match acted_at {
                None => over_total >= grace,
                Some(at) => over_total - at >= repeat,
            };
            let acted = v.events.iter().any(|e| matches!(e, WatchdogEvent::Act { .. }));
            prop_assert_eq!(acted, due, "t={} over_total={}", t, over_total);
            for e in &v.events {
                if let WatchdogEvent::Act { breach, .. } = e {
                    prop_assert_eq!(breach.over_for, Duration::from_secs(over_total));
                    prop_assert_eq!(&breach.processes, &vec![(1, web_gib * GIB)]);
                    prop_assert_eq!(&breach.target.key, &web_key());
                }
                if let WatchdogEvent::BreachStarted(b) = e {
                    prop_assert!(started);
                    prop_assert_eq!(&b.target.key, &web_key());
                }
            }
            if acted {
                acted_at = Some(over_total);
            }
            prop_assert_eq!(v.state.in_breach().count(), usize::from(in_breach));
            state = v.state;
        }
    }
}

/// DRA mode: two containers of one pod, a claim each, both on GPU-a (4 GiB + 4 GiB). The pod's
/// 7 GiB there is within what it holds: no breach (judged claim by claim it was over both).
#[test]
fn a_pod_with_two_dra_claims_on_one_gpu_is_judged_against_both_grants() {
    use crate::node::publish::{ClaimHolding, add_claim_holdings};
    let samples = vec![GpuSample {
        uuid: "GPU-a".into(),
        ..sample(vec![
            proc_(10, 4 * GIB, Some("uid-pod")),
            proc_(11, 3 * GIB, Some("uid-pod")),
        ])
    }];
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    let holding = |claim: &str| ClaimHolding {
        namespace: "ml".into(),
        claim: claim.into(),
        pods: vec![("pod".into(), "uid-pod".into())],
        gpu_uuid: "GPU-a".into(),
        bytes: 4 * GIB,
    };
    add_claim_holdings(&mut report, &samples, &[holding("a"), holding("b")]);
    let verdict = evaluate(
        &policy(0, WatchdogAction::EvictPod),
        &WatchdogState::default(),
        Duration::from_secs(0),
        &report,
        &samples,
        &BTreeMap::new(),
    );
    assert!(verdict.events.is_empty(), "{:?}", verdict.events);
}

/// DRA mode: pods A and B share claim S (2 GiB) on GPU-a, and B has claim P (4 GiB) there
/// too. They are one entry (6 GiB), and all of it is judged: B's processes count, and are
/// acted on, with A's.
#[test]
fn pods_linked_by_a_shared_dra_claim_are_judged_together() {
    use crate::node::publish::{ClaimHolding, add_claim_holdings};
    let samples = vec![GpuSample {
        uuid: "GPU-a".into(),
        ..sample(vec![
            proc_(10, GIB, Some("uid-a")),
            proc_(20, 6 * GIB, Some("uid-b")),
        ])
    }];
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    let holding = |claim: &str, pods: &[&str], gib: u64| ClaimHolding {
        namespace: "ml".into(),
        claim: claim.into(),
        pods: pods
            .iter()
            .map(|p| ((*p).to_string(), format!("uid-{p}")))
            .collect(),
        gpu_uuid: "GPU-a".into(),
        bytes: gib * GIB,
    };
    add_claim_holdings(
        &mut report,
        &samples,
        &[holding("s", &["a", "b"], 2), holding("p", &["b"], 4)],
    );
    assert_eq!(report.gpus[0].pods.len(), 1);
    assert_eq!(report.gpus[0].pods[0].sharing_uids, ["uid-b"]);
    let verdict = evaluate(
        &policy(30, WatchdogAction::KillProcess),
        &WatchdogState::default(),
        Duration::from_secs(0),
        &report,
        &samples,
        &BTreeMap::new(),
    );
    let [WatchdogEvent::BreachStarted(breach)] = verdict.events.as_slice() else {
        panic!("want one breach, got {:?}", verdict.events);
    };
    assert_eq!((breach.used_bytes, breach.limit_bytes), (7 * GIB, 6 * GIB));
    assert_eq!(breach.processes, [(10, GIB), (20, 6 * GIB)]);
    // The kill re-checks each PID's pod against these before the signal.
    assert!(breach.target.judges("uid-a") && breach.target.judges("uid-b"));
    assert!(!breach.target.judges("uid-c"));
}

/// DRA mode: a prepared claim on two GPUs (6 GiB granted on each) shows in the report through
/// `add_claim_holdings`; its pod going over on one GPU is a breach there only, with that GPU's
/// grant as the limit and only that GPU's processes to act on.
#[test]
fn a_dra_claim_over_its_grant_on_one_of_its_gpus_is_a_breach_there_only() {
    use crate::node::publish::{ClaimHolding, add_claim_holdings};
    let on = |uuid: &str, index: u32, processes: Vec<ProcessSample>| GpuSample {
        index,
        uuid: uuid.into(),
        ..sample(processes)
    };
    let samples = vec![
        on("GPU-a", 0, vec![proc_(10, 9 * GIB, Some("uid-tp"))]),
        on("GPU-b", 1, vec![proc_(11, 5 * GIB, Some("uid-tp"))]),
    ];
    let mut report = build_report(VramUnit::Gib1, &samples, &[]);
    let holding = |gpu: &str| ClaimHolding {
        namespace: "ml".into(),
        claim: "tp-vram".into(),
        pods: vec![("tp-0".into(), "uid-tp".into())],
        gpu_uuid: gpu.into(),
        bytes: 6 * GIB,
    };
    add_claim_holdings(&mut report, &samples, &[holding("GPU-a"), holding("GPU-b")]);
    let p = policy(30, WatchdogAction::KillProcess);
    let first = evaluate(
        &p,
        &WatchdogState::default(),
        Duration::from_secs(0),
        &report,
        &samples,
        &BTreeMap::new(),
    );
    let [WatchdogEvent::BreachStarted(breach)] = first.events.as_slice() else {
        panic!("want one breach on GPU-a, got {:?}", first.events);
    };
    assert_eq!(breach.target.key.gpu_uuid, "GPU-a");
    assert_eq!(breach.target.key.pod_uid, "uid-tp");
    assert_eq!(breach.target.name, "tp-0");
    assert_eq!((breach.used_bytes, breach.limit_bytes), (9 * GIB, 6 * GIB));
    assert_eq!(breach.processes, [(10, 9 * GIB)]);
    // Past the grace period the action names GPU-a's process, not GPU-b's.
    let later = evaluate(
        &p,
        &first.state,
        Duration::from_secs(31),
        &report,
        &samples,
        &BTreeMap::new(),
    );
    let acts: Vec<_> = later
        .events
        .iter()
        .filter_map(|e| match e {
            WatchdogEvent::Act { action, breach } => Some((*action, breach.processes.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(acts, [(WatchdogAction::KillProcess, vec![(10, 9 * GIB)])]);
    // No process of the claim's pod counts as a process without a pod.
    assert!(
        !later
            .events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::ProcessWithoutPod { .. })),
        "{:?}",
        later.events
    );
}

/// A breach begun at 0 s and not judged at 10 s, judged over again: the same breach (no new
/// start), whose time over leaves out the time it could not be judged (0 s to 10 s): 21 s at
/// 31 s, a grace period (30 s) at 40 s.
fn judged_over_again_after_10_unjudged_seconds(p: &WatchdogPolicy, blind: &WatchdogState) {
    let later = step(p, blind, 31, over());
    assert!(later.events.is_empty(), "{:?}", later.events);
    let due = step(p, &later.state, 40, over());
    assert!(
        due.events.iter().any(
            |e| matches!(e, WatchdogEvent::Act { breach, .. } if breach.over_for == Duration::from_secs(30))
        ),
        "{:?}",
        due.events
    );
}

#[test]
fn usage_the_driver_does_not_give_is_not_judged_and_keeps_a_breach() {
    // Regression: NVML's "not available" was read as 0 bytes, so a pod over its limit looked
    // within it and its breach ended.
    let p = policy(30, WatchdogAction::Report);
    let unknown = |pid| ProcessSample {
        pid,
        used_bytes: None,
        pod_uid: Some("uid-web".into()),
    };
    let quiet = step(&p, &WatchdogState::default(), 0, vec![unknown(1)]);
    assert!(quiet.events.is_empty(), "{:?}", quiet.events);
    let started = step(&p, &WatchdogState::default(), 0, over());
    assert!(matches!(
        started.events[..],
        [WatchdogEvent::BreachStarted(_)]
    ));
    // One of its processes goes unmeasured: nothing is decided, the breach stays.
    let blind = step(
        &p,
        &started.state,
        10,
        vec![proc_(1, 9 * GIB, Some("uid-web")), unknown(2)],
    );
    assert!(blind.events.is_empty(), "{:?}", blind.events);
    judged_over_again_after_10_unjudged_seconds(&p, &blind.state);
}

#[test]
fn a_process_list_the_driver_could_not_read_is_not_judged_and_keeps_a_breach() {
    // Regression: a failed process list read as "no processes", so every breach ended (and
    // its grace period started over once the list came back).
    let p = policy(30, WatchdogAction::Report);
    let started = step(&p, &WatchdogState::default(), 0, over());
    assert!(matches!(
        started.events[..],
        [WatchdogEvent::BreachStarted(_)]
    ));
    let blind = step_listing(&p, &started.state, 10, None);
    assert!(blind.events.is_empty(), "{:?}", blind.events);
    assert!(blind.state.breaches.contains_key(&web_key()));
    judged_over_again_after_10_unjudged_seconds(&p, &blind.state);
}

#[test]
fn strays_reported_once_stay_reported_while_the_process_list_cannot_be_read() {
    let p = policy(30, WatchdogAction::Report);
    let stray = vec![proc_(7, GIB, None)];
    let first = step(&p, &WatchdogState::default(), 0, stray.clone());
    assert_eq!(
        first
            .events
            .iter()
            .filter(|e| matches!(e, WatchdogEvent::ProcessWithoutPod { .. }))
            .count(),
        1
    );
    let blind = step_listing(&p, &first.state, 10, None);
    let back = step(&p, &blind.state, 20, stray);
    assert!(
        !back
            .events
            .iter()
            .any(|e| matches!(e, WatchdogEvent::ProcessWithoutPod { .. })),
        "not reported again: {:?}",
        back.events
    );
}

#[test]
fn a_reading_is_too_old_after_three_poll_intervals_and_never_before_the_floor() {
    let fast = polled(30, 1);
    assert!(!reading_too_old(&fast, Duration::from_secs(5)));
    assert!(reading_too_old(&fast, Duration::from_millis(5001)));
    let slow = polled(30, 10);
    assert!(!reading_too_old(&slow, Duration::from_secs(30)));
    assert!(reading_too_old(&slow, Duration::from_secs(31)));
    let extreme = WatchdogPolicy {
        poll_interval: Duration::MAX,
        ..fast
    };
    assert!(!reading_too_old(&extreme, Duration::MAX));
}
