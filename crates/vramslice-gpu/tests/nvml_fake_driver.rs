//! The NVML backend against a fake `libnvidia-ml` (tests/fake_nvml/fake_nvml.c), compiled here
//! with the system C compiler (`$CC`, default `cc`: the same one cargo links with). Each test
//! copies the library into its own directory and scripts the "driver" through the state file
//! next to it, so tests run in parallel without sharing driver state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vramslice_gpu::{BackendError, GpuBackend, Health, NvmlBackend, ProcessSample};

const GIB: u64 = 1 << 30;
const UUID0: &str = "GPU-00000000-aaaa-bbbb-cccc-000000000000";
const UUID1: &str = "GPU-11111111-aaaa-bbbb-cccc-111111111111";

/// Compile the fake library once per test binary.
fn fake_library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-nvml");
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join(format!("libnvidia-ml-fake-{}.so", std::process::id()));
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let status = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(status.success(), "compiling {} failed", source.display());
        out
    })
}

/// A private copy of the fake driver with its own state file.
struct Driver {
    dir: tempfile::TempDir,
    lib: PathBuf,
}

impl Driver {
    fn new(state: &str) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_library(), &lib).unwrap();
        let driver = Driver { dir, lib };
        driver.set(state);
        driver
    }

    fn set(&self, state: &str) {
        let tmp = self.dir.path().join("fake-nvml-state.tmp");
        std::fs::write(&tmp, state).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("fake-nvml-state")).unwrap();
    }

    fn append(&self, line: &str) {
        let path = self.dir.path().join("fake-nvml-state");
        let mut state = std::fs::read_to_string(&path).unwrap();
        state.push_str(line);
        state.push('\n');
        self.set(&state);
    }

    fn backend(&self) -> NvmlBackend {
        NvmlBackend::with_library_path(self.lib.as_os_str()).unwrap()
    }
}

fn two_gpus() -> String {
    format!(
        "gpu 0 {UUID0} {} {} NVIDIA H100 80GB HBM3\n\
         gpu 1 {UUID1} {} {} NVIDIA A100-SXM4-40GB\n",
        80 * GIB,
        70 * GIB,
        40 * GIB,
        40 * GIB
    )
}

fn unhealthy(reason: &str) -> Health {
    Health::Unhealthy {
        reason: reason.to_string(),
    }
}

#[test]
fn reads_devices_memory_and_processes() {
    let driver = Driver::new(&format!(
        "{}proc 0 compute 300 {}\nproc 0 compute 100 {}\nproc 0 graphics 100 {}\nproc 0 graphics 200 na\n",
        two_gpus(),
        3 * GIB,
        GIB,
        2 * GIB
    ));
    let backend = driver.backend();
    assert_eq!(backend.name(), "nvml");
    let readings = backend.read().unwrap();
    assert_eq!(readings.len(), 2);
    let g0 = &readings[0];
    assert_eq!((g0.index, g0.uuid.as_str()), (0, UUID0));
    assert_eq!(g0.model, "NVIDIA H100 80GB HBM3");
    // used = total − free, including the memory the driver reserves.
    assert_eq!(
        (g0.total_bytes, g0.used_bytes, g0.free_bytes),
        (80 * GIB, 10 * GIB, 70 * GIB)
    );
    assert_eq!(g0.health, Health::Healthy);
    let process = |pid, used_bytes| ProcessSample {
        pid,
        used_bytes,
        pod_uid: None,
    };
    // PID 100 is in both lists (its larger figure counts); "not available" is unknown, not 0.
    assert_eq!(
        g0.processes,
        Some(vec![
            process(100, Some(2 * GIB)),
            process(200, None),
            process(300, Some(3 * GIB))
        ])
    );
    let g1 = &readings[1];
    assert_eq!((g1.index, g1.uuid.as_str(), g1.used_bytes), (1, UUID1, 0));
    assert_eq!(g1.processes, Some(vec![]));
}

