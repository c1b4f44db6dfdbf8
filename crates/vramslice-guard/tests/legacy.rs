//! The v1 driver ABI (CUDA 3.1: 32-bit device pointers and sizes), which the driver still exports
//! and `cuGetProcAddress` hands out for versions before 3020: `cuMemAlloc`, `cuMemAllocPitch`,
//! `cuMemFree`, `cuMemGetInfo`, `cuDeviceTotalMem`, `cuArrayCreate`, `cuCtxCreate`,
//! `cuCtxDestroy` without their version suffixes. Held to the same limit and shown
//! the same slice as the `_v2` forms, reached directly, through `dlsym` and through
//! `cuGetProcAddress` at version 2000.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, guarded_peaks, unguarded};

const LIMIT: u64 = 256 * MIB;
/// Contexts take 16 MiB: the v1 `cuCtxCreate` must be charged its context.
const CTX: u64 = 16 * MIB;

#[test]
fn the_v1_abi_is_held_to_the_limit_through_every_lookup() {
    let modes = ["direct", "dlsym", "gpa"];
    for (mode, peak) in modes
        .iter()
        .zip(guarded_peaks("legacy", &modes, LIMIT, CTX, 14))
    {
        assert!(
            peak > 0 && peak <= LIMIT,
            "{mode}: the driver saw at most the limit at any time: {peak} bytes"
        );
    }
}

#[test]
fn without_the_guard_the_v1_abi_allocates_past_the_slice() {
    let (so, peak) = unguarded("legacy", "gpa", LIMIT, CTX);
    assert!(
        so.contains("FAIL: v1 cuMemAlloc is refused at the limit"),
        "the fake driver alone allocates through v1 past the slice:\n{so}"
    );
    assert!(peak > LIMIT);
}
