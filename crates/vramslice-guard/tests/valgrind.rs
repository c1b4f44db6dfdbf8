//! The guard under valgrind memcheck (entry points, shared account and fork, per-GPU limits, graph
//! memory nodes): invalid reads/writes or uninitialised use anywhere in the preloaded library (or
//! the probe and fake driver) fail the test. valgrind is part of every machine image this project
//! builds on; a machine without it fails here with a clear message.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};

fn under_valgrind(envs: &[(&str, String)], args: &[&str]) {
    let plain = probe(true, envs, args);
    let mut cmd = std::process::Command::new("valgrind");
    cmd.args(["--error-exitcode=97", "--quiet", "--trace-children=yes"])
        .arg(plain.get_program())
        .args(args);
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(std::process::Stdio::null());
    let found = std::process::Command::new("valgrind")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "valgrind is not installed: apt-get install valgrind"
    );
    let (out, so, se) = run(cmd);
    assert_ne!(
        out.status.code(),
        Some(97),
        "valgrind reported memory errors:\n{se}"
    );
    assert_checks(&out, &so, &se, 3);
}

#[test]
fn entry_points_are_clean_under_memcheck() {
    let env = vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", (100 * MIB).to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (1024 * MIB).to_string()),
    ];
    under_valgrind(
        &env,
        &[
            "entrypoints",
            "gpa_ptsz",
            "limited",
            &(100 * MIB).to_string(),
        ],
    );
}

#[test]
fn shared_account_and_fork_are_clean_under_memcheck() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", (100 * MIB).to_string()),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.path().display().to_string()),
    ];
    under_valgrind(
        &env,
        &["fork", &(30 * MIB).to_string(), &(100 * MIB).to_string()],
    );
}

#[test]
fn per_gpu_limits_are_clean_under_memcheck() {
    let dir = tempfile::tempdir().unwrap();
    let gib = 1u64 << 30;
    let env = vec![
        (
            "VRAMSLICE_VRAM_LIMITS",
            "GPU-11111111-1111-1111-1111-111111111111:1Gi,GPU-22222222-2222-2222-2222-222222222222:512Mi"
                .to_string(),
        ),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.path().display().to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICES", "2".into()),
        ("FAKE_CUDA_DEVICE_BYTES", format!("{},{}", 4 * gib, 4 * gib)),
        ("FAKE_CUDA_CTX_BYTES", "0".into()),
    ];
    under_valgrind(
        &env,
        &["multi", &gib.to_string(), &(512 * MIB).to_string(), "0"],
    );
}

#[test]
fn graph_memory_nodes_and_mapped_memory_are_clean_under_memcheck() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", (256 * MIB).to_string()),
        ("VRAMSLICE_ACCOUNTING_DIR", dir.path().display().to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_CTX_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
    ];
    for scenario in ["graphs", "vmm"] {
        under_valgrind(&env, &[scenario, "gpa_ptsz", &(256 * MIB).to_string()]);
    }
}
