//! Unit tests of `dra`.

use super::*;
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult,
    ResourceClaimConsumerReference, ResourceClaimStatus,
};

const GIB: u64 = 1 << 30;

fn result(
    driver: &str,
    pool: &str,
    device: &str,
    memory: Option<&str>,
) -> DeviceRequestAllocationResult {
    DeviceRequestAllocationResult {
        driver: driver.into(),
        pool: pool.into(),
        device: device.into(),
        request: "vram".into(),
        share_id: Some(format!("share-{device}")),
        consumed_capacity: memory
            .map(|m| BTreeMap::from([(DRA_CAPACITY_MEMORY.to_string(), Quantity(m.into()))])),
        ..DeviceRequestAllocationResult::default()
    }
}

fn claim(results: Vec<DeviceRequestAllocationResult>) -> ResourceClaim {
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some("ml".into()),
            name: Some("llm".into()),
            uid: Some("uid-1".into()),
            ..ObjectMeta::default()
        },
        status: Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(results),
                    config: None,
                }),
                ..AllocationResult::default()
            }),
            reserved_for: Some(vec![ResourceClaimConsumerReference {
                resource: "pods".into(),
                name: "llm-0".into(),
                uid: "pod-uid".into(),
                api_group: None,
            }]),
            ..ResourceClaimStatus::default()
        }),
        ..ResourceClaim::default()
    }
}

fn uuid_of(device: &str) -> Option<String> {
    device.strip_prefix("gpu-").map(|i| format!("GPU-{i}"))
}

#[test]
fn only_this_drivers_results_in_this_pool_are_read() {
    let c = claim(vec![
        result(DRA_DRIVER, "node-a", "gpu-0", Some("6Gi")),
        result("gpu.nvidia.com", "node-a", "gpu-0", Some("1Gi")),
        result(DRA_DRIVER, "node-b", "gpu-1", Some("2Gi")),
        result(DRA_DRIVER, "node-a", "gpu-1", Some("6442450944")),
    ]);
    let on_node = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect("readable");
    let bytes: Vec<(String, u64)> = on_node
        .grants
        .iter()
        .map(|g| (g.gpu_uuid.clone(), g.bytes))
        .collect();
    assert_eq!(
        bytes,
        [
            ("GPU-0".to_string(), 6 * GIB),
            ("GPU-1".to_string(), 6 * GIB)
        ]
    );
    assert_eq!(on_node.share_ids[0].as_deref(), Some("share-gpu-0"));
    assert_eq!(on_node.pods, [("llm-0".to_string(), "pod-uid".to_string())]);
    assert!(!on_node.admin_access);
    let mut admin = result(DRA_DRIVER, "node-a", "gpu-0", Some("6Gi"));
    admin.admin_access = Some(true);
    let c = claim(vec![
        result(DRA_DRIVER, "node-a", "gpu-1", Some("2Gi")),
        admin,
    ]);
    let on_node = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect("readable");
    assert!(
        on_node.admin_access,
        "an admin-access result makes the claim admin"
    );
}

#[test]
fn consumed_memory_is_read_under_its_qualified_name_too() {
    let mut qualified = result(DRA_DRIVER, "node-a", "gpu-0", None);
    qualified.consumed_capacity = Some(BTreeMap::from([(
        format!("{DRA_DRIVER}/{DRA_CAPACITY_MEMORY}"),
        Quantity("3Gi".into()),
    )]));
    let c = claim(vec![qualified]);
    let on_node = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect("readable");
    assert_eq!(on_node.grants[0].bytes, 3 * GIB);
}

#[test]
fn claims_that_cannot_be_prepared_say_why() {
    let c = claim(vec![result(DRA_DRIVER, "node-a", "gpu-0", Some("6Gi"))]);
    let err = claim_on_node(&c, "other", "node-a", uuid_of).expect_err("uid");
    assert_eq!(
        err.to_string(),
        "claim ml/llm has UID uid-1, the kubelet asked for other"
    );
    let c = claim(vec![result(DRA_DRIVER, "node-a", "gpu-9", Some("6Gi"))]);
    let err = claim_on_node(&c, "uid-1", "node-a", |_| None).expect_err("device");
    assert!(
        err.to_string().contains("device gpu-9 of pool node-a"),
        "{err}"
    );
    let c = claim(vec![result(DRA_DRIVER, "node-a", "gpu-0", Some("lots"))]);
    let err = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect_err("memory");
    assert!(
        err.to_string().contains("\"lots\" is not a byte count"),
        "{err}"
    );
    let c = claim(vec![result(DRA_DRIVER, "node-a", "gpu-0", None)]);
    let err = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect_err("whole device");
    assert!(
        err.to_string()
            .contains("DRAConsumableCapacity feature gate"),
        "{err}"
    );
    let mut c = claim(vec![]);
    c.status = None;
    let err = claim_on_node(&c, "uid-1", "node-a", uuid_of).expect_err("not allocated");
    assert_eq!(err.to_string(), "claim ml/llm is not allocated");
}

