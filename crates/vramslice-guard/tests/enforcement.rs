//! Enforcement against the workload itself, over the fake CUDA driver: the plugin's
//! read-only limit file beats a raised environment; the guard stays loaded through
//! `/etc/ld.so.preload` when the program clears `LD_PRELOAD` (in a mount namespace this test sets
//! up, as the container runtime would); damaged accounting files; pre-fork workers.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, artifacts, assert_checks, probe, run};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vramslice_core::container::accounting::{
    self, ACCOUNTING_FILE_NAME, AccountingSnapshot, header, slot,
};
use vramslice_core::container::limit::limit_file_content;

fn write_limit(dir: &Path, limit: u64) -> String {
    let path = dir.join("limit");
    std::fs::write(&path, limit_file_content(limit, "GPU-file")).unwrap();
    path.display().to_string()
}

fn base_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
    ]
}

fn snapshot(dir: &Path) -> AccountingSnapshot {
    accounting::parse(&std::fs::read(dir.join(ACCOUNTING_FILE_NAME)).unwrap()).unwrap()
}

#[test]
fn raised_environment_limit_is_ignored_when_the_limit_file_is_present() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let mut e = base_env(dir.path());
    e.push(("VRAMSLICE_LIMIT_FILE", write_limit(dir.path(), limit)));
    e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", (3000 * MIB).to_string()));
    // Every entry point is held to the file's limit, not the environment's.
    let (out, so, se) = run(probe(
        true,
        &e,
        &["entrypoints", "direct", "limited", &limit.to_string()],
    ));
    assert_checks(&out, &so, &se, 10);
    assert!(se.contains("can only lower the limit"), "{se}");
    let (_, so, se) = run(probe(true, &e, &["alloc", &(150 * MIB).to_string()]));
    assert!(
        so.contains("alloc rc=2"),
        "150 MiB past a 100 MiB file limit: {so}{se}"
    );
    assert_eq!(snapshot(dir.path()).limit_bytes, limit);
    assert_eq!(snapshot(dir.path()).gpu_uuid, "GPU-file");
}

#[test]
fn the_environment_can_lower_the_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = base_env(dir.path());
    e.push(("VRAMSLICE_LIMIT_FILE", write_limit(dir.path(), 100 * MIB)));
    e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", (50 * MIB).to_string()));
    let (_, so, se) = run(probe(true, &e, &["alloc", &(60 * MIB).to_string()]));
    assert!(so.contains("alloc rc=2"), "{so}{se}");
    let (_, so, se) = run(probe(true, &e, &["alloc", &(40 * MIB).to_string()]));
    assert!(so.contains("alloc rc=0"), "{so}{se}");
}

#[test]
fn an_invalid_limit_file_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limit");
    std::fs::write(&path, "limit=lots\n").unwrap();
    let mut e = base_env(dir.path());
    e.push(("VRAMSLICE_LIMIT_FILE", path.display().to_string()));
    e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", (100 * MIB).to_string()));
    let (out, so, se) = run(probe(true, &e, &["alloc", &MIB.to_string()]));
    assert!(
        out.status.success() && so.contains("alloc rc=2"),
        "{so}{se}"
    );
    assert!(se.contains("failing closed"), "{se}");
}

/// Runs `script` (sh) as root in a fresh mount namespace, with `/etc` made writable by an overlay
/// (the host's `/etc` is untouched) and a tmpfs on `/run`, like a container's own root. Fails
/// the test, never skips, when the namespace cannot be made.
fn in_mount_namespace(
    work: &Path,
    script: &str,
    envs: &[(&str, String)],
) -> (bool, String, String) {
    for d in ["up", "work"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let setup = format!(
        "set -e\n\
         mount -t overlay overlay -o lowerdir=/etc,upperdir={w}/up,workdir={w}/work /etc\n\
         mount -t tmpfs tmpfs /run\n\
         {script}",
        w = work.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &setup,
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .stdin(Stdio::null());
    let a = artifacts();
    cmd.env("VRAMSLICE_REAL_LIBCUDA", &a.fake)
        .env("VRAMSLICE_REAL_LIBNVML", &a.fake)
        .env("PROBE", &a.probe)
        .env("GUARD", &a.guard);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run unshare (util-linux) to make a mount namespace: {e}")
    });
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !se.contains("unshare failed") && !se.contains("Operation not permitted"),
        "this test needs root and unshare(CLONE_NEWNS) + mount permission (it sets up the \
         container-like mount namespace itself); they were refused:\n{se}"
    );
    (out.status.success(), so, se)
}

