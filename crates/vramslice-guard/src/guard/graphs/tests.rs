//! The graph memory policy against a fake graph pool per test.

use super::super::tests::{account, probes_with};
use super::*;
use crate::guard::{Mapping, Probes};
use crate::tracker::Kind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A fake graph pool per test: tests run on parallel threads and probes are plain `fn`s, so
/// each test reads its own static through a distinct const generic.
struct Pool {
    reserved: AtomicU64,
    used: AtomicU64,
    trims: AtomicU64,
    trim_works: AtomicBool,
    /// The next `stall` readings wait, once taken, each until `released` reaches its number
    /// (1, 2, ... in the order they stalled): threads reading the pool while another changes
    /// and re-reads it.
    stall: AtomicU64,
    stalled: AtomicU64,
    released: AtomicU64,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            reserved: AtomicU64::new(0),
            used: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            trim_works: AtomicBool::new(true),
            stall: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }
    /// What the probe answers: the reading, held back first when a stall was asked for.
    fn read(&self) -> GraphPoolReading {
        let r = self.reading();
        let stall = self
            .stall
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if stall {
            let number = self.stalled.fetch_add(1, Ordering::SeqCst) + 1;
            while self.released.load(Ordering::SeqCst) < number {
                std::thread::yield_now();
            }
        }
        r
    }
    /// Wait until `n` readings in all have stalled.
    fn wait_stalled(&self, n: u64) {
        while self.stalled.load(Ordering::SeqCst) < n {
            std::thread::yield_now();
        }
    }
    fn set(&self, reserved: u64, used: u64) {
        self.reserved.store(reserved, Ordering::SeqCst);
        self.used.store(used, Ordering::SeqCst);
    }
    fn reading(&self) -> GraphPoolReading {
        GraphPoolReading {
            reserved: self.reserved.load(Ordering::SeqCst),
            used: self.used.load(Ordering::SeqCst),
        }
    }
    fn trim(&self) -> bool {
        self.trims.fetch_add(1, Ordering::SeqCst);
        if self.trim_works.load(Ordering::SeqCst) {
            // Idle mappings go back; nothing is live in these tests.
            self.set(0, 0);
        }
        true
    }
}

static POOLS: [Pool; 10] = [
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
    Pool::new(),
];

fn probes_on<const I: usize>() -> Probes {
    let mut p = probes_with(|_| Some(0));
    p.graph_pool = |dev| (dev == 0).then(|| POOLS[I].read());
    p.graph_trim = |_| POOLS[I].trim();
    p
}

fn guard_on<const I: usize>(limit: u64) -> Guard {
    POOLS[I].set(0, 0);
    POOLS[I].trims.store(0, Ordering::SeqCst);
    POOLS[I].trim_works.store(true, Ordering::SeqCst);
    Guard::new(
        vec![account("", limit)],
        Mapping::Container,
        probes_on::<I>(),
    )
    .unwrap()
}

/// What the driver does on a first mapping in these tests: the pool grows by the growth.
fn driver_maps<const I: usize>(bytes: u64) {
    let r = POOLS[I].reading();
    POOLS[I].set(r.reserved + r.growth_for(bytes), r.used + bytes);
}

#[test]
fn growth_counts_the_unused_part_of_the_pool_first() {
    let r = GraphPoolReading {
        reserved: 100,
        used: 30,
    };
    assert_eq!(r.growth_for(50), 0);
    assert_eq!(r.growth_for(70), 0);
    assert_eq!(r.growth_for(90), 20);
    assert_eq!(GraphPoolReading::default().growth_for(5), 5);
    let odd = GraphPoolReading {
        reserved: 10,
        used: 40,
    };
    assert_eq!(
        odd.growth_for(5),
        5,
        "a used figure above reserved reuses nothing"
    );
}

#[test]
fn a_first_launch_is_reserved_in_advance_then_charged_what_the_pool_holds() {
    let g = guard_on::<0>(100);
    g.graph_instantiated(7, 107, Some(vec![(0, 40)]), false);
    let plan = g.graph_before_launch(7, || Some(0)).unwrap();
    assert_eq!(plan.reserved_in_advance(), 40);
    assert_eq!(g.used(0), 40, "reserved before the driver maps");
    driver_maps::<0>(40);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 40, "the advance became the pool's charge");
    assert_eq!(g.graph_charged(0), 40);
    // A replay: nothing reserved in advance, nothing new charged.
    let plan = g.graph_before_launch(7, || Some(0)).unwrap();
    assert_eq!(plan.reserved_in_advance(), 0);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 40);
}

