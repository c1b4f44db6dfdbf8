//! Several processes of one container sharing the accounting file: racing processes never take
//! more than the limit together (checked on the fake driver's own high-water mark), a killed
//! process's share comes back, forked children get their own slot, the device plugin's parser
//! reads the file, and a damaged file is rebuilt.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vramslice_core::container::accounting::{self, ACCOUNTING_FILE_NAME, AccountingSnapshot};

fn env(dir: &Path, limit: u64) -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", limit.to_string()),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
        ("VRAMSLICE_GPU_UUID", "GPU-test".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
    ]
}

/// One probe allocating 1 MiB under a 100 MiB limit with its account in `dir`: it must
/// succeed; returns the guard's messages.
fn alloc_succeeds(dir: &Path) -> String {
    let (out, so, se) = run(probe(
        true,
        &env(dir, 100 * MIB),
        &["alloc", &MIB.to_string()],
    ));
    assert!(
        out.status.success() && so.contains("alloc rc=0"),
        "{so}{se}"
    );
    se
}

fn snapshot(dir: &Path) -> AccountingSnapshot {
    accounting::parse(&std::fs::read(dir.join(ACCOUNTING_FILE_NAME)).unwrap()).unwrap()
}

/// Spawns a probe that prints a line containing `marker` when ready and waits for stdin to close.
fn spawn_until(mut cmd: std::process::Command, marker: &str) -> (Child, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(marker) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {marker:?}; got {seen}"
        );
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("probe exited before {marker:?}; got {seen}");
        }
        seen.push_str(&line);
    }
    // keep draining in the background so the child never blocks on a full pipe
    std::thread::spawn(move || for _ in reader.lines() {});
    (child, seen)
}

#[test]
fn sixteen_processes_racing_never_exceed_the_limit_together() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 64 * MIB;
    let hwm_file = dir.path().join("hwm");
    let shared = dir.path().join("fake-shared");
    let mut e = env(dir.path(), limit);
    e.push(("FAKE_CUDA_HWM_FILE", hwm_file.display().to_string()));
    e.push(("FAKE_CUDA_SHARED_FILE", shared.display().to_string()));
    let children: Vec<Child> = (0..16)
        .map(|_| {
            let mut cmd = probe(true, &e, &["race", "8", "1500", &(4 * MIB).to_string()]);
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    let (mut ok, mut oom) = (0u64, 0u64);
    for c in children {
        let out = c.wait_with_output().unwrap();
        let so = String::from_utf8_lossy(&out.stdout);
        assert_checks(&out, &so, &String::from_utf8_lossy(&out.stderr), 1);
        let line = so.lines().find(|l| l.starts_with("race ")).unwrap();
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        ok += field("ok=");
        oom += field("oom=");
    }
    let hwm: u64 = std::fs::read_to_string(&hwm_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "race: {ok} allocations, {oom} refused, driver high-water mark {hwm} of limit {limit}"
    );
    assert!(
        hwm <= limit,
        "driver saw {hwm} bytes at once, limit {limit}"
    );
    assert!(
        hwm > limit / 2,
        "the race did push against the limit ({hwm})"
    );
    assert!(
        ok > 0 && oom > 0,
        "both outcomes happened: ok={ok} oom={oom}"
    );
    // The racers exited holding pool-retained bytes; the next process to attach reaps them.
    let snap = snapshot(dir.path());
    assert_eq!(
        snap.used_bytes,
        snap.slot_bytes_sum(),
        "total = sum of slots: {snap:?}"
    );
    let (_, so, _) = run(probe(true, &e, &["alloc", "1024"]));
    assert!(so.contains("alloc rc=0"), "{so}");
    let snap = snapshot(dir.path());
    assert_eq!(
        snap.used_bytes, 1024,
        "dead racers reaped, only the new process counted: {snap:?}"
    );
    assert_eq!(snap.gpu_uuid, "GPU-test");
    assert_eq!(snap.limit_bytes, limit);
}

/// A probe holding `bytes` (the only process of the container so far), and its slot's index.
fn hold(dir: &Path, e: &[(&'static str, String)], bytes: u64) -> (Child, usize) {
    let (holder, seen) = spawn_until(probe(true, e, &["hold", &bytes.to_string()]), "ready");
    assert!(seen.contains("hold rc=0"), "{seen}");
    let pid = holder.id();
    let snap = snapshot(dir);
    let slot = snap
        .slots
        .iter()
        .find(|s| s.pid == pid)
        .unwrap_or_else(|| panic!("no slot for {pid}: {snap:?}"));
    assert_eq!(slot.bytes, bytes);
    assert_eq!(snap.used_bytes, bytes);
    (holder, slot.index)
}

#[test]
fn killed_process_slot_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let e = env(dir.path(), limit);
    let (mut holder, _) = hold(dir.path(), &e, 80 * MIB);
    let pid = holder.id();

    let (_, so, _) = run(probe(true, &e, &["alloc", &(80 * MIB).to_string()]));
    assert!(
        so.contains("alloc rc=2"),
        "a second process is refused while the first holds: {so}"
    );

    holder.kill().unwrap(); // SIGKILL: no chance to free anything
    holder.wait().unwrap();
    let (_, so, se) = run(probe(true, &e, &["alloc", &(80 * MIB).to_string()]));
    assert!(
        so.contains("alloc rc=0"),
        "the dead process's share is reclaimed: {so}{se}"
    );
    let snap = snapshot(dir.path());
    assert!(
        snap.slots.iter().all(|s| s.pid != pid),
        "dead slot freed: {snap:?}"
    );
}

#[test]
fn the_accounting_file_is_writable_by_every_user_whatever_the_creators_umask() {
    // Regression: created 0644 under a usual umask, so a worker an entrypoint started as
    // another user could not open it read-write (and under the limit file is refused all).
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let a = common::artifacts();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask 077 && exec \"$@\"", "sh"])
        .arg(&a.probe)
        .args(["alloc", &MIB.to_string()])
        .env("VRAMSLICE_REAL_LIBCUDA", &a.fake)
        .env("VRAMSLICE_REAL_LIBNVML", &a.fake)
        .env("LD_PRELOAD", &a.guard)
        .stdin(Stdio::null());
    for (k, v) in env(dir.path(), 100 * MIB) {
        cmd.env(k, v);
    }
    let (out, so, se) = run(cmd);
    assert!(
        out.status.success() && so.contains("alloc rc=0"),
        "{so}{se}"
    );
    let mode = std::fs::metadata(dir.path().join(ACCOUNTING_FILE_NAME))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "{mode:o}");
}

