use super::*;
use crate::container::limit::{GpuLimits, LimitFile, parse_limit_file};
use crate::names::env;
use crate::node::allocation::{DeviceListStrategy, InjectionMode};
use crate::node::sample::{Health, ProcessSample};

const GIB: u64 = 1 << 30;

fn sample(index: u32, total: u64, free: u64, healthy: bool) -> GpuSample {
    GpuSample {
        index,
        uuid: format!("GPU-{index}"),
        model: "NVIDIA H100 80GB HBM3".into(),
        total_bytes: total,
        used_bytes: total - free,
        free_bytes: free,
        health: if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy {
                reason: "XID 79".into(),
            }
        },
        processes: Some(Vec::new()),
    }
}

fn settings(strategy: DeviceListStrategy) -> AllocationSettings {
    AllocationSettings {
        injection: InjectionMode::LdPreloadEnv,
        device_list_strategy: strategy,
        guard_library_host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
        preload_file_host_path: "/var/lib/vramslice/ld.so.preload".into(),
        accounting_root: "/var/lib/vramslice/accounting".into(),
    }
}

fn grant(device: &str, uuid: &str, bytes: u64) -> ClaimGrant {
    ClaimGrant {
        request: "vram".into(),
        device: device.into(),
        gpu_uuid: uuid.into(),
        bytes,
    }
}

#[test]
fn an_idle_gpu_publishes_its_whole_memory_in_steps() {
    let total = 80 * GIB + (300 << 20);
    let devices = slice_devices(&[sample(0, total, total, true)], &BTreeMap::new(), GIB, 0);
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].name, "gpu-0");
    assert_eq!(devices[0].advertised_bytes, 80 * GIB);
    assert_eq!(devices[0].capacity_bytes, 80 * GIB);
}

#[test]
fn an_outside_process_shrinks_the_capacity_and_claims_are_not_counted_twice() {
    // GPU 0: a claim of 20 GiB uses 12, a process of no claim holds 16. Free: 80 − 28 = 52.
    let mut grants = BTreeMap::new();
    grants.insert(
        "GPU-0".to_string(),
        GrantsOnGpu {
            granted: 20 * GIB,
            unobserved: 8 * GIB,
        },
    );
    let devices = slice_devices(
        &[
            sample(0, 80 * GIB, 52 * GIB, true),
            sample(1, 80 * GIB, 80 * GIB, true),
        ],
        &grants,
        GIB,
        GIB,
    );
    // 52 free − 8 the claim may still take − 1 headroom = 43 for new claims, + 20 granted.
    assert_eq!(devices[0].capacity_bytes, 63 * GIB);
    assert_eq!(devices[1].capacity_bytes, 79 * GIB);
}

#[test]
fn an_unhealthy_gpu_stays_listed_with_its_reason() {
    let devices = slice_devices(
        &[
            sample(0, 80 * GIB, 80 * GIB, false),
            sample(1, 80 * GIB, 80 * GIB, true),
        ],
        &BTreeMap::new(),
        GIB,
        0,
    );
    let listed: Vec<(&str, Option<&str>)> = devices
        .iter()
        .map(|d| (d.name.as_str(), d.unhealthy.as_deref()))
        .collect();
    assert_eq!(listed, [("gpu-0", Some("XID 79")), ("gpu-1", None)]);
}