#[test]
fn a_launch_that_does_not_fit_is_refused_with_nothing_left_reserved() {
    let g = guard_on::<1>(100);
    g.reserve(0, 70).unwrap();
    g.graph_instantiated(9, 109, Some(vec![(0, 40)]), false);
    match g.graph_before_launch(9, || Some(0)) {
        Err(GraphRefusal::OverLimit(e)) => {
            assert_eq!((e.requested, e.used, e.limit), (40, 70, 100));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(g.used(0), 70, "nothing left reserved");
    assert_eq!(
        POOLS[1].trims.load(Ordering::SeqCst),
        1,
        "trimmed once first"
    );
    g.release(0, 70);
    assert!(g.graph_before_launch(9, || Some(0)).is_ok());
}

#[test]
fn a_trim_makes_room_for_a_new_graph_and_maps_old_ones_again() {
    let g = guard_on::<2>(100);
    g.graph_instantiated(1, 101, Some(vec![(0, 60)]), false);
    g.graph_instantiated(2, 102, Some(vec![(0, 70)]), false);
    let plan = g.graph_before_launch(1, || Some(0)).unwrap();
    driver_maps::<2>(60);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 60);
    // Graph 2 needs 70: the pool holds 60, all associated with graph 1, so 70 more would not
    // fit; the guard trims (graph 1's idle mapping goes back) and graph 2 fits.
    let plan = g.graph_before_launch(2, || Some(0)).unwrap();
    assert_eq!(POOLS[2].trims.load(Ordering::SeqCst), 1);
    assert!(
        !g.accounts[0].warned.load(Ordering::SeqCst),
        "no out-of-memory warning for a launch the trim made fit"
    );
    assert_eq!(g.graph_charged(0), 0, "the trim was charged off");
    driver_maps::<2>(70);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 70);
    // Graph 1 was mapped before the trim: its next launch is checked again (and refused:
    // 60 more do not fit beside graph 2's 70 even after another trim that frees nothing).
    POOLS[2].trim_works.store(false, Ordering::SeqCst);
    assert!(matches!(
        g.graph_before_launch(1, || Some(0)),
        Err(GraphRefusal::OverLimit(_))
    ));
    assert_eq!(g.used(0), 70);
    assert!(
        g.accounts[0].warned.load(Ordering::SeqCst),
        "a refusal is logged"
    );
}

#[test]
fn user_trims_and_unknown_graphs_follow_the_pool() {
    let g = guard_on::<3>(100);
    // A graph the guard did not see instantiated: nothing in advance, re-read after.
    let plan = g.graph_before_launch(42, || Some(0)).unwrap();
    assert_eq!(plan.reserved_in_advance(), 0);
    POOLS[3].set(30, 30);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 30, "charged what the pool holds");
    POOLS[3].set(0, 0);
    g.graph_trimmed(0);
    assert_eq!(g.used(0), 0, "a trim gives it back");
    // A mapping the driver made after the guard read the pool is charged on the next
    // re-read (memory information, or memory short).
    POOLS[3].set(20, 20);
    g.reconcile_graph_pools();
    assert_eq!(g.used(0), 20);
    // Memory short: the slow path re-reads graph pools too.
    POOLS[3].set(50, 0);
    g.graph_trimmed(0);
    assert_eq!(g.used(0), 50);
    POOLS[3].set(10, 0);
    g.reserve(0, 90).unwrap();
    assert_eq!(g.graph_charged(0), 10);
    assert_eq!(g.used(0), 100);
}

#[test]
fn instantiation_with_upload_is_checked_and_counts_as_mapped() {
    let g = guard_on::<4>(100);
    let needs = vec![(0, 50)];
    let plan = g.graph_before_instantiate_upload(&needs).unwrap();
    assert_eq!(plan.reserved_in_advance(), 50);
    driver_maps::<4>(50);
    g.graph_instantiated(5, 105, Some(needs), true);
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 50);
    let plan = g.graph_before_launch(5, || Some(0)).unwrap();
    assert_eq!(
        plan.reserved_in_advance(),
        0,
        "already mapped by the upload"
    );
    g.graph_after_mapping(plan, true);
    g.graph_destroyed(5);
    assert_eq!(
        g.used(0),
        50,
        "destroying a graph leaves its memory in the pool"
    );
    // 60 more do not fit beside the 50 the pool keeps: the pool is trimmed, then they fit.
    let plan = g.graph_before_instantiate_upload(&vec![(0, 60)]).unwrap();
    assert_eq!(POOLS[4].trims.load(Ordering::SeqCst), 1);
    assert_eq!(plan.reserved_in_advance(), 60);
    assert_eq!((g.graph_charged(0), g.used(0)), (0, 60));
    g.graph_after_mapping(plan, false);
    assert_eq!(g.used(0), 0);
}