#[test]
fn a_link_planted_in_place_of_the_account_is_not_followed() {
    // The accounting directory is writable by every user of the container (and, in DRA mode,
    // of every pod sharing the claim): a link there must not make a root process's guard
    // change or rewrite what it points to.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, "not an accounting file").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join(ACCOUNTING_FILE_NAME)).unwrap();
    let se = alloc_succeeds(dir.path());
    assert!(se.contains("cannot open accounting file"), "{se}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "not an accounting file"
    );
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[test]
fn a_fork_while_another_thread_sets_the_guard_up_leaves_the_child_working() {
    // Regression: the guard set up its accounts lazily and registered its fork handlers only
    // after; a fork while another thread was in that set-up gave the child a set-up marked in
    // progress by a thread it does not have, and its first CUDA call waited forever.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(ACCOUNTING_FILE_NAME);
    common::artifacts(); // built before the lock is taken: the build takes longer than it is held
    // Hold the accounting file's lock so that the probe's first CUDA call (on its own thread)
    // sits in the set-up while the main thread forks.
    let mut holder = std::process::Command::new("flock")
        .arg(&file)
        .args(["-c", "sleep 3"])
        .spawn()
        .expect("flock(1) from util-linux");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::process::Command::new("flock")
        .args(["-n"])
        .arg(&file)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "the lock was never taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let (out, so, se) = run(probe(
        true,
        &env(dir.path(), 100 * MIB),
        &["forkinit", "300"],
    ));
    holder.wait().unwrap();
    assert_checks(&out, &so, &se, 1);
    assert!(so.contains("child alloc rc=0"), "{so}\n{se}");
    assert!(so.contains("thread alloc rc=0"), "{so}\n{se}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the fork waited for the set-up, not for the child's alarm"
    );
}

#[test]
fn fork_handlers_never_call_an_allocator_preloaded_beside_the_guard_while_it_is_locked() {
    // jemalloc and tcmalloc register their fork handlers at their first allocation; when that
    // comes after the guard registered its own, the guard's prepare handler runs after the
    // allocator locked itself, and its child handler before the allocator unlocked: any
    // allocation there deadlocks. The guard allocates once before registering, so that such
    // an allocator is set up (and registered) first.
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let a = common::artifacts();
    for order in [
        format!("{} {}", a.guard.display(), a.lockalloc.display()),
        format!("{} {}", a.lockalloc.display(), a.guard.display()),
    ] {
        let mut cmd = probe(
            true,
            &env(dir.path(), limit),
            &["fork", &(30 * MIB).to_string(), &limit.to_string()],
        );
        cmd.env("LD_PRELOAD", &order);
        let (mut parent, seen) = spawn_until(cmd, "child ready");
        assert!(
            seen.contains("ok: child is refused past the shared container total"),
            "{order}: {seen}"
        );
        drop(parent.stdin.take());
        let status = parent.wait().unwrap();
        assert!(status.success(), "LD_PRELOAD={order}: {status:?}");
    }
}

