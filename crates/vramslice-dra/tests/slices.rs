//! The slice publisher: what it writes, with which pool generation, and when it holds back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::ResourceSlice;
use vramslice_api::convert::dra::SliceSettings;
use vramslice_core::node::dra::{SliceDevice, SlicePublishReason};
use vramslice_dra::slices::{MemorySlices, SlicePolicy, SlicePublisher};

const GIB: u64 = 1 << 30;

type Memory = MemorySlices;

fn device(index: u32, capacity: u64) -> SliceDevice {
    SliceDevice {
        name: format!("gpu-{index}"),
        uuid: format!("GPU-{index}"),
        model: "NVIDIA H100".into(),
        index,
        advertised_bytes: 80 * GIB,
        capacity_bytes: capacity,
        unhealthy: None,
    }
}

fn publisher(memory: &Memory) -> SlicePublisher<Memory> {
    SlicePublisher::new(
        memory.clone(),
        SliceSettings {
            node: "node-a".into(),
            node_uid: None,
            step_bytes: GIB,
            generation: 0,
            driver_version: None,
        },
        SlicePolicy {
            threshold_bytes: GIB,
            min_interval: Duration::from_secs(5),
            verify_interval: Duration::from_secs(30),
        },
    )
}

/// What `publisher` does with one full H100 at `now`.
async fn one_h100(
    publisher: &mut SlicePublisher<Memory>,
    now: Instant,
) -> Option<SlicePublishReason> {
    publisher
        .observe(vec![device(0, 80 * GIB)], now)
        .await
        .unwrap()
}

fn capacity(slice: &ResourceSlice, i: usize) -> String {
    slice.spec.devices.as_ref().unwrap()[i]
        .capacity
        .as_ref()
        .unwrap()["memory"]
        .value
        .0
        .clone()
}

#[tokio::test]
async fn the_slice_follows_the_measurement_at_a_bounded_rate() {
    let memory = Memory::default();
    let mut publisher = publisher(&memory);
    let t0 = Instant::now();
    let first = publisher
        .observe(vec![device(0, 80 * GIB), device(1, 80 * GIB)], t0)
        .await
        .unwrap();
    assert_eq!(first, Some(SlicePublishReason::First));
    // Same capacity: nothing written.
    assert_eq!(
        publisher
            .observe(vec![device(0, 80 * GIB), device(1, 80 * GIB)], t0)
            .await
            .unwrap(),
        None
    );
    // A process of no claim takes 16 GiB on GPU 1: beyond the threshold, but within the
    // minimum interval it waits ...
    let shrunk = || vec![device(0, 80 * GIB), device(1, 64 * GIB)];
    assert_eq!(
        publisher
            .observe(shrunk(), t0 + Duration::from_secs(1))
            .await
            .unwrap(),
        None
    );
    // ... and is written once the interval has passed.
    let moved = publisher
        .observe(shrunk(), t0 + Duration::from_secs(6))
        .await
        .unwrap();
    assert!(
        matches!(moved, Some(SlicePublishReason::CapacityMoved { .. })),
        "{moved:?}"
    );
    // GPU 0 falls unhealthy and is withdrawn: written at once.
    let gone = publisher
        .observe(vec![device(1, 64 * GIB)], t0 + Duration::from_secs(7))
        .await
        .unwrap();
    assert_eq!(gone, Some(SlicePublishReason::DevicesChanged));

    let stored = memory.stored.lock().unwrap();
    let generations: Vec<i64> = stored.iter().map(|s| s.spec.pool.generation).collect();
    assert_eq!(generations, [1, 2, 3]);
    assert_eq!(capacity(&stored[1], 1), (64 * GIB).to_string());
    assert_eq!(stored[2].spec.devices.as_ref().unwrap().len(), 1);
    assert_eq!(publisher.writes(), 3);
}

#[tokio::test]
async fn capacity_wobbling_across_a_step_and_flapping_health_are_written_at_the_slow_pace() {
    let memory = Memory::default();
    let mut publisher = publisher(&memory); // minimum interval 5 s: slow pace 50 s
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let gpu = |capacity: u64| vec![device(0, capacity)];
    let sick = |capacity: u64, why: &str| {
        let mut d = device(0, capacity);
        d.unhealthy = Some(why.into());
        vec![d]
    };
    publisher.observe(gpu(30 * GIB), t0).await.unwrap();
    // Free memory wobbles around the 30 GiB step every few seconds.
    let mut written = Vec::new();
    for s in (5..=60).step_by(5) {
        let capacity = if s % 10 == 5 { 29 * GIB } else { 30 * GIB };
        if let Some(r) = publisher.observe(gpu(capacity), at(s)).await.unwrap() {
            written.push((s, r));
        }
    }
    // The fall at 5 s at once; the rises wait for the slow pace (50 s after that write).
    let seconds: Vec<u64> = written.iter().map(|(s, _)| *s).collect();
    assert_eq!(seconds, [5, 60], "{written:?}");
    // A GPU falling unhealthy is written at once; its health flapping back is slow.
    let fell = publisher
        .observe(sick(30 * GIB, "XID 79"), at(61))
        .await
        .unwrap();
    assert!(
        matches!(fell, Some(SlicePublishReason::FellUnhealthy { .. })),
        "{fell:?}"
    );
    for s in [65, 70, 80, 110] {
        assert_eq!(
            publisher.observe(gpu(30 * GIB), at(s)).await.unwrap(),
            None,
            "recovery at {s}s waits"
        );
    }
    assert!(matches!(
        publisher.observe(gpu(30 * GIB), at(111)).await.unwrap(),
        Some(SlicePublishReason::HealthEased { .. })
    ));
    assert_eq!(
        publisher.writes(),
        5,
        "first, fall, rise, unhealthy, recovered"
    );
}

