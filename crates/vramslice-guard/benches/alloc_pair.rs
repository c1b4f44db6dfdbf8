//! Cost of one cuMemAlloc_v2 + cuMemFree_v2 pair against the fake driver, without the guard and
//! with it (pass-through, enforcing with per-process accounting, enforcing with the shared
//! accounting file), in the same run; and of one cuMemAllocAsync + cuMemFreeAsync pair (pool
//! accounting, and the capture query that tells a graph memory node from memory). Prints ns per
//! pair and the guard's added cost.
//! It also prints what the alternative design — a file lock held only for the reserve step —
//! would cost per pair at least (one `flock` lock/unlock), against the CAS the guard uses.
//! Run: `cargo bench -p vramslice-guard --bench alloc_pair`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
use common::{MIB, probe};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
/// then a short smoke run is enough.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn pairs() -> &'static str {
    if full_run() { "2000000" } else { "20000" }
}

fn rounds() -> usize {
    if full_run() { 5 } else { 1 }
}

fn ns_per_pair(guarded: bool, env: &[(&str, String)]) -> f64 {
    ns_per(guarded, env, &[])
}

fn ns_per(guarded: bool, env: &[(&str, String)], extra: &[&str]) -> f64 {
    (0..rounds())
        .map(|_| {
            let mut args = vec!["bench", pairs(), "256"];
            args.extend_from_slice(extra);
            let out = probe(guarded, env, &args).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .unwrap()
        })
        .fold(f64::INFINITY, f64::min)
}

/// ns for one exclusive `flock` + unlock on a file (the file-lock design's reserve step).
fn flock_ns(path: &std::path::Path) -> f64 {
    let file = std::fs::File::create(path).unwrap();
    let fd = file.as_raw_fd();
    let n = if full_run() { 200_000 } else { 2_000 };
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        unsafe {
            libc::flock(fd, libc::LOCK_EX);
            libc::flock(fd, libc::LOCK_UN);
        }
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

/// ns for the guard's reserve + release on one word (CAS loop + saturating CAS loop).
fn cas_ns() -> f64 {
    let total = AtomicU64::new(0);
    let n: u32 = if full_run() { 10_000_000 } else { 100_000 };
    let t = Instant::now();
    for _ in 0..n {
        let mut cur = total.load(Ordering::Relaxed);
        while let Err(a) =
            total.compare_exchange_weak(cur, cur + 256, Ordering::AcqRel, Ordering::Relaxed)
        {
            cur = a;
        }
        let mut cur = total.load(Ordering::Relaxed);
        while let Err(a) = total.compare_exchange_weak(
            cur,
            cur.saturating_sub(256),
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            cur = a;
        }
    }
    std::hint::black_box(total.load(Ordering::Relaxed));
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("vramslice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let limit = ("VRAMSLICE_VRAM_LIMIT_BYTES", (1024 * MIB).to_string());
    let shared = vec![
        limit.clone(),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
    ];
    let base = ns_per_pair(false, &[]);
    let pass = ns_per_pair(true, &[]);
    let private = ns_per_pair(true, std::slice::from_ref(&limit));
    let full = ns_per_pair(true, &shared);
    println!(
        "alloc/free pair against the fake driver (min of {} runs of {} pairs):",
        rounds(),
        pairs()
    );
    println!("  without guard                      {base:8.1} ns/pair");
    println!(
        "  guard, no limit (pass-through)     {pass:8.1} ns/pair  (+{:.1})",
        pass - base
    );
    println!(
        "  guard, limit, per-process account  {private:8.1} ns/pair  (+{:.1})",
        private - base
    );
    println!(
        "  guard, limit, shared account file  {full:8.1} ns/pair  (+{:.1})",
        full - base
    );
    let async_base = ns_per(false, &[], &["async"]);
    let async_full = ns_per(true, &shared, &["async"]);
    println!("cuMemAllocAsync/cuMemFreeAsync pair on a stream:");
    println!("  without guard                      {async_base:8.1} ns/pair");
    println!(
        "  guard, limit, shared account file  {async_full:8.1} ns/pair  (+{:.1})",
        async_full - async_base
    );
    println!("reserve-step designs, single thread:");
    println!(
        "  CAS on the shared total (reserve + release)  {:8.1} ns/pair",
        cas_ns()
    );
    println!(
        "  flock lock + unlock (file-lock reserve)      {:8.1} ns/pair",
        flock_ns(&dir.join("lock"))
    );
    std::fs::remove_dir_all(&dir).ok();
}
