//! Shared by the integration tests and the benchmark: builds the fake CUDA driver and the probe
//! program with the system C compiler (`$CC`, default `cc`) into cargo's target tmpdir, finds the
//! guard library next to the test binary, and runs the probe under it.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

#[path = "../support/build.rs"]
mod build;
use build::{cc, guard_library};

pub const MIB: u64 = 1 << 20;

pub struct Artifacts {
    pub dir: PathBuf,
    pub fake: PathBuf,
    pub probe: PathBuf,
    pub guard: PathBuf,
    /// An allocator that aborts when called inside the fork handlers' window (`lockalloc.c`).
    pub lockalloc: PathBuf,
}

pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-cuda");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("vramslice-guard-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("libcuda.so.1");
        cc(&[
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fPIC",
            "-shared",
            "-Wl,-Bsymbolic",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            fake.to_str().unwrap(),
            src.join("fake_cuda.c").to_str().unwrap(),
        ]);
        std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")).ok();
        let next_b = dir.join("libnext_b.so");
        cc(&[
            "-O2",
            "-fPIC",
            "-shared",
            "-o",
            next_b.to_str().unwrap(),
            src.join("next_b.c").to_str().unwrap(),
        ]);
        let next_a = dir.join("libnext_a.so");
        let rpath_b = format!("-Wl,-rpath,{}", dir.display());
        cc(&[
            "-O2",
            "-fPIC",
            "-shared",
            "-o",
            next_a.to_str().unwrap(),
            src.join("next_a.c").to_str().unwrap(),
            "-L",
            dir.to_str().unwrap(),
            &rpath_b,
            "-Wl,--no-as-needed",
            "-lnext_b",
            "-ldl",
        ]);
        let lockalloc = dir.join("liblockalloc.so");
        cc(&[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fPIC",
            "-shared",
            "-o",
            lockalloc.to_str().unwrap(),
            src.join("lockalloc.c").to_str().unwrap(),
            "-lpthread",
        ]);
        let probe = dir.join("probe");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        cc(&[
            "-O2",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            probe.to_str().unwrap(),
            src.join("probe.c").to_str().unwrap(),
            "-L",
            dir.to_str().unwrap(),
            &rpath,
            "-lcuda",
            "-lnext_a",
            "-ldl",
            "-lpthread",
        ]);
        Artifacts {
            dir,
            fake,
            probe,
            guard: guard_library(),
            lockalloc,
        }
    })
}

/// A probe command with the fake driver; `guarded` adds the preload. The environment is
/// cleared of every VRAMSLICE_/FAKE_CUDA_ variable the caller did not set.
pub fn probe(guarded: bool, envs: &[(&str, String)], args: &[&str]) -> Command {
    let a = artifacts();
    let mut cmd = Command::new(&a.probe);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("VRAMSLICE_") || k.starts_with("FAKE_CUDA_") || k == "LD_PRELOAD" {
            cmd.env_remove(k);
        }
    }
    cmd.env("VRAMSLICE_REAL_LIBCUDA", &a.fake)
        .env("VRAMSLICE_REAL_LIBNVML", &a.fake);
    if guarded {
        cmd.env("LD_PRELOAD", &a.guard);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub fn run(mut cmd: Command) -> (Output, String, String) {
    let out = cmd.output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, so, se)
}

/// Asserts the probe's own checks all passed and that it ran at least `min` of them.
pub fn assert_checks(out: &Output, stdout: &str, stderr: &str, min: usize) {
    let passed = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
    assert!(
        out.status.success() && !stdout.contains("FAIL") && passed >= min,
        "probe failed ({:?}, {passed} checks passed, expected >= {min}):\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// The environment of a probe on one 4 GiB fake device, with the accounting directory and the
/// driver's high-water mark file (see [`driver_peak`]) in `dir`; contexts take `ctx_bytes`, and
/// the guard estimates an unmeasurable one at that.
pub fn fake_gpu_env(dir: &Path, ctx_bytes: u64) -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_ACCOUNTING_DIR", dir.display().to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", ctx_bytes.to_string()),
        ("FAKE_CUDA_CTX_BYTES", ctx_bytes.to_string()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
        ("FAKE_CUDA_HWM_FILE", dir.join("hwm").display().to_string()),
    ]
}

/// The most the fake driver held at once as `file` in `dir` records it (`hwm` for device 0,
/// `hwm.<i>` for device i); 0 when it never wrote one.
pub fn driver_peak(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or(0)
}

/// Runs probe `scenario` under the guard at `limit` ([`fake_gpu_env`] with `ctx_bytes`) through
/// each lookup of `modes`; asserts every check passed (at least `min`) and returns the driver's
/// peak on device 0 in each run.
pub fn guarded_peaks(
    scenario: &str,
    modes: &[&str],
    limit: u64,
    ctx_bytes: u64,
    min: usize,
) -> Vec<u64> {
    guarded_peaks_with(scenario, modes, limit, ctx_bytes, min, &[])
}

/// [`guarded_peaks`] with `extra` variables in the probe's environment.
pub fn guarded_peaks_with(
    scenario: &str,
    modes: &[&str],
    limit: u64,
    ctx_bytes: u64,
    min: usize,
    extra: &[(&'static str, String)],
) -> Vec<u64> {
    modes
        .iter()
        .map(|mode| {
            let dir = tempfile::tempdir().unwrap();
            let mut e = fake_gpu_env(dir.path(), ctx_bytes);
            e.push(("VRAMSLICE_VRAM_LIMIT_BYTES", limit.to_string()));
            e.extend(extra.iter().cloned());
            let (out, so, se) = run(probe(true, &e, &[scenario, mode, &limit.to_string()]));
            assert_checks(&out, &so, &se, min);
            driver_peak(dir.path(), "hwm")
        })
        .collect()
}

/// Runs probe `scenario` through `mode` without the guard ([`fake_gpu_env`] with `ctx_bytes`):
/// its stdout and the driver's peak, for tests that show the checks can fail.
pub fn unguarded(scenario: &str, mode: &str, limit: u64, ctx_bytes: u64) -> (String, u64) {
    unguarded_with(scenario, mode, limit, ctx_bytes, &[])
}

/// [`unguarded`] with `extra` variables in the probe's environment.
pub fn unguarded_with(
    scenario: &str,
    mode: &str,
    limit: u64,
    ctx_bytes: u64,
    extra: &[(&'static str, String)],
) -> (String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut e = fake_gpu_env(dir.path(), ctx_bytes);
    e.extend(extra.iter().cloned());
    let (_, so, _) = run(probe(false, &e, &[scenario, mode, &limit.to_string()]));
    (so, driver_peak(dir.path(), "hwm"))
}