#[test]
fn ld_so_preload_file_keeps_the_guard_when_the_program_clears_ld_preload() {
    let work = tempfile::tempdir().unwrap();
    let acct = work.path().join("acct");
    std::fs::create_dir_all(&acct).unwrap();
    let preload = work.path().join("ld.so.preload");
    std::fs::write(&preload, format!("{}\n", artifacts().guard.display())).unwrap();
    let limit = 100 * MIB;
    let limit_file = work.path().join("limit-src");
    // Under the limit file the context estimate cannot be lowered (the workload's 0 below is
    // ignored): the probe's context is charged it, and the limit leaves room for it.
    let context = vramslice_guard::config::DEFAULT_CONTEXT_ESTIMATE;
    let limit = limit + context;
    std::fs::write(&limit_file, limit_file_content(limit, "GPU-ns")).unwrap();
    let envs = [
        ("PRELOAD_SRC", preload.display().to_string()),
        ("LIMIT_SRC", limit_file.display().to_string()),
        ("ACCT_SRC", acct.display().to_string()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        // The workload raised the env limit, renamed the limit-file variable away and pointed
        // the accounting directory at one of its own...
        (
            "VRAMSLICE_ACCOUNTING_DIR",
            work.path().join("own").display().to_string(),
        ),
        ("VRAMSLICE_VRAM_LIMIT_BYTES", (3000 * MIB).to_string()),
        ("VRAMSLICE_LIMIT_FILE", "/nowhere/limit".to_string()),
        (
            "LD_PRELOAD",
            "/nonexistent-but-about-to-be-cleared.so".to_string(),
        ),
    ];
    // As the runtime does: bind the host files read-only at their in-container paths.
    let mounts = "touch /etc/ld.so.preload\n\
         mount --bind \"$PRELOAD_SRC\" /etc/ld.so.preload\n\
         mount -o remount,bind,ro /etc/ld.so.preload\n\
         mkdir -p /run/vramslice && touch /run/vramslice/limit\n\
         mount --bind \"$LIMIT_SRC\" /run/vramslice/limit\n\
         mount -o remount,bind,ro /run/vramslice/limit\n\
         mkdir -p /run/vramslice/accounting\n\
         mount --bind \"$ACCT_SRC\" /run/vramslice/accounting\n";
    let script = format!(
        "{mounts}\
         if echo x > /etc/ld.so.preload 2>/dev/null; then echo 'FAIL: preload file writable'; exit 1; fi\n\
         unset LD_PRELOAD\n\
         test -z \"${{LD_PRELOAD:-}}\"\n\
         exec \"$PROBE\" entrypoints direct limited {limit} {context}\n"
    );
    let (ok, so, se) = in_mount_namespace(work.path(), &script, &envs);
    assert!(
        ok && !so.contains("FAIL") && so.lines().filter(|l| l.starts_with("ok: ")).count() >= 10,
        "guarded through /etc/ld.so.preload with LD_PRELOAD cleared, limited by the fixed \
         limit file:\n{so}\n{se}"
    );
    assert!(se.contains("can only lower the limit"), "{se}");
    assert!(
        se.contains("is ignored under the limit file"),
        "the repointed accounting directory is named: {se}"
    );
    // ...and still shares the account the plugin mounted.
    let snap = snapshot(&acct);
    assert_eq!(snap.limit_bytes, limit);
    assert_eq!(snap.gpu_uuid, "GPU-ns");
    assert!(!work.path().join("own").exists());

    // Under the limit file, no shared account means every allocation is refused: each process
    // on its own account could take the whole limit.
    let work3 = tempfile::tempdir().unwrap();
    let no_account = "mkdir -p /run/vramslice && touch /run/vramslice/limit\n\
         mount --bind \"$LIMIT_SRC\" /run/vramslice/limit\n\
         mount -o remount,bind,ro /run/vramslice/limit\n\
         export LD_PRELOAD=\"$GUARD\"\n\
         exec \"$PROBE\" alloc 1048576\n";
    let (ok, so, se) = in_mount_namespace(work3.path(), no_account, &envs);
    assert!(ok, "{so}\n{se}");
    assert!(
        so.contains("alloc rc=2"),
        "CUDA_ERROR_OUT_OF_MEMORY: {so}\n{se}"
    );
    assert!(se.contains("failing closed"), "{se}");

    // Control: the same namespace without the preload file — the guard is gone, the probe sees
    // the whole device (so the first run really was the preload file's doing).
    let work2 = tempfile::tempdir().unwrap();
    let script =
        format!("unset LD_PRELOAD\nexec \"$PROBE\" entrypoints direct unlimited {limit}\n");
    let (ok, so, se) = in_mount_namespace(work2.path(), &script, &envs);
    assert!(ok && !so.contains("FAIL"), "unguarded control:\n{so}\n{se}");
}

fn put(image: &mut [u8], word: usize, v: u64) {
    image[word * 8..word * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn limited(dir: &Path, limit: u64) -> Vec<(&'static str, String)> {
    let mut e = base_env(dir);
    e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", limit.to_string()));
    e
}

#[test]
fn truncated_and_garbage_files_are_rebuilt() {
    let limit = 100 * MIB;
    let good = accounting::initial_image(limit, "GPU-x", accounting::DEFAULT_SLOT_COUNT);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("half a header", good[..60].to_vec()),
        ("header only", good[..accounting::HEADER_BYTES].to_vec()),
        ("cut in the slots", good[..good.len() / 2].to_vec()),
        ("zeros", vec![0; good.len()]),
        ("zeros, twice as long", vec![0; 2 * good.len()]),
        ("slot count absurd", {
            let mut b = good.clone();
            put(&mut b, header::SLOT_COUNT, u64::MAX);
            b
        }),
        ("limit rewritten", {
            let mut b = good.clone();
            put(&mut b, header::LIMIT, u64::MAX);
            b
        }),
    ];
    for (what, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ACCOUNTING_FILE_NAME), &bytes).unwrap();
        let (out, so, se) = run(probe(
            true,
            &limited(dir.path(), limit),
            &["alloc", &(90 * MIB).to_string()],
        ));
        assert!(
            out.status.success() && so.contains("alloc rc=0"),
            "{what}: {so}{se}"
        );
        let snap = snapshot(dir.path());
        assert_eq!(snap.limit_bytes, limit, "{what}");
        assert_eq!(snap.slot_count, accounting::DEFAULT_SLOT_COUNT, "{what}");
        // Never shortened: another process's mapping past the new end would fault.
        let len = std::fs::metadata(dir.path().join(ACCOUNTING_FILE_NAME))
            .unwrap()
            .len();
        assert!(
            len >= bytes.len() as u64,
            "{what}: {len} bytes after the rebuild"
        );
        let (_, so, se) = run(probe(
            true,
            &limited(dir.path(), limit),
            &["alloc", &(110 * MIB).to_string()],
        ));
        assert!(
            so.contains("alloc rc=2"),
            "{what}: the limit still holds: {so}{se}"
        );
    }
}

