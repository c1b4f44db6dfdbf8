//! The whole chain, with nothing simulated above the driver: a process runs under the real guard
//! (`libvramslice_guard.so`, preloaded) over the guard's fake CUDA driver; the sidecar runtime
//! reads the guard's accounting file; a job's allocation is refused by the guard with
//! `CUDA_ERROR_OUT_OF_MEMORY`; the runtime runs the cleanup callback, backs off, raises the
//! job's peak and retries, and the retry succeeds. It also checks that `cuMemGetInfo` under
//! the guard (the sidecar's other usage source) reports the limit as the total.
//!
//! `harness = false`: without arguments this is the test (it builds the guard with cargo and
//! the fake driver with the system C compiler, then runs itself as the child); with `--child`
//! it is the process under the guard.
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

#[path = "../../vramslice-guard/tests/support/build.rs"]
mod guard_build;
use guard_build::{cc, guard_library};
use vramslice_sidecar::usage::UsageSource;
use vramslice_sidecar::{CudaError, Hooks, Job, Runtime};

const MIB: u64 = 1 << 20;
const LIMIT: u64 = 256 * MIB;
const CACHE: u64 = 150 * MIB; // a framework's cached blocks
const DECLARED: u64 = 64 * MIB; // what the job declares (an underestimate)
const REAL: u64 = 120 * MIB; // what it really allocates

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--child") {
        child();
        return;
    }
    parent();
}

// ---- parent: build the artefacts and run the child under the guard ----

