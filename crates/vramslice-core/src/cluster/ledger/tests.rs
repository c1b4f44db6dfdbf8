//! Unit tests of the ledger: the effective-free rule, reasons, reservations and reconciliation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::units::VramUnit;

pub(super) const GIB: u64 = 1 << 30;

pub(super) fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn config(headroom: u64) -> LedgerConfig {
    LedgerConfig {
        headroom_bytes: headroom,
        staleness: Duration::from_secs(90),
    }
}

pub(super) fn gpu(index: u32, units: u64, free_gib: u64) -> PublishedGpu {
    PublishedGpu {
        index,
        uuid: format!("GPU-{index}"),
        free_bytes: free_gib * GIB,
        units,
        healthy: true,
        health_reason: None,
        pods: Vec::new(),
    }
}

pub(super) fn reading(observed: u64, gpus: Vec<PublishedGpu>) -> NodeReading {
    NodeReading {
        observed_at: at(observed),
        unit: VramUnit::Gib1,
        gpus,
    }
}

pub(super) fn listed(uid: &str, limit_gib: u64, used_gib: u64) -> ListedPod {
    ListedPod {
        uid: Some(uid.to_string()),
        namespace: "ns".into(),
        name: uid.to_string(),
        limit_bytes: limit_gib * GIB,
        used_bytes: Some(used_gib * GIB),
    }
}

fn bound(uid: &str, node: &str, gpu: Option<&str>, gib: u64, assigned: u64) -> PodRecord {
    PodRecord {
        uid: uid.to_string(),
        namespace: "ns".into(),
        name: uid.to_string(),
        node: node.to_string(),
        gpu_uuid: gpu.map(str::to_string),
        assigned_at: Some(at(assigned)),
        request: PodRequest::new(VramUnit::Gib1, gib),
    }
}

fn want(uid: &str, gib: u64) -> ReserveRequest {
    ReserveRequest {
        uid: uid.to_string(),
        namespace: "ns".into(),
        name: uid.to_string(),
        request: PodRequest::new(VramUnit::Gib1, gib),
    }
}

fn gib(n: u64) -> PodRequest {
    PodRequest::new(VramUnit::Gib1, n)
}

#[test]
fn the_reason_names_live_free_unobserved_and_need() {
    let mut ledger = Ledger::new(config(0));
    let mut sick = gpu(0, 16, 16);
    sick.healthy = false;
    sick.health_reason = Some("XID 79".into());
    let mut busy = gpu(1, 16, 5);
    busy.pods.push(listed("running", 9, 9));
    ledger.set_reading("n1", reading(0, vec![sick, busy]));
    ledger.observe_pod(bound("running", "n1", Some("GPU-1"), 9, 0));
    // Assigned after the reading: the reading cannot show it yet.
    ledger.observe_pod(bound("pending", "n1", Some("GPU-1"), 2, 10));

    let views = ledger.gpu_views("n1").unwrap();
    assert_eq!(views[1].live_free, 5 * GIB);
    assert_eq!(views[1].unobserved, 2 * GIB);
    assert_eq!(views[1].declared_free, 5 * GIB);
    assert_eq!(views[1].effective_free, 3 * GIB);

    let err = ledger.check("n1", gib(6), at(20)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: unhealthy (XID 79); GPU 1: 3 GiB effective free (live 5 GiB, 2 GiB reserved by \
         pods not yet running), need 6 GiB"
    );
    assert!(!err.is_unresolvable());
    assert_eq!(ledger.check("n1", gib(3), at(20)), Ok(()));
}

#[test]
fn headroom_is_kept_and_named() {
    let mut ledger = Ledger::new(config(512 << 20));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 4)]));
    let err = ledger.check("n1", gib(4), at(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: 3.5 GiB effective free (live 4 GiB, 0 B reserved by pods not yet running, \
         512 MiB headroom), need 4 GiB"
    );
}