#[test]
fn absurd_counters_and_dead_slots_are_corrected_at_attach() {
    let limit = 100 * MIB;
    let me = std::process::id();
    let file = |used: u64, slots: &[(u64, u64, u64)]| {
        let dir = tempfile::tempdir().unwrap();
        let mut image = accounting::initial_image(limit, "GPU-x", accounting::DEFAULT_SLOT_COUNT);
        put(&mut image, header::USED, used);
        put(&mut image, header::GENERATION, u64::MAX); // absurd: the next claim wraps it
        for (i, (pid, start, bytes)) in slots.iter().enumerate() {
            put(&mut image, accounting::slot_word(i, slot::PID), *pid);
            put(
                &mut image,
                accounting::slot_word(i, slot::START_TIME),
                *start,
            );
            put(&mut image, accounting::slot_word(i, slot::BYTES), *bytes);
        }
        std::fs::write(dir.path().join(ACCOUNTING_FILE_NAME), image).unwrap();
        dir
    };
    let alloc = |dir: &Path, n: u64| {
        run(probe(
            true,
            &limited(dir, limit),
            &["alloc", &n.to_string()],
        ))
    };

    // Total absurdly high, live owner (this test process) holds 10 MiB: lowered to 10 MiB.
    let dir = file(u64::MAX - 7, &[(u64::from(me), own_start_time(), 10 * MIB)]);
    let (_, so, se) = alloc(dir.path(), 80 * MIB);
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    assert!(se.contains("corrected"), "{se}");
    // Total zeroed by a workload while a live process holds 90 MiB: raised back, 80 MiB refused.
    let dir = file(0, &[(u64::from(me), own_start_time(), 90 * MIB)]);
    let (_, so, se) = alloc(dir.path(), 80 * MIB);
    assert!(so.contains("alloc rc=2"), "{so}{se}");
    // Slots claiming dead PIDs (and a non-PID word) with absurd bytes: reaped, memory back.
    let dir = file(
        u64::MAX,
        &[
            (4_000_000, 1, u64::MAX),
            (u64::from(u32::MAX) + 5, 0, 1 << 40),
            (1, 12345, 50 * MIB),
        ],
    );
    let (_, so, se) = alloc(dir.path(), 90 * MIB);
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    let snap = snapshot(dir.path());
    assert!(
        snap.slots.iter().all(|s| s.pid != 4_000_000 && s.pid != 1),
        "{snap:?}"
    );
}

