//! DRA objects to and from the core's values: a `ResourceClaim`'s allocation on this node to
//! [`ClaimGrant`]s, and the core's [`SliceDevice`]s to the node's `ResourceSlice`.

use std::collections::BTreeMap;

use k8s_openapi::api::resource::v1::{
    CapacityRequestPolicy, CapacityRequestPolicyRange, Device, DeviceAttribute, DeviceCapacity,
    DeviceRequestAllocationResult, DeviceTaint, ResourceClaim, ResourcePool, ResourceSlice,
    ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use vramslice_core::node::dra::{
    ClaimGrant, SliceDevice, UNHEALTHY_TAINT_KEY, base_request_name, driver_version_semver,
};
use vramslice_core::parse_bytes;

use crate::names::{DRA_CAPACITY_MEMORY, DRA_DRIVER};

/// A claim whose allocation this node cannot prepare.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The claim has no allocation yet.
    #[error("claim {claim} is not allocated")]
    NotAllocated {
        /// `namespace/name`.
        claim: String,
    },
    /// The claim the API server holds is another object than the kubelet asked for.
    #[error("claim {claim} has UID {found}, the kubelet asked for {expected}")]
    UidMismatch {
        /// `namespace/name`.
        claim: String,
        /// The UID the kubelet passed.
        expected: String,
        /// The UID of the object.
        found: String,
    },
    /// A result of this driver names a device this node does not publish.
    #[error(
        "claim {claim} was allocated device {device} of pool {pool}, which this node does not publish"
    )]
    UnknownDevice {
        /// `namespace/name`.
        claim: String,
        /// Pool name.
        pool: String,
        /// Device name.
        device: String,
    },
    /// The result carries no `consumedCapacity.memory`: the device was allocated whole, as
    /// kube-apiserver and kube-scheduler do when their `DRAConsumableCapacity` feature gate is
    /// off (they drop the slice's `allowMultipleAllocations`).
    #[error(
        "claim {claim}, device {device}: the allocation carries no consumed memory capacity, so the whole GPU was allocated; vramslice needs the DRAConsumableCapacity feature gate on kube-apiserver and kube-scheduler"
    )]
    NoConsumedMemory {
        /// `namespace/name`.
        claim: String,
        /// Device name.
        device: String,
    },
    /// `consumedCapacity.memory` is not a byte count.
    #[error("claim {claim}, device {device}: consumed memory {value:?} is not a byte count")]
    BadMemory {
        /// `namespace/name`.
        claim: String,
        /// Device name.
        device: String,
        /// The quantity as written.
        value: String,
    },
}

/// What a claim holds on this node, read from its allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimOnNode {
    /// The claim's UID.
    pub uid: String,
    /// One grant per allocation result of this driver in this node's pool.
    pub grants: Vec<ClaimGrant>,
    /// The share IDs of those results, in the same order (consumable capacity).
    pub share_ids: Vec<Option<String>>,
    /// The pods the claim is reserved for: (name, UID).
    pub pods: Vec<(String, String)>,
    /// Whether any of those results was allocated with admin access (kube-scheduler does not
    /// count such results as allocated).
    pub admin_access: bool,
}