#[test]
fn declared_units_bound_effective_free_even_when_live_memory_is_idle() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    // Two pods that hold 6 units but use nothing yet, listed in the reading.
    let mut g = gpu(0, 8, 8);
    g.pods = vec![listed("a", 3, 0), listed("b", 3, 0)];
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 3, 0));
    ledger.observe_pod(bound("b", "n1", Some("GPU-0"), 3, 0));
    ledger.set_reading("n1", reading(5, vec![g]));
    let err = ledger.check("n1", gib(3), at(6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: 2 GiB effective free (live 8 GiB, 6 GiB reserved by pods not yet running), \
         need 3 GiB"
    );
    // Live memory plentiful, units not: the declared side is named.
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 80)]));
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 6, 0));
    let views = ledger.gpu_views("n1").unwrap();
    assert_eq!(views[0].effective_free, 2 * GIB);
    let err = ledger.check("n1", gib(3), at(1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: 2 GiB effective free (6 GiB of 8 GiB assigned), need 3 GiB"
    );
}

#[test]
fn stale_and_missing_readings_take_no_pods() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    assert_eq!(ledger.check("n1", gib(1), at(90)), Ok(()));
    let err = ledger.check("n1", gib(1), at(95)).unwrap_err();
    assert_eq!(err.to_string(), "GPU 0: reading 95 s old");
    assert_eq!(ledger.stale_node_count(at(95)), 1);
    assert_eq!(ledger.stale_node_count(at(10)), 0);
    // A reading from the future (a node clock ahead) is fresh within the same bound; beyond it
    // it would never age, so it is stale too, and the reason says which way.
    ledger.set_reading("n2", reading(150, vec![gpu(0, 8, 8)]));
    assert_eq!(ledger.check("n2", gib(1), at(100)), Ok(()));
    ledger.set_reading("n2", reading(500, vec![gpu(0, 8, 8)]));
    let err = ledger.check("n2", gib(1), at(100)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: reading 400 s ahead of the extender's clock"
    );
    assert_eq!(
        ledger.refusal("n2", gib(1), at(100)),
        Some(RefusalKind::Stale)
    );
    assert_eq!(ledger.stale_node_count(at(100)), 2);
    ledger.remove_reading("n2");

    let err = ledger.check("ghost", gib(1), at(0)).unwrap_err();
    assert_eq!(err.to_string(), "no GpuNode reading for node ghost");
    ledger.set_reading_invalid("n3", "observedAt \"yesterday\" is not RFC 3339");
    let err = ledger.check("n3", gib(1), at(0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GpuNode n3 is unusable: observedAt \"yesterday\" is not RFC 3339"
    );
    ledger.set_reading("n4", reading(0, vec![]));
    assert_eq!(
        ledger.check("n4", gib(1), at(0)).unwrap_err().to_string(),
        "node n4 reports no GPUs"
    );
    ledger.remove_reading("n1");
    assert_eq!(
        ledger.check("n1", gib(1), at(0)).unwrap_err().to_string(),
        "no GpuNode reading for node n1"
    );
}

