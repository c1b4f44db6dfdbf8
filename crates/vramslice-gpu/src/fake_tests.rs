use super::*;
use crate::{BackendKind, open};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;
const UUID_A: &str = "GPU-11111111-2222-3333-4444-555555555555";
const UUID_B: &str = "GPU-66666666-7777-8888-9999-000000000000";
const POD: &str = "0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0";

fn readings(yaml: &str) -> Result<Vec<GpuSample>, FakeFileError> {
    FakeNode::from_yaml(yaml)?.readings()
}

fn error_of(yaml: &str) -> String {
    readings(yaml)
        .expect_err("expected the file to be rejected")
        .to_string()
}

#[test]
fn full_example_parses() {
    let yaml = format!(
        "gpus:
  - uuid: {UUID_A}
    index: 0
    model: NVIDIA H100 80GB HBM3
    total: 80Gi
    used: 2Gi
    healthy: true
    processes:
      - pid: 4242
        used: 1Gi
        podUid: {POD}
      - pid: 4243
        used: 512Mi
  - uuid: {UUID_B}
    total: 42949672960
    healthy: false
    unhealthyReason: XID 79
"
    );
    let got = readings(&yaml).unwrap();
    assert_eq!(got.len(), 2);
    let a = &got[0];
    assert_eq!((a.index, a.uuid.as_str()), (0, UUID_A));
    assert_eq!(a.model, "NVIDIA H100 80GB HBM3");
    assert_eq!(
        (a.total_bytes, a.used_bytes, a.free_bytes),
        (80 * GIB, 2 * GIB, 78 * GIB)
    );
    assert_eq!(a.health, Health::Healthy);
    assert_eq!(
        a.listed_processes(),
        [
            ProcessSample {
                pid: 4242,
                used_bytes: Some(GIB),
                pod_uid: Some(POD.into())
            },
            ProcessSample {
                pid: 4243,
                used_bytes: Some(GIB / 2),
                pod_uid: None
            },
        ]
    );
    let b = &got[1];
    assert_eq!((b.index, b.model.as_str()), (1, DEFAULT_FAKE_MODEL));
    assert_eq!(
        (b.total_bytes, b.used_bytes, b.free_bytes),
        (40 * GIB, 0, 40 * GIB)
    );
    assert_eq!(
        b.health,
        Health::Unhealthy {
            reason: "XID 79".into()
        }
    );
}

#[test]
fn used_defaults_to_the_processes_sum() {
    let yaml = format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 8Gi\n    processes:\n      - {{pid: 1, used: 1Gi}}\n      - {{pid: 2, used: 2Gi}}\n"
    );
    let got = readings(&yaml).unwrap();
    assert_eq!((got[0].used_bytes, got[0].free_bytes), (3 * GIB, 5 * GIB));
}

#[test]
fn processes_unreadable_plays_a_driver_whose_process_list_fails() {
    let yaml = format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 8Gi\n    processesUnreadable: true\n    processes:\n      - {{pid: 1, used: 1Gi}}\n"
    );
    let got = readings(&yaml).unwrap();
    assert_eq!(got[0].processes, None, "unknown, not none");
    assert_eq!(
        got[0].used_bytes, GIB,
        "the hidden process still uses memory"
    );
    let listed = readings(&format!("gpus:\n  - uuid: {UUID_A}\n    total: 8Gi\n")).unwrap();
    assert_eq!(listed[0].processes, Some(vec![]));
}

#[test]
fn a_process_without_used_plays_a_driver_that_does_not_say() {
    let r = readings(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 8Gi\n    used: 3Gi\n    processes:\n      - {{pid: 7, used: 1Gi}}\n      - {{pid: 8}}\n"
    ))
    .unwrap();
    let got: Vec<_> = r[0]
        .listed_processes()
        .iter()
        .map(|p| (p.pid, p.used_bytes))
        .collect();
    assert_eq!(got, [(7, Some(GIB)), (8, None)]);
    assert_eq!(r[0].used_bytes, 3 * GIB);
}