/// Read `claim`'s allocation results of [`DRA_DRIVER`] in pool `pool` (this node). `uuid_of`
/// maps a published device name to its GPU's UUID. The UID must be `expected_uid`: a claim
/// deleted and re-created under the same name is another claim.
///
/// # Errors
/// [`ClaimError`] naming the claim and what is wrong.
pub fn claim_on_node(
    claim: &ResourceClaim,
    expected_uid: &str,
    pool: &str,
    uuid_of: impl Fn(&str) -> Option<String>,
) -> Result<ClaimOnNode, ClaimError> {
    let name = format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    );
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    if uid != expected_uid {
        return Err(ClaimError::UidMismatch {
            claim: name,
            expected: expected_uid.to_string(),
            found: uid,
        });
    }
    let status = claim.status.as_ref();
    let allocation =
        status
            .and_then(|s| s.allocation.as_ref())
            .ok_or_else(|| ClaimError::NotAllocated {
                claim: name.clone(),
            })?;
    let results = allocation
        .devices
        .as_ref()
        .and_then(|d| d.results.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut grants = Vec::new();
    let mut share_ids = Vec::new();
    let mut admin_access = false;
    for result in results
        .iter()
        .filter(|r| r.driver == DRA_DRIVER && r.pool == pool)
    {
        let gpu_uuid = uuid_of(&result.device).ok_or_else(|| ClaimError::UnknownDevice {
            claim: name.clone(),
            pool: result.pool.clone(),
            device: result.device.clone(),
        })?;
        let memory = result
            .consumed_capacity
            .as_ref()
            .and_then(|c| c.get(DRA_CAPACITY_MEMORY));
        let memory = memory.ok_or_else(|| ClaimError::NoConsumedMemory {
            claim: name.clone(),
            device: result.device.clone(),
        })?;
        let bytes = parse_bytes(&memory.0).map_err(|_| ClaimError::BadMemory {
            claim: name.clone(),
            device: result.device.clone(),
            value: memory.0.clone(),
        })?;
        grants.push(ClaimGrant {
            request: base_request_name(&result.request).to_string(),
            device: result.device.clone(),
            gpu_uuid,
            bytes,
        });
        share_ids.push(result.share_id.clone());
        admin_access |= result.admin_access == Some(true);
    }
    let pods = status
        .and_then(|s| s.reserved_for.as_ref())
        .map(|r| {
            r.iter()
                .filter(|c| c.resource == "pods")
                .map(|c| (c.name.clone(), c.uid.clone()))
                .collect()
        })
        .unwrap_or_default();
    Ok(ClaimOnNode {
        uid,
        grants,
        share_ids,
        pods,
        admin_access,
    })
}

/// The allocation results of `claim`, of every driver (none while it is not allocated).
pub fn allocation_results(
    claim: &ResourceClaim,
) -> impl Iterator<Item = &DeviceRequestAllocationResult> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
}

/// Whether `claim` is allocated devices of [`DRA_DRIVER`].
pub fn allocated_by_driver(claim: &ResourceClaim) -> bool {
    allocation_results(claim).any(|r| r.driver == DRA_DRIVER)
}

/// Settings of the slice besides its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSettings {
    /// The node (and pool) name.
    pub node: String,
    /// The node's UID, for the owner reference (the slice goes with its node).
    pub node_uid: Option<String>,
    /// The request step and default, in bytes (the configured unit).
    pub step_bytes: u64,
    /// The pool generation to write.
    pub generation: i64,
    /// The NVIDIA driver's version as NVML reports it (`580.65.06`), when known: the devices'
    /// `driverVersion` attribute, a semantic version for CEL (`driver_version_semver`); left
    /// out when it is not a version.
    pub driver_version: Option<String>,
}

/// Longest string attribute value the API accepts.
const ATTRIBUTE_STRING_MAX: usize = 64;