#[test]
fn unhealthy_without_reason_and_unresolvable_requests() {
    let mut ledger = Ledger::new(config(0));
    let mut g = gpu(0, 8, 8);
    g.healthy = false;
    ledger.set_reading("n1", reading(0, vec![g, gpu(1, 16, 9)]));
    let err = ledger.check("n1", gib(10), at(0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "GPU 0: unhealthy; GPU 1: 9 GiB effective free (live 9 GiB, 0 B reserved by pods \
         not yet running), need 10 GiB"
    );
    // Healthy GPU 1 has room for 9: only the unhealthy one is skipped.
    assert_eq!(ledger.check("n1", gib(9), at(0)), Ok(()));
    let too_big = ledger.check("n1", gib(17), at(0)).unwrap_err();
    assert!(too_big.is_unresolvable());
    assert_eq!(
        too_big.to_string(),
        "pod needs 17 GiB, more than any GPU on node n1 advertises (largest 16 GiB)"
    );
    let other_unit = ledger
        .check("n1", PodRequest::new(VramUnit::Mib512, 2), at(0))
        .unwrap_err();
    assert!(other_unit.is_unresolvable());
    assert_eq!(
        other_unit.to_string(),
        "node n1 advertises vramslice.io/vram-gib, the pod requests vramslice.io/vram-512mib"
    );
    // The unrendered verdict agrees, for each kind.
    let mib512 = PodRequest::new(VramUnit::Mib512, 2);
    let kind = |node: &str, request: PodRequest, now: u64| ledger.refusal(node, request, at(now));
    assert_eq!(kind("n1", gib(9), 0), None);
    assert_eq!(kind("n1", gib(10), 0), Some(RefusalKind::Short));
    assert_eq!(kind("n1", gib(17), 0), Some(RefusalKind::NeverFits));
    assert_eq!(kind("n1", mib512, 0), Some(RefusalKind::NeverFits));
    assert_eq!(kind("nowhere", gib(1), 0), Some(RefusalKind::NoReading));
    assert_eq!(kind("n1", gib(1), 600), Some(RefusalKind::Stale));
    // Only the unhealthy GPU is large enough: the kind says so, not "short".
    assert_eq!(kind("n1", gib(16), 0), Some(RefusalKind::Short));
    let mut big_sick = gpu(1, 16, 16);
    big_sick.healthy = false;
    ledger.set_reading("n3", reading(0, vec![gpu(0, 8, 8), big_sick]));
    let kind = |node: &str, request: PodRequest, now: u64| ledger.refusal(node, request, at(now));
    assert_eq!(kind("n3", gib(12), 0), Some(RefusalKind::Unhealthy));
    assert_eq!(kind("n3", gib(4), 0), None);
    // Only a node short of memory on healthy, fresh GPUs large enough can be helped by
    // evicting pods; every other refusal is unresolvable, detailed or brief.
    for kind in [
        RefusalKind::NoReading,
        RefusalKind::NeverFits,
        RefusalKind::Stale,
        RefusalKind::Unhealthy,
    ] {
        assert!(kind.is_unresolvable(), "{kind:?}");
    }
    assert!(!RefusalKind::Short.is_unresolvable());
    assert!(
        ledger
            .check("n3", gib(12), at(0))
            .unwrap_err()
            .is_unresolvable()
    );
    assert!(
        ledger
            .check("n1", gib(1), at(600))
            .unwrap_err()
            .is_unresolvable()
    );
    assert!(
        ledger
            .check("nowhere", gib(1), at(0))
            .unwrap_err()
            .is_unresolvable()
    );
    // n1's GPU 1 (16 GiB, healthy) is short of 10 GiB: preemption there could help, although
    // GPU 0 is unhealthy.
    assert!(
        !ledger
            .check("n1", gib(10), at(0))
            .unwrap_err()
            .is_unresolvable()
    );
    ledger.remove_reading("n3");
    assert_eq!(ledger.largest_gpu_bytes(), Some(16 * GIB));
    ledger.set_reading("n2", reading(0, vec![gpu(0, 80, 80)]));
    assert_eq!(ledger.largest_gpu_bytes(), Some(80 * GIB));
    ledger.set_reading("n2", reading(0, vec![gpu(0, 40, 40)]));
    assert_eq!(ledger.largest_gpu_bytes(), Some(40 * GIB));
    ledger.remove_reading("n2");
    assert_eq!(ledger.largest_gpu_bytes(), Some(16 * GIB));
}

#[test]
fn reservations_never_overcommit_and_release_frees() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8)]));
    let mut placed = Vec::new();
    for i in 0..10 {
        match ledger.reserve(want(&format!("p{i}"), 3), "n1", Policy::Binpack, at(1)) {
            Ok(p) => placed.push(p),
            Err(e) => assert!(
                e.to_string().contains("need 3 GiB"),
                "unexpected refusal: {e}"
            ),
        }
    }
    // 8 units per GPU hold two 3-unit pods each.
    assert_eq!(placed.len(), 4);
    assert_eq!(placed[0].gpu_index, 0);
    assert_eq!(placed[1].gpu_index, 0, "binpack fills GPU 0 first");
    assert_eq!(placed[2].gpu_index, 1);
    for v in ledger.gpu_views("n1").unwrap() {
        assert!(v.assigned_bytes <= v.advertised_bytes);
        assert_eq!(v.effective_free, 2 * GIB);
    }
    assert_eq!(ledger.reservation_count(), 4);
    assert!(ledger.release("p0"));
    assert!(!ledger.release("p0"));
    assert!(!ledger.release("never"));
    let again = ledger
        .reserve(want("p9", 3), "n1", Policy::Binpack, at(2))
        .unwrap();
    assert_eq!(again.gpu_uuid, "GPU-0");
}

