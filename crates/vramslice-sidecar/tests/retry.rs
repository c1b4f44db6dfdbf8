//! Out-of-memory retry through the public API with a simulated device: backoff between attempts,
//! the cleanup callback, peak raising, giving up, and metrics.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vramslice_sidecar::policy::{Backoff, ReserveSource};
use vramslice_sidecar::{Config, CudaError, Hooks, Job, ManualUsage, RunError, Runtime};

const GIB: u64 = 1 << 30;

fn runtime(retries: u32) -> (Runtime, ManualUsage) {
    let usage = ManualUsage::new(0, 0);
    let config = Config {
        limit: Some(10 * GIB),
        oom_retries: retries,
        backoff: Backoff {
            base: Duration::from_millis(20),
            factor: 2.0,
            max: Duration::from_millis(80),
        },
        sample_interval: Duration::from_millis(2),
        ..Config::default()
    };
    (Runtime::new(config, usage.clone()).unwrap(), usage)
}

#[test]
fn retries_with_backoff_cleanup_and_a_raised_peak() {
    let (rt, usage) = runtime(3);
    let job = Job::new("llm").param("ctx", 4096).need(GIB);
    let starts = Mutex::new(Vec::new());
    let reserved = Mutex::new(Vec::new());
    let cleanups = AtomicU32::new(0);
    let hooks = Hooks::default().cleanup(|| {
        cleanups.fetch_add(1, Ordering::SeqCst);
        usage.set(0); // the framework released its cache
    });
    let out = rt.run_blocking(&job, &hooks, |attempt| {
        starts.lock().unwrap().push(Instant::now());
        reserved.lock().unwrap().push(rt.stats().reserved);
        usage.add(2 * GIB); // it really needs 2 GiB, more than declared
        if attempt < 2 {
            Err(CudaError(2))
        } else {
            Ok(attempt)
        }
    });
    assert_eq!(out.unwrap(), 2);
    assert_eq!(cleanups.load(Ordering::SeqCst), 2);
    // Waits of at least 20 ms then 40 ms between attempts.
    let starts = starts.into_inner().unwrap();
    assert!(starts[1] - starts[0] >= Duration::from_millis(20));
    assert!(starts[2] - starts[1] >= Duration::from_millis(40));
    // Each retry reserved more than the one before: the peak was raised.
    let reserved = reserved.into_inner().unwrap();
    assert_eq!(reserved[0], GIB);
    assert!(
        reserved[1] > reserved[0] && reserved[2] > reserved[1],
        "{reserved:?}"
    );
    let peak = rt.learned_peak(&job).unwrap();
    assert!(peak >= 2 * GIB, "peak {peak}");
    let m = rt.render_metrics();
    assert!(m.contains("vramslice_sidecar_oom_errors_total 2"), "{m}");
    assert!(m.contains("vramslice_sidecar_retries_total 2"), "{m}");
    assert!(
        m.contains("vramslice_sidecar_job_duration_seconds_count 3"),
        "{m}"
    );
    assert!(m.contains("vramslice_sidecar_jobs_running 0"), "{m}");
}

#[test]
fn gives_up_after_the_configured_retries() {
    let (rt, _) = runtime(2);
    let calls = AtomicU32::new(0);
    let r: Result<(), _> = rt.run_blocking(&Job::new("m").need(GIB), &Hooks::default(), |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(CudaError(2))
    });
    match r {
        Err(RunError::OutOfMemory { attempts, last }) => {
            assert_eq!(attempts, 3);
            assert_eq!(last, CudaError(2));
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(rt.stats().running, 0);
}

#[test]
fn other_errors_are_not_retried() {
    let (rt, _) = runtime(3);
    let calls = AtomicU32::new(0);
    let r: Result<(), _> = rt.run_blocking(&Job::new("m").need(GIB), &Hooks::default(), |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(CudaError(1))
    });
    assert!(matches!(r, Err(RunError::Job(CudaError(1)))));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        rt.render_metrics()
            .contains("vramslice_sidecar_oom_errors_total 0")
    );
}

#[test]
fn caller_classified_errors_retry() {
    let (rt, _) = runtime(1);
    let hooks = Hooks::classify(|e: &String| e.contains("KV cache full"));
    let out = rt.run_blocking(&Job::new("m").need(GIB), &hooks, |attempt| {
        if attempt == 0 {
            Err("KV cache full".to_string())
        } else {
            Ok("ok")
        }
    });
    assert_eq!(out.unwrap(), "ok");
}

#[tokio::test]
async fn async_run_retries_and_learns() {
    let (rt, usage) = runtime(3);
    let job = Job::new("whisper"); // no declared need: first run reserves 80 %
    let hooks = Hooks::default();
    let out = rt
        .run(&job, &hooks, |attempt| {
            let usage = usage.clone();
            async move {
                usage.add(GIB);
                tokio::time::sleep(Duration::from_millis(10)).await;
                usage.sub(GIB);
                if attempt == 0 {
                    Err(CudaError(2))
                } else {
                    Ok(())
                }
            }
        })
        .await;
    out.unwrap();
    let next = rt.admit(&job).await.unwrap();
    assert_eq!(next.source(), ReserveSource::Profile);
}
