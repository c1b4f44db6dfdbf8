//! Per-GPU limits over the fake driver with two devices (FAKE_CUDA_DEVICES=2, UUIDs
//! `GPU-11111111-...` and `GPU-22222222-...`): each device is held to its own limit, every entry
//! point charges the device its memory is on, memory information is per device, processes of a
//! container share each device's account, a device without a limit is refused, the environment
//! lowers one device's limit, and one limit for the container still spans its devices.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vramslice_core::container::accounting::{
    self, ACCOUNTING_FILE_NAME, AccountingSnapshot, gpu_accounting_file_name,
};
use vramslice_core::container::limit::{limit_file_content, limits_file_content};

const U0: &str = "GPU-11111111-1111-1111-1111-111111111111";
const U1: &str = "GPU-22222222-2222-2222-2222-222222222222";
const GIB: u64 = 1 << 30;

/// Two fake devices of 4 and 8 GiB, contexts free unless a test says otherwise.
fn two_devices(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("FAKE_CUDA_DEVICES", "2".into()),
        ("FAKE_CUDA_DEVICE_BYTES", format!("{},{}", 4 * GIB, 8 * GIB)),
        ("FAKE_CUDA_CTX_BYTES", "0".into()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
    ]
}

/// A limit file with `text` in `dir`, named by `VRAMSLICE_LIMIT_FILE`.
fn with_limit_file(
    mut env: Vec<(&'static str, String)>,
    dir: &Path,
    text: &str,
) -> Vec<(&'static str, String)> {
    let path = dir.join("limit");
    std::fs::write(&path, text).unwrap();
    env.push(("VRAMSLICE_LIMIT_FILE", path.display().to_string()));
    env
}

fn per_gpu_file(l0: u64, l1: u64) -> String {
    limits_file_content(&[(U0, l0), (U1, l1)]).unwrap()
}

fn snapshot(dir: &Path, name: &str) -> AccountingSnapshot {
    accounting::parse(&std::fs::read(dir.join(name)).unwrap()).unwrap()
}

/// Two devices under per-GPU limits `l0` and `l1` from the limit file, contexts estimated at
/// `context` bytes.
fn per_gpu_env(dir: &Path, l0: u64, l1: u64, context: u64) -> Vec<(&'static str, String)> {
    let mut env = with_limit_file(two_devices(dir), dir, &per_gpu_file(l0, l1));
    env.retain(|(k, _)| *k != "VRAMSLICE_CONTEXT_ESTIMATE_BYTES");
    env.push(("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", context.to_string()));
    env
}

/// A probe scenario's arguments: its name, then numbers.
fn scenario(name: &str, numbers: [u64; 3]) -> Vec<String> {
    std::iter::once(name.to_string())
        .chain(numbers.iter().map(u64::to_string))
        .collect()
}

fn args(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

#[test]
fn each_gpu_is_held_to_its_own_limit_and_shows_its_own_slice() {
    let dir = tempfile::tempdir().unwrap();
    let env = per_gpu_env(dir.path(), GIB, 2 * GIB, 16 * MIB);
    let list = scenario("multi", [GIB, 2 * GIB, 16 * MIB]);
    let (out, so, se) = run(probe(true, &env, &args(&list)));
    assert_checks(&out, &so, &se, 25);
    for uuid in [U0, U1] {
        assert!(
            se.contains(&format!("out of memory on GPU {uuid}")),
            "each device's refusal names it:\n{se}"
        );
    }
    // One accounting file per GPU, recording that GPU and its limit; no container-wide file.
    let s0 = snapshot(dir.path(), &gpu_accounting_file_name(U0));
    let s1 = snapshot(dir.path(), &gpu_accounting_file_name(U1));
    assert_eq!((s0.gpu_uuid.as_str(), s0.limit_bytes), (U0, GIB));
    assert_eq!((s1.gpu_uuid.as_str(), s1.limit_bytes), (U1, 2 * GIB));
    assert!(!dir.path().join(ACCOUNTING_FILE_NAME).exists());

    // Without the guard the probe's checks fail: the slices are the guard's doing.
    let (out, so, _) = run(probe(false, &env, &args(&list)));
    assert!(!out.status.success() && so.contains("FAIL"), "{so}");
}

#[test]
fn every_entry_point_charges_the_device_its_memory_is_on() {
    let limit = 100 * MIB;
    // The other device's limit is 0: a single byte charged to it would fail the checks.
    for (device, l0, l1, modes) in [
        (1, 0, limit, &["direct", "dlsym", "gpa", "gpa_ptsz"][..]),
        (0, limit, 0, &["direct"][..]),
    ] {
        for mode in modes {
            let dir = tempfile::tempdir().unwrap();
            let env = with_limit_file(two_devices(dir.path()), dir.path(), &per_gpu_file(l0, l1));
            let mut cmd = probe(
                true,
                &env,
                &["entrypoints", mode, "limited", &limit.to_string()],
            );
            cmd.env("PROBE_DEVICE", device.to_string());
            let (out, so, se) = run(cmd);
            assert_checks(&out, &so, &se, 40);
            let own = if device == 0 { U0 } else { U1 };
            assert!(
                se.contains(&format!(
                    "out of memory on GPU {own}: requested 62914560 bytes"
                )),
                "device {device} {mode}:\n{se}"
            );
        }
    }
}

#[test]
fn contexts_modules_and_primary_contexts_are_charged_to_their_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = with_limit_file(
        two_devices(dir.path()),
        dir.path(),
        &per_gpu_file(0, 4 * GIB),
    );
    env.retain(|(k, _)| !k.contains("CTX_BYTES") && !k.contains("ESTIMATE"));
    env.extend([
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", (10 * MIB).to_string()),
        ("FAKE_CUDA_CTX_BYTES", (64 * MIB).to_string()),
        ("FAKE_CUDA_MODULE_BYTES", MIB.to_string()),
    ]);
    let list = [10 * MIB, 64 * MIB, MIB].map(|n| n.to_string());
    let mut cmd = probe(true, &env, &["contexts", &list[0], &list[1], &list[2]]);
    cmd.env("PROBE_DEVICE", "1");
    let (out, so, se) = run(cmd);
    assert_checks(&out, &so, &se, 16);
}

#[test]
fn nvml_shows_each_devices_slice() {
    for (dev, limit) in [(0, GIB), (1, 2 * GIB)] {
        let dir = tempfile::tempdir().unwrap();
        let env = with_limit_file(
            two_devices(dir.path()),
            dir.path(),
            &per_gpu_file(GIB, 2 * GIB),
        );
        let (out, so, se) = run(probe(
            true,
            &env,
            &["nvmlon", &dev.to_string(), &limit.to_string()],
        ));
        assert_checks(&out, &so, &se, 5);
    }
}

/// Spawns a probe that prints "ready" and waits for stdin to close.
fn spawn_ready(mut cmd: std::process::Command) -> (Child, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains("ready") {
        assert!(Instant::now() < deadline, "timed out; got {seen}");
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("probe exited before it was ready; got {seen}");
        }
        seen.push_str(&line);
    }
    std::thread::spawn(move || for _ in reader.lines() {});
    (child, seen)
}

