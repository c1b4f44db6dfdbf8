//! DRA mode as `kubectl vramslice` shows it: each vramslice claim with its pods, GPUs, grant and
//! live use (`claims`), and for a pending pod with claims, what room each node's devices have
//! by the scheduler's own arithmetic (published `memory` capacity minus what is allocated).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use serde::Serialize;
use vramslice_api::GpuNode;
use vramslice_api::convert::dra::allocation_results;
use vramslice_api::names::{DRA_CAPACITY_MEMORY, DRA_DEVICE_CLASS, DRA_DRIVER};
use vramslice_core::{format_bytes, parse_bytes};

use crate::explain::NodeVerdict;

/// One device of a vramslice slice, with the scheduler's view of its room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRoom {
    /// Node (pool).
    pub node: String,
    /// Device name.
    pub device: String,
    /// GPU UUID (the `uuid` attribute).
    pub gpu_uuid: Option<String>,
    /// Published `memory` capacity.
    pub capacity: u64,
    /// Consumed by allocated claims.
    pub allocated: u64,
    /// A taint that keeps new claims off the device (`NoSchedule` or `NoExecute`): its key,
    /// with the `unhealthyReason` attribute when the device has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taint: Option<String>,
    /// The `memory` request policy the device publishes, when it does.
    #[serde(skip)]
    pub policy: Option<RoomPolicy>,
}

/// A device's `memory` request policy, as the scheduler applies it to a claim's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomPolicy {
    /// What a request naming no memory consumes.
    pub default: u64,
    /// The least a request consumes.
    pub min: u64,
    /// Requests are rounded up to `min` plus whole steps.
    pub step: Option<u64>,
}

impl DeviceRoom {
    /// What a request for `asked` bytes (`None`: no amount named) consumes on this device: the
    /// policy's default, or the amount raised to `min` and rounded up to whole steps from it;
    /// without a policy the amount, or the whole device.
    pub fn consumes(&self, asked: Option<u64>) -> u64 {
        match (asked, self.policy) {
            (None, Some(p)) => p.default,
            (None, None) => self.capacity,
            (Some(bytes), None) => bytes,
            (Some(bytes), Some(p)) => {
                let bytes = bytes.max(p.min);
                match p.step.filter(|s| *s > 0) {
                    Some(step) => (bytes - p.min)
                        .div_ceil(step)
                        .saturating_mul(step)
                        .saturating_add(p.min),
                    None => bytes,
                }
            }
        }
    }

    /// What a new claim may still get: nothing on a tainted device.
    pub fn free(&self) -> u64 {
        if self.taint.is_some() {
            return 0;
        }
        self.capacity.saturating_sub(self.allocated)
    }

    /// The device's room as a verdict names it.
    fn describe(&self) -> String {
        match &self.taint {
            Some(taint) => format!("{} tainted {taint}", self.device),
            None => format!("{} {} free", self.device, format_bytes(self.free())),
        }
    }
}

