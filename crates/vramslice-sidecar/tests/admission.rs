//! Admission through the public API: order and fairness, queue timeout, never-fits errors, the
//! high-water mark, memory freed elsewhere, async cancellation, and profiling.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vramslice_sidecar::policy::ReserveSource;
use vramslice_sidecar::{AdmitError, Config, Job, ManualUsage, Runtime};

const GIB: u64 = 1 << 30;

fn runtime(limit: u64, tweak: impl FnOnce(&mut Config)) -> (Runtime, ManualUsage) {
    let usage = ManualUsage::new(0, 0);
    let mut config = Config {
        limit: Some(limit),
        sample_interval: Duration::from_millis(2),
        ..Config::default()
    };
    tweak(&mut config);
    (Runtime::new(config, usage.clone()).unwrap(), usage)
}

/// Poll `cond` until it holds; panics after 10 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_large_job_at_the_head_is_not_overtaken_by_small_ones() {
    let (rt, _) = runtime(10 * GIB, |_| {});
    let first = rt.admit_blocking(&Job::new("a").need(6 * GIB)).unwrap();
    let mut threads = Vec::new();
    // big (5 GiB) queues first, then three small (1 GiB) ones that would fit right now.
    for (i, need) in [(0, 5 * GIB), (1, GIB), (2, GIB), (3, GIB)] {
        let rt2 = rt.clone();
        threads.push(std::thread::spawn(move || {
            rt2.admit_blocking(&Job::new(format!("j{i}")).need(need))
                .unwrap()
        }));
        wait_until("queued", || rt.stats().queued == i + 1);
    }
    std::thread::sleep(Duration::from_millis(20)); // let the sampler pump a few times
    assert_eq!(rt.stats().running, 1, "small jobs overtook the large one");
    assert_eq!(rt.stats().queued, 4);
    drop(first);
    let permits: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(rt.stats().running, 4);
    assert_eq!(rt.stats().reserved, 8 * GIB);
    drop(permits);
    assert_eq!(rt.stats().running, 0);
}