#[test]
fn per_gpu_limits_refuse_a_graph_on_a_device_without_an_entry() {
    POOLS[5].set(0, 0);
    let mut p = probes_on::<5>();
    p.graph_pool = |_| Some(GraphPoolReading::default());
    let g = Guard::new(
        vec![account("GPU-a", 100), account("GPU-b", 200)],
        Mapping::PerGpu,
        p,
    )
    .unwrap();
    g.graph_instantiated(3, 103, Some(vec![(1, 150), (2, 10)]), false);
    assert_eq!(
        g.graph_before_launch(3, || Some(0)),
        Err(GraphRefusal::Device(2))
    );
    assert_eq!(g.used(1), 0, "device 1's advance was given back");
    g.graph_instantiated(4, 104, Some(vec![(1, 150)]), false);
    let plan = g.graph_before_launch(4, || Some(0)).unwrap();
    assert_eq!((g.used(0), g.used(1)), (0, 150), "charged to GPU-b only");
    g.graph_after_mapping(plan, false);
    assert_eq!(
        g.used(1),
        0,
        "a failed launch keeps only what the pool holds"
    );
}

#[test]
fn a_captured_free_releases_when_a_graph_from_that_capture_first_runs() {
    let g = guard_on::<6>(100);
    g.reserve(0, 30).unwrap();
    g.track(Kind::DevicePtr, 0xa0, 0, 30);
    assert!(
        g.graph_free_captured(200, 200, 0xa0),
        "an ordinary allocation"
    );
    assert!(
        !g.graph_free_captured(200, 200, 0xb0),
        "not tracked: a graph allocation"
    );
    assert_eq!(g.used(0), 30, "still charged after the capture");
    g.graph_instantiated(20, 200, Some(Vec::new()), false);
    let upload = g.graph_before_upload(20, || Some(0)).unwrap();
    g.graph_after_mapping(upload, true);
    assert_eq!(g.used(0), 30, "an upload does not run the graph");
    let launch = g.graph_before_launch(20, || Some(0)).unwrap();
    g.graph_after_mapping(launch, true);
    assert_eq!(g.used(0), 0, "released when the graph ran");
    let again = g.graph_before_launch(20, || Some(0)).unwrap();
    g.graph_after_mapping(again, true);
    assert_eq!(g.used(0), 0, "once");
    // A capture whose graph is destroyed before it is instantiated frees nothing.
    g.reserve(0, 10).unwrap();
    g.track(Kind::DevicePtr, 0xc0, 0, 10);
    assert!(g.graph_free_captured(300, 300, 0xc0));
    g.graph_source_destroyed(300);
    g.graph_instantiated(30, 300, None, false);
    let launch = g.graph_before_launch(30, || Some(0)).unwrap();
    g.graph_after_mapping(launch, true);
    assert_eq!(g.used(0), 10);
    // A failed launch frees nothing either.
    assert!(g.graph_free_captured(400, 400, 0xc0));
    g.graph_instantiated(40, 400, None, false);
    let launch = g.graph_before_launch(40, || Some(0)).unwrap();
    g.graph_after_mapping(launch, false);
    assert_eq!(g.used(0), 10);
}