#[test]
fn forked_child_gets_its_own_slot_and_counts_against_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let cmd = probe(
        true,
        &env(dir.path(), limit),
        &["fork", &(30 * MIB).to_string(), &limit.to_string()],
    );
    let (mut parent, seen) = spawn_until(cmd, "child ready");
    let child_pid: u32 = seen
        .lines()
        .find_map(|l| l.strip_prefix("child ready pid="))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let snap = snapshot(dir.path());
    let parent_slot = snap.slots.iter().find(|s| s.pid == parent.id()).unwrap();
    let child_slot = snap.slots.iter().find(|s| s.pid == child_pid).unwrap();
    assert_ne!(parent_slot.index, child_slot.index);
    assert_eq!(parent_slot.bytes, 30 * MIB);
    assert_eq!(child_slot.bytes, 30 * MIB);
    assert_eq!(snap.used_bytes, 60 * MIB);
    assert!(
        seen.contains("ok: child is refused past the shared container total"),
        "{seen}"
    );
    drop(parent.stdin.take()); // child (then parent) finish
    let status = parent.wait().unwrap();
    assert!(
        status.success(),
        "parent's checks (incl. reclaiming the exited child's share) passed"
    );
}

#[test]
fn a_fifo_in_place_of_the_slot_lock_file_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let e = env(dir.path(), limit);
    let fifo = dir.path().join(format!("{ACCOUNTING_FILE_NAME}.slots"));
    let c = std::ffi::CString::new(fifo.into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let mut cmd = probe(true, &e, &["alloc", &(10 * MIB).to_string()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the probe waited on the FIFO");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    assert!(se.contains("is not a plain file"), "{se}");
}

/// Sets `fs.protected_regular` for as long as it lives (when it may: root, a writable /proc/sys).
struct ProtectedRegular(Option<String>);

impl ProtectedRegular {
    const PATH: &str = "/proc/sys/fs/protected_regular";

    fn at_least_one() -> Self {
        let old = std::fs::read_to_string(Self::PATH).ok();
        let raised =
            old.as_deref().map(str::trim) == Some("0") && std::fs::write(Self::PATH, "1").is_ok();
        ProtectedRegular(old.filter(|_| raised))
    }
}

impl Drop for ProtectedRegular {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(Self::PATH, old);
        }
    }
}

#[test]
fn an_account_another_user_made_in_the_sticky_directory_is_opened_not_refused() {
    // The plugin makes the accounting directory 01777. There, with fs.protected_regular >= 1
    // (systemd's default; Ubuntu's is 2), the kernel refuses an O_CREAT open of a file owned by
    // neither the opener nor the directory's owner, root included: a worker of another user
    // than the account's creator was refused the account.
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let e = env(dir.path(), 100 * MIB);
    let (_, so, se) = run(probe(true, &e, &["alloc", &(10 * MIB).to_string()]));
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    let account = dir.path().join(ACCOUNTING_FILE_NAME);
    let slots = dir.path().join(format!("{ACCOUNTING_FILE_NAME}.slots"));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Made by uid 1000, as a worker an entrypoint started as another user would.
        for f in [&account, &slots] {
            std::os::unix::fs::chown(f, Some(1000), Some(1000)).unwrap();
        }
    }
    let protection = ProtectedRegular::at_least_one();
    let level = std::fs::read_to_string(ProtectedRegular::PATH).unwrap_or_default();
    eprintln!(
        "root: {root}, fs.protected_regular: {} (raised for this test: {})",
        level.trim(),
        protection.0.is_some()
    );
    let (_, so, se) = run(probe(true, &e, &["alloc", &(10 * MIB).to_string()]));
    drop(protection);
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    assert!(
        !se.contains("cannot open"),
        "the account and its slot lock file were opened: {se}"
    );
}

#[test]
fn damaged_accounting_file_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(ACCOUNTING_FILE_NAME);
    std::fs::write(&path, b"this is not an accounting file at all").unwrap();
    let se = alloc_succeeds(dir.path());
    assert!(se.contains("rebuilding it"), "{se}");
    let snap = snapshot(dir.path());
    assert_eq!(snap.limit_bytes, 100 * MIB);
    assert_eq!(snap.slot_count, accounting::DEFAULT_SLOT_COUNT);
}

#[test]
fn unusable_accounting_dir_falls_back_to_per_process() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let (out, so, se) = run(probe(
        true,
        &env(&not_a_dir, 100 * MIB),
        &["alloc", &MIB.to_string()],
    ));
    assert!(
        out.status.success() && so.contains("alloc rc=0"),
        "{so}{se}"
    );
    assert!(se.contains("per-process accounting only"), "{se}");
}