#[test]
fn waiters_are_admitted_in_arrival_order() {
    let (rt, _) = runtime(10 * GIB, |_| {});
    let first = rt.admit_blocking(&Job::new("a").need(5 * GIB)).unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for i in 0..4 {
        let (rt2, order2) = (rt.clone(), order.clone());
        // 5 GiB each: only one fits at a time under the 8.5 GiB high-water mark.
        threads.push(std::thread::spawn(move || {
            let p = rt2
                .admit_blocking(&Job::new(format!("j{i}")).need(5 * GIB))
                .unwrap();
            order2.lock().unwrap().push(i);
            drop(p);
        }));
        wait_until("queued", || rt.stats().queued == i + 1);
    }
    drop(first);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

#[test]
fn queue_timeout_names_need_free_and_queue() {
    let (rt, _) = runtime(4 * GIB, |c| c.queue_timeout = Duration::from_millis(50));
    let _held = rt.admit_blocking(&Job::new("a").need(3 * GIB)).unwrap();
    let err = rt.admit_blocking(&Job::new("b").need(2 * GIB)).unwrap_err();
    assert!(matches!(err, AdmitError::Timeout { need, .. } if need == 2 * GIB));
    let msg = err.to_string();
    assert!(
        msg.contains("needs 2.0 GiB, 409.6 MiB free, 0 jobs queued"),
        "{msg}"
    );
    assert_eq!(rt.stats().queued, 0, "a timed-out job leaves the queue");
    assert!(
        rt.render_metrics()
            .contains(r#"vramslice_sidecar_admission_rejected_total{reason="timeout"} 1"#)
    );
}

#[test]
fn never_fits_fails_at_once_even_with_a_long_timeout() {
    let (rt, _) = runtime(4 * GIB, |c| c.queue_timeout = Duration::from_secs(3600));
    let err = rt
        .admit_blocking(&Job::new("big").need(6 * GIB))
        .unwrap_err();
    assert!(
        err.to_string().contains("needs 6.0 GiB, limit 4.0 GiB"),
        "{err}"
    );
    assert!(matches!(err, AdmitError::Refused { .. }));
}

#[test]
fn queue_full_is_refused_with_the_numbers() {
    let (rt, _) = runtime(10 * GIB, |c| c.queue_max = 2);
    let _held = rt.admit_blocking(&Job::new("a").need(7 * GIB)).unwrap();
    let mut waiting = Vec::new();
    for i in 0..2 {
        let rt2 = rt.clone();
        waiting.push(std::thread::spawn(move || {
            rt2.admit_blocking(&Job::new("w").need(6 * GIB)).map(drop)
        }));
        wait_until("queued", || rt.stats().queued == i + 1);
    }
    let err = rt.admit_blocking(&Job::new("c").need(6 * GIB)).unwrap_err();
    assert!(
        err.to_string()
            .contains("needs 6.0 GiB, 1.5 GiB free, 2 jobs queued"),
        "{err}"
    );
    assert!(rt.admit_blocking(&Job::new("d").need(20 * GIB)).is_err());
    let metrics = rt.render_metrics();
    for reason in ["queue_full", "never_fits"] {
        let line = format!("vramslice_sidecar_admission_rejected_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing in\n{metrics}");
    }
    drop(_held);
    for w in waiting {
        w.join().unwrap().unwrap();
    }
}

#[test]
fn high_water_mark_stops_admission_below_the_limit() {
    let (rt, usage) = runtime(10 * GIB, |c| c.queue_timeout = Duration::from_millis(30));
    usage.set(GIB);
    // 1 + 8 = 9 GiB is under the 10 GiB limit but over the 8.5 GiB high-water mark.
    assert!(matches!(
        rt.admit_blocking(&Job::new("a").need(8 * GIB)),
        Err(AdmitError::Timeout { .. })
    ));
    let (loose, usage) = runtime(10 * GIB, |c| c.policy.high_water = 0.95);
    usage.set(GIB);
    loose.admit_blocking(&Job::new("a").need(8 * GIB)).unwrap();
}

#[test]
fn memory_freed_elsewhere_admits_a_waiter() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    usage.set(8 * GIB); // another worker holds 8 GiB
    let rt2 = rt.clone();
    let waiter = std::thread::spawn(move || rt2.admit_blocking(&Job::new("w").need(2 * GIB)));
    wait_until("queued", || rt.stats().queued == 1);
    usage.set(GIB); // the other worker freed its memory
    let permit = waiter.join().unwrap().unwrap();
    assert_eq!(permit.reserved(), 2 * GIB);
}

#[test]
fn live_growth_counts_against_later_jobs() {
    let (rt, usage) = runtime(10 * GIB, |c| c.queue_timeout = Duration::from_millis(30));
    let p = rt.admit_blocking(&Job::new("a").need(GIB)).unwrap();
    usage.add(6 * GIB); // it grew far past its declared need
    wait_until("sampled", || rt.stats().live == 6 * GIB);
    assert_eq!(rt.stats().free, 17 * GIB / 2 - 6 * GIB);
    assert!(rt.admit_blocking(&Job::new("b").need(3 * GIB)).is_err());
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_waiters_admit_in_order_and_cancel_cleanly() {
    let (rt, _) = runtime(10 * GIB, |_| {});
    let first = rt.admit(&Job::new("a").need(8 * GIB)).await.unwrap();
    // A waiter whose future is dropped gives up its place.
    let rt2 = rt.clone();
    let abandoned = tokio::spawn(async move { rt2.admit(&Job::new("gone").need(4 * GIB)).await });
    while rt.stats().queued == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    abandoned.abort();
    let _ = abandoned.await;
    assert_eq!(rt.stats().queued, 0);
    let rt3 = rt.clone();
    let next = tokio::spawn(async move { rt3.admit(&Job::new("b").need(4 * GIB)).await });
    while rt.stats().queued == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(first);
    let p = next.await.unwrap().unwrap();
    assert_eq!(p.reserved(), 4 * GIB);
    assert_eq!(rt.stats().running, 1);
}

#[test]
fn first_run_reserves_default_then_learned_peak_with_margin() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, usage) = runtime(10 * GIB, |c| c.profile_dir = Some(dir.path().to_path_buf()));
    let job = Job::new("whisper").param("batch", 8);
    let p = rt.admit_blocking(&job).unwrap();
    assert_eq!(p.source(), ReserveSource::FirstRun);
    assert_eq!(p.reserved(), 8 * GIB);
    usage.add(3 * GIB); // peak
    wait_until("peak sampled", || p.peak_so_far() == 3 * GIB);
    usage.sub(2 * GIB); // frees most before finishing
    assert_eq!(p.complete(), Some(3 * GIB));
    usage.set(0);

    let p = rt.admit_blocking(&job).unwrap();
    assert_eq!(p.source(), ReserveSource::Profile);
    assert_eq!(p.reserved(), vramslice_sidecar::policy::scale(3 * GIB, 1.2));
    usage.add(GIB); // a smaller run never lowers the peak
    assert_eq!(p.complete(), Some(3 * GIB));

    // Another process (a fresh runtime on the same directory) starts from the learned peak.
    let (other, _) = runtime(10 * GIB, |c| c.profile_dir = Some(dir.path().to_path_buf()));
    assert_eq!(other.learned_peak(&job), Some(3 * GIB));
    assert_eq!(
        other.learned_peak(&Job::new("whisper").param("batch", 16)),
        None
    );
    let metrics = rt.render_metrics();
    assert!(
        metrics.contains("vramslice_sidecar_profile_hits_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vramslice_sidecar_profile_misses_total 1"),
        "{metrics}"
    );
}

