//! Unit tests of pods spanning several GPUs (`vramslice.io/gpus`): filter, scoring, reserve,
//! readings that list a pod on each of its GPUs, and shape swaps between same-size pods.

use std::time::Duration;

use super::tests::{GIB, at, gpu, listed, reading};
use super::*;
use crate::units::VramUnit;

fn ledger() -> Ledger {
    Ledger::new(LedgerConfig {
        headroom_bytes: 0,
        staleness: Duration::from_secs(90),
    })
}

fn span(units: u64, gpus: u32) -> PodRequest {
    PodRequest::spanning(VramUnit::Gib1, units, gpus)
}

fn want(uid: &str, request: PodRequest) -> ReserveRequest {
    ReserveRequest {
        uid: uid.to_string(),
        namespace: "ns".into(),
        name: uid.to_string(),
        request,
    }
}

fn bound(uid: &str, gpu: &str, request: PodRequest, assigned: u64) -> PodRecord {
    PodRecord {
        uid: uid.to_string(),
        namespace: "ns".into(),
        name: uid.to_string(),
        node: "n1".into(),
        gpu_uuid: Some(gpu.to_string()),
        assigned_at: Some(at(assigned)),
        request,
    }
}

fn free_gib(ledger: &Ledger) -> Vec<u64> {
    ledger
        .gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| v.effective_free / GIB)
        .collect()
}

#[test]
fn a_node_passes_only_with_n_gpus_that_each_fit_the_share() {
    let mut l = ledger();
    l.set_reading(
        "n1",
        reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 15), gpu(2, 40, 25)]),
    );
    // 40 GiB over 2 GPUs: 20 each; GPU 0 and GPU 2 have it.
    assert_eq!(l.check("n1", span(40, 2), at(1)), Ok(()));
    // Over 3 GPUs (60 GiB, 20 each): only 2 have 20.
    let err = l.check("n1", span(60, 3), at(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "needs 3 GPUs with 20 GiB effective free each; 2 have; GPU 1: 15 GiB effective free \
         (live 15 GiB, 0 B reserved by pods not yet running), need 20 GiB"
    );
    assert!(!err.is_unresolvable());
    let refusal = l.check_rendered("n1", span(60, 3), at(1)).unwrap_err();
    assert_eq!(&*refusal.reason, err.to_string());
    assert_eq!(
        l.refusal("n1", span(60, 3), at(1)),
        Some(RefusalKind::Short)
    );
    assert_eq!(l.score("n1", span(60, 3), Policy::Binpack, at(1)), 0);
    // The same total on one GPU fits GPU 0 alone.
    assert_eq!(l.check("n1", span(40, 1), at(1)), Ok(()));
    // More GPUs than the node has (large enough): unresolvable.
    let err = l.check("n1", span(80, 4), at(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod needs 4 GPUs with 20 GiB each; node n1 has 3 GPUs that large"
    );
    assert!(err.is_unresolvable());
    assert_eq!(
        l.refusal("n1", span(80, 4), at(1)),
        Some(RefusalKind::NeverFits)
    );
    // A share larger than any GPU: too large, as for one GPU.
    assert!(
        l.check("n1", span(100, 2), at(1))
            .unwrap_err()
            .is_unresolvable()
    );
    // GPU 2 unhealthy: of the 3 GPUs the pod spans, 2 are healthy. GPU 1 is short but could be
    // emptied by preemption only for a 2-GPU pod; a 3-GPU pod can never fit while GPU 2 is
    // sick, whatever is evicted.
    let mut sick = gpu(2, 40, 25);
    sick.healthy = false;
    l.set_reading("n1", reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 15), sick]));
    let err = l.check("n1", span(60, 3), at(1)).unwrap_err();
    assert!(err.is_unresolvable(), "{err}");
    assert_eq!(
        l.refusal("n1", span(60, 3), at(1)),
        Some(RefusalKind::Unhealthy)
    );
    let err = l.check("n1", span(60, 2), at(1)).unwrap_err();
    assert!(!err.is_unresolvable(), "{err}");
    assert_eq!(
        l.refusal("n1", span(60, 2), at(1)),
        Some(RefusalKind::Short)
    );
}