#[test]
fn the_slice_is_written_on_change_beyond_the_threshold_only() {
    let before = slice_devices(
        &[sample(0, 80 * GIB, 80 * GIB, true)],
        &BTreeMap::new(),
        GIB,
        0,
    );
    assert_eq!(
        slice_publish_reason(None, &before, GIB),
        Some(SlicePublishReason::First)
    );
    assert_eq!(slice_publish_reason(Some(&before), &before, GIB), None);
    let slightly = slice_devices(
        &[sample(0, 80 * GIB, 79 * GIB + 1, true)],
        &BTreeMap::new(),
        GIB,
        0,
    );
    // 79 GiB + 1 byte floors to 79 GiB: moved by one step, the threshold.
    assert_eq!(
        slice_publish_reason(Some(&before), &slightly, GIB),
        Some(SlicePublishReason::CapacityMoved {
            device: "gpu-0".into(),
            from: 80 * GIB,
            to: 79 * GIB
        })
    );
    // A fall is written whatever the threshold: the scheduler would promise memory that is
    // gone. A rise waits for the threshold (a GPU is then under-offered for a while).
    assert_eq!(
        slice_publish_reason(Some(&before), &slightly, 4 * GIB),
        Some(SlicePublishReason::CapacityMoved {
            device: "gpu-0".into(),
            from: 80 * GIB,
            to: 79 * GIB
        })
    );
    assert_eq!(
        slice_publish_reason(Some(&slightly), &before, 2 * GIB),
        None
    );
    assert_eq!(
        slice_publish_reason(Some(&slightly), &before, GIB),
        Some(SlicePublishReason::CapacityMoved {
            device: "gpu-0".into(),
            from: 79 * GIB,
            to: 80 * GIB
        })
    );
    // Falling unhealthy (same capacity) is written at once, whatever the threshold: the taint.
    let unhealthy = slice_devices(
        &[sample(0, 80 * GIB, 80 * GIB, false)],
        &BTreeMap::new(),
        GIB,
        0,
    );
    let fell = slice_publish_reason(Some(&before), &unhealthy, 100 * GIB);
    assert_eq!(
        fell,
        Some(SlicePublishReason::FellUnhealthy {
            device: "gpu-0".into()
        })
    );
    assert_eq!(fell.map(|r| r.pace()), Some(SlicePace::Now));
    // Coming back, or a new reason, is written too, at the slow pace (as a rise).
    let eased = slice_publish_reason(Some(&unhealthy), &before, 100 * GIB);
    assert_eq!(
        eased,
        Some(SlicePublishReason::HealthEased {
            device: "gpu-0".into()
        })
    );
    assert_eq!(eased.map(|r| r.pace()), Some(SlicePace::Slow));
    let mut other_reason = unhealthy.clone();
    other_reason[0].unhealthy = Some("XID 48".into());
    assert_eq!(
        slice_publish_reason(Some(&unhealthy), &other_reason, 100 * GIB).map(|r| r.pace()),
        Some(SlicePace::Slow)
    );
    // Falls are soon, rises slow.
    assert_eq!(
        slice_publish_reason(Some(&before), &slightly, GIB).map(|r| r.pace()),
        Some(SlicePace::Soon)
    );
    assert_eq!(
        slice_publish_reason(Some(&slightly), &before, GIB).map(|r| r.pace()),
        Some(SlicePace::Slow)
    );
    assert_eq!(
        slice_publish_reason(Some(&before), &[], GIB),
        Some(SlicePublishReason::DevicesChanged),
        "a GPU gone"
    );
}

#[test]
fn a_one_gpu_claim_gets_the_single_limit_form() {
    let plan = plan_claim(
        "ml/llm",
        "5f0c-11",
        &[grant("gpu-0", "GPU-0", 6 * GIB)],
        &settings(DeviceListStrategy::Envvar),
    )
    .expect("plan");
    assert_eq!(plan.limits, [("GPU-0".to_string(), 6 * GIB)]);
    let file = parse_limit_file(&plan.limit_file).expect("the guard reads it");
    assert_eq!(
        file,
        LimitFile::Single {
            limit_bytes: 6 * GIB,
            gpu_uuid: "GPU-0".into()
        }
    );
    assert_eq!(
        plan.edits.envs[env::VRAM_LIMIT_BYTES],
        (6 * GIB).to_string()
    );
    assert_eq!(plan.edits.envs[env::NVIDIA_VISIBLE_DEVICES], "GPU-0");
    assert!(
        plan.edits.host_accounting_dir.ends_with("claim-5f0c-11"),
        "{:?}",
        plan.edits.host_accounting_dir
    );
    assert!(plan.edits.host_limit_file.ends_with("claim-5f0c-11.limit"));
}