#[test]
fn overlapping_jobs_do_not_record_contaminated_peaks() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let a = rt.admit_blocking(&Job::new("a").need(GIB)).unwrap();
    let b = rt.admit_blocking(&Job::new("b").need(GIB)).unwrap();
    usage.add(2 * GIB);
    assert_eq!(a.complete(), None);
    assert_eq!(b.complete(), None);
    assert_eq!(rt.learned_peak(&Job::new("a")), None);
}

#[test]
fn an_out_of_memory_beside_other_jobs_raises_from_the_recorded_peak_not_theirs() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let small = Job::new("small");
    let p = rt.admit_blocking(&small.clone().need(GIB)).unwrap();
    usage.add(GIB);
    assert_eq!(p.complete(), Some(GIB));
    usage.sub(GIB);
    let big = rt.admit_blocking(&Job::new("big").need(5 * GIB)).unwrap();
    let p = rt.admit_blocking(&small).unwrap();
    usage.add(5 * GIB + GIB / 2); // the neighbour's 5 GiB and this job's half
    let raised = p.out_of_memory();
    drop(big);
    assert_eq!(
        raised,
        GIB + GIB / 4,
        "the recorded 1 GiB times 1.25, not the neighbours' peak"
    );
    assert_eq!(rt.learned_peak(&small), Some(raised));
}

#[test]
fn an_out_of_memory_beside_other_jobs_is_not_written_to_the_shared_profile() {
    // Regression: every out-of-memory raised the job's peak on disk for good, also when a
    // neighbour in the process caused it, so a busy server's reservations only grew.
    let dir = tempfile::tempdir().unwrap();
    let shared = |c: &mut Config| c.profile_dir = Some(dir.path().to_path_buf());
    let (rt, usage) = runtime(10 * GIB, shared);
    let small = Job::new("small");
    let p = rt.admit_blocking(&small).unwrap();
    usage.add(GIB);
    assert_eq!(p.complete(), Some(GIB));
    usage.sub(GIB);

    let big = rt.admit_blocking(&Job::new("big").need(5 * GIB)).unwrap();
    let raised = rt.admit_blocking(&small).unwrap().out_of_memory();
    assert_eq!(raised, GIB + GIB / 4);
    // The retry in this process reserves by the raise ...
    let retry = rt.admit_blocking(&small).unwrap();
    assert_eq!(retry.reserved(), (raised as f64 * 1.2) as u64);
    // ... other workers (and this one after a restart) keep the measured peak.
    let (other, _) = runtime(10 * GIB, shared);
    assert_eq!(other.learned_peak(&small), Some(GIB));
    drop(big);
    // Measured alone, the peak replaces the provisional raise, even lower.
    usage.add(GIB - GIB / 8);
    assert_eq!(retry.complete(), None, "measured no higher than the record");
    usage.set(0);
    let alone = rt.admit_blocking(&small).unwrap();
    usage.add(GIB / 2);
    assert_eq!(alone.complete(), Some(GIB));
    assert_eq!(rt.learned_peak(&small), Some(GIB));

    // Alone, the job caused it: the raise is recorded for every worker.
    usage.set(0);
    let p = rt.admit_blocking(&small).unwrap();
    usage.add(2 * GIB);
    assert_eq!(p.out_of_memory(), 2 * GIB + GIB / 2);
    assert_eq!(other.learned_peak(&small), Some(2 * GIB + GIB / 2));
}

#[test]
fn a_provisional_raise_does_not_reach_the_profile_through_a_later_lone_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let shared = |c: &mut Config| c.profile_dir = Some(dir.path().to_path_buf());
    let (rt, usage) = runtime(10 * GIB, shared);
    let job = Job::new("j");
    let p = rt.admit_blocking(&job).unwrap();
    usage.add(GIB);
    assert_eq!(p.complete(), Some(GIB));
    usage.set(0);
    // Two neighbours' spikes: provisional raises, 1.25 GiB then about 1.56 GiB.
    for _ in 0..2 {
        let big = rt.admit_blocking(&Job::new("big").need(GIB)).unwrap();
        rt.admit_blocking(&job).unwrap().out_of_memory();
        drop(big);
    }
    assert!(rt.learned_peak(&job).unwrap() > GIB + GIB / 2);
    let reserved_by = rt.learned_peak(&job).unwrap();
    // Alone, it fails having grown 1 GiB: the raise written starts from the recorded 1 GiB ...
    let p = rt.admit_blocking(&job).unwrap();
    usage.add(GIB);
    let next = p.out_of_memory();
    let (other, _) = runtime(10 * GIB, shared);
    assert_eq!(other.learned_peak(&job), Some(GIB + GIB / 4));
    // ... and the retry here reserves no less than the attempt that failed.
    assert_eq!(next, reserved_by);
    assert_eq!(rt.learned_peak(&job), Some(reserved_by));
}