#[tokio::test]
async fn a_restarted_publisher_continues_the_pool_generation() {
    let memory = Memory::default();
    let mut before = publisher(&memory);
    before
        .observe(vec![device(0, 80 * GIB)], Instant::now())
        .await
        .unwrap();
    before.observe(vec![], Instant::now()).await.unwrap();
    let mut after = publisher(&memory);
    after
        .observe(vec![device(0, 80 * GIB)], Instant::now())
        .await
        .unwrap();
    let generations: Vec<i64> = memory
        .stored
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.spec.pool.generation)
        .collect();
    assert_eq!(generations, [1, 2, 3]);
}

#[tokio::test]
async fn republish_writes_the_same_devices_again_with_the_next_generation() {
    // A starting kubelet deletes its node's slices; on registering again the agent republishes.
    let memory = Memory::default();
    let mut publisher = publisher(&memory);
    let now = Instant::now();
    one_h100(&mut publisher, now).await;
    assert_eq!(
        one_h100(&mut publisher, now).await,
        None,
        "unchanged devices are not written again"
    );
    publisher.republish();
    assert_eq!(
        one_h100(&mut publisher, now).await,
        Some(SlicePublishReason::First),
        "after republish the same devices are written at once, inside the minimum interval"
    );
    let stored = memory.stored.lock().unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].spec.pool.generation, 2);
    assert_eq!(capacity(&stored[1], 0), (80 * GIB).to_string());
}

#[tokio::test]
async fn a_slice_deleted_behind_its_back_is_written_again_within_the_verify_interval() {
    let memory = Memory::default();
    let mut publisher = publisher(&memory);
    let t0 = Instant::now();
    publisher
        .observe(vec![device(0, 80 * GIB)], t0)
        .await
        .unwrap();
    // Deleted (a kubelet's wipe that retried after the agent's republish, or a person); the
    // capacity stays steady, so nothing else would write it.
    memory.stored.lock().unwrap().clear();
    let steady = || vec![device(0, 80 * GIB)];
    assert_eq!(
        publisher
            .observe(steady(), t0 + Duration::from_secs(10))
            .await
            .unwrap(),
        None,
        "not checked before the verify interval"
    );
    assert_eq!(
        publisher
            .observe(steady(), t0 + Duration::from_secs(31))
            .await
            .unwrap(),
        Some(SlicePublishReason::First),
        "checked, found gone, written again"
    );
    assert_eq!(memory.stored.lock().unwrap().len(), 1);
    // Present and ours: checked, not written.
    assert_eq!(
        publisher
            .observe(steady(), t0 + Duration::from_secs(62))
            .await
            .unwrap(),
        None
    );
    assert_eq!(memory.stored.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_new_node_uid_rewrites_the_slice_with_the_new_owner() {
    // `kubectl delete node` and a kubelet restart make the Node again with a new UID; the
    // garbage collector deletes a slice owned by the old one, so it must be written anew.
    let memory = Memory::default();
    let mut publisher = publisher(&memory);
    assert!(publisher.set_node_uid(Some("uid-1".into())));
    let now = Instant::now();
    one_h100(&mut publisher, now).await;
    assert!(!publisher.set_node_uid(Some("uid-1".into())));
    assert!(!publisher.set_node_uid(None));
    assert_eq!(
        one_h100(&mut publisher, now).await,
        None,
        "an unchanged or unreadable UID writes nothing"
    );
    assert!(publisher.set_node_uid(Some("uid-2".into())));
    assert_eq!(
        one_h100(&mut publisher, now).await,
        Some(SlicePublishReason::First)
    );
    let stored = memory.stored.lock().unwrap();
    let owner = |s: &ResourceSlice| s.metadata.owner_references.as_ref().unwrap()[0].uid.clone();
    assert_eq!(owner(&stored[0]), "uid-1");
    assert_eq!(owner(&stored[1]), "uid-2");
}

/// The periodic check of the stored slice cannot read it (the API server answers reads with
/// errors): a GPU fallen unhealthy is still written at once.
#[tokio::test]
async fn a_failing_check_read_does_not_hold_back_an_urgent_write() {
    use std::sync::atomic::Ordering;
    let memory = Memory::default();
    let mut publisher = publisher(&memory);
    let t0 = Instant::now();
    assert_eq!(
        one_h100(&mut publisher, t0).await,
        Some(SlicePublishReason::First)
    );
    memory.reads_failing.store(true, Ordering::SeqCst);
    // Past the verify interval (a check is due) and the minimum interval.
    let later = t0 + Duration::from_secs(31);
    let mut sick = device(0, 80 * GIB);
    sick.unhealthy = Some("XID 79".into());
    let written = publisher.observe(vec![sick], later).await.unwrap();
    assert!(written.is_some(), "the unhealthy GPU was held back");
    assert_eq!(memory.written().len(), 2);
}
