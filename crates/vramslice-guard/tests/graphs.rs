//! CUDA graph memory nodes over the fake driver (`fake-cuda/fake_cuda_graphs.inc.c`): an
//! allocation captured from a stream charges nothing until the graph is mapped; a launch, upload
//! or instantiation-with-upload whose memory does not fit the slice is refused before the driver
//! maps it; idle graphs' memory is trimmed to make room; a device's graph pool stays charged
//! until it is trimmed; a stream-ordered free captured into a graph keeps its allocation charged
//! until the graph runs. The probe reaches the driver directly, through `dlsym` and through
//! `cuGetProcAddress` (plain and per-thread default stream), as real programs do.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, driver_peak, fake_gpu_env, guarded_peaks, probe, run, unguarded};
use vramslice_core::container::accounting::{self, gpu_accounting_file_name};
use vramslice_core::container::limit::limits_file_content;

const LIMIT: u64 = 256 * MIB;

#[test]
fn graph_memory_is_held_to_the_limit_through_every_lookup() {
    let modes = ["direct", "dlsym", "gpa", "gpa_ptsz"];
    for (mode, peak) in modes
        .iter()
        .zip(guarded_peaks("graphs", &modes, LIMIT, 0, 33))
    {
        assert!(
            peak > 0 && peak <= LIMIT,
            "{mode}: the driver saw at most the limit at any time: {peak} bytes"
        );
    }
}

#[test]
fn without_the_guard_the_same_graphs_map_past_the_slice() {
    let (so, peak) = unguarded("graphs", "direct", LIMIT, 0);
    assert!(
        so.contains("FAIL: launching a graph whose memory nodes exceed the slice"),
        "the fake driver alone maps a graph larger than the slice:\n{so}"
    );
    assert!(peak > LIMIT);
}

#[test]
fn graph_memory_on_a_gpu_counts_toward_that_gpus_limit_only() {
    let dir = tempfile::tempdir().unwrap();
    let (u0, u1) = (
        "GPU-11111111-1111-1111-1111-111111111111",
        "GPU-22222222-2222-2222-2222-222222222222",
    );
    let limit_file = dir.path().join("limit");
    std::fs::write(
        &limit_file,
        limits_file_content(&[(u0, 1024 * MIB), (u1, LIMIT)]).unwrap(),
    )
    .unwrap();
    let mut e = fake_gpu_env(dir.path(), 0);
    e.push(("FAKE_CUDA_DEVICES", "2".into()));
    e.push(("PROBE_DEVICE", "1".into()));
    e.push(("VRAMSLICE_LIMIT_FILE", limit_file.display().to_string()));
    let (out, so, se) = run(probe(true, &e, &["graphs", "gpa", &LIMIT.to_string()]));
    assert_checks(&out, &so, &se, 33);
    let peak = driver_peak(dir.path(), "hwm.1");
    assert!(peak > 0 && peak <= LIMIT, "device 1 peak {peak}");
    assert_eq!(driver_peak(dir.path(), "hwm"), 0, "nothing on device 0");
    let peak_of = |uuid: &str| {
        let file = std::fs::read(dir.path().join(gpu_accounting_file_name(uuid))).unwrap();
        let snap = accounting::parse(&file).unwrap();
        snap.slots.iter().map(|s| s.peak).max().unwrap_or(0)
    };
    assert_eq!(peak_of(u0), 0, "GPU 0's account never charged");
    assert!(
        peak_of(u1) >= 128 * MIB,
        "GPU 1's account charged the graphs"
    );
}
