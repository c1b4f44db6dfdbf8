//! Build steps shared by every test that runs programs under the real guard: the guard's tests
//! (through `tests/common`) and the sidecar's whole-chain test (included there with `#[path]`).
//! Paths are spelled from `CARGO_MANIFEST_DIR/../vramslice-guard`, which names this crate from
//! either includer.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guard crate's directory.
pub fn guard_crate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vramslice-guard")
}

/// Run the system C compiler (`$CC`, default `cc`); panics with its stderr when it fails.
pub fn cc(args: &[&str]) {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&compiler)
        .args(args)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the guard's cdylib with cargo (same profile as the calling test), in its own target
/// directory under cargo's test tmpdir: cargo builds only the rlib for integration tests (and no
/// other package's cdylib), and the outer cargo holds the main target directory's lock while
/// tests run.
pub fn guard_library() -> PathBuf {
    let release = !cfg!(debug_assertions);
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guard-cdylib");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "vramslice-guard",
        "--lib",
        "--manifest-path",
    ])
    .arg(guard_crate_dir().join("Cargo.toml"))
    .env("CARGO_TARGET_DIR", &target);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("run cargo to build the guard library");
    assert!(
        out.status.success(),
        "building the guard failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = target
        .join(if release { "release" } else { "debug" })
        .join("libvramslice_guard.so");
    assert!(lib.exists(), "guard library not built at {}", lib.display());
    lib
}