#[test]
fn processes_of_a_container_share_each_devices_account() {
    let dir = tempfile::tempdir().unwrap();
    let env = with_limit_file(
        two_devices(dir.path()),
        dir.path(),
        &per_gpu_file(GIB, 2 * GIB),
    );
    let steps = [format!("0:{}", 700 * MIB), format!("1:{}", 1800 * MIB)];
    let mut list = vec!["holdon".to_string()];
    list.extend(steps);
    let (mut holder, seen) = spawn_ready(probe(true, &env, &args(&list)));
    assert!(
        seen.contains("alloc dev=0 rc=0") && seen.contains("alloc dev=1 rc=0"),
        "{seen}"
    );
    let s0 = snapshot(dir.path(), &gpu_accounting_file_name(U0));
    let s1 = snapshot(dir.path(), &gpu_accounting_file_name(U1));
    assert_eq!((s0.used_bytes, s1.used_bytes), (700 * MIB, 1800 * MIB));
    assert!(
        s0.slots
            .iter()
            .any(|s| s.pid == holder.id() && s.bytes == 700 * MIB)
    );

    // A second process: each device's remainder, not more, and not the other device's.
    let steps = [
        format!("0:{}", 400 * MIB),
        format!("1:{}", 300 * MIB),
        format!("0:{}", 300 * MIB),
        format!("1:{}", 200 * MIB),
    ];
    let mut list = vec!["allocon".to_string()];
    list.extend(steps);
    let (_, so, se) = run(probe(true, &env, &args(&list)));
    let rcs: Vec<&str> = so.lines().collect();
    assert_eq!(
        rcs,
        vec![
            "alloc dev=0 rc=2",
            "alloc dev=1 rc=2",
            "alloc dev=0 rc=0",
            "alloc dev=1 rc=0"
        ],
        "{se}"
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();
    // Both gone: the next process reaps them and gets each device's whole limit.
    let (_, so, se) = run(probe(
        true,
        &env,
        &["allocon", &format!("0:{GIB}"), &format!("1:{}", 2 * GIB)],
    ));
    assert!(
        so.contains("alloc dev=0 rc=0") && so.contains("alloc dev=1 rc=0"),
        "{so}{se}"
    );
}

#[test]
fn a_device_without_a_limit_is_refused_with_one_log_line_naming_it() {
    let one_entry = format!("limits={U0}:{GIB}\n");
    let dir = tempfile::tempdir().unwrap();
    let from_file = with_limit_file(two_devices(dir.path()), dir.path(), &one_entry);
    let mut from_env = two_devices(dir.path());
    from_env.push(("VRAMSLICE_VRAM_LIMITS", format!("{U0}:1Gi")));
    for env in [from_file, from_env] {
        let (out, so, se) = run(probe(
            true,
            &env,
            &[
                "allocon",
                &format!("0:{MIB}"),
                &format!("create:1:{MIB}"),
                &format!("create:1:{MIB}"),
                &format!("1:{MIB}"),
                "primary:1",
                "primary:0",
            ],
        ));
        assert!(out.status.success(), "{so}{se}");
        assert_eq!(
            so.lines().collect::<Vec<_>>(),
            vec![
                "alloc dev=0 rc=0",
                "create dev=1 rc=2",
                "create dev=1 rc=2",
                "context dev=1 rc=2",
                "primary dev=1 rc=2",
                "primary dev=0 rc=0",
            ],
            "{se}"
        );
        let lines: Vec<&str> = se.lines().filter(|l| l.contains("no entry")).collect();
        assert_eq!(lines.len(), 1, "one log line:\n{se}");
        assert!(
            lines[0].contains(U1) && lines[0].contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{se}"
        );
    }
}

#[test]
fn the_environment_lowers_one_devices_limit_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = with_limit_file(
        two_devices(dir.path()),
        dir.path(),
        &per_gpu_file(GIB, 2 * GIB),
    );
    env.push(("VRAMSLICE_VRAM_LIMITS", format!("{U1}:512Mi")));
    let list = ["multi", &GIB.to_string(), &(512 * MIB).to_string(), "0"];
    let (out, so, se) = run(probe(true, &env, &list));
    assert_checks(&out, &so, &se, 25);
    assert!(!se.contains("can only lower"), "{se}");

    // Raising one device's limit is ignored, with a message naming it.
    let dir = tempfile::tempdir().unwrap();
    let mut env = with_limit_file(
        two_devices(dir.path()),
        dir.path(),
        &per_gpu_file(GIB, 2 * GIB),
    );
    env.push(("VRAMSLICE_VRAM_LIMITS", format!("{U0}:3Gi,{U1}:1Gi")));
    let list = ["multi", &GIB.to_string(), &GIB.to_string(), "0"];
    let (out, so, se) = run(probe(true, &env, &list));
    assert_checks(&out, &so, &se, 25);
    assert!(
        se.contains(&format!("gives GPU {U0} 3221225472 bytes")) && se.contains("can only lower"),
        "{se}"
    );
}