#[test]
fn a_captured_free_runs_once_even_from_two_graphs_of_one_capture() {
    let g = guard_on::<7>(100);
    g.reserve(0, 30).unwrap();
    g.track(Kind::DevicePtr, 0xd0, 0, 30);
    assert!(g.graph_free_captured(500, 500, 0xd0));
    g.graph_instantiated(50, 500, Some(Vec::new()), false);
    g.graph_instantiated(51, 500, Some(Vec::new()), false);
    let launch = g.graph_before_launch(50, || Some(0)).unwrap();
    g.graph_after_mapping(launch, true);
    assert_eq!(g.used(0), 0);
    // The address is reused by a new allocation; the other graph's launch must not free it,
    // nor may a graph instantiated from the capture later.
    g.reserve(0, 40).unwrap();
    g.track(Kind::DevicePtr, 0xd0, 0, 40);
    let launch = g.graph_before_launch(51, || Some(0)).unwrap();
    g.graph_after_mapping(launch, true);
    g.graph_instantiated(52, 500, Some(Vec::new()), false);
    let launch = g.graph_before_launch(52, || Some(0)).unwrap();
    g.graph_after_mapping(launch, true);
    assert_eq!(g.used(0), 40, "the new allocation stays charged");
}

/// Readings of the pool by several threads end in any order: the latest-started one stands.
/// A reading taken before a launch mapped more must not give back what is mapped, whether it
/// ends after the launch's own re-read (dropped) or before it (overtaken).
#[test]
fn the_latest_started_reading_of_a_graph_pool_stands() {
    let g = guard_on::<8>(100);
    let pool = &POOLS[8];
    for order in ["stale ends last", "stale ends first"] {
        pool.stall.store(0, Ordering::SeqCst);
        pool.stalled.store(0, Ordering::SeqCst);
        pool.released.store(0, Ordering::SeqCst);
        let plan = g.graph_before_launch(41, || Some(0)).unwrap();
        pool.set(10, 10);
        g.graph_after_mapping(plan, true);
        assert_eq!(g.used(0), 10, "{order}");
        std::thread::scope(|scope| {
            // A cuMemGetInfo on another thread reads the pool (10) and is held there...
            pool.stall.store(1, Ordering::SeqCst);
            let stale = scope.spawn(|| g.reconcile_graph_pools());
            pool.wait_stalled(1);
            // ...while a launch maps 30 more; its re-read (40) is held too, or not.
            let plan = g.graph_before_launch(42, || Some(0)).unwrap();
            pool.set(40, 40);
            if order == "stale ends last" {
                g.graph_after_mapping(plan, true);
                assert_eq!(g.used(0), 40);
                pool.released.store(1, Ordering::SeqCst);
                stale.join().unwrap();
            } else {
                pool.stall.store(1, Ordering::SeqCst);
                let launch = scope.spawn(|| g.graph_after_mapping(plan, true));
                pool.wait_stalled(2);
                pool.released.store(1, Ordering::SeqCst);
                stale.join().unwrap();
                pool.released.store(2, Ordering::SeqCst);
                launch.join().unwrap();
            }
        });
        assert_eq!(
            g.used(0),
            40,
            "{order}: the stale reading (10) gave back mapped memory"
        );
        assert_eq!(g.graph_charged(0), 40, "{order}");
        // Back to nothing for the next order.
        pool.set(0, 0);
        g.graph_trimmed(0);
        assert_eq!(g.used(0), 0, "{order}");
    }
}

/// A capture the driver invalidated made no graph and destroyed its own: the frees captured into
/// it never run, even from a later graph that gets the same handle; a capture that ends well
/// hands them to the graph it made.
#[test]
fn frees_of_a_capture_that_made_no_graph_are_forgotten() {
    let g = guard_on::<9>(100);
    g.reserve(0, 30).unwrap();
    g.track(Kind::DevicePtr, 0xa, 0, 30);
    // Captured on stream 0x60 into graph 0x600; the capture is invalidated.
    assert!(g.graph_free_captured(0x60, 0x600, 0xa));
    g.graph_capture_ended(0x60, None);
    // The next capture gets handle 0x600 back and frees nothing.
    g.graph_instantiated(0x700, 0x600, Some(Vec::new()), false);
    let plan = g.graph_before_launch(0x700, || Some(0)).unwrap();
    g.graph_after_mapping(plan, true);
    assert_eq!(g.used(0), 30, "the failed capture's free ran");
    // A capture that ends well: its graph (here under another handle) carries the free.
    assert!(g.graph_free_captured(0x80, 0x800, 0xa));
    g.graph_capture_ended(0x80, Some(0x900));
    g.graph_instantiated(0x901, 0x900, Some(Vec::new()), false);
    let plan = g.graph_before_launch(0x901, || Some(0)).unwrap();
    g.graph_after_mapping(plan, true);
    assert_eq!(
        g.used(0),
        0,
        "the graph the capture made frees it when it runs"
    );
}