#[test]
fn spread_takes_the_emptiest_gpu() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8)]));
    let a = ledger
        .reserve(want("a", 2), "n1", Policy::Spread, at(1))
        .unwrap();
    let b = ledger
        .reserve(want("b", 2), "n1", Policy::Spread, at(1))
        .unwrap();
    assert_eq!((a.gpu_index, b.gpu_index), (0, 1));
}

#[test]
fn double_binds_are_refused_with_the_reason() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    ledger
        .reserve(want("a", 1), "n1", Policy::Binpack, at(1))
        .unwrap();
    let err = ledger
        .reserve(want("a", 1), "n1", Policy::Binpack, at(1))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod ns/a already has a bind in flight to node n1"
    );
    ledger.observe_pod(bound("a", "n1", None, 1, 1));
    assert!(ledger.has_pod("a") && !ledger.has_pod("b"));
    let info = ledger.pod("a").unwrap();
    assert!(!info.reserved);
    assert_eq!(
        info.gpu_uuid.as_deref(),
        Some("GPU-0"),
        "the reserved GPU is kept"
    );
    assert!(!ledger.release("a"), "a bound pod is not released");
    let err = ledger
        .reserve(want("a", 1), "n1", Policy::Binpack, at(1))
        .unwrap_err();
    assert_eq!(err.to_string(), "pod ns/a is already bound to node n1");
}

#[test]
fn a_reservation_confirmed_bound_keeps_its_room_past_the_ttl_until_two_relists_lack_it() {
    let ttl = Duration::from_secs(300);
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    for uid in ["a", "b"] {
        ledger
            .reserve(want(uid, 4), "n1", Policy::Binpack, at(1))
            .unwrap();
    }
    let token = ledger.unsettle("b", at(2)).unwrap();
    assert!(ledger.confirm_bound("a") && ledger.confirm_bound("b"));
    assert!(!ledger.confirm_bound("a"), "already confirmed");
    assert!(!ledger.confirm_bound("never"));
    assert_eq!(ledger.reservation_count(), 0);
    assert_eq!(ledger.unsettled_token("b"), None);
    // The pod watch has not shown them (stalled): their room stays taken past the TTL.
    assert!(ledger.expire_reservations(at(1000), ttl).is_empty());
    assert!(!ledger.release("a") && !ledger.release_unsettled("b", token));
    assert!(matches!(
        ledger.reserve(want("c", 1), "n1", Policy::Binpack, at(1000)),
        Err(ReserveError::NoFit(_))
    ));
    assert_eq!(
        ledger
            .reserve(want("a", 4), "n1", Policy::Binpack, at(1000))
            .unwrap_err()
            .to_string(),
        "pod ns/a is already bound to node n1"
    );
    // The first re-list after may have been taken before the Binding: it keeps them.
    ledger.replace_pods(vec![bound("b", "n1", Some("GPU-0"), 4, 1)]);
    assert!(ledger.pod("a").is_some() && ledger.pod("b").is_some());
    // The next is the API server's word: a pod it lacks is gone.
    ledger.replace_pods(vec![bound("b", "n1", Some("GPU-0"), 4, 1)]);
    assert!(ledger.pod("a").is_none() && ledger.pod("b").is_some());
}

