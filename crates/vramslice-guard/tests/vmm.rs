//! Physical allocations of the virtual memory management API over the fake driver
//! (`fake-cuda/fake_cuda_vmm.inc.c`, which frees one only when its last handle reference is
//! released and its last mapping unmapped, as the driver does): the guard keeps the memory
//! charged exactly as long. Releasing the handle right after mapping it, NCCL's
//! retain-release-unmap-release, one unmap over many mappings, one allocation mapped twice, and
//! refused releases and unmaps, reached directly, through `dlsym` and through `cuGetProcAddress`.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};
use std::path::Path;

const LIMIT: u64 = 256 * MIB;

fn env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_CTX_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
        ("FAKE_CUDA_HWM_FILE", dir.join("hwm").display().to_string()),
    ]
}

fn driver_peak(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("hwm"))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn mapped_memory_stays_charged_until_the_driver_frees_it_through_every_lookup() {
    for mode in ["direct", "dlsym", "gpa", "gpa_ptsz"] {
        let dir = tempfile::tempdir().unwrap();
        let mut e = env(dir.path());
        e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", LIMIT.to_string()));
        let (out, so, se) = run(probe(true, &e, &["vmm", mode, &LIMIT.to_string()]));
        assert_checks(&out, &so, &se, 17);
        let peak = driver_peak(dir.path());
        assert!(
            peak == LIMIT,
            "{mode}: the driver held the whole slice and never more: {peak} bytes"
        );
    }
}

#[test]
fn without_the_guard_released_mappings_take_memory_past_the_slice() {
    let dir = tempfile::tempdir().unwrap();
    let (_, so, _) = run(probe(
        false,
        &env(dir.path()),
        &["vmm", "direct", &LIMIT.to_string()],
    ));
    assert!(
        so.contains("FAIL: cuMemRelease right after cuMemMap"),
        "the fake driver alone lets released mappings pile up:\n{so}"
    );
    assert!(driver_peak(dir.path()) > LIMIT);
}