#[test]
fn one_fitting_gpu_of_two_is_named() {
    let mut l = ledger();
    l.set_reading("n1", reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 10)]));
    let err = l.check("n1", span(40, 2), at(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "needs 2 GPUs with 20 GiB effective free each; 1 has; GPU 1: 10 GiB effective free \
         (live 10 GiB, 0 B reserved by pods not yet running), need 20 GiB"
    );
}

#[test]
fn reserve_books_the_share_on_each_chosen_gpu() {
    let mut l = ledger();
    l.set_reading(
        "n1",
        reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 30), gpu(2, 40, 25)]),
    );
    // Binpack: the two tightest that fit (GPU 1 and GPU 2).
    let p = l
        .reserve(want("tp", span(40, 2)), "n1", Policy::Binpack, at(1))
        .unwrap();
    assert_eq!(p.gpu_uuid, "GPU-1,GPU-2");
    assert_eq!(p.gpu_uuids, vec!["GPU-1", "GPU-2"]);
    assert_eq!(p.gpu_indices, vec![1, 2]);
    assert_eq!(p.gpu_index, 1);
    assert_eq!(free_gib(&l), vec![40, 10, 5]);
    let info = l.pod("tp").unwrap();
    assert_eq!(info.gpu_uuid.as_deref(), Some("GPU-1,GPU-2"));
    // Spread: the two emptiest.
    let p = l
        .reserve(want("tp2", span(10, 2)), "n1", Policy::Spread, at(1))
        .unwrap();
    assert_eq!(p.gpu_uuid, "GPU-0,GPU-1");
    assert_eq!(free_gib(&l), vec![35, 5, 5]);
    // Confirmed by the API server with the annotation: same books.
    l.observe_pod(bound("tp", "GPU-1,GPU-2", span(40, 2), 1));
    assert_eq!(free_gib(&l), vec![35, 5, 5]);
    // Released: the shares come back.
    assert!(l.release("tp2"));
    assert_eq!(free_gib(&l), vec![40, 10, 5]);
}

#[test]
fn scores_follow_the_chosen_gpus() {
    let mut l = ledger();
    l.set_reading("full", reading(0, vec![gpu(0, 40, 20), gpu(1, 40, 20)]));
    l.set_reading("n1", reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 40)]));
    let r = span(40, 2);
    assert_eq!(l.score("full", r, Policy::Binpack, at(1)), 10);
    assert_eq!(l.score("n1", r, Policy::Binpack, at(1)), 6);
    assert_eq!(l.score("full", r, Policy::Spread, at(1)), 1);
    assert_eq!(l.score("n1", r, Policy::Spread, at(1)), 5);
}

#[test]
fn a_reading_listing_the_pod_on_each_gpu_books_its_share_there() {
    let mut l = ledger();
    l.set_reading("n1", reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 40)]));
    l.observe_pod(bound("tp", "GPU-0,GPU-1", span(40, 2), 1));
    assert_eq!(free_gib(&l), vec![20, 20]);
    let mut g0 = gpu(0, 40, 30);
    g0.pods.push(listed("tp", 20, 10));
    let mut g1 = gpu(1, 40, 35);
    g1.pods.push(listed("tp", 20, 5));
    l.set_reading("n1", reading(5, vec![g0, g1]));
    let views = l.gpu_views("n1").unwrap();
    assert_eq!(views[0].assigned_bytes, 20 * GIB);
    assert_eq!(views[0].unobserved, 10 * GIB);
    assert_eq!(views[1].unobserved, 15 * GIB);
    assert_eq!(free_gib(&l), vec![20, 20]);
    assert_eq!(
        l.pod("tp").unwrap().gpu_uuid.as_deref(),
        Some("GPU-0,GPU-1")
    );
}

