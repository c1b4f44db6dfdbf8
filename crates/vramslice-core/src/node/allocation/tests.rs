use super::*;
use crate::device_id::DeviceId;
use crate::node::inventory::GpuUnitsView;
use crate::units::VramUnit;
use proptest::prelude::*;

fn inventory() -> GpuInventory {
    GpuInventory::new(
        VramUnit::Gib1,
        vec![
            GpuUnitsView {
                uuid: "GPU-a".into(),
                index: 0,
                total_bytes: 80 << 30,
                healthy: true,
            },
            GpuUnitsView {
                uuid: "GPU-b".into(),
                index: 1,
                total_bytes: 24 << 30,
                healthy: true,
            },
        ],
    )
}

fn settings(injection: InjectionMode, strategy: DeviceListStrategy) -> AllocationSettings {
    AllocationSettings {
        injection,
        device_list_strategy: strategy,
        guard_library_host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
        preload_file_host_path: "/var/lib/vramslice/ld.so.preload".into(),
        accounting_root: "/var/lib/vramslice/accounting".into(),
    }
}

fn env_of<'a>(a: &'a ContainerAllocation, k: &str) -> Option<&'a str> {
    a.envs.get(k).map(String::as_str)
}

#[test]
fn ld_preload_env_mode_sets_everything_the_contract_lists() {
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
    let a = plan_allocation(&inventory(), &s, &["GPU-b::3", "GPU-b::1", "GPU-b::2"]).unwrap();
    assert_eq!(a.gpu_uuid, "GPU-b");
    assert_eq!(a.units, 3);
    assert_eq!(a.limit_bytes, 3 << 30);
    assert_eq!(env_of(&a, "VRAMSLICE_VRAM_LIMIT_BYTES"), Some("3221225472"));
    assert_eq!(env_of(&a, "VRAMSLICE_GPU_UUID"), Some("GPU-b"));
    assert_eq!(env_of(&a, "NVIDIA_VISIBLE_DEVICES"), Some("GPU-b"));
    assert_eq!(
        env_of(&a, "VRAMSLICE_ACCOUNTING_DIR"),
        Some(ACCOUNTING_CONTAINER_DIR)
    );
    assert_eq!(env_of(&a, "LD_PRELOAD"), Some(GUARD_CONTAINER_PATH));
    assert_eq!(
        env_of(&a, "VRAMSLICE_LIMIT_FILE"),
        Some(LIMIT_FILE_CONTAINER_PATH)
    );
    assert_eq!(a.envs.len(), 6);
    assert!(a.cdi_devices.is_empty());
    let key = allocation_key("GPU-b", &[1, 2, 3]);
    assert_eq!(
        a.host_accounting_dir,
        Path::new("/var/lib/vramslice/accounting").join(&key)
    );
    assert_eq!(
        a.mounts,
        vec![
            MountSpec {
                container_path: ACCOUNTING_CONTAINER_DIR.into(),
                host_path: format!("/var/lib/vramslice/accounting/{key}"),
                read_only: false,
            },
            MountSpec {
                container_path: "/var/run/vramslice/limit".into(),
                host_path: format!("/var/lib/vramslice/accounting/{key}.limit"),
                read_only: true,
            },
            MountSpec {
                container_path: GUARD_CONTAINER_PATH.into(),
                host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
                read_only: true,
            },
        ]
    );
}

#[test]
fn preload_file_mode_mounts_the_file_and_sets_no_ld_preload() {
    let s = settings(InjectionMode::LdSoPreloadFile, DeviceListStrategy::Envvar);
    let a = plan_allocation(&inventory(), &s, &["GPU-a::0"]).unwrap();
    assert_eq!(env_of(&a, "LD_PRELOAD"), None);
    assert_eq!(a.mounts.len(), 4);
    assert_eq!(
        a.mounts[3],
        MountSpec {
            container_path: "/etc/ld.so.preload".into(),
            host_path: "/var/lib/vramslice/ld.so.preload".into(),
            read_only: true,
        }
    );
    assert_eq!(a.mounts[2].container_path, GUARD_CONTAINER_PATH);
    assert_eq!(preload_file_content(), format!("{GUARD_CONTAINER_PATH}\n"));
}