fn parent() {
    let guard = guard_library();
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("libcuda.so.1");
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vramslice-guard/fake-cuda/fake_cuda.c");
    cc(&[
        "-O2",
        "-fPIC",
        "-shared",
        "-Wl,-Bsymbolic",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        fake.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    let accounting = tmp.path().join("accounting");
    std::fs::create_dir(&accounting).unwrap();
    let exe = std::env::current_exe().unwrap();

    let run = |guarded: bool| {
        let mut cmd = Command::new(&exe);
        cmd.arg("--child")
            .arg(if guarded { "guarded" } else { "unguarded" });
        for (k, _) in std::env::vars() {
            if k.starts_with("VRAMSLICE_") || k.starts_with("FAKE_CUDA_") || k == "LD_PRELOAD" {
                cmd.env_remove(k);
            }
        }
        cmd.env("VRAMSLICE_SIDECAR_LIBCUDA", &fake)
            .env("VRAMSLICE_REAL_LIBCUDA", &fake)
            .env("FAKE_CUDA_DEVICE_BYTES", (1024 * MIB).to_string())
            .env("FAKE_CUDA_CTX_BYTES", "0")
            .env("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0")
            .env("VRAMSLICE_OOM_BACKOFF", "10ms")
            .env("VRAMSLICE_QUEUE_TIMEOUT", "5s");
        if guarded {
            cmd.env("LD_PRELOAD", &guard)
                .env("VRAMSLICE_VRAM_LIMIT_BYTES", LIMIT.to_string())
                .env("VRAMSLICE_ACCOUNTING_DIR", &accounting);
        } else {
            cmd.env("VRAMSLICE_VRAM_LIMIT_BYTES", LIMIT.to_string());
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "child ({guarded}) failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        (stdout, stderr)
    };

    // Without the guard the same allocations succeed: the out-of-memory below is the guard's.
    let (stdout, _) = run(false);
    assert!(
        stdout.contains("unguarded: cache + job fit on the 1 GiB fake device"),
        "{stdout}"
    );

    let (stdout, stderr) = run(true);
    for line in [
        "cuMemGetInfo under the guard: total = limit",
        "attempt 0: CUDA_ERROR_OUT_OF_MEMORY",
        "attempt 1: ok",
        "cleanups = 1",
        "accounting file read: live = job's 120 MiB",
        "peak raised above the declared need",
        "metrics: 1 oom error, 1 retry",
    ] {
        assert!(
            stdout.contains(line),
            "missing {line:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    println!("{stdout}");
    println!("guard_chain: 1 passed, 0 failed");
}

// ---- child: the process under the guard ----

type CuInit = unsafe extern "C" fn(u32) -> i32;
type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
type CuRetain = unsafe extern "C" fn(*mut *mut std::ffi::c_void, i32) -> i32;
type CuSetCurrent = unsafe extern "C" fn(*mut std::ffi::c_void) -> i32;
type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> i32;
type CuMemFree = unsafe extern "C" fn(u64) -> i32;

struct Driver {
    _lib: libloading::os::unix::Library,
    alloc: CuMemAlloc,
    free: CuMemFree,
}

impl Driver {
    /// Open the driver as an application would (`dlopen`), but resolve the entry points in the
    /// global scope, where the preloaded guard's definitions come first.
    fn open() -> Self {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        let path = std::env::var("VRAMSLICE_SIDECAR_LIBCUDA").unwrap();
        // SAFETY: loading the fake driver runs no initialiser with preconditions.
        let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }.unwrap();
        let global = Library::this();
        // SAFETY: each symbol is given the CUDA driver API's documented C signature.
        unsafe {
            let init: CuInit = *global.get::<CuInit>(b"cuInit\0").unwrap();
            let device_get: CuDeviceGet = *global.get::<CuDeviceGet>(b"cuDeviceGet\0").unwrap();
            let retain: CuRetain = *global
                .get::<CuRetain>(b"cuDevicePrimaryCtxRetain\0")
                .unwrap();
            let set: CuSetCurrent = *global.get::<CuSetCurrent>(b"cuCtxSetCurrent\0").unwrap();
            assert_eq!(init(0), 0);
            let mut dev = 0;
            assert_eq!(device_get(&mut dev, 0), 0);
            let mut ctx = std::ptr::null_mut();
            assert_eq!(retain(&mut ctx, dev), 0);
            assert_eq!(set(ctx), 0);
            Self {
                alloc: *global.get::<CuMemAlloc>(b"cuMemAlloc_v2\0").unwrap(),
                free: *global.get::<CuMemFree>(b"cuMemFree_v2\0").unwrap(),
                _lib: lib,
            }
        }
    }

    fn alloc(&self, bytes: u64) -> Result<u64, CudaError> {
        let mut ptr = 0u64;
        // SAFETY: `ptr` is a valid out-pointer; a context is current on this thread.
        let r = unsafe { (self.alloc)(&mut ptr, bytes as usize) };
        if r == 0 { Ok(ptr) } else { Err(CudaError(r)) }
    }

    fn free(&self, ptr: u64) {
        // SAFETY: `ptr` came from a successful cuMemAlloc and is freed once.
        assert_eq!(unsafe { (self.free)(ptr) }, 0);
    }
}

fn child() {
    let driver = Driver::open();
    if std::env::args().nth(2).as_deref() == Some("unguarded") {
        let cache = driver.alloc(CACHE).unwrap();
        let job = driver.alloc(REAL).unwrap();
        driver.free(job);
        driver.free(cache);
        println!("unguarded: cache + job fit on the 1 GiB fake device");
        return;
    }

    // The sidecar's cuMemGetInfo source sees the guard's view: the limit as the total.
    let info = vramslice_sidecar::ffi::cuda::CudaMemInfo::load().unwrap();
    let reading = info.read().unwrap();
    assert_eq!(reading.total, Some(LIMIT), "{reading:?}");
    println!(
        "cuMemGetInfo under the guard: total = limit ({} MiB)",
        LIMIT / MIB
    );

    // Usage from the guard's accounting file (VRAMSLICE_ACCOUNTING_DIR), limit from the env.
    let rt = Runtime::from_env().unwrap();
    let cache = std::sync::Mutex::new(Some(driver.alloc(CACHE).unwrap()));
    let cleanups = AtomicU32::new(0);
    let hooks = Hooks::default().cleanup(|| {
        cleanups.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = cache.lock().unwrap().take() {
            driver.free(p); // like torch.cuda.empty_cache()
        }
    });
    let job = Job::new("chain-model").need(DECLARED);
    let buffer = rt
        .run_blocking(&job, &hooks, |attempt| {
            let r = driver.alloc(REAL);
            match &r {
                Ok(_) => println!("attempt {attempt}: ok"),
                Err(e) => {
                    assert!(vramslice_sidecar::OutOfMemory::is_out_of_memory(e), "{e}");
                    println!("attempt {attempt}: CUDA_ERROR_OUT_OF_MEMORY from the guard ({e})");
                }
            }
            r
        })
        .unwrap();
    println!("cleanups = {}", cleanups.load(Ordering::SeqCst));
    // The buffer is still held: the accounting file (written by the guard) shows it.
    let _ = rt.render_metrics(); // reads the accounting file afresh
    let live = rt.stats().live;
    assert!((REAL..REAL + 8 * MIB).contains(&live), "live {live}");
    println!("accounting file read: live = job's {} MiB", live / MIB);
    let peak = rt.learned_peak(&job).unwrap();
    const { assert!(REAL > DECLARED) };
    assert!(peak >= REAL, "peak {peak}");
    println!("peak raised above the declared need: {} MiB", peak / MIB);
    let m = rt.render_metrics();
    assert!(m.contains("vramslice_sidecar_oom_errors_total 1"), "{m}");
    assert!(m.contains("vramslice_sidecar_retries_total 1"), "{m}");
    println!("metrics: 1 oom error, 1 retry");
    driver.free(buffer);
}