#[test]
fn settings_out_of_range_are_refused_however_they_are_made() {
    for tweak in [
        (|c: &mut Config| c.policy.peak_margin = 0.0) as fn(&mut Config),
        |c| c.policy.high_water = 0.0,
        |c| c.policy.first_run_fraction = 1.5,
        |c| c.queue_timeout = Duration::from_secs(5_000_000_000_000_000_000),
        |c| c.backoff = vramslice_sidecar::policy::Backoff::from_base(Duration::MAX),
        |c| c.sample_interval = Duration::from_secs(2 * 24 * 3600),
        |c| c.sample_interval = Duration::from_nanos(1),
        |c| c.oom_retries = u32::MAX,
    ] {
        let mut config = Config {
            limit: Some(GIB),
            ..Config::default()
        };
        tweak(&mut config);
        let err = Runtime::new(config, ManualUsage::new(0, 0)).err().unwrap();
        assert!(err.to_string().starts_with("configuration: "), "{err}");
    }
}

#[test]
fn a_job_timeout_longer_than_a_day_waits_a_day_and_does_not_panic() {
    let (rt, _) = runtime(4 * GIB, |_| {});
    let _held = rt.admit_blocking(&Job::new("a").need(3 * GIB)).unwrap();
    let patient = Job::new("b").need(2 * GIB).timeout(Duration::MAX);
    let rt2 = rt.clone();
    let waiter = std::thread::spawn(move || rt2.admit_blocking(&patient).map(|_| ()));
    wait_until("queued", || rt.stats().queued == 1);
    drop(_held);
    waiter.join().unwrap().unwrap();
}

#[test]
fn a_cancelled_blocking_wait_gives_up_its_place_in_line() {
    let (rt, _) = runtime(4 * GIB, |c| c.queue_timeout = Duration::from_secs(3600));
    let held = rt.admit_blocking(&Job::new("a").need(3 * GIB)).unwrap();
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (rt2, flag) = (rt.clone(), cancelled.clone());
    let waiter = std::thread::spawn(move || {
        rt2.admit_blocking_unless(&Job::new("b").need(2 * GIB), &|| {
            flag.load(std::sync::atomic::Ordering::Acquire)
        })
    });
    wait_until("b queued", || rt.stats().queued == 1);
    cancelled.store(true, std::sync::atomic::Ordering::Release);
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, AdmitError::Cancelled { .. }), "{err}");
    assert_eq!(rt.stats().queued, 0, "its place in line is gone");
    // A job that fits beside the held one runs at once instead of waiting behind b.
    assert!(rt.admit_blocking(&Job::new("c").need(GIB / 4)).is_ok());
    drop(held);
}

#[test]
fn a_blocking_wait_admitted_before_it_sees_the_cancel_returns_its_permit() {
    let (rt, _) = runtime(4 * GIB, |c| c.queue_timeout = Duration::from_secs(3600));
    let held = rt.admit_blocking(&Job::new("a").need(3 * GIB)).unwrap();
    let (rt2, rt3) = (rt.clone(), rt.clone());
    // The cancel comes true exactly when b has been admitted by a's release: the waiter must
    // still get b's permit (throwing it away would waste the admission).
    let waiter = std::thread::spawn(move || {
        rt2.admit_blocking_unless(&Job::new("b").need(2 * GIB), &|| {
            let s = rt3.stats();
            s.queued == 0 && s.running == 1
        })
        .map(|permit| permit.complete())
    });
    wait_until("b queued", || rt.stats().queued == 1);
    drop(held);
    let got = waiter.join().unwrap();
    assert!(got.is_ok(), "b was admitted before the cancel: {got:?}");
}

#[test]
fn a_spike_between_samples_still_counts_toward_the_peak() {
    // No sampler at all: only the usage source's own high-water (ManualUsage keeps one per read
    // window) can see the spike.
    let (rt, usage) = runtime(10 * GIB, |c| c.sample_interval = Duration::ZERO);
    let p = rt.admit_blocking(&Job::new("spiky").need(GIB)).unwrap();
    usage.add(2 * GIB);
    usage.sub(2 * GIB);
    assert_eq!(p.complete(), Some(2 * GIB));
}

#[test]
fn a_reported_peak_is_recorded_even_when_jobs_overlap() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let a = rt.admit_blocking(&Job::new("a").need(GIB)).unwrap();
    let b = rt.admit_blocking(&Job::new("b").need(GIB)).unwrap();
    usage.add(3 * GIB);
    a.report_peak(GIB / 2);
    a.report_peak(GIB / 4); // the highest report counts
    assert_eq!(a.complete(), Some(GIB / 2));
    assert_eq!(b.complete(), None);
}