/// One H100 whose published capacity is 63 GiB.
fn h100_with_63_gib() -> SliceDevice {
    SliceDevice {
        name: "gpu-0".into(),
        uuid: "GPU-0".into(),
        model: "NVIDIA H100".into(),
        index: 0,
        advertised_bytes: 80 * GIB,
        capacity_bytes: 63 * GIB,
        unhealthy: None,
    }
}

#[test]
fn the_slice_has_one_pool_per_node_and_memory_in_steps() {
    let devices = [h100_with_63_gib()];
    let slice = resource_slice(
        &devices,
        &SliceSettings {
            node: "node-a".into(),
            node_uid: Some("n-uid".into()),
            step_bytes: GIB,
            generation: 3,
            driver_version: Some("580.65.06".into()),
        },
    );
    let json = serde_json::to_value(&slice).expect("serialises");
    assert_eq!(json["metadata"]["name"], "node-a-vramslice.io");
    assert_eq!(json["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(json["spec"]["driver"], DRA_DRIVER);
    assert_eq!(json["spec"]["pool"]["generation"], 3);
    assert_eq!(json["spec"]["pool"]["resourceSliceCount"], 1);
    let device = &json["spec"]["devices"][0];
    assert_eq!(device["allowMultipleAllocations"], true);
    assert_eq!(device["attributes"]["uuid"]["string"], "GPU-0");
    assert_eq!(device["attributes"]["index"]["int"], 0);
    assert_eq!(device["attributes"]["driverVersion"]["version"], "580.65.6");
    let memory = &device["capacity"]["memory"];
    assert_eq!(memory["value"], (63 * GIB).to_string());
    assert_eq!(
        memory["requestPolicy"]["validRange"]["step"],
        GIB.to_string()
    );
    assert_eq!(memory["requestPolicy"]["default"], GIB.to_string());
}

/// The API server's checks of a validRange request policy against its capacity
/// (`validateRequestPolicyRange`, Kubernetes 1.37).
fn policy_problems(memory: &serde_json::Value) -> Vec<&'static str> {
    let n = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<u64>().ok());
    let capacity = n(&memory["value"]).expect("capacity");
    let policy = &memory["requestPolicy"];
    let (default, min) = (n(&policy["default"]), n(&policy["validRange"]["min"]));
    let (Some(default), Some(min)) = (default, min) else {
        return vec!["default and min are required"];
    };
    let mut problems = Vec::new();
    if min > capacity {
        problems.push("min is larger than capacity value");
    }
    if default < min {
        problems.push("default is less than min");
    }
    if let Some(step) = n(&policy["validRange"]["step"]) {
        if min + step > capacity {
            problems.push("one step is larger than capacity value");
        }
        if (default - min) % step != 0 {
            problems.push("default is not a multiple of the step from min");
        }
    }
    problems
}

/// Node `node-a`, 1 GiB steps, generation 1, no driver version.
fn node_a_settings() -> SliceSettings {
    SliceSettings {
        node: "node-a".into(),
        node_uid: None,
        step_bytes: GIB,
        generation: 1,
        driver_version: None,
    }
}

