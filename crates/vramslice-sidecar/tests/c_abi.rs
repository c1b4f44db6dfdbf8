//! Compiles `tests/c/abi_smoke.c` against the committed header with the system C compiler
//! (`$CC`, default `cc`), links it to this crate's cdylib (built by cargo next to this test) and
//! runs it.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn cdylib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libvramslice_sidecar.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "libvramslice_sidecar.so not found next to {}",
        exe.display()
    );
}

#[test]
fn c_program_uses_the_abi() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = cdylib_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let bin = out_dir.path().join("abi_smoke");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&bin)
        .arg(crate_dir.join("tests/c/abi_smoke.c"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lvramslice_sidecar")
        .status()
        .unwrap_or_else(|e| panic!("cannot run C compiler {cc:?}: {e}"));
    assert!(status.success(), "compiling abi_smoke.c failed");
    let accounting = tempfile::tempdir().unwrap();
    let run = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars() {
            if k.starts_with("VRAMSLICE_") {
                cmd.env_remove(k);
            }
        }
        // cargo's LD_LIBRARY_PATH names target/debug too, where a stale copy of the library
        // from an earlier `cargo build` would win over the rpath (a RUNPATH ranks below it).
        cmd.env("LD_LIBRARY_PATH", &lib_dir);
        let out = cmd.envs(envs.iter().copied()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "abi_smoke {envs:?} failed: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    };
    run(&[]);
    let dir = accounting.path().to_str().unwrap();
    let env = [
        ("ABI_SMOKE_FROM_ENV", "1"),
        ("VRAMSLICE_VRAM_LIMIT_BYTES", "4Gi"),
        ("VRAMSLICE_ACCOUNTING_DIR", dir),
    ];
    run(&env);
    let mut bad = env.to_vec();
    bad.extend([("ABI_SMOKE_BAD_CONFIG", "1"), ("VRAMSLICE_HIGH_WATER", "2")]);
    run(&bad);
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    run(&[
        ("ABI_SMOKE_METRICS_IN_USE", "1"),
        ("VRAMSLICE_VRAM_LIMIT_BYTES", "4Gi"),
        ("VRAMSLICE_ACCOUNTING_DIR", dir),
        ("VRAMSLICE_METRICS_ADDR", &addr),
    ]);
    drop(held);
    run(&[
        ("ABI_SMOKE_METRICS_FORK", "1"),
        ("VRAMSLICE_METRICS_ADDR", &addr),
    ]);
}
