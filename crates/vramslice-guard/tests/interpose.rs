//! The guard preloaded into a C program over the fake driver: every covered entry point, every
//! way of reaching the driver, memory information, contexts and modules, configuration errors.
#![allow(clippy::unwrap_used)]

mod common;
use common::{MIB, assert_checks, probe, run};

const LIMIT: u64 = 100 * MIB;

fn limited_env() -> Vec<(&'static str, String)> {
    vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", LIMIT.to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", "0".into()),
        ("FAKE_CUDA_DEVICE_BYTES", (1024 * MIB).to_string()),
    ]
}

fn entrypoints(mode: &str) {
    let (out, so, se) = run(probe(
        true,
        &limited_env(),
        &["entrypoints", mode, "limited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 40);
    assert!(
        se.contains("requested 62914560 bytes"),
        "OOM logged with numbers:\n{se}"
    );
    assert_eq!(
        se.matches("out of memory").count(),
        1,
        "logged once per process:\n{se}"
    );
}

#[test]
fn limit_enforced_on_every_entry_point_when_linked_directly() {
    entrypoints("direct");
}

#[test]
fn limit_enforced_through_dlopen_and_dlsym() {
    entrypoints("dlsym");
}

#[test]
fn limit_enforced_through_cu_get_proc_address() {
    entrypoints("gpa");
}

#[test]
fn limit_enforced_through_cu_get_proc_address_per_thread_stream_variants() {
    entrypoints("gpa_ptsz");
}

#[test]
fn without_the_guard_the_probe_sees_the_whole_device() {
    let (out, so, se) = run(probe(
        false,
        &limited_env(),
        &["entrypoints", "direct", "unlimited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 30);
}

#[test]
fn no_limit_passes_everything_through() {
    let env = vec![("FAKE_CUDA_DEVICE_BYTES", (1024 * MIB).to_string())];
    for mode in ["direct", "gpa"] {
        let (out, so, se) = run(probe(
            true,
            &env,
            &["entrypoints", mode, "unlimited", &LIMIT.to_string()],
        ));
        assert_checks(&out, &so, &se, 30);
        assert!(se.is_empty(), "pass-through is silent:\n{se}");
    }
}

#[test]
fn malformed_limit_is_reported_and_passes_through() {
    let mut env = limited_env();
    env[0].1 = "a lot".into();
    let (out, so, se) = run(probe(
        true,
        &env,
        &["entrypoints", "direct", "unlimited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 30);
    assert!(
        se.contains("VRAMSLICE_VRAM_LIMIT_BYTES=\"a lot\" is malformed"),
        "{se}"
    );
    assert!(se.contains("NOT enforced"), "{se}");
}

#[test]
fn malformed_optional_settings_are_reported_and_defaulted() {
    let mut env = limited_env();
    env.push(("VRAMSLICE_COUNT_MANAGED", "perhaps".into()));
    let (out, so, se) = run(probe(
        true,
        &env,
        &["entrypoints", "direct", "limited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 40);
    assert!(
        se.contains("VRAMSLICE_COUNT_MANAGED=\"perhaps\" is not a boolean"),
        "{se}"
    );
}

#[test]
fn managed_memory_can_be_left_uncounted() {
    let mut env = limited_env();
    env.push(("VRAMSLICE_COUNT_MANAGED", "0".into()));
    let (out, so, _se) = run(probe(
        true,
        &env,
        &["entrypoints", "direct", "limited", &LIMIT.to_string()],
    ));
    assert!(!out.status.success());
    let fails: Vec<&str> = so.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        !fails.is_empty() && fails.iter().all(|l| l.contains("cuMemAllocManaged")),
        "{so}"
    );
}

#[test]
fn missing_real_driver_is_an_error_code_not_a_crash() {
    let mut cmd = probe(true, &limited_env(), &["alloc", "1024"]);
    cmd.env("VRAMSLICE_REAL_LIBCUDA", "/nonexistent/libcuda.so.1");
    let (out, so, se) = run(cmd);
    assert!(out.status.success(), "{so}{se}");
    assert!(
        so.contains("alloc rc=3"),
        "CUDA_ERROR_NOT_INITIALIZED:\n{so}"
    );
    assert!(se.contains("cannot load /nonexistent/libcuda.so.1"), "{se}");
}

/// VRAMSLICE_REAL_LIBCUDA naming the guard itself: every "real" call would be the guard's own
/// wrapper calling itself until the stack ran out. An error code and a message instead.
#[test]
fn the_guard_named_as_the_real_driver_is_an_error_code_not_a_crash() {
    let mut cmd = probe(true, &limited_env(), &["alloc", "1024"]);
    let guard = common::artifacts().guard.clone();
    cmd.env("VRAMSLICE_REAL_LIBCUDA", &guard)
        .env("VRAMSLICE_REAL_LIBNVML", &guard);
    let (out, so, se) = run(cmd);
    assert!(out.status.success(), "{so}{se}");
    assert!(
        so.contains("alloc rc=3"),
        "CUDA_ERROR_NOT_INITIALIZED:\n{so}"
    );
    assert!(
        se.contains("is the guard library itself, not the real driver"),
        "{se}"
    );
}

#[test]
fn contexts_and_modules_are_measured_and_charged() {
    let env = vec![
        ("VRAMSLICE_VRAM_LIMIT_BYTES", (1024 * MIB).to_string()),
        ("VRAMSLICE_CONTEXT_ESTIMATE_BYTES", (10 * MIB).to_string()),
        ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
        ("FAKE_CUDA_CTX_BYTES", (64 * MIB).to_string()),
        ("FAKE_CUDA_MODULE_BYTES", MIB.to_string()),
    ];
    let args = [
        "contexts",
        &(10 * MIB).to_string(),
        &(64 * MIB).to_string(),
        &MIB.to_string(),
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, so, se) = run(probe(true, &env, &args));
    assert_checks(&out, &so, &se, 16);
}

#[test]
fn a_context_that_cannot_be_measured_is_charged_by_its_devices_multiprocessors() {
    // A fresh process retains its primary context with none current: unmeasurable. An H100 or
    // H200 (132 SMs) is charged 429 MiB for it, so 100 MiB more does not fit in 500 MiB; a
    // device that does not say its SM count is charged the 256 MiB floor, and it fits.
    let hundred = format!("0:{}", 100 * MIB);
    for (sms, want) in [
        (Some("132"), "alloc dev=0 rc=2"),
        (None, "alloc dev=0 rc=0"),
    ] {
        let mut env = vec![
            ("VRAMSLICE_VRAM_LIMIT_BYTES", (500 * MIB).to_string()),
            ("FAKE_CUDA_DEVICE_BYTES", (4096 * MIB).to_string()),
        ];
        if let Some(sms) = sms {
            env.push(("FAKE_CUDA_SMS", sms.to_string()));
        }
        let (out, so, se) = run(probe(true, &env, &["allocon", &hundred]));
        assert!(
            out.status.success() && so.contains(want),
            "SMs {sms:?}:\n{so}{se}"
        );
    }
}

#[test]
fn per_process_accounting_is_announced() {
    let (out, so, se) = run(probe(true, &limited_env(), &["alloc", "1024"]));
    assert!(
        out.status.success() && so.contains("alloc rc=0"),
        "{so}{se}"
    );
    assert!(
        se.contains("VRAMSLICE_ACCOUNTING_DIR is not set: per-process accounting only"),
        "{se}"
    );
}

#[test]
fn nvml_memory_info_shows_the_slice() {
    let (out, so, se) = run(probe(
        true,
        &limited_env(),
        &["nvml", "limited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 5);
    let mut env = limited_env();
    env.push(("VRAMSLICE_VIRTUALIZE_NVML", "0".into()));
    let (out, so, se) = run(probe(
        true,
        &env,
        &["nvml", "unlimited", &LIMIT.to_string()],
    ));
    assert_checks(&out, &so, &se, 4);
}

#[test]
fn interposed_dlsym_keeps_rtld_next_and_errors() {
    for guarded in [false, true] {
        let (out, so, se) = run(probe(guarded, &limited_env(), &["rtldnext"]));
        assert_checks(&out, &so, &se, 3);
    }
}

#[test]
fn closed_stderr_does_not_change_the_answer() {
    let a = common::artifacts();
    let cmd = probe(true, &limited_env(), &[]);
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(format!(
        "exec {} alloc {} 2>&-",
        a.probe.display(),
        2 * LIMIT
    ));
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    let (out, so, se) = run(sh);
    assert!(
        out.status.success() && so.contains("alloc rc=2"),
        "refused, not a panic code: {so}{se}"
    );
}

#[test]
fn an_entry_point_the_guard_cannot_know_is_named_once() {
    // cuGetProcAddress of cuMemAlloc for a CUDA version to come: the driver hands out an entry
    // point none of the guard's wrappers matches. It cannot be wrapped (its ABI is unknown),
    // but its allocations would go uncounted, so the guard says so, once.
    let (out, so, se) = run(probe(true, &limited_env(), &["gpafuture"]));
    assert_checks(&out, &so, &se, 4);
    let said = se
        .matches("cuGetProcAddress(\"cuMemAlloc\", version 99000) returned an entry point the guard does not know")
        .count();
    assert_eq!(said, 1, "{se}");
    // Unguarded, nothing is said.
    let (out, so, se) = run(probe(false, &limited_env(), &["gpafuture"]));
    assert_checks(&out, &so, &se, 4);
    assert!(!se.contains("does not know"), "{se}");
}