#[test]
fn accounting_file_is_shared_and_writable_by_late_processes() {
    let dir = tempfile::tempdir().unwrap();
    let e = env(dir.path(), 100 * MIB);
    let (mut a, _) = spawn_until(probe(true, &e, &["hold", &(30 * MIB).to_string()]), "ready");
    let (mut b, _) = spawn_until(probe(true, &e, &["hold", &(30 * MIB).to_string()]), "ready");
    let snap = snapshot(dir.path());
    assert_eq!(snap.used_bytes, 60 * MIB);
    assert_eq!(snap.slots.len(), 2);
    assert_eq!(snap.slot_bytes_sum(), 60 * MIB);
    let mut sin = b.stdin.take().unwrap();
    sin.write_all(b"x").unwrap();
    drop(sin);
    drop(a.stdin.take());
    a.wait().unwrap();
    b.wait().unwrap();
}

fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A file whose slot 0 claims `bytes` for (`pid`, `start`).
fn file_with_slot(dir: &Path, limit: u64, pid: u32, start: u64, bytes: u64) {
    use accounting::{header, slot, slot_word};
    let mut image = accounting::initial_image(limit, "GPU-test", accounting::DEFAULT_SLOT_COUNT);
    let mut put = |w: usize, v: u64| image[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
    put(header::USED, bytes);
    put(slot_word(0, slot::PID), u64::from(pid));
    put(slot_word(0, slot::START_TIME), start);
    put(slot_word(0, slot::BYTES), bytes);
    std::fs::write(dir.join(ACCOUNTING_FILE_NAME), image).unwrap();
}

#[test]
fn reused_pid_is_told_apart_by_start_time() {
    let limit = 100 * MIB;
    let me = std::process::id();
    // this (live) process, but a different start time: the pid was reused, the slot is stale
    let dir = tempfile::tempdir().unwrap();
    file_with_slot(dir.path(), limit, me, own_start_time() + 12345, 90 * MIB);
    let (_, so, se) = run(probe(
        true,
        &env(dir.path(), limit),
        &["alloc", &(80 * MIB).to_string()],
    ));
    assert!(
        so.contains("alloc rc=0"),
        "stale slot of a reused pid reaped: {so}{se}"
    );
    assert!(snapshot(dir.path()).slots.iter().all(|s| s.pid != me));

    // this process with its real start time: alive, its 90 MiB stay counted
    let dir = tempfile::tempdir().unwrap();
    file_with_slot(dir.path(), limit, me, own_start_time(), 90 * MIB);
    let (_, so, se) = run(probe(
        true,
        &env(dir.path(), limit),
        &["alloc", &(80 * MIB).to_string()],
    ));
    assert!(
        so.contains("alloc rc=2"),
        "a live process's slot is kept: {so}{se}"
    );
    assert!(
        snapshot(dir.path())
            .slots
            .iter()
            .any(|s| s.pid == me && s.bytes == 90 * MIB)
    );
}

#[test]
fn a_live_process_whose_pid_means_nothing_here_keeps_its_slot() {
    // Containers sharing a DRA claim share its accounting file but not their PID namespaces:
    // a holder's pid is meaningless (or another process) in its neighbour's. Its slot is held
    // by its lock on the slot lock file, not judged by that pid.
    let dir = tempfile::tempdir().unwrap();
    let limit = 100 * MIB;
    let e = env(dir.path(), limit);
    let (mut holder, index) = hold(dir.path(), &e, 80 * MIB);
    // As if it ran in another PID namespace as pid 4000000 (its slot and its lock mark say
    // so): a pid that names no process here. Written in place: the holder has the file mapped.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(ACCOUNTING_FILE_NAME))
        .unwrap();
    for (field, value) in [
        (
            accounting::slot::LOCKED,
            accounting::slot_lock_mark(4_000_000),
        ),
        (accounting::slot::PID, 4_000_000),
    ] {
        let word = accounting::slot_word(index, field);
        std::os::unix::fs::FileExt::write_all_at(&file, &value.to_le_bytes(), (word * 8) as u64)
            .unwrap();
    }

    let (_, so, se) = run(probe(true, &e, &["alloc", &(80 * MIB).to_string()]));
    assert!(
        so.contains("alloc rc=2"),
        "the holder's 80 MiB stay counted: {so}{se}"
    );
    assert_eq!(snapshot(dir.path()).used_bytes, 80 * MIB);

    // Once it ends, its lock goes with it and the next process reclaims the slot.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let (_, so, se) = run(probe(true, &e, &["alloc", &(80 * MIB).to_string()]));
    assert!(so.contains("alloc rc=0"), "{so}{se}");
    assert!(
        snapshot(dir.path())
            .slots
            .iter()
            .all(|s| s.pid != 4_000_000)
    );
}