#[test]
fn a_pod_waits_while_one_of_its_size_over_another_gpu_count_waits_for_its_units() {
    let mut l = ledger();
    let four = || {
        vec![
            gpu(0, 40, 40),
            gpu(1, 40, 40),
            gpu(2, 40, 40),
            gpu(3, 40, 40),
        ]
    };
    l.set_reading("n1", reading(0, four()));
    l.reserve(want("single", span(40, 1)), "n1", Policy::Binpack, at(1))
        .unwrap();
    // 40 GiB over 2 GPUs is the single pod's size: the device plugin could swap them.
    let err = l.check("n1", span(40, 2), at(2)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod ns/single of the same size (40 GiB) waits for its units on node n1 over 1 GPU; \
         the device plugin cannot tell pods of one size apart, so this pod over 2 GPUs waits \
         until that one has its units"
    );
    assert!(err.is_unresolvable(), "evicting pods would not help");
    assert_eq!(
        l.refusal("n1", span(40, 2), at(2)),
        Some(RefusalKind::SameSizeWaiting)
    );
    let rendered = l.check_rendered("n1", span(40, 2), at(2)).unwrap_err();
    assert_eq!(&*rendered.reason, err.to_string());
    assert_eq!(l.score("n1", span(40, 2), Policy::Binpack, at(2)), 0);
    assert!(matches!(
        l.reserve(want("tp", span(40, 2)), "n1", Policy::Binpack, at(2)),
        Err(ReserveError::NoFit(_))
    ));
    // Another pod of its size and GPU count, or of another size over 2 GPUs, may come.
    assert_eq!(l.check("n1", span(40, 1), at(2)), Ok(()));
    assert_eq!(l.check("n1", span(20, 2), at(2)), Ok(()));
    // Once the reading lists the single pod where the kubelet placed it, the spanning pod
    // fits, and a single pod of its size then waits for it in turn.
    l.observe_pod(bound("single", "GPU-0", span(40, 1), 1));
    let mut g0 = gpu(0, 40, 40);
    g0.pods.push(listed("single", 40, 0));
    let mut gpus = four();
    gpus[0] = g0;
    l.set_reading("n1", reading(5, gpus));
    assert_eq!(l.check("n1", span(40, 2), at(6)), Ok(()));
    l.reserve(want("tp", span(40, 2)), "n1", Policy::Binpack, at(6))
        .unwrap();
    assert_eq!(
        l.refusal("n1", span(40, 1), at(7)),
        Some(RefusalKind::SameSizeWaiting)
    );
}

#[test]
fn a_waiting_pod_holds_off_other_shapes_only_where_there_is_room_and_for_a_while() {
    let mut l = ledger();
    l.set_reading("n1", reading(0, vec![gpu(0, 80, 80), gpu(1, 40, 15)]));
    l.observe_pod(bound("single", "GPU-0", span(40, 1), 1));
    // 40 GiB over 2 GPUs: GPU 0 has 40 left, GPU 1 15 free, short of the 20 GiB share: the
    // memory is the reason (preemption may help), not the waiting pod.
    let err = l.check("n1", span(40, 2), at(2)).unwrap_err();
    assert!(!err.is_unresolvable(), "{err}");
    assert!(err.to_string().starts_with("needs 2 GPUs"), "{err}");
    assert_eq!(
        l.refusal("n1", span(40, 2), at(2)),
        Some(RefusalKind::Short)
    );
    // With room, the waiting pod is the reason...
    l.set_reading("n1", reading(3, vec![gpu(0, 80, 80), gpu(1, 40, 40)]));
    assert_eq!(
        l.refusal("n1", span(40, 2), at(4)),
        Some(RefusalKind::SameSizeWaiting)
    );
    // ... for SHAPE_WAIT_LIMIT after its assignment: one still not listed long after (its
    // VRAM in a plain init container, which PodResources never lists) no longer holds the
    // node off.
    let late = 1 + super::shape::SHAPE_WAIT_LIMIT.as_secs() + 1;
    l.set_reading("n1", reading(late, vec![gpu(0, 80, 80), gpu(1, 40, 40)]));
    assert_eq!(l.check("n1", span(40, 2), at(late)), Ok(()));
}

