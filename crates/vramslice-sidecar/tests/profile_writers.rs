//! Several real processes write peaks for the same keys into one profile directory while a
//! reader reads continuously: no torn file is ever seen, no temporary file is left behind, and
//! each key ends at the highest peak any process wrote.
//!
//! `harness = false`: the binary is both the test (no arguments) and the writer processes it
//! spawns (`--writer DIR SEED`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vramslice_sidecar::profile::{Profiles, read_record};
use vramslice_sidecar::profile_key::profile_file_name;

const KEYS: [&str; 3] = ["whisper", "llama", "resnet"];
const WRITERS: u64 = 6;
const WRITES: u64 = 150;

fn params() -> BTreeMap<String, String> {
    BTreeMap::from([("batch".to_string(), "8".to_string())])
}

/// Deterministic pseudo-random peaks (SplitMix64).
fn peak(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(1_000_003)
        .wrapping_add(i)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % (64 << 30)
}

fn writer(dir: &Path, seed: u64) {
    let profiles = Profiles::in_dir(dir).unwrap();
    for i in 0..WRITES {
        let key = KEYS[(i % 3) as usize];
        let stored = profiles.record(key, &params(), peak(seed, i)).unwrap();
        assert!(stored >= peak(seed, i));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--writer") {
        writer(Path::new(&args[2]), args[3].parse().unwrap());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..WRITERS)
        .map(|seed| {
            Command::new(&exe)
                .args(["--writer", dir.path().to_str().unwrap(), &seed.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Read continuously while they write: every file seen must parse whole.
    let files: Vec<_> = KEYS
        .iter()
        .map(|k| dir.path().join(profile_file_name(k, &params())))
        .collect();
    let mut reads = 0u64;
    let mut last = [0u64; 3];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut children = children;
    while !children.is_empty() {
        assert!(Instant::now() < deadline, "writers did not finish in 60 s");
        for (i, f) in files.iter().enumerate() {
            if f.exists() {
                let rec = read_record(f).unwrap_or_else(|| panic!("torn or unreadable {f:?}"));
                assert!(
                    rec.peak_bytes >= last[i],
                    "peak went down: {} < {}",
                    rec.peak_bytes,
                    last[i]
                );
                last[i] = rec.peak_bytes;
                reads += 1;
            }
        }
        children.retain_mut(|c| match c.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "writer failed: {status}");
                false
            }
            None => true,
        });
    }
    for (k, key) in KEYS.iter().enumerate() {
        let expected = (0..WRITERS)
            .flat_map(|seed| {
                (0..WRITES)
                    .filter(move |i| i % 3 == k as u64)
                    .map(move |i| peak(seed, i))
            })
            .max()
            .unwrap();
        let rec = read_record(&files[k]).unwrap();
        assert_eq!(rec.peak_bytes, expected, "{key}");
        assert_eq!(rec.key, *key);
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    println!("profile_writers: {WRITERS} processes x {WRITES} writes, {reads} concurrent reads");
    println!("profile_writers: 1 passed, 0 failed");
}
