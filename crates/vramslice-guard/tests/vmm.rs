//! Physical allocations of the virtual memory management API over the fake driver
//! (`fake-cuda/fake_cuda_vmm.inc.c`, which frees one only when its last handle reference is
//! released and its last mapping unmapped, as the driver does): the guard keeps the memory
//! charged exactly as long. Releasing the handle right after mapping it, NCCL's
//! retain-release-unmap-release, one unmap over many mappings, one allocation mapped twice, and
//! refused releases and unmaps, reached directly, through `dlsym` and through `cuGetProcAddress`.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, guarded_peaks, unguarded};

const LIMIT: u64 = 256 * MIB;

#[test]
fn mapped_memory_stays_charged_until_the_driver_frees_it_through_every_lookup() {
    let modes = ["direct", "dlsym", "gpa", "gpa_ptsz"];
    for (mode, peak) in modes.iter().zip(guarded_peaks("vmm", &modes, LIMIT, 0, 17)) {
        assert_eq!(
            peak, LIMIT,
            "{mode}: the driver held the whole slice and never more"
        );
    }
}

#[test]
fn without_the_guard_released_mappings_take_memory_past_the_slice() {
    let (so, peak) = unguarded("vmm", "direct", LIMIT, 0);
    assert!(
        so.contains("FAIL: cuMemRelease right after cuMemMap"),
        "the fake driver alone lets released mappings pile up:\n{so}"
    );
    assert!(peak > LIMIT);
}