/// The first taint of `device` that keeps new claims off it, described.
fn blocking_taint(device: &k8s_openapi::api::resource::v1::Device) -> Option<String> {
    let taint = device
        .taints
        .iter()
        .flatten()
        .find(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")?;
    let reason = device
        .attributes
        .as_ref()
        .and_then(|a| a.get("unhealthyReason"))
        .and_then(|a| a.string.clone());
    Some(match reason {
        Some(reason) => format!("{} ({reason})", taint.key),
        None => taint.key.clone(),
    })
}

fn memory(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> u64 {
    q.and_then(|q| parse_bytes(&q.0).ok()).unwrap_or(0)
}

/// Every vramslice device of `slices`, with what `claims` consume of it.
pub fn device_rooms(slices: &[ResourceSlice], claims: &[ResourceClaim]) -> Vec<DeviceRoom> {
    let mut consumed: BTreeMap<(String, String), u64> = BTreeMap::new();
    for claim in claims {
        for r in allocation_results(claim) {
            if r.driver == DRA_DRIVER {
                let bytes = memory(
                    r.consumed_capacity
                        .as_ref()
                        .and_then(|c| c.get(DRA_CAPACITY_MEMORY)),
                );
                *consumed
                    .entry((r.pool.clone(), r.device.clone()))
                    .or_default() += bytes;
            }
        }
    }
    let mut rooms = Vec::new();
    for slice in slices.iter().filter(|s| s.spec.driver == DRA_DRIVER) {
        let node = slice.spec.pool.name.clone();
        for d in slice.spec.devices.iter().flatten() {
            let capacity = memory(
                d.capacity
                    .as_ref()
                    .and_then(|c| c.get(DRA_CAPACITY_MEMORY))
                    .map(|c| &c.value),
            );
            let gpu_uuid = d
                .attributes
                .as_ref()
                .and_then(|a| a.get("uuid"))
                .and_then(|a| a.string.clone());
            let policy = d
                .capacity
                .as_ref()
                .and_then(|c| c.get(DRA_CAPACITY_MEMORY))
                .and_then(|c| c.request_policy.as_ref())
                .and_then(|p| {
                    let range = p.valid_range.as_ref()?;
                    let min = parse_bytes(&range.min.0).ok()?;
                    Some(RoomPolicy {
                        default: p.default.as_ref().map_or(min, |q| memory(Some(q))),
                        min,
                        step: range.step.as_ref().map(|q| memory(Some(q))),
                    })
                });
            rooms.push(DeviceRoom {
                policy,
                allocated: consumed
                    .get(&(node.clone(), d.name.clone()))
                    .copied()
                    .unwrap_or(0),
                node: node.clone(),
                device: d.name.clone(),
                gpu_uuid,
                capacity,
                taint: blocking_taint(d),
            });
        }
    }
    rooms.sort_by(|a, b| (&a.node, &a.device).cmp(&(&b.node, &b.device)));
    rooms
}

/// What a claim asks of vramslice: devices of class `vram.vramslice.io`, how many, and the
/// memory each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimAsk {
    /// `namespace/name`.
    pub claim: String,
    /// The request's name.
    pub request: String,
    /// What satisfies it, in the order kube-scheduler tries them: the request itself
    /// (`exactly`), or its `firstAvailable` subrequests of the vramslice class.
    pub options: Vec<DeviceAsk>,
    /// Classes of `firstAvailable` subrequests that are not vramslice's: this tool does not
    /// evaluate them, so the request may be met by one of those instead.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_classes: Vec<String>,
}

/// One way to satisfy a request with vramslice devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceAsk {
    /// Devices wanted (a request's `count`, 1 by default).
    pub count: u64,
    /// Memory per device; the class default (one unit) when the request names none.
    pub bytes_each: Option<u64>,
    /// The request's CEL selectors: this tool does not evaluate them, so a device with room
    /// may still be one they exclude.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
}

impl DeviceAsk {
    fn of(
        count: Option<i64>,
        capacity: Option<&k8s_openapi::api::resource::v1::CapacityRequirements>,
        selectors: Option<&Vec<k8s_openapi::api::resource::v1::DeviceSelector>>,
    ) -> Self {
        DeviceAsk {
            count: count.and_then(|c| u64::try_from(c).ok()).unwrap_or(1),
            bytes_each: capacity
                .and_then(|c| c.requests.as_ref())
                .and_then(|r| r.get(DRA_CAPACITY_MEMORY))
                .and_then(|q| parse_bytes(&q.0).ok()),
            selectors: selectors
                .into_iter()
                .flatten()
                .filter_map(|s| s.cel.as_ref().map(|c| c.expression.clone()))
                .collect(),
        }
    }
}

/// The vramslice requests of `claim`: those whose `exactly` names the vramslice class, and
/// those with a `firstAvailable` subrequest of it.
pub fn claim_asks(claim: &ResourceClaim) -> Vec<ClaimAsk> {
    let name = format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    );
    claim
        .spec
        .as_ref()
        .and_then(|s| s.devices.as_ref())
        .and_then(|d| d.requests.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let mut options = Vec::new();
            let mut other_classes = Vec::new();
            if let Some(e) = &r.exactly {
                if e.device_class_name != DRA_DEVICE_CLASS {
                    return None;
                }
                options.push(DeviceAsk::of(
                    e.count,
                    e.capacity.as_ref(),
                    e.selectors.as_ref(),
                ));
            }
            for sub in r.first_available.iter().flatten() {
                if sub.device_class_name == DRA_DEVICE_CLASS {
                    options.push(DeviceAsk::of(
                        sub.count,
                        sub.capacity.as_ref(),
                        sub.selectors.as_ref(),
                    ));
                } else {
                    other_classes.push(sub.device_class_name.clone());
                }
            }
            (!options.is_empty()).then(|| ClaimAsk {
                claim: name.clone(),
                request: r.name.clone(),
                options,
                other_classes,
            })
        })
        .collect()
}

/// Per node: can it take every ask now (each ask `count` distinct devices with room for its
/// memory, devices not shared between asks)? The reason names the devices' room when not.
pub fn dra_verdicts(asks: &[ClaimAsk], rooms: &[DeviceRoom]) -> Vec<NodeVerdict> {
    let nodes: BTreeSet<&str> = rooms.iter().map(|r| r.node.as_str()).collect();
    nodes
        .into_iter()
        .map(|node| {
            let mut free: Vec<(&DeviceRoom, u64)> = rooms
                .iter()
                .filter(|r| r.node == node)
                .map(|r| (r, r.free()))
                .collect();
            free.sort_by_key(|(_, f)| *f);
            let reason = place(asks, free.clone())
                .err()
                .map(|failed| no_room(&asks[failed], &free, node));
            NodeVerdict {
                node: node.to_string(),
                fits: reason.is_none(),
                reason,
                unresolvable: false,
            }
        })
        .collect()
}