#[test]
fn an_unsettled_reservation_holds_its_room_and_tells_the_next_bind_so() {
    let settle = Duration::from_secs(3);
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    ledger
        .reserve(want("a", 6), "n1", Policy::Binpack, at(1))
        .unwrap();
    let first = ledger.unsettle("a", at(1)).unwrap();
    assert_eq!(
        ledger.unsettle("never", at(1)),
        None,
        "only a reservation is unsettled"
    );
    // The pod may be bound there: its room stays taken.
    assert!(matches!(
        ledger.reserve(want("b", 6), "n1", Policy::Binpack, at(2)),
        Err(ReserveError::NoFit(_))
    ));
    let err = ledger
        .reserve(want("a", 6), "n1", Policy::Binpack, at(2))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod ns/a's earlier bind to node n1 ended without knowing whether it took"
    );
    // Too young to be judged by one read (its Binding may still be committing) ...
    assert!(!ledger.take_unsettled("a", at(2), settle));
    // ... then taken by a bind checking it: another bind of the pod is told one is in flight,
    // and the background read-back of its token leaves it alone.
    assert!(ledger.take_unsettled("a", at(4), settle));
    assert!(!ledger.take_unsettled("a", at(4), settle));
    assert!(matches!(
        ledger.reserve(want("a", 6), "n1", Policy::Binpack, at(4)),
        Err(ReserveError::InFlight { .. })
    ));
    assert!(!ledger.release_unsettled("a", first));
    assert!(ledger.pod("a").unwrap().reserved);
    // Unsettled again (the check could not tell): only the read-back of the new token drops it.
    let second = ledger.unsettle("a", at(5)).unwrap();
    assert_ne!(first, second);
    assert_eq!(ledger.unsettled_token("a"), Some(second));
    assert!(!ledger.release_unsettled("a", first), "an older read-back");
    assert!(ledger.release_unsettled("a", second));
    assert!(ledger.pod("a").is_none());
    // Reserved again: settled, until a bind leaves it unsettled.
    ledger
        .reserve(want("a", 6), "n1", Policy::Binpack, at(6))
        .unwrap();
    assert_eq!(ledger.unsettled_token("a"), None);
    assert!(matches!(
        ledger.reserve(want("a", 6), "n1", Policy::Binpack, at(6)),
        Err(ReserveError::InFlight { .. })
    ));
    // Shown bound by the API server: no longer a reservation, unsettled or not.
    let third = ledger.unsettle("a", at(7)).unwrap();
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 6, 3));
    assert!(!ledger.pod("a").unwrap().reserved);
    assert_eq!(ledger.unsettle("a", at(8)), None);
    assert!(!ledger.release_unsettled("a", third));
    assert!(ledger.pod("a").is_some(), "a bound pod is never released");
}

#[test]
fn the_kubelet_placement_wins_over_the_annotation() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8)]));
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 2, 1));
    ledger.observe_pod(bound("b", "n1", Some("GPU-1"), 2, 1));
    let (mut g0, mut g1) = (gpu(0, 8, 6), gpu(1, 8, 6));
    g0.pods.push(listed("b", 2, 2));
    g1.pods.push(listed("a", 2, 2));
    ledger.set_reading("n1", reading(5, vec![g0, g1]));
    assert_eq!(ledger.pod("a").unwrap().gpu_uuid.as_deref(), Some("GPU-1"));
    assert_eq!(ledger.pod("b").unwrap().gpu_uuid.as_deref(), Some("GPU-0"));
    // A later pod update with the old annotation does not undo it.
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 2, 1));
    assert_eq!(ledger.pod("a").unwrap().gpu_uuid.as_deref(), Some("GPU-1"));
    // And a restart (fresh ledger, pods first, reading second or first) reaches the same books.
    let before = ledger.gpu_views("n1").unwrap().to_vec();
    let mut fresh = Ledger::new(config(0));
    let (mut g0, mut g1) = (gpu(0, 8, 6), gpu(1, 8, 6));
    g0.pods.push(listed("b", 2, 2));
    g1.pods.push(listed("a", 2, 2));
    fresh.set_reading("n1", reading(5, vec![g0, g1]));
    fresh.replace_pods(vec![
        bound("a", "n1", Some("GPU-0"), 2, 1),
        bound("b", "n1", Some("GPU-1"), 2, 1),
    ]);
    assert_eq!(fresh.gpu_views("n1").unwrap(), before.as_slice());
    assert_eq!(fresh.pod("a").unwrap().gpu_uuid.as_deref(), Some("GPU-1"));
}