#[test]
fn same_size_pods_of_different_gpu_counts_may_swap_shapes() {
    let mut l = ledger();
    l.set_reading(
        "n1",
        reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 40), gpu(2, 40, 40)]),
    );
    // Both 40 GiB: one on GPU 0, one spread over GPU 1 and GPU 2, bound together (the extender
    // no longer binds them so, but pods bound before it was upgraded, or by hand, may be).
    l.observe_pod(bound("single", "GPU-0", span(40, 1), 1));
    l.observe_pod(bound("tp", "GPU-1,GPU-2", span(40, 2), 2));
    assert_eq!(free_gib(&l), vec![0, 20, 20]);
    // The plugin gave the single pod the spanning pod's shape (it matches by size): the reading
    // shows it on GPU 1 and GPU 2; the spanning pod, still waiting, will get GPU 0's units.
    let mut g1 = gpu(1, 40, 40);
    g1.pods.push(listed("single", 20, 0));
    let mut g2 = gpu(2, 40, 40);
    g2.pods.push(listed("single", 20, 0));
    l.set_reading("n1", reading(5, vec![gpu(0, 40, 40), g1, g2]));
    assert_eq!(free_gib(&l), vec![0, 20, 20]);
    // Once the spanning pod shows on GPU 0 the books stay put.
    let mut g0 = gpu(0, 40, 40);
    g0.pods.push(listed("tp", 40, 0));
    let mut g1 = gpu(1, 40, 40);
    g1.pods.push(listed("single", 20, 0));
    let mut g2 = gpu(2, 40, 40);
    g2.pods.push(listed("single", 20, 0));
    l.set_reading("n1", reading(6, vec![g0, g1, g2]));
    assert_eq!(free_gib(&l), vec![0, 20, 20]);
}

#[test]
fn a_spanning_pod_of_unknown_gpus_counts_its_share_everywhere() {
    let mut l = ledger();
    l.set_reading("n1", reading(0, vec![gpu(0, 40, 40), gpu(1, 40, 40)]));
    let mut rec = bound("tp", "GPU-0,GPU-9", span(40, 2), 1);
    l.observe_pod(rec.clone());
    assert_eq!(free_gib(&l), vec![20, 20]);
    rec.gpu_uuid = None;
    rec.uid = "tp-2".into();
    rec.name = "tp-2".into();
    l.observe_pod(rec);
    assert_eq!(free_gib(&l), vec![0, 0]);
}

#[test]
fn an_allocation_of_a_set_nobody_is_owed_does_not_offset_a_waiting_pod() {
    // 2 GiB pods: w waits for GPU 0; s (assigned GPUs 1 and 2) took the set {0, 1} of a pod
    // deleted since. The device plugin counts sets: {0} and {1, 2} are each owed a pod, {0, 1}
    // is paid by nobody's debt, so w gets GPU 0. Counting bytes per GPU, s's share on GPU 0
    // would have offset half of w's 2 GiB there.
    let mut l = ledger();
    l.set_reading(
        "n1",
        reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8), gpu(2, 8, 8)]),
    );
    l.observe_pod(bound("w", "GPU-0", span(2, 1), 1));
    l.observe_pod(bound("s", "GPU-1,GPU-2", span(2, 2), 1));
    let (mut g0, mut g1) = (gpu(0, 8, 7), gpu(1, 8, 7));
    g0.pods.push(listed("s", 1, 1));
    g1.pods.push(listed("s", 1, 1));
    l.set_reading("n1", reading(5, vec![g0, g1, gpu(2, 8, 8)]));
    let assigned: Vec<u64> = l
        .gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| v.assigned_bytes / GIB)
        .collect();
    // GPU 0: s's share and w's whole limit; GPU 1: s's share; GPUs 1 and 2: the half of w
    // each that may still come to the set {1, 2} (one pod for two owed sets: both are booked).
    assert_eq!(assigned, vec![3, 2, 1]);
}

/// A ledger of pods bound to GPUs (uid, GPU, GiB, in assignment order) and a reading listing
/// pods on two 10 GiB GPUs (uid, GiB, per GPU); returns each GPU's (assigned, unobserved) GiB.
fn books(pods: &[(&str, &str, u64)], listing: [&[(&str, u64)]; 2]) -> Vec<(u64, u64)> {
    let records = pods
        .iter()
        .zip(1..)
        .map(|(&(uid, gpu, gib), order)| {
            bound(uid, gpu, PodRequest::new(VramUnit::Gib1, gib), order)
        })
        .collect();
    books_of(records, listing)
}