#[test]
fn pre_fork_workers_each_get_a_slot_and_together_stay_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 256 * MIB;
    let workers = 6;
    let hwm = dir.path().join("hwm");
    let mut e = limited(dir.path(), limit);
    e.push(("FAKE_CUDA_CTX_BYTES", (16 * MIB).to_string()));
    // The parent's first context cannot be measured (none current): charged this estimate.
    e.push(("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", (16 * MIB).to_string()));
    e.push(("FAKE_CUDA_HWM_FILE", hwm.display().to_string()));
    e.push((
        "FAKE_CUDA_SHARED_FILE",
        dir.path().join("shared").display().to_string(),
    ));
    // Each worker wants 64 MiB in 4 MiB steps: 6 × 64 = 384 MiB of demand for 256 MiB.
    let mut cmd = probe(
        true,
        &e,
        &[
            "prefork",
            &workers.to_string(),
            &(4 * MIB).to_string(),
            &(64 * MIB).to_string(),
        ],
    );
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut parent = cmd.spawn().unwrap();
    let mut reader = BufReader::new(parent.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("all ready") {
        assert!(Instant::now() < deadline, "workers not ready: {seen}");
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "probe exited early: {seen}"
        );
        seen.push_str(&line);
    }
    let held: Vec<(u32, u64)> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("worker pid="))
        .map(|l| {
            let mut f = l.split_whitespace();
            let pid = f.next().unwrap().parse().unwrap();
            let held = f
                .next()
                .unwrap()
                .trim_start_matches("held=")
                .parse()
                .unwrap();
            (pid, held)
        })
        .collect();
    assert_eq!(held.len(), workers);
    let snap = snapshot(dir.path());
    // Parent + every worker in a slot of its own, each slot holding what its worker reported.
    assert_eq!(snap.slots.len(), workers + 1, "{snap:?}");
    for (pid, bytes) in &held {
        let s = snap
            .slots
            .iter()
            .find(|s| s.pid == *pid)
            .unwrap_or_else(|| panic!("no slot for worker {pid}: {snap:?}"));
        assert_eq!(s.bytes, *bytes);
    }
    let workers_total: u64 = held.iter().map(|(_, b)| b).sum();
    let parent_slot = snap.slots.iter().find(|s| s.pid == parent.id()).unwrap();
    assert!(
        parent_slot.bytes >= 16 * MIB,
        "the parent's context is charged: {parent_slot:?}"
    );
    assert!(snap.used_bytes <= limit, "{snap:?}");
    assert_eq!(snap.used_bytes, snap.slot_bytes_sum());
    assert!(workers_total + parent_slot.bytes <= limit);
    assert!(
        workers_total >= limit - parent_slot.bytes - 4 * MIB * workers as u64,
        "the workers filled the slice: {workers_total}"
    );
    assert!(seen.contains("rc=2"), "some worker was refused: {seen}");
    let driver_peak: u64 = std::fs::read_to_string(&hwm)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        driver_peak <= limit,
        "the driver saw {driver_peak} bytes at once"
    );
    drop(parent.stdin.take());
    let status = parent.wait().unwrap();
    let mut rest = String::new();
    for l in reader.lines() {
        rest.push_str(&l.unwrap());
        rest.push('\n');
    }
    assert!(status.success() && !rest.contains("FAIL"), "{rest}");
}

#[test]
fn a_narrow_tall_pitched_allocation_is_refused_before_the_driver_pads_it() {
    // 4-byte rows of a million lines: the driver pads each to 512 bytes, 512 MiB in all. The
    // guard must refuse it before the call, not find the padding after the memory was taken.
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * MIB;
    let hwm = dir.path().join("hwm");
    let mut e = limited(dir.path(), limit);
    e.push(("FAKE_CUDA_HWM_FILE", hwm.display().to_string()));
    let run = |width: u64, height: u64| {
        let out = probe(
            true,
            &e,
            &["pitch", &width.to_string(), &height.to_string()],
        )
        .output()
        .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let high_water = || -> u64 {
        std::fs::read_to_string(&hwm)
            .map(|t| t.trim().parse().unwrap())
            .unwrap_or(0)
    };
    assert_eq!(run(4, 1 << 20), "pitch rc=2 pitch=0");
    assert!(
        high_water() <= limit,
        "the driver took {} bytes",
        high_water()
    );
    // Within the limit once padded (4096 rows of 4000 bytes, pitch 4096: 16 MiB): served.
    assert_eq!(run(4000, 4096), "pitch rc=0 pitch=4096");
    assert!(high_water() <= limit);
}