/// Whether `asks` can all be placed on the devices `free` (each with its room): each ask by
/// one of its options, the tightest fitting devices taken (as binpacking would), trying the
/// later options of an ask when the asks after it do not fit otherwise (kube-scheduler's
/// allocator backtracks the same way). `free` comes sorted by room, tightest first (taking
/// devices out keeps it so). On failure, the index of the deepest ask reached.
fn place(asks: &[ClaimAsk], free: Vec<(&DeviceRoom, u64)>) -> Result<(), usize> {
    let Some((ask, rest)) = asks.split_first() else {
        return Ok(());
    };
    let mut deepest = 0;
    for option in &ask.options {
        let fitting: Vec<usize> = (0..free.len())
            .filter(|i| free[*i].1 >= free[*i].0.consumes(option.bytes_each))
            .collect();
        if (fitting.len() as u64) < option.count {
            continue;
        }
        let mut left = free.clone();
        for i in fitting
            .into_iter()
            .take(usize::try_from(option.count).unwrap_or(usize::MAX))
            .rev()
        {
            left.remove(i);
        }
        match place(rest, left) {
            Ok(()) => return Ok(()),
            Err(failed) => deepest = deepest.max(failed + 1),
        }
    }
    Err(deepest)
}

/// Why `node`'s devices (`free`: each with its room) cannot take `ask`: what each option comes
/// to on them (the class default when it names no memory) and what they have.
fn no_room(ask: &ClaimAsk, free: &[(&DeviceRoom, u64)], node: &str) -> String {
    let wants: Vec<String> = ask
        .options
        .iter()
        .map(|option| {
            let need = free
                .iter()
                .map(|(r, _)| r.consumes(option.bytes_each))
                .min()
                .or(option.bytes_each)
                .unwrap_or(0);
            format!(
                "{} device(s) with {} each",
                option.count,
                format_bytes(need)
            )
        })
        .collect();
    let rooms: Vec<String> = free.iter().map(|(r, _)| r.describe()).collect();
    let mut reason = format!(
        "claim {} needs {}; {} has {}",
        ask.claim,
        wants.join(" or "),
        node,
        if rooms.is_empty() {
            "no vramslice devices".to_string()
        } else {
            rooms.join(", ")
        }
    );
    if !ask.other_classes.is_empty() {
        reason.push_str(&format!(
            " (its alternatives of class {} are not evaluated)",
            ask.other_classes.join(", ")
        ));
    }
    reason
}

/// One vramslice claim for `kubectl vramslice claims`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimRow {
    /// Namespace.
    pub namespace: String,
    /// Claim name.
    pub claim: String,
    /// Pods it is reserved for.
    pub pods: Vec<String>,
    /// Node, once allocated.
    pub node: Option<String>,
    /// Devices with their GPU UUIDs.
    pub gpus: Vec<String>,
    /// Memory granted, over all its devices.
    pub granted_bytes: u64,
    /// What its pods use on those GPUs, when the node agent measured it (GpuNode).
    pub used_bytes: Option<u64>,
    /// `allocated` or `pending`.
    pub state: String,
}