/// [`books`] of pods bound as given.
fn books_of(records: Vec<PodRecord>, listing: [&[(&str, u64)]; 2]) -> Vec<(u64, u64)> {
    let mut l = ledger();
    l.replace_pods(records);
    let gpus = listing
        .iter()
        .zip(0..)
        .map(|(pods, i)| {
            let mut g = gpu(i, 10, 10);
            g.pods = pods.iter().map(|&(uid, gib)| listed(uid, gib, 0)).collect();
            g
        })
        .collect();
    l.set_reading("n1", reading(5, gpus));
    l.gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| (v.assigned_bytes / GIB, v.unobserved / GIB))
        .collect()
}

#[test]
fn a_pod_listed_unevenly_is_booked_by_what_the_kubelet_gave_it_on_each_gpu() {
    // Regression: pod B (containers of 1 and 3 GiB, assigned GPU 0) had its 1 GiB container
    // take the units of pod A (1 GiB, assigned GPU 1), a same-size swap; A then took GPU 0.
    // The ledger booked B as two even 2 GiB shares: GPU 0 held 4 GiB but was booked 3.
    let pods = [("a", "GPU-1", 1), ("b", "GPU-0", 4)];
    let done = books(&pods, [&[("a", 1), ("b", 3)], &[("b", 1)]]);
    assert_eq!(done, [(4, 4), (1, 1)]);

    // Earlier, only B's 1 GiB container allocated (the pod's whole 4 GiB were booked on GPU 1):
    // B still counts as waiting for its GPU 0 there, besides its GiB on GPU 1; A still waits
    // for its GPU 1. Until the kubelet is done, more is booked than will land (GPU 1 ends with
    // 1 GiB).
    assert_eq!(books(&pods, [&[], &[("b", 1)]]), [(4, 4), (2, 2)]);
}

#[test]
fn a_partly_allocated_pod_never_leaves_a_gpu_booked_below_what_will_land_there() {
    // X (containers of 1 and 3 GiB, assigned GPU 0) has only its 1 GiB container allocated,
    // on GPU 1 (it took Z's place); W (4 GiB, one container) and Z (1 GiB) wait for GPU 1.
    // The device plugin matches per container size: W lands on GPU 1, Z on GPU 0, X's 3 GiB
    // on GPU 0. In the end GPU 0 holds 4 GiB and GPU 1 holds 5.
    let pods = [("x", "GPU-0", 4), ("w", "GPU-1", 4), ("z", "GPU-1", 1)];
    let booked = books(&pods, [&[], &[("x", 1)]]);
    assert!(booked[0].0 >= 4 && booked[1].0 >= 5, "booked {booked:?}");
}

#[test]
fn a_pod_whose_init_container_asked_more_is_booked_its_whole_request() {
    // PodResources lists only the 4 GiB server, not the 8 GiB init container before it, whose
    // units the kubelet keeps for the pod: its GPU is booked 8 GiB, not 4, and not 4 + 8.
    let pods = [("p", "GPU-0", 8)];
    assert_eq!(books(&pods, [&[("p", 4)], &[]]), [(8, 8), (0, 0)]);
    // Spanning two GPUs: 2 GiB listed on each, 4 booked on each.
    let spanning = vec![bound("s", "GPU-0,GPU-1", span(8, 2), 1)];
    let booked = books_of(spanning, [&[("s", 2)], &[("s", 2)]]);
    assert_eq!(booked, [(4, 4), (4, 4)]);
}

#[test]
fn a_spanning_pods_init_part_is_booked_evenly_though_its_sidecar_sits_on_one_gpu() {
    // P spans GPUs 0 and 1 with 12 GiB: a 4 GiB sidecar (2 + 2) and an 8 GiB plain init
    // container (4 + 4). Its sidecar took the place of Q (4 GiB on GPU 1): 4 on GPU 1; its init
    // container took 4 + 4, and Q then 2 + 2. P is listed for its sidecar alone, for good: GPU 0
    // holds 4 + 2 = 6 GiB and GPU 1 holds 4 + 4 + 2 = 10.
    let pods = vec![
        bound("q", "GPU-1", PodRequest::new(VramUnit::Gib1, 4), 1),
        bound("p", "GPU-0,GPU-1", span(12, 2), 2),
    ];
    let booked = books_of(pods, [&[("q", 2)], &[("p", 4), ("q", 2)]]);
    assert_eq!(booked.iter().map(|b| b.0).collect::<Vec<_>>(), [6, 10]);
}