#[test]
fn a_two_gpu_claim_gets_one_limit_per_gpu() {
    let plan = plan_claim(
        "ml/tp2",
        "uid-2",
        &[
            grant("gpu-0", "GPU-0", 20 * GIB),
            grant("gpu-1", "GPU-1", 20 * GIB),
        ],
        &settings(DeviceListStrategy::Cdi),
    )
    .expect("plan");
    let text = format!("GPU-0:{0},GPU-1:{0}", 20 * GIB);
    assert_eq!(plan.limit_file, format!("limits={text}\n"));
    assert_eq!(
        parse_limit_file(&plan.limit_file).expect("the guard reads it"),
        LimitFile::PerGpu(
            GpuLimits::new([("GPU-0", 20 * GIB), ("GPU-1", 20 * GIB)]).expect("valid")
        )
    );
    assert_eq!(plan.edits.envs[env::VRAM_LIMITS], text);
    assert_eq!(
        plan.edits.envs[env::VRAM_LIMIT_BYTES],
        (40 * GIB).to_string(),
        "the claim's whole memory, as every container gets it"
    );
    assert_eq!(
        plan.edits.cdi_devices,
        ["nvidia.com/gpu=GPU-0", "nvidia.com/gpu=GPU-1"]
    );
}

#[test]
fn two_requests_on_one_gpu_add_up() {
    let plan = plan_claim(
        "ml/two",
        "uid-3",
        &[
            grant("gpu-0", "GPU-0", 2 * GIB),
            grant("gpu-0", "GPU-0", 3 * GIB),
        ],
        &settings(DeviceListStrategy::Envvar),
    )
    .expect("plan");
    assert_eq!(plan.limits, [("GPU-0".to_string(), 5 * GIB)]);
}

#[test]
fn claims_with_nothing_to_prepare_are_refused_by_name() {
    let none = plan_claim("ml/empty", "u", &[], &settings(DeviceListStrategy::Envvar));
    assert_eq!(
        none.expect_err("no devices").to_string(),
        "claim ml/empty has no device of this driver in its allocation"
    );
    let zero = plan_claim(
        "ml/zero",
        "u",
        &[grant("gpu-3", "GPU-3", 0)],
        &settings(DeviceListStrategy::Envvar),
    );
    assert_eq!(
        zero.expect_err("no memory").to_string(),
        "claim ml/zero was granted no memory on device gpu-3"
    );
}

#[test]
fn claim_keys_are_one_safe_path_component() {
    assert_eq!(claim_key("8c1e-44/../x"), "claim-8c1e-44____x");
}

#[test]
fn driver_versions_become_semantic_versions() {
    for (raw, want) in [
        ("580.65.06", Some("580.65.6")),
        ("535.104.05", Some("535.104.5")),
        ("550.54", Some("550.54.0")),
        (" 570.00.00\n", Some("570.0.0")),
        ("450.80.02.01", Some("450.80.2+1")),
        ("580", None),
        ("580.65.06-beta", None),
        ("580..06", None),
        ("", None),
        ("1.2.3.4.5", None),
        ("99999999999999999999.1", None),
        ("+580.1", None),
    ] {
        assert_eq!(driver_version_semver(raw).as_deref(), want, "{raw:?}");
    }
}