#[test]
fn none_mode_mounts_only_the_accounting_dir() {
    let s = settings(InjectionMode::None, DeviceListStrategy::Envvar);
    let a = plan_allocation(&inventory(), &s, &["GPU-a::0"]).unwrap();
    assert_eq!(env_of(&a, "LD_PRELOAD"), None);
    assert_eq!(a.mounts.len(), 2);
    assert_eq!(a.mounts[0].container_path, ACCOUNTING_CONTAINER_DIR);
    assert!(
        a.mounts[1].read_only,
        "the limit file is read-only in every mode"
    );
}

#[test]
fn cdi_strategy_names_a_cdi_device_instead_of_the_env_var() {
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Cdi);
    let a = plan_allocation(&inventory(), &s, &["GPU-a::5"]).unwrap();
    assert_eq!(a.cdi_devices, vec!["nvidia.com/gpu=GPU-a".to_string()]);
    assert_eq!(env_of(&a, "NVIDIA_VISIBLE_DEVICES"), None);
    assert_eq!(env_of(&a, "VRAMSLICE_GPU_UUID"), Some("GPU-a"));
}

#[test]
fn equal_shares_of_several_gpus_get_per_gpu_limits() {
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
    let a = plan_allocation(
        &inventory(),
        &s,
        &["GPU-b::0", "GPU-a::5", "GPU-b::1", "GPU-a::6"],
    )
    .unwrap();
    assert_eq!(a.gpu_uuid, "GPU-a,GPU-b");
    assert_eq!(a.units, 4);
    assert_eq!(a.limit_bytes, 4 << 30);
    assert_eq!(
        env_of(&a, "VRAMSLICE_VRAM_LIMITS"),
        Some("GPU-a:2147483648,GPU-b:2147483648")
    );
    assert_eq!(env_of(&a, "NVIDIA_VISIBLE_DEVICES"), Some("GPU-a,GPU-b"));
    // units × unit bytes, as every container gets it (the sum over its GPUs); no one GPU's UUID.
    assert_eq!(env_of(&a, "VRAMSLICE_VRAM_LIMIT_BYTES"), Some("4294967296"));
    assert_eq!(env_of(&a, "VRAMSLICE_GPU_UUID"), None);
    assert_eq!(
        crate::container::limit::gpu_limits_file_content(&a.limits),
        "limits=GPU-a:2147483648,GPU-b:2147483648\n"
    );
    assert_eq!(
        a.host_accounting_dir,
        std::path::Path::new("/var/lib/vramslice/accounting").join(
            allocation_key_for_ids(&["GPU-a::5", "GPU-a::6", "GPU-b::0", "GPU-b::1"]).unwrap()
        )
    );
    let cdi = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Cdi);
    let a = plan_allocation(&inventory(), &cdi, &["GPU-b::0", "GPU-a::5"]).unwrap();
    assert_eq!(
        a.cdi_devices,
        vec!["nvidia.com/gpu=GPU-a", "nvidia.com/gpu=GPU-b"]
    );
    // One GPU keeps the single-GPU form.
    let one = plan_allocation(&inventory(), &s, &["GPU-b::3"]).unwrap();
    assert_eq!(
        crate::container::limit::gpu_limits_file_content(&one.limits),
        crate::container::limit::limit_file_content(1 << 30, "GPU-b")
    );
}

/// What the plugin gives a container, read back as the guard and the sidecar read it: the
/// limits stand as planned, with nothing to warn about, on one GPU and spanning two.
#[test]
fn a_containers_environment_and_limit_file_read_back_without_a_message() {
    use crate::container::limit::{
        FileRead, LimitEnv, Limits, gpu_limits_file_content, resolve_limits,
    };
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
    for ids in [
        &["GPU-b::3", "GPU-b::4"][..],
        &["GPU-b::0", "GPU-a::5", "GPU-b::1", "GPU-a::6"][..],
    ] {
        let a = plan_allocation(&inventory(), &s, ids).unwrap();
        let files = vec![(
            "/var/run/vramslice/limit".to_string(),
            FileRead::Text(gpu_limits_file_content(&a.limits)),
        )];
        let mut msgs = Vec::new();
        let resolved = resolve_limits(
            LimitEnv {
                limit_bytes: env_of(&a, "VRAMSLICE_VRAM_LIMIT_BYTES"),
                limits: env_of(&a, "VRAMSLICE_VRAM_LIMITS"),
            },
            &files,
            &mut msgs,
        );
        assert!(msgs.is_empty(), "{ids:?}: {msgs:?}");
        match resolved.limits {
            Limits::PerGpu(g) => assert_eq!(g, a.limits, "{ids:?}"),
            Limits::Single(bytes) => {
                assert_eq!(a.limits.len(), 1, "{ids:?}");
                assert_eq!(bytes, a.limit_bytes, "{ids:?}");
            }
            other => panic!("{ids:?}: {other:?}"),
        }
    }
}