#[test]
fn unhealthy_without_reason_gets_the_default_reason() {
    let yaml = format!("gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, healthy: false}}\n");
    assert_eq!(
        readings(&yaml).unwrap()[0].health,
        Health::Unhealthy {
            reason: DEFAULT_UNHEALTHY_REASON.into()
        }
    );
}

#[test]
fn readings_are_sorted_by_index() {
    let yaml = format!(
        "gpus:\n  - {{uuid: {UUID_A}, index: 3, total: 1Gi}}\n  - {{uuid: {UUID_B}, index: 1, total: 1Gi}}\n"
    );
    let got = readings(&yaml).unwrap();
    assert_eq!(
        got.iter()
            .map(|r| (r.index, r.uuid.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, UUID_B), (3, UUID_A)]
    );
}

#[test]
fn empty_gpu_list_is_a_node_without_gpus() {
    assert_eq!(readings("gpus: []\n").unwrap(), vec![]);
}

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    for (yaml, key) in [
        ("gpus: []\nextra: 1\n".to_string(), "extra"),
        (
            format!("gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, memory: 2Gi}}\n"),
            "memory",
        ),
        (
            format!(
                "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes:\n      - {{pid: 1, used: 1Mi, pod: x}}\n"
            ),
            "pod",
        ),
        (
            format!("gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, unhealthy_reason: x}}\n"),
            "unhealthy_reason",
        ),
    ] {
        let err = FakeNode::from_yaml(&yaml).expect_err(key).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn missing_required_fields_are_rejected() {
    assert!(
        FakeNode::from_yaml("{}\n")
            .unwrap_err()
            .to_string()
            .contains("gpus")
    );
    assert!(
        FakeNode::from_yaml(" \n")
            .unwrap_err()
            .to_string()
            .contains("empty")
    );
    let err = FakeNode::from_yaml(&format!("gpus:\n  - {{uuid: {UUID_A}}}\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("total"), "{err}");
}

#[test]
fn duplicate_uuid_is_named() {
    let err = error_of(&format!(
        "gpus:\n  - {{uuid: {UUID_A}, total: 1Gi}}\n  - {{uuid: {UUID_A}, total: 1Gi}}\n"
    ));
    assert!(
        err.contains("gpus[1]") && err.contains(UUID_A) && err.contains("duplicate uuid"),
        "{err}"
    );
}

#[test]
fn duplicate_index_including_defaulted_ones_is_named() {
    let err = error_of(&format!(
        "gpus:\n  - {{uuid: {UUID_A}, total: 1Gi}}\n  - {{uuid: {UUID_B}, index: 0, total: 1Gi}}\n"
    ));
    assert!(
        err.contains("gpus[1]") && err.contains("duplicate index 0"),
        "{err}"
    );
}

#[test]
fn invalid_uuids_are_rejected() {
    for uuid in ["\"\"", "\"GPU a\"", "\"GPU-a::1\""] {
        let err = error_of(&format!("gpus:\n  - {{uuid: {uuid}, total: 1Gi}}\n"));
        assert!(
            err.contains("gpus[0].uuid") && err.contains("not a valid GPU UUID"),
            "{err}"
        );
    }
}

#[test]
fn used_above_total_is_rejected() {
    let err = error_of(&format!(
        "gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, used: 2Gi}}\n"
    ));
    assert!(
        err.contains(UUID_A) && err.contains("more than total"),
        "{err}"
    );
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes: [{{pid: 1, used: 2Gi}}]\n"
    ));
    assert!(err.contains("more than total"), "{err}");
}

#[test]
fn processes_above_used_are_rejected() {
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 8Gi\n    used: 1Gi\n    processes: [{{pid: 1, used: 1Gi}}, {{pid: 2, used: 1Mi}}]\n"
    ));
    assert!(
        err.contains("processes use") && err.contains("more than used"),
        "{err}"
    );
}