#[test]
fn a_claims_use_is_its_pods_processes_on_its_gpu() {
    let limits = [("GPU-0".to_string(), 8 * GIB)];
    let llm = || ClaimUse {
        limits: &limits,
        pods: vec!["pod-a"],
        admin_access: false,
    };
    let process = |pid, used, pod: Option<&str>| ProcessSample {
        pid,
        used_bytes: Some(used),
        pod_uid: pod.map(str::to_string),
    };
    let mut gpu = sample(0, 80 * GIB, 59 * GIB, true);
    gpu.processes = Some(vec![
        process(1, 3 * GIB, Some("pod-a")),
        process(2, 2 * GIB, Some("pod-a")),
        process(3, 16 * GIB, None),
    ]);
    let gpus = std::slice::from_ref(&gpu);
    let grants = grants_by_gpu([llm()], gpus);
    assert_eq!(
        grants["GPU-0"],
        GrantsOnGpu {
            granted: 8 * GIB,
            unobserved: 3 * GIB
        }
    );

    // Two claims of one pod on the GPU (one container uses each): the pod's 5 GiB cannot be
    // told apart by claim, so the two 8 GiB grants are 16 GiB less 5 used, not each 8 GiB less
    // the pod's whole 5 GiB. A claim of another pod (using nothing yet) counts on its own.
    let other_limits = [("GPU-0".to_string(), 2 * GIB)];
    let other = ClaimUse {
        limits: &other_limits,
        pods: vec!["pod-b"],
        admin_access: false,
    };
    let grants = grants_by_gpu([llm(), other, llm()], gpus);
    assert_eq!(
        grants["GPU-0"],
        GrantsOnGpu {
            granted: 18 * GIB,
            unobserved: 11 * GIB + 2 * GIB
        }
    );
    // A claim linking two groups (reserved for both pods) joins them.
    let both = ClaimUse {
        limits: &other_limits,
        pods: vec!["pod-a", "pod-b"],
        admin_access: false,
    };
    let other = ClaimUse {
        limits: &other_limits,
        pods: vec!["pod-b"],
        admin_access: false,
    };
    let grants = grants_by_gpu([llm(), other, both], gpus);
    assert_eq!(
        grants["GPU-0"],
        GrantsOnGpu {
            granted: 12 * GIB,
            unobserved: 12 * GIB - 5 * GIB
        }
    );
}

#[test]
fn admin_access_claims_are_not_added_back_but_their_room_is_held() {
    // kube-scheduler subtracts no consumed capacity for admin-access results: adding such a
    // grant back would publish memory the admin pod may still take.
    let mut gpu = sample(0, 80 * GIB, 78 * GIB, true);
    gpu.processes = Some(vec![ProcessSample {
        pid: 1,
        used_bytes: Some(2 * GIB),
        pod_uid: Some("debug".into()),
    }]);
    let limits = [("GPU-0".to_string(), 8 * GIB)];
    let admin = ClaimUse {
        limits: &limits,
        pods: vec!["debug"],
        admin_access: true,
    };
    let grants = grants_by_gpu([admin], std::slice::from_ref(&gpu));
    assert_eq!(
        grants["GPU-0"],
        GrantsOnGpu {
            granted: 0,
            unobserved: 6 * GIB
        }
    );
    let headroom = GIB / 2;
    let devices = slice_devices(std::slice::from_ref(&gpu), &grants, GIB, headroom);
    // 78 GiB free, less the 6 GiB the admin pod may still take and the headroom.
    assert_eq!(devices[0].capacity_bytes, 71 * GIB);
    // What the scheduler may then hand out, plus everything the admin pod may hold, fits.
    assert!(devices[0].capacity_bytes + 8 * GIB + headroom <= 80 * GIB);
}

#[test]
fn a_reading_older_than_the_bound_taints_every_gpu() {
    use std::time::Duration;
    let samples = [
        sample(0, 80 * GIB, 80 * GIB, true),
        sample(1, 80 * GIB, 80 * GIB, false),
    ];
    let devices = slice_devices(&samples, &BTreeMap::new(), GIB, 0);
    let bound = reading_staleness_bound(Duration::from_secs(10));
    assert_eq!(bound, Duration::from_secs(90));
    assert_eq!(
        reading_staleness_bound(Duration::from_secs(60)),
        Duration::from_secs(180)
    );
    let fresh = mark_unread(devices.clone(), Duration::from_secs(89), bound);
    assert_eq!(fresh, devices);
    let stale = mark_unread(devices.clone(), Duration::from_secs(95), bound);
    assert_eq!(
        stale[0].unhealthy.as_deref(),
        Some("no GPU reading for 90s or more (the node agent cannot read the GPUs)")
    );
    assert_eq!(stale[1].unhealthy.as_deref(), Some("XID 79"));
    // Published at once, whatever the threshold: a healthy GPU fell unhealthy.
    let reason = slice_publish_reason(Some(&devices), &stale, 100 * GIB);
    assert_eq!(
        reason,
        Some(SlicePublishReason::FellUnhealthy {
            device: "gpu-0".into()
        })
    );
    assert_eq!(reason.map(|r| r.pace()), Some(SlicePace::Now));
    // Regression: the reason named the age, so every later wake-up while stale rewrote the
    // slice. Staying stale changes nothing.
    let staler = mark_unread(devices.clone(), Duration::from_secs(125), bound);
    assert_eq!(slice_publish_reason(Some(&stale), &staler, 100 * GIB), None);
}