#[test]
fn a_raised_need_still_runs_beside_memory_that_never_frees() {
    // Regression: repeated out-of-memory raised a learned need to the whole capacity, which
    // could never fit beside a loaded model, and the FIFO queue stalled behind it.
    let (rt, usage) = runtime(10 * GIB, |c| c.queue_timeout = Duration::from_secs(5));
    usage.set(2 * GIB); // model weights, loaded for good
    let job = Job::new("grows");
    for _ in 0..10 {
        rt.admit_blocking(&job).unwrap().out_of_memory();
    }
    assert!(rt.learned_peak(&job).unwrap() > 10 * GIB);
    let p = rt.admit_blocking(&job).unwrap();
    assert_eq!(p.reserved(), rt.stats().capacity - 2 * GIB);
}

#[test]
fn a_job_may_bring_its_own_admission_timeout() {
    let (rt, _) = runtime(4 * GIB, |c| c.queue_timeout = Duration::from_secs(3600));
    let _held = rt.admit_blocking(&Job::new("a").need(3 * GIB)).unwrap();
    let quick = Job::new("b")
        .need(2 * GIB)
        .timeout(Duration::from_millis(20));
    assert!(matches!(
        rt.admit_blocking(&quick),
        Err(AdmitError::Timeout { .. })
    ));
}

#[test]
fn without_a_limit_the_gpu_total_is_the_budget() {
    let usage = ManualUsage::new(2 * GIB, 8 * GIB); // a GPU of 8 GiB, 2 GiB used by others
    let rt = Runtime::new(Config::default(), usage).unwrap();
    assert_eq!(rt.limit(), 8 * GIB);
    let err = rt
        .admit_blocking(&Job::new("big").need(7 * GIB))
        .unwrap_err();
    assert!(err.to_string().contains("limit 8.0 GiB"), "{err}");
    let p = rt.admit_blocking(&Job::new("ok").need(4 * GIB)).unwrap();
    assert_eq!(rt.stats().free, rt.stats().capacity - 6 * GIB);
    drop(p);
    // No limit and a source that knows no total: a clear error.
    let err = Runtime::new(Config::default(), ManualUsage::default()).unwrap_err();
    assert!(
        err.to_string().contains("VRAMSLICE_VRAM_LIMIT_BYTES"),
        "{err}"
    );
}

/// Under per-GPU limits the runtime admits by one GPU's slice — the GPU `VRAMSLICE_GPU_UUID`
/// names — and reads that GPU's accounting file (the guard keeps one per GPU).
#[test]
fn per_gpu_limits_admit_by_the_named_gpus_slice() {
    use vramslice_core::container::accounting::{gpu_accounting_file_name, header, initial_image};
    use vramslice_core::container::limit::{FileRead, limits_file_content};
    let dir = tempfile::tempdir().unwrap();
    let dir_text = dir.path().display().to_string();
    // A limit file the environment names, so that the accounting directory is the
    // environment's too (under the plugin's fixed file it would be the mounted one).
    let env = move |k: &str| match k {
        "VRAMSLICE_GPU_UUID" => Some("GPU-b".to_string()),
        "VRAMSLICE_ACCOUNTING_DIR" => Some(dir_text.clone()),
        "VRAMSLICE_LIMIT_FILE" => Some("/test/named-limit".to_string()),
        _ => None,
    };
    let file = limits_file_content(&[("GPU-a", 8 * GIB), ("GPU-b", 4 * GIB)]).unwrap();
    let config = Config::from_lookup(env, |p| {
        if p.ends_with("named-limit") {
            FileRead::Text(file.clone())
        } else {
            FileRead::Missing
        }
    })
    .unwrap();
    assert_eq!(config.gpu_uuid.as_deref(), Some("GPU-b"));
    // The guard's file for GPU-b says 1 GiB is in use there.
    let mut image = initial_image(4 * GIB, "GPU-b", 4);
    let at = header::USED * 8;
    image[at..at + 8].copy_from_slice(&GIB.to_le_bytes());
    std::fs::write(dir.path().join(gpu_accounting_file_name("GPU-b")), image).unwrap();
    let source = vramslice_sidecar::usage::AccountingFile::in_dir_for(
        config.accounting_dir.as_deref().unwrap(),
        config.gpu_uuid.as_deref(),
    );
    let rt = Runtime::new(config, source).unwrap();
    assert_eq!(rt.limit(), 4 * GIB, "GPU-b's limit, not GPU-a's");
    assert_eq!(rt.stats().live, GIB, "GPU-b's usage");
    let err = rt
        .admit_blocking(&Job::new("big").need(5 * GIB))
        .unwrap_err();
    assert!(err.to_string().contains("limit 4.0 GiB"), "{err}");
}

