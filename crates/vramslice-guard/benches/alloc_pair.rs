//! Cost of one cuMemAlloc_v2 + cuMemFree_v2 pair against the fake driver, without the guard and
//! with it (pass-through, enforcing with per-process accounting, enforcing with the shared
//! accounting file), in the same run. Prints ns per pair and the guard's added cost.
//! Run: `cargo bench -p vramslice-guard --bench alloc_pair`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
use common::{MIB, probe};

const PAIRS: &str = "2000000";
const ROUNDS: usize = 5;

fn ns_per_pair(guarded: bool, env: &[(&str, String)]) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let out = probe(guarded, env, &["bench", PAIRS, "256"])
                .output()
                .unwrap();
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
    println!("alloc/free pair against the fake driver (min of {ROUNDS} runs of {PAIRS} pairs):");
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
    std::fs::remove_dir_all(&dir).ok();
}