#[test]
fn nearly_full_gpus_never_make_the_slice_invalid() {
    let settings = node_a_settings();
    let devices: Vec<SliceDevice> = [0, GIB / 2, GIB, 2 * GIB, 63 * GIB]
        .iter()
        .enumerate()
        .map(|(i, &capacity)| SliceDevice {
            name: format!("gpu-{i}"),
            index: i as u32,
            capacity_bytes: capacity,
            ..h100_with_63_gib()
        })
        .collect();
    let json = serde_json::to_value(resource_slice(&devices, &settings)).expect("serialises");
    let published = json["spec"]["devices"].as_array().expect("devices");
    // Less than a step: no claim can be on it, nothing fits: left out.
    let names: Vec<&str> = published
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["gpu-2", "gpu-3", "gpu-4"]);
    for device in published {
        let memory = &device["capacity"]["memory"];
        assert_eq!(policy_problems(memory), Vec::<&str>::new(), "{device}");
    }
    // One step of room: no step in the range (one claim of one step fits, rounded up to min).
    assert!(published[0]["capacity"]["memory"]["requestPolicy"]["validRange"]["step"].is_null());
    assert_eq!(
        published[1]["capacity"]["memory"]["requestPolicy"]["validRange"]["step"],
        GIB.to_string()
    );
}

#[test]
fn a_driver_version_that_is_no_version_leaves_the_attribute_out() {
    let devices = [h100_with_63_gib()];
    for driver_version in [None, Some("r580-beta".to_string())] {
        let slice = resource_slice(
            &devices,
            &SliceSettings {
                node: "node-a".into(),
                node_uid: None,
                step_bytes: GIB,
                generation: 1,
                driver_version,
            },
        );
        let json = serde_json::to_value(&slice).expect("serialises");
        let attributes = &json["spec"]["devices"][0]["attributes"];
        assert!(attributes.get("driverVersion").is_none(), "{attributes}");
        assert_eq!(attributes["model"]["string"], "NVIDIA H100");
    }
}

#[test]
fn an_unhealthy_gpu_is_tainted_with_its_reason() {
    let mut sick = h100_with_63_gib();
    sick.unhealthy = Some(format!(
        "XID 79 (GPU has fallen off the bus) {}",
        "x".repeat(80)
    ));
    let slice = resource_slice(&[sick, h100_with_63_gib()], &node_a_settings());
    let json = serde_json::to_value(&slice).expect("serialises");
    let sick = &json["spec"]["devices"][0];
    assert_eq!(sick["taints"][0]["key"], "vramslice.io/unhealthy");
    assert_eq!(sick["taints"][0]["effect"], "NoSchedule");
    assert_eq!(sick["attributes"]["healthy"]["bool"], false);
    let reason = sick["attributes"]["unhealthyReason"]["string"]
        .as_str()
        .expect("a reason");
    assert!(
        reason.starts_with("XID 79 (GPU has fallen off the bus)"),
        "{reason}"
    );
    assert!(reason.len() <= 64 && reason.ends_with('…'), "{reason}");
    let well = &json["spec"]["devices"][1];
    assert!(well.get("taints").is_none(), "{well}");
    assert_eq!(well["attributes"]["healthy"]["bool"], true);
    assert!(well["attributes"].get("unhealthyReason").is_none());
}

#[test]
fn slice_names_fit_the_api_servers_limit_and_stay_distinct() {
    assert_eq!(slice_name("node-a"), "node-a-vramslice.io");
    let exact = "n".repeat(253 - "-vramslice.io".len());
    assert_eq!(slice_name(&exact), format!("{exact}-vramslice.io"));
    // Two 253-character node names that differ only at the end.
    let long_a = format!("{}.a", "x".repeat(251));
    let long_b = format!("{}.b", "x".repeat(251));
    let (a, b) = (slice_name(&long_a), slice_name(&long_b));
    assert_ne!(a, b);
    for name in [&a, &b] {
        assert!(name.len() <= 253, "{} characters", name.len());
        assert!(name.ends_with("-vramslice.io"), "{name}");
        assert!(name.starts_with("xxxx"), "{name}");
    }
    assert_eq!(slice_name(&long_a), a, "stable");
}

#[test]
fn a_long_model_name_is_cut_to_the_attribute_limit() {
    let mut gpu = h100_with_63_gib();
    gpu.model = format!("NVIDIA {}", "H".repeat(80));
    let slice = resource_slice(&[gpu], &node_a_settings());
    let json = serde_json::to_value(&slice).expect("serialises");
    let model = json["spec"]["devices"][0]["attributes"]["model"]["string"]
        .as_str()
        .expect("a model");
    assert!(
        model.len() <= 64 && model.starts_with("NVIDIA HH"),
        "{model}"
    );
}