#[test]
fn a_process_list_that_cannot_be_read_leaves_the_processes_unknown() {
    let with_processes = format!(
        "{}proc 0 compute 100 {}\nproc 0 compute 300 {}\n",
        two_gpus(),
        GIB,
        GIB
    );
    let driver = Driver::new(&with_processes);
    let backend = driver.backend();
    // A GPU without a graphics engine answers NOT_SUPPORTED for graphics processes: none.
    driver.append("procfail 0 graphics notsupported");
    let readings = backend.read().unwrap();
    let listed: Vec<u32> = readings[0]
        .listed_processes()
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(listed, vec![100, 300], "compute processes are still listed");

    // The graphics list failing otherwise (a sandbox's NVML): the compute list still stands.
    driver.set(&format!("{with_processes}procfail 0 graphics unknown\n"));
    assert_eq!(backend.read().unwrap()[0].listed_processes().len(), 2);

    // Any failure of the compute list: the processes are unknown, not none, while the GPU
    // itself is still read and healthy.
    for failure in [
        "procfail 0 compute unknown",
        "procfail 0 compute notsupported",
    ] {
        driver.set(&format!("{with_processes}{failure}\n"));
        let readings = backend.read().unwrap();
        assert_eq!(readings[0].processes, None, "{failure}");
        assert_eq!(readings[0].used_bytes, 10 * GIB, "{failure}");
        assert!(readings[0].health.is_healthy(), "{failure}");
        assert_eq!(
            readings[1].processes,
            Some(vec![]),
            "{failure}: GPU 1 unaffected"
        );
    }
    driver.set(&with_processes);
    assert_eq!(backend.read().unwrap()[0].listed_processes().len(), 2);
}

#[test]
fn critical_xid_is_sticky_and_application_xids_are_ignored() {
    let driver = Driver::new(&two_gpus());
    let backend = driver.backend();
    assert!(
        backend
            .read()
            .unwrap()
            .iter()
            .all(|r| r.health.is_healthy())
    );

    driver.append("xid 1 13");
    driver.append("xid 1 31");
    driver.append("xid 0 79");
    let readings = backend.read().unwrap();
    assert_eq!(readings[0].health, unhealthy("XID 79"));
    assert_eq!(readings[1].health, Health::Healthy);

    // The event is consumed; the verdict stays until restart, and later XIDs don't rename it.
    driver.append("xid 0 48");
    for _ in 0..2 {
        let readings = backend.read().unwrap();
        assert_eq!(readings[0].health, unhealthy("XID 79"));
        assert_eq!(readings[1].health, Health::Healthy);
    }
}

#[test]
fn double_bit_ecc_marks_unhealthy() {
    let driver = Driver::new(&two_gpus());
    let backend = driver.backend();
    driver.append("dbe 1");
    let readings = backend.read().unwrap();
    assert_eq!(readings[0].health, Health::Healthy);
    assert_eq!(readings[1].health, unhealthy("double-bit ECC error"));
}

#[test]
fn events_before_construction_are_not_replayed() {
    let driver = Driver::new(&format!("{}xid 0 79\n", two_gpus()));
    let readings = driver.backend().read().unwrap();
    assert!(readings.iter().all(|r| r.health.is_healthy()));
}

#[test]
fn a_transient_query_error_is_unhealthy_only_after_three_reads_in_a_row() {
    let driver = Driver::new(&format!("{}proc 0 compute 7 {}\n", two_gpus(), GIB));
    let backend = driver.backend();
    assert!(backend.read().unwrap()[0].health.is_healthy());
    let failing = format!("{}proc 0 compute 7 {}\nmemfail 0\n", two_gpus(), GIB);
    driver.set(&failing);
    for read in 1..vramslice_gpu::nvml::UNHEALTHY_AFTER_FAILED_READS {
        let r = backend.read().unwrap();
        assert!(r[0].health.is_healthy(), "read {read}: not flipped yet");
        assert_eq!(r[0].processes, None, "read {read}: processes unknown");
        assert_eq!(r[0].used_bytes, 10 * GIB, "the last figures");
    }
    let r = backend.read().unwrap();
    assert!(
        matches!(&r[0].health, Health::Unhealthy { reason } if reason.contains("memory")),
        "{:?}",
        r[0].health
    );
    assert!(r[1].health.is_healthy(), "GPU 1 unaffected");
    // Back: healthy at once, and a new failure starts its count again.
    driver.set(&format!("{}proc 0 compute 7 {}\n", two_gpus(), GIB));
    assert!(backend.read().unwrap()[0].health.is_healthy());
    driver.set(&failing);
    assert!(backend.read().unwrap()[0].health.is_healthy());
}