#[test]
fn a_waiting_estimate_is_sized_with_the_room_there_is_when_it_is_admitted() {
    // Regression: a first-run (or learned) reservation was cut to the room when the job joined
    // the line and kept at that size after the room grew, so jobs admitted beside it overbooked.
    let (rt, usage) = runtime(10 * GIB, |_| {}); // capacity 8.5 GiB
    usage.set(4 * GIB); // another worker's 4 GiB, freed later
    let a = rt.admit_blocking(&Job::new("a").need(2 * GIB)).unwrap();
    let rt2 = rt.clone();
    // No profile: asks for 8 GiB (80 %), only 4.5 GiB of room now, and 2 GiB of it taken.
    let waiter = std::thread::spawn(move || rt2.admit_blocking(&Job::new("x")).unwrap());
    wait_until("x queued", || rt.stats().queued == 1);
    usage.set(0);
    drop(a);
    let x = waiter.join().unwrap();
    assert_eq!(x.source(), ReserveSource::FirstRun);
    assert_eq!(x.reserved(), 8 * GIB, "sized with the room at admission");
    let small = Job::new("y").need(GIB).timeout(Duration::from_millis(50));
    assert!(
        matches!(rt.admit_blocking(&small), Err(AdmitError::Timeout { .. })),
        "8 GiB + 1 GiB is past the 8.5 GiB capacity"
    );
}

#[test]
fn a_job_that_fits_only_once_the_cache_is_emptied_runs_after_the_reclaim_hook() {
    // 3 GiB of weights and 4 GiB of allocator cache stay while the runtime is idle; a 4 GiB
    // request does not fit beside them (7 + 4 > 8.5 GiB) and no release of this runtime will
    // make room: the hook empties the cache, once, and the job runs.
    let (rt, usage) = runtime(10 * GIB, |c| c.queue_timeout = Duration::from_secs(5));
    usage.set(7 * GIB);
    let calls = Arc::new(Mutex::new(0));
    let (hook_usage, hook_calls) = (usage.clone(), Arc::clone(&calls));
    rt.set_reclaim(move || {
        *hook_calls.lock().unwrap() += 1;
        hook_usage.set(3 * GIB);
    });
    let started = Instant::now();
    let p = rt
        .admit_blocking(&Job::new("request").need(4 * GIB))
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(p.reserved(), 4 * GIB);
    assert_eq!(*calls.lock().unwrap(), 1);
    assert!(
        rt.render_metrics()
            .contains("vramslice_sidecar_reclaims_total 1")
    );
}

#[test]
fn the_reclaim_hook_runs_once_per_stalled_job_and_not_while_jobs_run() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let calls = Arc::new(Mutex::new(0));
    let hook_calls = Arc::clone(&calls);
    rt.set_reclaim(move || *hook_calls.lock().unwrap() += 1);
    // A running job will release: no reclaim for the job behind it.
    let running = rt.admit_blocking(&Job::new("a").need(6 * GIB)).unwrap();
    let quick = |need| Job::new("b").need(need).timeout(Duration::from_millis(60));
    assert!(matches!(
        rt.admit_blocking(&quick(4 * GIB)),
        Err(AdmitError::Timeout { running: 1, .. })
    ));
    assert_eq!(*calls.lock().unwrap(), 0);
    drop(running);
    // Idle, and the memory stays (held elsewhere): one call, then the wait runs out, saying
    // that nothing of this runtime was running.
    usage.set(7 * GIB);
    let err = rt.admit_blocking(&quick(4 * GIB)).unwrap_err();
    assert!(
        err.to_string().ends_with("0 jobs queued, 0 running"),
        "{err}"
    );
    assert_eq!(*calls.lock().unwrap(), 1);
}