#[test]
fn one_limit_for_the_container_still_spans_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let env = with_limit_file(
        two_devices(dir.path()),
        dir.path(),
        &limit_file_content(GIB, U0),
    );
    let (_, so, se) = run(probe(
        true,
        &env,
        &[
            "allocon",
            &format!("0:{}", 600 * MIB),
            &format!("1:{}", 600 * MIB),
            &format!("1:{}", 424 * MIB),
        ],
    ));
    assert_eq!(
        so.lines().collect::<Vec<_>>(),
        vec!["alloc dev=0 rc=0", "alloc dev=1 rc=2", "alloc dev=1 rc=0"],
        "one account for both devices, as before per-GPU limits:\n{se}"
    );
    assert!(!se.contains("no entry"), "{se}");
    let snap = snapshot(dir.path(), ACCOUNTING_FILE_NAME);
    assert_eq!((snap.gpu_uuid.as_str(), snap.limit_bytes), (U0, GIB));

    // The environment's single limit alone, too.
    let dir = tempfile::tempdir().unwrap();
    let mut env = two_devices(dir.path());
    env.push(("VRAMSLICE_VRAM_LIMIT_BYTES", "1Gi".into()));
    let (_, so, se) = run(probe(
        true,
        &env,
        &[
            "allocon",
            &format!("1:{}", 600 * MIB),
            &format!("0:{}", 600 * MIB),
        ],
    ));
    assert_eq!(
        so.lines().collect::<Vec<_>>(),
        vec!["alloc dev=1 rc=0", "alloc dev=0 rc=2"],
        "{se}"
    );
}

#[test]
fn an_asynchronous_allocation_is_charged_to_its_streams_device() {
    // Regression: cuMemAllocAsync was charged to the current context's device and pool, while
    // CUDA allocates from the pool of the stream's device.
    let dir = tempfile::tempdir().unwrap();
    let env = per_gpu_env(dir.path(), 256 * MIB, GIB, 16 * MIB);
    let list = scenario("streamdev", [256 * MIB, GIB, 16 * MIB]);
    let (out, so, se) = run(probe(true, &env, &args(&list)));
    assert_checks(&out, &so, &se, 4);
    assert!(se.contains(&format!("out of memory on GPU {U1}")), "{se}");
    assert!(!se.contains(&format!("out of memory on GPU {U0}")), "{se}");
}