#[test]
fn a_claim_is_allocated_again_when_its_results_or_its_limits_differ() {
    let pair = |d: &str, s: Option<&str>| (d.to_string(), s.map(str::to_string));
    let limits = |b: u64| vec![("GPU-0".to_string(), b)];
    fn seen<'a>(
        devices: &'a [(String, Option<String>)],
        limits: Option<&'a [(String, u64)]>,
    ) -> AllocationSeen<'a> {
        AllocationSeen { devices, limits }
    }
    let (l4, l8) = (limits(4 * GIB), limits(8 * GIB));
    let two = [pair("gpu-0", Some("a")), pair("gpu-1", Some("b"))];
    let swapped = [pair("gpu-1", Some("b")), pair("gpu-0", Some("a"))];
    let reshared = [pair("gpu-0", Some("c")), pair("gpu-1", Some("b"))];
    let moved = [pair("gpu-7", Some("a"))];
    // Same results, any order, same or unreadable limits: the same allocation.
    assert!(!allocated_again(
        seen(&two, Some(&l4)),
        seen(&swapped, Some(&l4))
    ));
    assert!(!allocated_again(seen(&two, Some(&l4)), seen(&two, None)));
    // Other results say so alone, even with limits unreadable (an unknown device).
    assert!(allocated_again(
        seen(&two, Some(&l4)),
        seen(&reshared, Some(&l4))
    ));
    assert!(allocated_again(seen(&two, Some(&l4)), seen(&moved, None)));
    // Same results, other limits.
    assert!(allocated_again(
        seen(&two, Some(&l4)),
        seen(&two, Some(&l8))
    ));
    // No results now: nothing new to prepare.
    assert!(!allocated_again(seen(&two, Some(&l4)), seen(&[], None)));
    // Same results and bytes on another GPU (the device renumbered): not a new allocation.
    let elsewhere = vec![("GPU-9".to_string(), 4 * GIB)];
    assert!(!allocated_again(
        seen(&two, Some(&l4)),
        seen(&two, Some(&elsewhere))
    ));
}

#[test]
fn a_device_that_names_another_gpu_now_is_a_change() {
    let map = |pairs: &'static [(&'static str, &'static str)]| {
        move |d: &str| {
            pairs
                .iter()
                .find(|(name, _)| *name == d)
                .map(|(_, u)| u.to_string())
        }
    };
    let as_prepared = map(&[("gpu-0", "GPU-A"), ("gpu-1", "GPU-B")]);
    assert_eq!(gpus_changed(["GPU-A"], ["gpu-0"], as_prepared), None);
    assert_eq!(
        gpus_changed(["GPU-B", "GPU-A"], ["gpu-1", "gpu-0", "gpu-0"], as_prepared),
        None,
        "any order, a device listed twice (two shares)"
    );
    // GPU-A gone: gpu-0 is GPU-B now, gpu-1 names nothing.
    let after = map(&[("gpu-0", "GPU-B")]);
    assert_eq!(
        gpus_changed(["GPU-A"], ["gpu-0"], after),
        Some(GpusChanged {
            then: vec!["GPU-A".into()],
            devices: vec!["gpu-0".into()],
            now: vec![Some("GPU-B".into())],
        })
    );
    assert_eq!(
        gpus_changed(["GPU-B"], ["gpu-1"], after).map(|c| c.now),
        Some(vec![None])
    );
    // Nothing prepared: nothing to compare.
    assert_eq!(gpus_changed([], ["gpu-0"], after), None);
}