#[test]
fn a_waiting_pod_is_booked_where_a_same_size_swap_sends_it() {
    // GPU 0 and GPU 1 each have 4 units; a (2 units) was assigned GPU 0, b (2 units) GPU 1,
    // and fillers take the other 2 units of each. The kubelet admitted a first and gave it
    // GPU 1's units; b, still waiting, will get GPU 0's (`owed_gpus`).
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 4, 4), gpu(1, 4, 4)]));
    for (uid, g) in [("a", "GPU-0"), ("b", "GPU-1")] {
        ledger.observe_pod(bound(uid, "n1", Some(g), 2, 1));
    }
    ledger.observe_pod(bound("f0", "n1", Some("GPU-0"), 2, 1));
    ledger.observe_pod(bound("f1", "n1", Some("GPU-1"), 2, 1));
    let (mut g0, mut g1) = (gpu(0, 4, 2), gpu(1, 4, 0));
    g0.pods.push(listed("f0", 2, 2));
    g1.pods.push(listed("f1", 2, 2));
    g1.pods.push(listed("a", 2, 2));
    ledger.set_reading("n1", reading(5, vec![g0, g1]));
    let views = ledger.gpu_views("n1").unwrap();
    // GPU 0 is still full in the books: b is booked there, not on GPU 1 beside a.
    assert_eq!(views[0].assigned_bytes, 4 * GIB);
    assert_eq!(views[0].unobserved, 2 * GIB);
    assert_eq!(views[0].effective_free, 0);
    assert_eq!(views[1].assigned_bytes, 4 * GIB);
    assert_eq!(
        ledger.reserve(want("c", 1), "n1", Policy::Binpack, at(6)),
        Err(ReserveError::NoFit(ledger.rejection("n1", gib(1), at(6))))
    );
    // b lands on GPU 0: the books are the same, now from the reading alone.
    let (mut g0, mut g1) = (gpu(0, 4, 0), gpu(1, 4, 0));
    g0.pods.extend([listed("f0", 2, 2), listed("b", 2, 2)]);
    g1.pods.extend([listed("f1", 2, 2), listed("a", 2, 2)]);
    ledger.set_reading("n1", reading(7, vec![g0, g1]));
    let views = ledger.gpu_views("n1").unwrap();
    assert_eq!(views[0].assigned_bytes, 4 * GIB);
    assert_eq!(views[1].assigned_bytes, 4 * GIB);
    assert_eq!(views[0].unobserved + views[1].unobserved, 0);
}

#[test]
fn an_unpaired_swap_books_the_waiting_pod_on_every_gpu_it_may_take() {
    // a (GPU 0) took GPU 2 by the kubelet's choice; b (GPU 1) waits. Owed: GPU 0 and GPU 1,
    // one pod left: it may land on either, so both are booked for it.
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading(
        "n1",
        reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8), gpu(2, 8, 8)]),
    );
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 3, 1));
    ledger.observe_pod(bound("b", "n1", Some("GPU-1"), 3, 1));
    let mut g2 = gpu(2, 8, 5);
    g2.pods.push(listed("a", 3, 3));
    ledger.set_reading("n1", reading(5, vec![gpu(0, 8, 8), gpu(1, 8, 8), g2]));
    let assigned: Vec<u64> = ledger
        .gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| v.assigned_bytes / GIB)
        .collect();
    assert_eq!(assigned, vec![3, 3, 3]);
}

#[test]
fn a_pod_an_unpaired_swap_would_steer_to_a_gpu_without_room_is_refused() {
    // q (4 GiB) was assigned GPU 1, but the kubelet gave it GPU 0's units (its swap partner
    // was deleted before the ledger knew it). GPU 1 is still owed a 4 GiB pod, so the device
    // plugin sends the next 4 GiB pod there whatever its annotation says: a process outside
    // any pod leaves 1 GiB live free on it.
    let mut ledger = Ledger::new(config(0));
    ledger.observe_pod(bound("q", "n1", Some("GPU-1"), 4, 10));
    let mut g0 = gpu(0, 16, 12);
    g0.pods.push(listed("q", 4, 4));
    ledger.set_reading("n1", reading(100, vec![g0.clone(), gpu(1, 16, 1)]));
    let before: Vec<u64> = ledger
        .gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| v.assigned_bytes)
        .collect();
    // The filter already refuses the node, naming the GPU the pod would land on (GPU 0 alone
    // has room: it is not named), and bind refuses it the same way.
    let refused = ledger.check("n1", gib(4), at(101)).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "GPU 1: owed a pod of this size after a swap at the device plugin; 1 GiB effective free \
         for 4 GiB booked"
    );
    assert!(!refused.is_unresolvable());
    assert_eq!(
        ledger.refusal("n1", gib(4), at(101)),
        Some(RefusalKind::Short)
    );
    assert_eq!(ledger.score("n1", gib(4), Policy::Binpack, at(101)), 0);
    let err = ledger
        .reserve(want("p", 4), "n1", Policy::Binpack, at(101))
        .unwrap_err();
    assert_eq!(err, ReserveError::NoFit(refused));
    let after: Vec<u64> = ledger
        .gpu_views("n1")
        .unwrap()
        .iter()
        .map(|v| v.assigned_bytes)
        .collect();
    assert_eq!(after, before, "the refused pod is not left on the books");
    // With room on GPU 1 the pod is taken, and booked on GPU 1, where it will land.
    ledger.set_reading("n1", reading(102, vec![g0, gpu(1, 16, 16)]));
    ledger
        .reserve(want("p", 4), "n1", Policy::Binpack, at(103))
        .unwrap();
    assert_eq!(ledger.gpu_views("n1").unwrap()[1].assigned_bytes, 4 * GIB);
}