#[test]
fn bad_quantities_name_the_field() {
    let err = error_of(&format!("gpus:\n  - {{uuid: {UUID_A}, total: 80GiB}}\n"));
    assert!(
        err.contains("gpus[0]") && err.contains(".total") && err.contains("80GiB"),
        "{err}"
    );
    let err = error_of(&format!(
        "gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, used: lots}}\n"
    ));
    assert!(err.contains(".used") && err.contains("lots"), "{err}");
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes: [{{pid: 1, used: 1m}}]\n"
    ));
    assert!(err.contains(".processes[0].used"), "{err}");
    let err = FakeNode::from_yaml(&format!("gpus:\n  - {{uuid: {UUID_A}, total: -5}}\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("negative"), "{err}");
    let err = FakeNode::from_yaml(&format!("gpus:\n  - {{uuid: {UUID_A}, total: 1.5}}\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("whole number"), "{err}");
}

#[test]
fn bad_processes_are_rejected() {
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes: [{{pid: 0, used: 1}}]\n"
    ));
    assert!(err.contains("processes[0].pid"), "{err}");
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes: [{{pid: 5, used: 1}}, {{pid: 5, used: 2}}]\n"
    ));
    assert!(
        err.contains("processes[1].pid") && err.contains("duplicate pid 5"),
        "{err}"
    );
    let err = error_of(&format!(
        "gpus:\n  - uuid: {UUID_A}\n    total: 1Gi\n    processes: [{{pid: 5, used: 1, podUid: \"\"}}]\n"
    ));
    assert!(err.contains("podUid"), "{err}");
}

#[test]
fn reason_on_a_healthy_gpu_is_rejected() {
    let err = error_of(&format!(
        "gpus:\n  - {{uuid: {UUID_A}, total: 1Gi, unhealthyReason: XID 79}}\n"
    ));
    assert!(
        err.contains("unhealthyReason") && err.contains("healthy is true"),
        "{err}"
    );
}

fn node(gpus: Vec<FakeGpu>) -> FakeNode {
    FakeNode {
        gpus,
        driver_version: None,
    }
}

#[test]
fn missing_file_is_a_read_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yaml");
    let err = FakeBackend::new(&path).read().unwrap_err();
    assert!(matches!(err, BackendError::FakeFileRead { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.yaml"), "{err}");
}

#[test]
fn invalid_file_is_an_invalid_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    std::fs::write(&path, "gpus: [ {uuid: GPU-a, total: 1Gi\n").unwrap();
    let err = FakeBackend::new(&path).read().unwrap_err();
    assert!(
        matches!(err, BackendError::FakeFileInvalid { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("gpus.yaml"), "{err}");
    std::fs::write(&path, "gpus:\n  - {uuid: GPU-a, total: 1Gi, used: 2Gi}\n").unwrap();
    let err = FakeBackend::new(&path).read().unwrap_err();
    assert!(err.to_string().contains("more than total"), "{err}");
}

#[test]
fn rereads_the_file_on_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    let backend = FakeBackend::new(&path);
    let mut a = FakeGpu::new(UUID_A, "16Gi");
    let b = FakeGpu::new(UUID_B, 8 * GIB);
    write_fake_file(&path, &node(vec![a.clone(), b.clone()])).unwrap();
    let first = backend.read().unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].used_bytes, 0);

    // Live usage grows.
    a.processes.push(FakeProcess {
        pid: 77,
        used: Some("3Gi".into()),
        pod_uid: Some(POD.into()),
    });
    write_fake_file(&path, &node(vec![a.clone(), b.clone()])).unwrap();
    let second = backend.read().unwrap();
    assert_eq!(
        (second[0].used_bytes, second[0].free_bytes),
        (3 * GIB, 13 * GIB)
    );
    assert_eq!(
        second[0].listed_processes()[0].pod_uid.as_deref(),
        Some(POD)
    );

    // The GPU goes unhealthy.
    a.healthy = false;
    a.unhealthy_reason = Some("XID 48".into());
    write_fake_file(&path, &node(vec![a.clone(), b.clone()])).unwrap();
    assert_eq!(
        backend.read().unwrap()[0].health,
        Health::Unhealthy {
            reason: "XID 48".into()
        }
    );

    // GPU A disappears; B keeps its index (1) because it is explicit.
    let mut b_fixed = b.clone();
    b_fixed.index = Some(1);
    write_fake_file(&path, &node(vec![b_fixed])).unwrap();
    let fourth = backend.read().unwrap();
    assert_eq!(fourth.len(), 1);
    assert_eq!((fourth[0].uuid.as_str(), fourth[0].index), (UUID_B, 1));

    // A broken write is an error; the caller keeps its last good reading.
    std::fs::write(&path, "gpus: {").unwrap();
    assert!(backend.read().is_err());
}