#[test]
fn lost_gpu_is_reported_unhealthy_with_last_known_figures_and_stays_so() {
    let driver = Driver::new(&format!(
        "gpu 0 {UUID0} {} {} H100\ngpu 1 {UUID1} {} {} A100\nproc 1 compute 7 {}\n",
        80 * GIB,
        80 * GIB,
        40 * GIB,
        39 * GIB,
        GIB
    ));
    let backend = driver.backend();
    let before = backend.read().unwrap();
    assert_eq!(
        (before[1].used_bytes, before[1].listed_processes().len()),
        (GIB, 1)
    );

    driver.append("lost 1");
    let during = backend.read().unwrap();
    assert_eq!(during.len(), 2);
    assert_eq!(during[0].health, Health::Healthy);
    let lost = &during[1];
    assert_eq!(lost.uuid, UUID1);
    assert!(matches!(&lost.health, Health::Unhealthy { reason } if reason.contains("GPU lost")));
    assert_eq!((lost.total_bytes, lost.used_bytes), (40 * GIB, GIB));
    assert_eq!(
        lost.processes, None,
        "stale processes are dropped: unknown now"
    );

    // The GPU answers again (say, after a reset): still unhealthy until restart.
    driver.set(&two_gpus());
    let after = backend.read().unwrap();
    assert!(
        matches!(&after[1].health, Health::Unhealthy { reason } if reason.contains("GPU lost"))
    );
}

#[test]
fn vanished_gpu_is_left_out() {
    let driver = Driver::new(&two_gpus());
    let backend = driver.backend();
    assert_eq!(backend.read().unwrap().len(), 2);
    driver.append("gone 0");
    let readings = backend.read().unwrap();
    assert_eq!(readings.len(), 1);
    assert_eq!(readings[0].uuid, UUID1);
}

#[test]
fn gpu_without_event_support_is_still_read() {
    let driver = Driver::new(&format!("{}noevents 0\n", two_gpus()));
    let backend = driver.backend();
    assert_eq!(
        backend.health_events_subscribed(),
        vec![(UUID0.to_string(), false), (UUID1.to_string(), true)]
    );
    driver.append("xid 0 79");
    driver.append("xid 1 79");
    let readings = backend.read().unwrap();
    assert_eq!(readings.len(), 2);
    // GPU 0 cannot deliver events (so its XID goes unseen); GPU 1 can.
    assert_eq!(readings[0].health, Health::Healthy);
    assert_eq!(readings[1].health, unhealthy("XID 79"));
}

#[test]
fn gpu_lost_from_the_start_is_left_out() {
    let driver = Driver::new(&format!("{}lost 0\n", two_gpus()));
    let readings = driver.backend().read().unwrap();
    assert_eq!(readings.len(), 1);
    assert_eq!(readings[0].uuid, UUID1);
}

#[test]
fn driver_not_loaded_is_unavailable() {
    let driver = Driver::new("");
    std::fs::remove_file(driver.dir.path().join("fake-nvml-state")).unwrap();
    let err = NvmlBackend::with_library_path(driver.lib.as_os_str()).unwrap_err();
    match &err {
        BackendError::NvmlUnavailable(message) => {
            assert!(message.contains("driver is not loaded"), "{message}")
        }
        other => panic!("expected NvmlUnavailable, got {other:?}"),
    }
}

#[test]
fn device_count_failure_is_an_error_not_a_panic() {
    let driver = Driver::new(&two_gpus());
    let backend = driver.backend();
    std::fs::remove_file(driver.dir.path().join("fake-nvml-state")).unwrap();
    let err = backend.read().unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Nvml {
                call: "nvmlDeviceGetCount",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_gpu_with_mig_on_is_unhealthy_with_the_reason() {
    // Regression: MIG mode was never read. A MIG-enabled H100 was advertised whole, and a
    // container given its UUID saw one MIG instance or none.
    let driver = Driver::new(&format!("{}mig 0 on\nmig 1 none\n", two_gpus()));
    let backend = driver.backend();
    let readings = backend.read().unwrap();
    assert_eq!(
        readings[0].health,
        unhealthy(vramslice_gpu::nvml::MIG_ENABLED)
    );
    assert_eq!(
        readings[1].health,
        Health::Healthy,
        "no MIG support: healthy"
    );
    // Turned off (after the operator drains and resets it), the GPU takes pods again.
    driver.set(&format!("{}mig 0 off\n", two_gpus()));
    assert!(
        backend
            .read()
            .unwrap()
            .iter()
            .all(|r| r.health == Health::Healthy)
    );
}
