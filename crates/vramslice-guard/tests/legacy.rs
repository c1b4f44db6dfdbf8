//! The v1 driver ABI (CUDA 3.1: 32-bit device pointers and sizes), which the driver still exports
//! and `cuGetProcAddress` hands out for versions before 3020: `cuMemAlloc`, `cuMemAllocPitch`,
//! `cuMemFree`, `cuMemGetInfo`, `cuDeviceTotalMem`, `cuArrayCreate`, `cuCtxCreate`,
//! `cuCtxDestroy` without their version suffixes. Held to the same limit and shown
//! the same slice as the `_v2` forms, reached directly, through `dlsym` and through
//! `cuGetProcAddress` at version 2000.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};
use std::path::Path;

const LIMIT: u64 = 256 * MIB;

fn env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
        // Contexts take 16 MiB; the first one (made while none is current, so not measurable)
        // is charged the same as its estimate.
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", (16 * MIB).to_string()),
        ("FAKE_CUDA_CTX_BYTES", (16 * MIB).to_string()),
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
fn the_v1_abi_is_held_to_the_limit_through_every_lookup() {
    for mode in ["direct", "dlsym", "gpa"] {
        let dir = tempfile::tempdir().unwrap();
        let mut e = env(dir.path());
        e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", LIMIT.to_string()));
        let (out, so, se) = run(probe(true, &e, &["legacy", mode, &LIMIT.to_string()]));
        assert_checks(&out, &so, &se, 14);
        let peak = driver_peak(dir.path());
        assert!(
            peak > 0 && peak <= LIMIT,
            "{mode}: the driver saw at most the limit at any time: {peak} bytes"
        );
    }
}

#[test]
fn without_the_guard_the_v1_abi_allocates_past_the_slice() {
    let dir = tempfile::tempdir().unwrap();
    let (_, so, _) = run(probe(
        false,
        &env(dir.path()),
        &["legacy", "gpa", &LIMIT.to_string()],
    ));
    assert!(
        so.contains("FAIL: v1 cuMemAlloc is refused at the limit"),
        "the fake driver alone allocates through v1 past the slice:\n{so}"
    );
    assert!(driver_peak(dir.path()) > LIMIT);
}