#[test]
fn errors_carry_the_core_text() {
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
    let err = plan_allocation(
        &inventory(),
        &s,
        &["GPU-a::0", "GPU-a::1", "GPU-a::2", "GPU-b::0"],
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "IDs span GPU-a (3 units) and GPU-b (1 unit): vramslice maps several GPUs only as equal shares"
    );
    let err = plan_allocation(&inventory(), &s, &["GPU-a::0", "GPU-b::30"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device ID GPU-b::30 is unknown: GPU GPU-b advertises units 0..24"
    );
    let err = plan_allocation(&inventory(), &s, &["GPU-b::24"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device ID GPU-b::24 is unknown: GPU GPU-b advertises units 0..24"
    );
    let err = plan_allocation(&inventory(), &s, &["GPU-zz::0"]).unwrap_err();
    assert_eq!(err.to_string(), "GPU GPU-zz is not on this node");
    let err = plan_allocation(&inventory(), &s, &["nonsense"]).unwrap_err();
    assert!(err.to_string().contains("\"nonsense\""), "{err}");
    let err = plan_allocation::<&str>(&inventory(), &s, &[]).unwrap_err();
    assert_eq!(err, AllocationError::Ids(DeviceIdError::Empty));
}

#[test]
fn modes_and_strategies_parse_and_name_bad_words() {
    for m in InjectionMode::ALL {
        assert_eq!(m.as_str().parse::<InjectionMode>(), Ok(m));
    }
    assert_eq!(
        "cdi".parse::<DeviceListStrategy>(),
        Ok(DeviceListStrategy::Cdi)
    );
    assert_eq!(
        "envvar".parse::<DeviceListStrategy>(),
        Ok(DeviceListStrategy::Envvar)
    );
    let err = "preload".parse::<InjectionMode>().unwrap_err().to_string();
    assert_eq!(
        err,
        "unknown injection mode \"preload\": expected one of ld-preload-env, ld-so-preload-file, none"
    );
    assert!(
        "CDI"
            .parse::<DeviceListStrategy>()
            .unwrap_err()
            .to_string()
            .contains("\"CDI\"")
    );
}

#[test]
fn keys_are_path_safe_and_readable() {
    assert_eq!(
        allocation_key("GPU-a", &[3, 1]),
        allocation_key("GPU-a", &[1, 3])
    );
    let key = allocation_key("GPU-a/../x y", &[4, 5]);
    assert!(key.starts_with("GPU-a_.._x_y.u4.n2."), "{key}");
    assert!(!key.contains('/'));
    assert_eq!(
        allocation_key_for_ids(&["GPU-a::1", "GPU-a::0"]).unwrap(),
        allocation_key("GPU-a", &[0, 1])
    );
    assert!(allocation_key_for_ids(&["GPU-a::1", "GPU-a::2", "GPU-b::0"]).is_err());
    // Equal shares of several GPUs: a key of the same shape, from the set of IDs alone.
    let key = allocation_key_for_ids(&["GPU-b::0", "GPU-a::1", "GPU-b::4", "GPU-a::2"]).unwrap();
    assert!(key.starts_with("GPU-a.g2.u1.n4."), "{key}");
    assert_eq!(
        key,
        allocation_key_for_ids(&["GPU-a::2", "GPU-b::4", "GPU-a::1", "GPU-b::0"]).unwrap()
    );
    assert_ne!(
        key,
        allocation_key_for_ids(&["GPU-a::1", "GPU-a::2", "GPU-b::0", "GPU-b::5"]).unwrap()
    );
    assert_eq!(crate::node::sweep::entry_key(&key), Some(key.as_str()));
    // Pinned value: the name must not change between releases (running pods keep their dir).
    assert_eq!(
        allocation_key("GPU-a", &[0]),
        format!("GPU-a.u0.n1.{:016x}", {
            let mut h = Fnv1a::new();
            h.write(b"GPU-a,0");
            h.finish()
        })
    );
}

#[test]
fn the_guard_is_mounted_under_its_library_name() {
    assert!(GUARD_CONTAINER_PATH.ends_with(crate::names::GUARD_LIBRARY));
}

#[test]
fn limit_file_is_beside_the_writable_dir_never_inside_it() {
    let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
    let a = plan_allocation(&inventory(), &s, &["GPU-a::2", "GPU-a::3"]).unwrap();
    assert!(!a.host_limit_file.starts_with(&a.host_accounting_dir));
    assert_eq!(a.host_limit_file.parent(), a.host_accounting_dir.parent());
    let limit = a
        .mounts
        .iter()
        .find(|m| m.container_path == LIMIT_FILE_CONTAINER_PATH)
        .unwrap();
    assert!(limit.read_only);
    assert_eq!(limit.host_path, a.host_limit_file.to_string_lossy());
    assert!(!LIMIT_FILE_CONTAINER_PATH.starts_with(ACCOUNTING_CONTAINER_DIR));
}

proptest! {
    #[test]
    fn key_depends_only_on_the_set_of_ids(
        units in proptest::collection::btree_set(0u64..200, 1..20), seed in any::<u64>()
    ) {
        let sorted: Vec<u64> = units.iter().copied().collect();
        let mut shuffled = sorted.clone();
        let n = shuffled.len();
        shuffled.rotate_left((seed as usize) % n);
        if seed % 2 == 0 { shuffled.reverse(); }
        prop_assert_eq!(allocation_key("GPU-x", &sorted), allocation_key("GPU-x", &shuffled));
        let ids: Vec<String> = shuffled.iter().map(|k| DeviceId::new("GPU-x", *k).to_string()).collect();
        prop_assert_eq!(allocation_key_for_ids(&ids).unwrap(), allocation_key("GPU-x", &sorted));
    }

    #[test]
    fn different_sets_get_different_keys(
        a in proptest::collection::btree_set(0u64..64, 1..8),
        b in proptest::collection::btree_set(0u64..64, 1..8),
    ) {
        prop_assume!(a != b);
        let a: Vec<u64> = a.into_iter().collect();
        let b: Vec<u64> = b.into_iter().collect();
        prop_assert_ne!(allocation_key("GPU-x", &a), allocation_key("GPU-x", &b));
    }

    #[test]
    fn limit_is_units_times_unit_and_within_the_gpu(
        k in 1u64..24, start in 0u64..24, unit_ix in 0usize..4
    ) {
        let unit = VramUnit::ALL[unit_ix];
        let inv = GpuInventory::new(unit, vec![GpuUnitsView {
            uuid: "GPU-b".into(), index: 0, total_bytes: 24 << 30, healthy: true,
        }]);
        let units = unit.units_in(24 << 30);
        let ids: Vec<String> = (start..start + k).map(|u| format!("GPU-b::{u}")).collect();
        let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
        match plan_allocation(&inv, &s, &ids) {
            Ok(a) => {
                prop_assert!(start + k <= units);
                prop_assert_eq!(a.limit_bytes, k * unit.bytes());
                prop_assert!(a.limit_bytes <= 24 << 30);
                prop_assert_eq!(a.envs.get("VRAMSLICE_VRAM_LIMIT_BYTES"), Some(&a.limit_bytes.to_string()));
            }
            Err(e) => {
                prop_assert!(start + k > units);
                prop_assert!(matches!(e, AllocationError::Inventory(InventoryError::UnknownUnit { .. })), "{}", e);
            }
        }
    }
}

#[test]
fn missing_guard_library_only_matters_with_injection() {
    let path = "/var/lib/vramslice/lib/libvramslice_guard.so";
    let gone = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    let none = settings(InjectionMode::None, DeviceListStrategy::Envvar);
    assert_eq!(missing_guard_library(&none, |_| gone()), None);
    for injection in [InjectionMode::LdSoPreloadFile, InjectionMode::LdPreloadEnv] {
        let on = settings(injection, DeviceListStrategy::Envvar);
        assert_eq!(missing_guard_library(&on, |_| Ok(true)), None);
        let looked_at = std::cell::RefCell::new(None);
        let dir = missing_guard_library(&on, |p| {
            *looked_at.borrow_mut() = Some(p.to_path_buf());
            Ok(false)
        })
        .expect("a directory at the path is refused");
        assert_eq!(looked_at.into_inner().as_deref(), Some(Path::new(path)));
        assert!(dir.contains(path) && dir.contains("is not a file"), "{dir}");
        assert!(dir.contains("injection.guardLibraryHostPath"), "{dir}");
        let unread = missing_guard_library(&on, |_| gone()).expect("a missing library is refused");
        assert!(
            unread.contains("cannot be read") && unread.contains(path),
            "{unread}"
        );
    }
}