/// `text` cut to what a string attribute may hold, on a character boundary, with `…` when cut.
fn attribute_text(text: &str) -> String {
    if text.len() <= ATTRIBUTE_STRING_MAX {
        return text.to_string();
    }
    let mut end = ATTRIBUTE_STRING_MAX - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The name of the node's one slice.
pub fn slice_name(node: &str) -> String {
    format!("{node}-{DRA_DRIVER}")
}

/// The node's `ResourceSlice`: one pool named after the node, each GPU one device that allows
/// multiple allocations, with `memory` capacity and a request policy in steps.
///
/// The API server rejects a whole slice when one device's request policy does not fit its
/// capacity (`min` above it, or `min` plus one `step` above it), so a GPU with less room than
/// two steps publishes no `step` (with `min` one step, the one claim that fits is still rounded
/// up to it), and a GPU with less than one step is left out: no claim can hold memory on it
/// (grants are whole steps and count in its capacity), and nothing new fits.
pub fn resource_slice(devices: &[SliceDevice], settings: &SliceSettings) -> ResourceSlice {
    let step_bytes = settings.step_bytes.max(1);
    let step = Quantity(step_bytes.to_string());
    let devices = devices
        .iter()
        .filter(|d| d.capacity_bytes >= step_bytes)
        .map(|d| {
            let mut attributes = BTreeMap::new();
            let string = |s: &str| DeviceAttribute {
                string: Some(s.to_string()),
                ..DeviceAttribute::default()
            };
            attributes.insert("uuid".to_string(), string(&d.uuid));
            attributes.insert("model".to_string(), string(&d.model));
            attributes.insert(
                "index".to_string(),
                DeviceAttribute {
                    int: Some(i64::from(d.index)),
                    ..DeviceAttribute::default()
                },
            );
            attributes.insert(
                "healthy".to_string(),
                DeviceAttribute {
                    bool: Some(d.unhealthy.is_none()),
                    ..DeviceAttribute::default()
                },
            );
            if let Some(reason) = &d.unhealthy {
                attributes.insert(
                    "unhealthyReason".to_string(),
                    string(&attribute_text(reason)),
                );
            }
            if let Some(version) = settings
                .driver_version
                .as_deref()
                .and_then(driver_version_semver)
            {
                attributes.insert(
                    "driverVersion".to_string(),
                    DeviceAttribute {
                        version: Some(version),
                        ..DeviceAttribute::default()
                    },
                );
            }
            let mut capacity = BTreeMap::new();
            capacity.insert(
                DRA_CAPACITY_MEMORY.to_string(),
                DeviceCapacity {
                    value: Quantity(d.capacity_bytes.to_string()),
                    request_policy: Some(CapacityRequestPolicy {
                        default: Some(step.clone()),
                        valid_range: Some(CapacityRequestPolicyRange {
                            min: step.clone(),
                            max: None,
                            step: (d.capacity_bytes / step_bytes >= 2).then(|| step.clone()),
                        }),
                        valid_values: None,
                    }),
                },
            );
            Device {
                name: d.name.clone(),
                allow_multiple_allocations: Some(true),
                attributes: Some(attributes),
                capacity: Some(capacity),
                // No new claim on an unhealthy GPU; claims already on it keep their pods (as a
                // device plugin's unhealthy device does), the reason is in `unhealthyReason`.
                taints: d.unhealthy.as_ref().map(|_| {
                    vec![DeviceTaint {
                        key: UNHEALTHY_TAINT_KEY.to_string(),
                        value: None,
                        effect: "NoSchedule".to_string(),
                        time_added: None,
                    }]
                }),
                ..Device::default()
            }
        })
        .collect();
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&settings.node)),
            owner_references: settings.node_uid.as_ref().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".to_string(),
                    kind: "Node".to_string(),
                    name: settings.node.clone(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: ResourceSliceSpec {
            driver: DRA_DRIVER.to_string(),
            node_name: Some(settings.node.clone()),
            pool: ResourcePool {
                name: settings.node.clone(),
                generation: settings.generation,
                resource_slice_count: 1,
            },
            devices: Some(devices),
            ..ResourceSliceSpec::default()
        },
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn nearly_full_gpus_never_make_the_slice_invalid() {
        let settings = SliceSettings {
            node: "node-a".into(),
            node_uid: None,
            step_bytes: GIB,
            generation: 1,
            driver_version: None,
        };
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
        assert!(
            published[0]["capacity"]["memory"]["requestPolicy"]["validRange"]["step"].is_null()
        );
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
        let slice = resource_slice(
            &[sick, h100_with_63_gib()],
            &SliceSettings {
                node: "node-a".into(),
                node_uid: None,
                step_bytes: GIB,
                generation: 1,
                driver_version: None,
            },
        );
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
}