#[test]
fn pods_of_unknown_gpu_count_everywhere_and_unknown_listed_pods_count() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8), gpu(1, 8, 8)]));
    ledger.observe_pod(bound("mystery", "n1", None, 3, 1));
    ledger.observe_pod(bound("gone-gpu", "n1", Some("GPU-9"), 1, 1));
    for v in ledger.gpu_views("n1").unwrap() {
        assert_eq!(v.assigned_bytes, 4 * GIB);
        assert_eq!(v.effective_free, 4 * GIB);
    }
    // A pod only the kubelet knows about (the ledger has not seen it).
    let mut g0 = gpu(0, 8, 5);
    g0.pods.push(listed("stranger", 2, 1));
    ledger.set_reading("n1", reading(5, vec![g0, gpu(1, 8, 8)]));
    let v = &ledger.gpu_views("n1").unwrap()[0];
    assert_eq!(v.assigned_bytes, 6 * GIB);
    assert_eq!(v.unobserved, 5 * GIB);
    assert_eq!(v.effective_free, 0);
}

#[test]
fn listed_pods_without_uid_match_by_name() {
    let mut ledger = Ledger::new(config(0));
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 4, 1));
    let mut g1 = gpu(1, 8, 7);
    g1.pods.push(ListedPod {
        uid: None,
        ..listed("a", 4, 1)
    });
    ledger.set_reading("n1", reading(5, vec![gpu(0, 8, 8), g1]));
    assert_eq!(ledger.pod("a").unwrap().gpu_uuid.as_deref(), Some("GPU-1"));
    let v = &ledger.gpu_views("n1").unwrap()[1];
    assert_eq!((v.assigned_bytes, v.unobserved), (4 * GIB, 3 * GIB));
    assert_eq!(ledger.gpu_views("n1").unwrap()[0].assigned_bytes, 0);
}

#[test]
fn relists_replace_bound_pods_but_keep_binds_in_flight() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 16, 16)]));
    ledger.observe_pod(bound("old", "n1", Some("GPU-0"), 4, 1));
    ledger
        .reserve(want("flying", 4), "n1", Policy::Binpack, at(2))
        .unwrap();
    ledger.replace_pods(vec![bound("new", "n1", Some("GPU-0"), 2, 1)]);
    assert!(ledger.pod("old").is_none());
    assert!(ledger.pod("flying").unwrap().reserved);
    assert!(ledger.pod("new").is_some());
    assert_eq!(ledger.pod_count(), 2);
    assert_eq!(ledger.gpu_views("n1").unwrap()[0].assigned_bytes, 6 * GIB);

    assert_eq!(
        ledger.expire_reservations(at(60), Duration::from_secs(120)),
        Vec::<String>::new()
    );
    assert_eq!(
        ledger.expire_reservations(at(200), Duration::from_secs(120)),
        vec!["flying".to_string()]
    );
    assert_eq!(ledger.gpu_views("n1").unwrap()[0].assigned_bytes, 2 * GIB);

    ledger.replace_readings(vec![("n2".into(), Err("bad".into()))]);
    assert_eq!(ledger.node_count(), 0);
    assert!(ledger.check("n1", gib(1), at(0)).is_err());
    assert_eq!(ledger.largest_gpu_bytes(), None);
}