/// Rows for the claims that ask for, or hold, vramslice devices, sorted by namespace and name.
pub fn claim_rows(
    claims: &[ResourceClaim],
    rooms: &[DeviceRoom],
    gpunodes: &[GpuNode],
) -> Vec<ClaimRow> {
    let mut rows: Vec<ClaimRow> = claims
        .iter()
        .filter_map(|claim| {
            let ours: Vec<_> = allocation_results(claim)
                .filter(|r| r.driver == DRA_DRIVER)
                .collect();
            if ours.is_empty() && claim_asks(claim).is_empty() {
                return None;
            }
            let status = claim.status.as_ref();
            let pods: Vec<(String, String)> = status
                .and_then(|s| s.reserved_for.as_ref())
                .into_iter()
                .flatten()
                .filter(|r| r.resource == "pods")
                .map(|r| (r.name.clone(), r.uid.clone()))
                .collect();
            let uuids: Vec<Option<String>> = ours
                .iter()
                .map(|r| {
                    rooms
                        .iter()
                        .find(|d| d.node == r.pool && d.device == r.device)
                        .and_then(|d| d.gpu_uuid.clone())
                })
                .collect();
            let used = measured_use(gpunodes, &pods, &uuids);
            Some(ClaimRow {
                namespace: claim.metadata.namespace.clone().unwrap_or_default(),
                claim: claim.metadata.name.clone().unwrap_or_default(),
                pods: pods.into_iter().map(|(name, _)| name).collect(),
                node: ours.first().map(|r| r.pool.clone()),
                gpus: ours
                    .iter()
                    .zip(&uuids)
                    .map(|(r, u)| match u {
                        Some(u) => format!("{} ({u})", r.device),
                        None => r.device.clone(),
                    })
                    .collect(),
                granted_bytes: ours
                    .iter()
                    .map(|r| {
                        memory(
                            r.consumed_capacity
                                .as_ref()
                                .and_then(|c| c.get(DRA_CAPACITY_MEMORY)),
                        )
                    })
                    .sum(),
                used_bytes: used,
                state: if ours.is_empty() {
                    "pending"
                } else {
                    "allocated"
                }
                .to_string(),
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.claim).cmp(&(&b.namespace, &b.claim)));
    rows
}

/// The use the GpuNodes report for `pods` on the GPUs `uuids` (None when no GPU reports any).
fn measured_use(
    gpunodes: &[GpuNode],
    pods: &[(String, String)],
    uuids: &[Option<String>],
) -> Option<u64> {
    let mut total: Option<u64> = None;
    for g in gpunodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .flat_map(|s| &s.gpus)
        .filter(|g| uuids.iter().flatten().any(|u| *u == g.uuid))
    {
        for p in &g.pods {
            let ours = pods
                .iter()
                .any(|(_, uid)| p.uid.as_deref() == Some(uid.as_str()));
            if let (true, Some(used)) = (ours, p.used_bytes) {
                total = Some(total.unwrap_or(0).saturating_add(used));
            }
        }
    }
    total
}

pub use vramslice_api::convert::pod_claims::pod_claim_names;

/// Whether `pod` uses resource claims at all.
pub fn pod_has_claims(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .is_some_and(|c| !c.is_empty())
}

#[cfg(test)]
mod tests;

/// Fill a pod's explanation from its claims (DRA mode): bound → where; pending → each node's
/// verdict for all its vramslice asks, from the devices' room. `pod_claims` are the claims the
/// pod's status names; `rooms` come from every claim in the cluster.
pub fn explain_claims(
    out: &mut crate::explain::Explanation,
    pod: &Pod,
    pod_claims: &[ResourceClaim],
    rooms: &[DeviceRoom],
) {
    use crate::explain::PodState;
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        out.state = PodState::Bound {
            node,
            gpu_uuid: None,
        };
        return;
    }
    let asks: Vec<ClaimAsk> = pod_claims.iter().flat_map(claim_asks).collect();
    let (names, not_made) = pod_claim_names(pod);
    let missing = names
        .iter()
        .filter(|n| {
            !pod_claims
                .iter()
                .any(|c| c.metadata.name.as_deref() == Some(n.as_str()))
        })
        .count();
    if not_made > 0 || missing > 0 {
        // kube-scheduler waits for every claim of the pod: nothing can be said of room yet.
        out.notes.push(format!(
            "{} of the pod's claims {} not exist yet (the resource claim controller makes them from the pod's ResourceClaimTemplates; a claim named directly must be created): kube-scheduler waits for them",
            not_made + missing,
            if not_made + missing == 1 { "does" } else { "do" }
        ));
        out.state = PodState::InvalidRequest {
            reason: "claims the pod uses do not exist yet".into(),
        };
        return;
    }
    if asks.is_empty() {
        out.notes.push(format!(
            "none of the pod's claims asks for devices of class {DRA_DEVICE_CLASS}: vramslice does not place it"
        ));
    }
    for ask in &asks {
        let selectors: Vec<String> = ask
            .options
            .iter()
            .flat_map(|o| &o.selectors)
            .map(|e| format!("`{e}`"))
            .collect();
        if !selectors.is_empty() {
            out.notes.push(format!(
                "claim {} also selects devices by CEL ({}); this tool counts room only, so a node it finds room on may have no device the selector accepts: kube-scheduler's FailedScheduling event says which",
                ask.claim,
                selectors.join(", ")
            ));
        }
        if !ask.other_classes.is_empty() {
            out.notes.push(format!(
                "claim {} request {} may also be met by class {}, which this tool does not evaluate",
                ask.claim,
                ask.request,
                ask.other_classes.join(", ")
            ));
        }
    }
    out.nodes = dra_verdicts(&asks, rooms);
    let fits_on = out.nodes.iter().filter(|n| n.fits).count();
    out.state = PodState::Pending { fits_on };
    out.notes.push(
        "DRA mode: kube-scheduler's DynamicResources plugin places this pod; each device's room is its published memory capacity (which follows the measurement) minus the claims allocated on it"
            .into(),
    );
    if rooms.is_empty() {
        out.notes.push(format!(
            "no ResourceSlice of driver {DRA_DRIVER}: is the vramslice node agent running with mode: dra?"
        ));
    }
}