#[test]
fn a_peak_read_from_the_guards_file_is_this_processs_own() {
    // Regression: the container's total was the only reading, so what the container's other
    // worker processes allocated during a job was recorded, for good, as the job's own peak.
    use vramslice_core::container::accounting::{ACCOUNTING_FILE_NAME, header, initial_image};
    use vramslice_core::container::accounting::{slot, slot_word};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(ACCOUNTING_FILE_NAME);
    let write = |own: u64, other: u64| {
        let mut image = initial_image(10 * GIB, "GPU-a", 4);
        let mut put = |word: usize, value: u64| {
            image[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
        };
        put(header::USED, own + other);
        put(slot_word(0, slot::PID), u64::from(std::process::id()));
        put(slot_word(0, slot::BYTES), own);
        put(slot_word(1, slot::PID), 1);
        put(slot_word(1, slot::BYTES), other);
        // Whole at once, as the guard's in-place updates are seen (a plain write truncates).
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, image).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(GIB, 2 * GIB); // weights here, another worker's 2 GiB
    let source = vramslice_sidecar::usage::AccountingFile::in_dir(dir.path());
    let config = Config {
        limit: Some(10 * GIB),
        sample_interval: Duration::from_millis(2),
        ..Config::default()
    };
    let rt = Runtime::new(config, source).unwrap();
    let job = Job::new("forward").param("batch", 1);
    let p = rt.admit_blocking(&job).unwrap();
    write(2 * GIB, 6 * GIB); // this job's 1 GiB; the other worker grew by 4 GiB meanwhile
    wait_until("sampled", || p.peak_so_far() == GIB);
    write(GIB, 6 * GIB);
    assert_eq!(p.complete(), Some(GIB));
    assert_eq!(rt.learned_peak(&job), Some(GIB));
    assert_eq!(
        rt.stats().live,
        7 * GIB,
        "admission still sees the container"
    );

    // A job that reuses memory this process already holds (a caching allocator's blocks) grows
    // nothing here: nothing is learned, not another worker's 3 GiB meanwhile.
    let cached = Job::new("forward").param("batch", 2);
    let p = rt.admit_blocking(&cached).unwrap();
    write(GIB, 9 * GIB);
    wait_until("sampled", || rt.stats().live == 10 * GIB);
    write(GIB, 6 * GIB);
    assert_eq!(p.complete(), None);
    assert_eq!(rt.learned_peak(&cached), None);

    // A front end that holds nothing, its jobs run by another process of the container (an
    // engine process): the container's growth is the job's.
    write(0, 7 * GIB);
    let engine = Job::new("generate");
    let p = rt.admit_blocking(&engine).unwrap();
    write(0, 10 * GIB);
    wait_until("sampled", || p.peak_so_far() == 3 * GIB);
    write(0, 7 * GIB);
    assert_eq!(p.complete(), Some(3 * GIB));

    // A front end that holds a CUDA context of its own says so: the container's growth.
    write(GIB / 2, 7 * GIB);
    let mut config = Config {
        limit: Some(10 * GIB),
        sample_interval: Duration::from_millis(2),
        ..Config::default()
    };
    config.peak_scope = vramslice_sidecar::PeakScope::Container;
    let front = Runtime::new(
        config,
        vramslice_sidecar::usage::AccountingFile::in_dir(dir.path()),
    )
    .unwrap();
    let p = front.admit_blocking(&Job::new("generate-2")).unwrap();
    write(GIB / 2, 9 * GIB);
    wait_until("sampled", || p.peak_so_far() == 2 * GIB);
    write(GIB / 2, 7 * GIB);
    assert_eq!(p.complete(), Some(2 * GIB));
}

#[test]
fn a_job_measured_before_its_cache_is_released_leaves_the_next_a_clean_start() {
    // Regression: the next job in line was admitted (and its start usage read) when the permit
    // ended, before the embedder emptied the finished job's cache: the next job's growth was
    // measured from a level that then fell, and its peak learned too low.
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let first = rt.admit_blocking(&Job::new("a").need(6 * GIB)).unwrap();
    let rt2 = rt.clone();
    let next = std::thread::spawn(move || rt2.admit_blocking(&Job::new("b")).unwrap());
    wait_until("queued", || rt.stats().queued == 1);
    usage.add(2 * GIB); // the first job's blocks, still cached when it ends
    assert!(!first.end_measurement(), "no other job runs");
    usage.add(5 * GIB); // what happens after the final reading is not the first job's
    wait_until("sampled", || rt.stats().live == 7 * GIB);
    usage.set(0); // the embedder empties the cache
    assert_eq!(
        rt.stats().queued,
        1,
        "the memory stays reserved until the permit ends"
    );
    assert_eq!(first.complete(), Some(2 * GIB));
    let next = next.join().unwrap();
    usage.add(3 * GIB);
    assert_eq!(
        next.complete(),
        Some(3 * GIB),
        "measured from the emptied level"
    );
}

#[test]
fn a_job_started_while_another_releases_its_cache_is_not_measured_alone() {
    let (rt, usage) = runtime(10 * GIB, |_| {});
    let first = rt.admit_blocking(&Job::new("a").need(GIB)).unwrap();
    usage.add(GIB);
    assert!(!first.end_measurement());
    let second = rt.admit_blocking(&Job::new("b").need(GIB)).unwrap();
    usage.set(0); // the first's cache goes while the second runs
    assert!(
        !second.end_measurement(),
        "the first only settles: the second must settle too"
    );
    assert_eq!(first.complete(), Some(GIB));
    usage.add(2 * GIB);
    assert_eq!(second.complete(), None, "its start was not a settled level");

    // Two jobs measured together: the first to end leaves the other measuring.
    let a = rt.admit_blocking(&Job::new("a").need(GIB)).unwrap();
    let b = rt.admit_blocking(&Job::new("b").need(GIB)).unwrap();
    assert!(a.end_measurement(), "b is still measured");
    assert!(!b.end_measurement(), "a no longer is");
}

/// Under the guard, with no sampler: an allocation this process made and freed during the job
/// shows only as a rise of its high-water mark in the accounting file, and still counts.
#[test]
fn the_guards_high_water_mark_counts_toward_a_jobs_peak() {
    use vramslice_core::container::accounting::{
        ACCOUNTING_FILE_NAME, header, initial_image, slot, slot_word,
    };
    use vramslice_sidecar::usage::accounting::{AccountingFile, ProcessIdentity};
    let dir = tempfile::tempdir().unwrap();
    let me = ProcessIdentity::current();
    let write = |bytes: u64, peak: u64| {
        let mut image = initial_image(10 * GIB, "", 4);
        for (at, value) in [
            (slot_word(0, slot::PID), u64::from(me.pid)),
            (slot_word(0, slot::START_TIME), me.start_time.unwrap_or(0)),
            (slot_word(0, slot::BYTES), bytes),
            (slot_word(0, slot::PEAK), peak),
            (header::USED, bytes),
        ] {
            image[at * 8..at * 8 + 8].copy_from_slice(&value.to_le_bytes());
        }
        std::fs::write(dir.path().join(ACCOUNTING_FILE_NAME), &image).unwrap();
    };
    write(GIB, GIB); // a model loaded before the job
    let rt = Runtime::new(
        Config {
            limit: Some(10 * GIB),
            sample_interval: Duration::ZERO,
            ..Config::default()
        },
        AccountingFile::in_dir(dir.path()),
    )
    .unwrap();
    let p = rt.admit_blocking(&Job::new("spiky").need(GIB)).unwrap();
    write(GIB, 3 * GIB); // 2 GiB allocated and freed between samples
    assert_eq!(p.complete(), Some(2 * GIB));
}

/// A usage source whose next reading on the thread named "scrape", once armed, is taken and then
/// held until released: a metrics thread whose reading ends after readings that began later.
#[derive(Debug, Clone, Default)]
struct HeldReading {
    usage: ManualUsage,
    armed: Arc<std::sync::atomic::AtomicBool>,
    holding: Arc<std::sync::atomic::AtomicBool>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl vramslice_sidecar::UsageSource for HeldReading {
    fn read(
        &self,
    ) -> Result<vramslice_sidecar::UsageReading, vramslice_sidecar::usage::UsageError> {
        use std::sync::atomic::Ordering::SeqCst;
        let reading = self.usage.read();
        // Only the scrape's thread: a waiter's admission loop reads too, and must not be held.
        let scraping = std::thread::current().name() == Some("scrape");
        if scraping && self.armed.swap(false, SeqCst) {
            self.holding.store(true, SeqCst);
            while !self.release.load(SeqCst) {
                std::thread::yield_now();
            }
        }
        reading
    }
}

/// Regression (a flaky CI run): a reading begun while the finished job's cache was still full,
/// ending after the next job had started from the emptied level, counted that cache as the next
/// job's peak. A reading is applied only to jobs that had started when it began.
#[test]
fn a_reading_begun_before_a_job_started_is_not_its_peak() {
    use std::sync::atomic::Ordering::SeqCst;
    let source = HeldReading::default();
    let rt = Runtime::new(
        Config {
            limit: Some(10 * GIB),
            sample_interval: Duration::ZERO,
            ..Config::default()
        },
        source.clone(),
    )
    .unwrap();
    let first = rt.admit_blocking(&Job::new("a").need(6 * GIB)).unwrap();
    let rt2 = rt.clone();
    let next = std::thread::spawn(move || rt2.admit_blocking(&Job::new("b")).unwrap());
    wait_until("queued", || rt.stats().queued == 1);
    source.usage.set(7 * GIB); // the first job's cache
    assert!(!first.end_measurement());
    // A metrics scrape reads 7 GiB, and is held before it applies what it read...
    source.armed.store(true, SeqCst);
    let rt3 = rt.clone();
    let scrape = std::thread::Builder::new()
        .name("scrape".into())
        .spawn(move || rt3.render_metrics())
        .unwrap();
    wait_until("the scrape holds its reading", || {
        source.holding.load(SeqCst)
    });
    // ...while the cache is emptied, the first job ends and the next starts from 0.
    source.usage.set(0);
    first.complete();
    let next = next.join().unwrap();
    source.release.store(true, SeqCst);
    scrape.join().unwrap();
    source.usage.add(3 * GIB);
    assert_eq!(
        next.complete(),
        Some(3 * GIB),
        "the scrape's 7 GiB was not the next job's"
    );
}