#[test]
fn scores_follow_the_policy_and_are_zero_for_misfits() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("full", reading(0, vec![gpu(0, 8, 8)]));
    ledger.observe_pod(bound("x", "full", Some("GPU-0"), 5, 0));
    ledger.set_reading("empty", reading(0, vec![gpu(0, 8, 8)]));
    let need = gib(2);
    let (full, empty) = (
        ledger.score("full", need, Policy::Binpack, at(1)),
        ledger.score("empty", need, Policy::Binpack, at(1)),
    );
    assert!(
        full > empty,
        "binpack prefers the fuller node: {full} vs {empty}"
    );
    let (full, empty) = (
        ledger.score("full", need, Policy::Spread, at(1)),
        ledger.score("empty", need, Policy::Spread, at(1)),
    );
    assert!(
        full < empty,
        "spread prefers the emptier node: {full} vs {empty}"
    );
    assert_eq!(ledger.score("full", gib(4), Policy::Binpack, at(1)), 0);
    assert_eq!(ledger.score("nowhere", need, Policy::Binpack, at(1)), 0);
    assert_eq!(ledger.score("empty", need, Policy::Binpack, at(1000)), 0);
}

#[test]
fn pods_moving_nodes_and_forgetting_update_both_nodes() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading("n1", reading(0, vec![gpu(0, 8, 8)]));
    ledger.set_reading("n2", reading(0, vec![gpu(0, 8, 8)]));
    ledger.observe_pod(bound("a", "n1", Some("GPU-0"), 4, 1));
    ledger.observe_pod(bound("a", "n2", Some("GPU-0"), 4, 1));
    assert_eq!(ledger.gpu_views("n1").unwrap()[0].assigned_bytes, 0);
    assert_eq!(ledger.gpu_views("n2").unwrap()[0].assigned_bytes, 4 * GIB);
    assert!(ledger.forget_pod("a"));
    assert!(!ledger.forget_pod("a"));
    assert_eq!(ledger.gpu_views("n2").unwrap()[0].assigned_bytes, 0);
}

#[test]
fn many_gpus_are_summed_up_compactly() {
    let mut ledger = Ledger::new(config(0));
    ledger.set_reading(
        "n1",
        reading(0, vec![gpu(0, 8, 1), gpu(1, 8, 5), gpu(2, 8, 2)]),
    );
    assert_eq!(
        ledger.check("n1", gib(6), at(1)).unwrap_err().to_string(),
        "GPU 1: 5 GiB effective free (live 5 GiB, 0 B reserved by pods not yet running), need \
         6 GiB; 2 more GPUs with less effective free"
    );
    assert_eq!(
        ledger.check("n1", gib(6), at(100)).unwrap_err().to_string(),
        "all 3 GPUs: reading 100 s old"
    );
    let mut sick = gpu(1, 8, 8);
    sick.healthy = false;
    sick.health_reason = Some("ECC".into());
    ledger.set_reading("n2", reading(0, vec![gpu(0, 8, 1), sick, gpu(2, 8, 3)]));
    assert_eq!(
        ledger.check("n2", gib(6), at(1)).unwrap_err().to_string(),
        "GPU 1: unhealthy (ECC); GPU 2: 3 GiB effective free (live 3 GiB, 0 B reserved by pods \
         not yet running), need 6 GiB; 1 more GPU with less effective free"
    );
}

#[test]
fn staleness_settings_above_zero_and_the_defaults_as_written() {
    assert_eq!(parse_staleness("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_staleness("0s"), Err("must be more than zero".into()));
    assert!(parse_staleness("soon").unwrap_err().contains("\"soon\""));
    assert_eq!(
        parse_staleness(DEFAULT_STALENESS),
        Ok(DEFAULT_STALENESS_DURATION)
    );
    assert_eq!(
        crate::parse_bytes(DEFAULT_HEADROOM),
        Ok(DEFAULT_HEADROOM_BYTES)
    );
}