#[test]
fn write_then_load_round_trips_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    let mut gpu = FakeGpu::new(UUID_A, "80Gi");
    gpu.index = Some(4);
    gpu.model = Some("NVIDIA H100 80GB HBM3".into());
    gpu.used = Some(FakeBytes::from(2 * GIB));
    gpu.healthy = false;
    gpu.unhealthy_reason = Some("XID 79".into());
    gpu.processes.push(FakeProcess {
        pid: 9,
        used: Some(GIB.into()),
        pod_uid: None,
    });
    let mut original = node(vec![gpu, FakeGpu::new(UUID_B, 1)]);
    original.driver_version = Some("580.65.06".into());
    write_fake_file(&path, &original).unwrap();
    assert_eq!(FakeBackend::new(&path).load().unwrap(), original);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("gpus.yaml")]);
}

#[test]
fn open_fake_validates_the_file_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    let kind = BackendKind::Fake { path: path.clone() };
    assert!(matches!(
        open(&kind),
        Err(BackendError::FakeFileRead { .. })
    ));
    write_fake_file(&path, &node(vec![FakeGpu::new(UUID_A, "1Gi")])).unwrap();
    let backend = open(&kind).unwrap();
    assert_eq!(backend.name(), "fake");
    assert_eq!(backend.read().unwrap()[0].uuid, UUID_A);
    assert_eq!(backend.driver_version().unwrap(), None);
    std::fs::write(
        &path,
        "driverVersion: 550.54.15\ngpus:\n  - {uuid: GPU-a, total: 1Gi}\n",
    )
    .unwrap();
    assert_eq!(
        backend.driver_version().unwrap().as_deref(),
        Some("550.54.15")
    );
}

#[test]
fn oversized_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpus.yaml");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(MAX_FILE_BYTES + 1).unwrap();
    let err = FakeBackend::new(&path).read().unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}

fn gpu_strategy() -> impl Strategy<Value = (u64, Vec<u64>, bool)> {
    (
        1u64..(1 << 40),
        prop::collection::vec(0u64..(1 << 30), 0..5),
        any::<bool>(),
    )
}

proptest! {
    #[test]
    fn from_yaml_never_panics(text in any::<String>()) {
        if let Ok(node) = FakeNode::from_yaml(&text) {
            let _ = node.readings();
        }
    }

    #[test]
    fn valid_nodes_round_trip_and_balance(gpus in prop::collection::vec(gpu_strategy(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.yaml");
        let fake = node(gpus.iter().enumerate().map(|(i, (total, procs, as_text))| {
            let mut g = FakeGpu::new(format!("GPU-{i:08x}"), if *as_text {
                FakeBytes::Quantity(total.to_string())
            } else {
                FakeBytes::Bytes(*total)
            });
            g.processes = procs.iter().enumerate().map(|(p, used)| FakeProcess {
                pid: p as u32 + 1,
                used: Some((*used).min(*total / 8).into()),
                pod_uid: None,
            }).collect();
            g
        }).collect());
        write_fake_file(&path, &fake).unwrap();
        let backend = FakeBackend::new(&path);
        prop_assert_eq!(&backend.load().unwrap(), &fake);
        let got = backend.read().unwrap();
        prop_assert_eq!(got.len(), gpus.len());
        for (reading, (total, _, _)) in got.iter().zip(&gpus) {
            prop_assert_eq!(reading.total_bytes, *total);
            prop_assert_eq!(reading.used_bytes + reading.free_bytes, reading.total_bytes);
            let sum: u64 = reading.listed_processes().iter().filter_map(|p| p.used_bytes).sum();
            prop_assert_eq!(sum, reading.used_bytes);
        }
    }
}
