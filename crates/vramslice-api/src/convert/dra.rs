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

/// The device and share ID of each of `claim`'s allocation results of [`DRA_DRIVER`] in pool
/// `pool`, sorted: what identifies its allocation there, read without knowing the node's GPUs
/// (empty when it has none there).
pub fn allocated_devices_in(claim: &ResourceClaim, pool: &str) -> Vec<(String, Option<String>)> {
    let mut found: Vec<(String, Option<String>)> = allocation_results(claim)
        .filter(|r| r.driver == DRA_DRIVER && r.pool == pool)
        .map(|r| (r.device.clone(), r.share_id.clone()))
        .collect();
    found.sort_unstable();
    found
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
        // Keyed as the slice names the capacity (`memory`, in the driver's domain); the
        // qualified spelling is taken too, should a scheduler write the domain out.
        let memory = result.consumed_capacity.as_ref().and_then(|c| {
            c.get(DRA_CAPACITY_MEMORY)
                .or_else(|| c.get(&format!("{DRA_DRIVER}/{DRA_CAPACITY_MEMORY}")))
        });
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
        admin_access |= admin_result_on(result, pool);
    }
    let pods = reserved_pods(claim);
    Ok(ClaimOnNode {
        uid,
        grants,
        share_ids,
        pods,
        admin_access,
    })
}

/// The pods `claim` is reserved for now (`status.reservedFor` entries of resource `pods`):
/// (name, UID).
pub fn reserved_pods(claim: &ResourceClaim) -> Vec<(String, String)> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.reserved_for.as_ref())
        .map(|r| {
            r.iter()
                .filter(|c| c.resource == "pods")
                .map(|c| (c.name.clone(), c.uid.clone()))
                .collect()
        })
        .unwrap_or_default()
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

/// Whether `result` is this driver's on `pool` with admin access (kube-scheduler counts no
/// capacity for such a result).
pub fn admin_result_on(result: &DeviceRequestAllocationResult, pool: &str) -> bool {
    result.driver == DRA_DRIVER && result.pool == pool && result.admin_access == Some(true)
}

/// Whether `claim` holds a device of this driver on `pool` with admin access.
pub fn admin_access_on(claim: &ResourceClaim, pool: &str) -> bool {
    allocation_results(claim).any(|r| admin_result_on(r, pool))
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

/// The longest object name the API server takes (a DNS subdomain).
const OBJECT_NAME_MAX: usize = 253;

/// The name of the node's one slice: `<node>-vramslice.io`. A node name too long for that (node
/// names may have 253 characters) is cut, and a hash of the whole name keeps two such nodes
/// apart.
pub fn slice_name(node: &str) -> String {
    let name = format!("{node}-{DRA_DRIVER}");
    if name.len() <= OBJECT_NAME_MAX {
        return name;
    }
    // FNV-1a: stable across versions and platforms, which the name must be.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let suffix = format!("-{hash:016x}-{DRA_DRIVER}");
    let mut end = OBJECT_NAME_MAX - suffix.len();
    while !node.is_char_boundary(end) {
        end -= 1;
    }
    let kept = node[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{kept}{suffix}")
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
            attributes.insert("model".to_string(), string(&attribute_text(&d.model)));
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
mod tests;
