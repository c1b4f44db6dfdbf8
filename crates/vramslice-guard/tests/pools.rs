//! Memory pools a program creates, over the fake driver (which keeps freed pool memory until a
//! trim, hands out host memory from a pool located on the host, and gives a destroyed pool's
//! memory back, its outstanding allocations' as they are freed): host pools are never charged,
//! a destroyed pool's retained memory and late frees are given back, and a pool created again on
//! the same handle is held to the limit, reached directly, through `dlsym` and through
//! `cuGetProcAddress`.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, guarded_peaks_with, unguarded_with};

const LIMIT: u64 = 256 * MIB;

fn retain() -> Vec<(&'static str, String)> {
    vec![("FAKE_CUDA_POOL_RETAIN", "1".to_string())]
}

#[test]
fn created_pools_are_charged_while_the_driver_holds_device_memory_for_them() {
    let modes = ["direct", "dlsym", "gpa"];
    for (mode, peak) in
        modes
            .iter()
            .zip(guarded_peaks_with("pools", &modes, LIMIT, 0, 30, &retain()))
    {
        assert!(peak <= LIMIT, "{mode}: the driver held {peak} bytes");
        assert_eq!(peak, LIMIT / 4 * 3, "{mode}: the largest allocation ran");
    }
}

#[test]
fn without_the_guard_nothing_is_refused() {
    let (so, peak) = unguarded_with("pools", "direct", LIMIT, 0, &retain());
    assert!(
        so.contains("FAIL: the new pool is held to the limit"),
        "the fake driver alone does not hold pools to the slice:\n{so}"
    );
    assert!(peak > LIMIT);
}
