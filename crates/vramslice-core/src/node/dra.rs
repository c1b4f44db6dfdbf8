//! The node seam in DRA mode: which devices the node's ResourceSlice lists and with what
//! `memory` capacity ([`slice_devices`], by the rule of [`crate::effective_free`]), when that
//! slice must be written again ([`slice_publish_reason`]), and what a prepared claim hands its
//! containers ([`plan_claim`]: the same edits as Allocate, one limit per GPU).
//!
//! Data enters as GPU samples, the grants of prepared claims (from their allocation results) and
//! measured use; it leaves as plain device descriptions, a publish verdict and container edits.
//! The DRA plugin turns them into a ResourceSlice and a CDI spec.

use std::collections::BTreeMap;
use std::fmt;

use crate::container::limit::{GpuLimits, GpuLimitsError, gpu_limits_file_content};
use crate::effective_free::{claimable_capacity, unobserved_part};
use crate::node::allocation::{AllocationSettings, ContainerEdits, container_edits};
use crate::node::sample::{GpuSample, Health};

/// What the plugin publishes about one healthy GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceDevice {
    /// Device name in the slice: `gpu-<index>`.
    pub name: String,
    /// NVML UUID.
    pub uuid: String,
    /// Product name.
    pub model: String,
    /// NVML index.
    pub index: u32,
    /// Whole steps of the GPU's memory: the most any claim could be granted.
    pub advertised_bytes: u64,
    /// The `memory` capacity to publish ([`claimable_capacity`]).
    pub capacity_bytes: u64,
    /// Why the GPU is unhealthy (`None` when healthy). An unhealthy GPU stays in the slice,
    /// tainted ([`UNHEALTHY_TAINT_KEY`]) so no new claim is allocated on it while users can
    /// still see it and why.
    pub unhealthy: Option<String>,
}

/// The key of the `NoSchedule` device taint on an unhealthy GPU's device (device taints are
/// GA in Kubernetes 1.37: kube-scheduler allocates no claim on a tainted device unless the
/// claim tolerates the taint).
pub const UNHEALTHY_TAINT_KEY: &str = "vramslice.io/unhealthy";

/// The device name a GPU of NVML index `index` has in the slice.
pub fn device_name(index: u32) -> String {
    format!("gpu-{index}")
}

/// The NVIDIA driver version as a semantic version for the slice's `driverVersion` attribute
/// (a `version` attribute, so CEL selectors can compare it: `device.attributes["vramslice.io"]
/// .driverVersion.compareTo(semver("550.0.0")) >= 0`). NVIDIA writes versions such as
/// `580.65.06` or `550.54`; semantic versions allow no leading zeros and need three parts, so
/// each part loses its leading zeros and missing parts are 0 (`580.65.6`, `550.54.0`). `None`
/// for anything that is not two to four dot-separated decimal numbers, so an odd driver string
/// leaves the attribute out rather than failing the slice's validation.
pub fn driver_version_semver(raw: &str) -> Option<String> {
    let parts: Vec<&str> = raw.trim().split('.').collect();
    if !(2..=4).contains(&parts.len()) {
        return None;
    }
    let mut numbers = Vec::with_capacity(3);
    for part in &parts {
        if part.is_empty() || part.len() > 18 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        numbers.push(part.parse::<u64>().ok()?);
    }
    // A fourth part (some datacenter branches) is kept as build metadata, which semver
    // comparisons ignore.
    let build = (numbers.len() == 4).then(|| numbers[3]);
    numbers.resize(3, 0);
    let version = format!("{}.{}.{}", numbers[0], numbers[1], numbers[2]);
    Some(match build {
        Some(build) => format!("{version}+{build}"),
        None => version,
    })
}

/// What prepared claims hold on one GPU, for the capacity rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrantsOnGpu {
    /// Bytes granted to claims on the GPU that kube-scheduler counts as allocated (all but
    /// admin-access ones): the capacity rule adds them back, since the scheduler subtracts
    /// them from what the slice publishes.
    pub granted: u64,
    /// What the GPU's claims, admin-access ones included, may still allocate that the
    /// measurement cannot show (sum of [`crate::effective_free::unobserved_part`]).
    pub unobserved: u64,
}

/// A prepared claim as the capacity rule sees it: what it was granted on each GPU (UUID,
/// bytes) and the UIDs of the pods it is reserved for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimUse<'a> {
    /// GPU UUID → bytes granted.
    pub limits: &'a [(String, u64)],
    /// UIDs of the pods the claim is reserved for.
    pub pods: Vec<&'a str>,
    /// Allocated with admin access: kube-scheduler does not count such results as allocated
    /// (it subtracts none of their consumed capacity), so their grants are not added back;
    /// what they may still take counts as unobserved, like any claim's.
    pub admin_access: bool,
}

/// Claims on one GPU linked by a shared pod, counted together.
struct LinkedClaims<'a> {
    /// Everything granted to them.
    granted: u64,
    /// The part of it kube-scheduler counts (not admin access).
    counted: u64,
    pods: Vec<&'a str>,
}

/// What prepared claims hold on each GPU: granted bytes, and what they may still take unseen
/// (their grants less what the processes of their pods use on that GPU; `samples` must carry
/// pod UIDs).
///
/// What a pod's processes use on a GPU cannot be told apart by claim, so claims on one GPU
/// that share a pod are counted together: their grants less what their pods use there.
/// Counting each claim against all of its pods' use would credit one pod's use to every claim
/// it holds, and hide the rest of the grants.
pub fn grants_by_gpu<'a>(
    claims: impl IntoIterator<Item = ClaimUse<'a>>,
    samples: &[GpuSample],
) -> BTreeMap<String, GrantsOnGpu> {
    let mut groups: BTreeMap<&str, Vec<LinkedClaims<'a>>> = BTreeMap::new();
    for claim in claims {
        for (uuid, granted) in claim.limits {
            let on_gpu = groups.entry(uuid.as_str()).or_default();
            let mut merged = LinkedClaims {
                granted: *granted,
                counted: if claim.admin_access { 0 } else { *granted },
                pods: claim.pods.clone(),
            };
            on_gpu.retain(|group| {
                let linked = group.pods.iter().any(|p| merged.pods.contains(p));
                if linked {
                    merged.granted = merged.granted.saturating_add(group.granted);
                    merged.counted = merged.counted.saturating_add(group.counted);
                    merged
                        .pods
                        .extend(group.pods.iter().filter(|p| !claim.pods.contains(p)));
                }
                !linked
            });
            on_gpu.push(merged);
        }
    }
    let mut out: BTreeMap<String, GrantsOnGpu> = BTreeMap::new();
    for (uuid, on_gpu) in groups {
        let entry = out.entry(uuid.to_string()).or_default();
        for group in on_gpu {
            let used = samples.iter().find(|s| s.uuid == uuid).and_then(|s| {
                s.used_by(|p| {
                    p.pod_uid
                        .as_deref()
                        .is_some_and(|uid| group.pods.contains(&uid))
                })
            });
            entry.granted = entry.granted.saturating_add(group.counted);
            entry.unobserved = entry
                .unobserved
                .saturating_add(unobserved_part(group.granted, used));
        }
    }
    out
}

/// The slice's devices: every GPU, its memory counted in whole `step`s and its capacity by the
/// shared rule; an unhealthy one carries its reason (the slice taints it).
pub fn slice_devices(
    samples: &[GpuSample],
    grants: &BTreeMap<String, GrantsOnGpu>,
    step: u64,
    headroom: u64,
) -> Vec<SliceDevice> {
    let step = step.max(1);
    samples
        .iter()
        .map(|s| {
            let advertised = s.total_bytes - s.total_bytes % step;
            let on_gpu = grants.get(&s.uuid).copied().unwrap_or_default();
            SliceDevice {
                name: device_name(s.index),
                uuid: s.uuid.clone(),
                model: s.model.clone(),
                index: s.index,
                advertised_bytes: advertised,
                capacity_bytes: claimable_capacity(
                    advertised,
                    on_gpu.granted,
                    s.free_bytes,
                    on_gpu.unobserved,
                    headroom,
                    step,
                ),
                unhealthy: match &s.health {
                    Health::Healthy => None,
                    Health::Unhealthy { reason } => Some(reason.clone()),
                },
            }
        })
        .collect()
}

/// How long the slice may rest on one reading: past this, the GPUs are published tainted (no
/// new claim lands on a measurement nobody renewed). The extender's default staleness, or
/// three polls when polling is slower.
pub fn reading_staleness_bound(poll_interval: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(90).max(poll_interval.saturating_mul(3))
}

/// `devices` as published when the reading they come from is `age` old: past `bound`, every
/// device is unhealthy with the reason (the GPU backend fails or hangs while the agent, and its
/// connection to the kubelet, live on; the kubelet then keeps the slice, and kube-scheduler
/// would allocate against a frozen capacity). A device already unhealthy keeps its reason. The
/// reason names `bound`, not `age`: a text that changed on every wake-up would rewrite the slice
/// (a device change, published at once) for as long as the readings stay stale.
pub fn mark_unread(
    mut devices: Vec<SliceDevice>,
    age: std::time::Duration,
    bound: std::time::Duration,
) -> Vec<SliceDevice> {
    if age >= bound {
        for device in devices.iter_mut().filter(|d| d.unhealthy.is_none()) {
            device.unhealthy = Some(format!(
                "no GPU reading for {}s or more (the node agent cannot read the GPUs)",
                bound.as_secs()
            ));
        }
    }
    devices
}

/// Why the slice must be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlicePublishReason {
    /// Nothing was published yet.
    First,
    /// A device appeared, went or changed identity.
    DevicesChanged,
    /// A device fell unhealthy (or its reading went stale): its taint goes on at once.
    FellUnhealthy {
        /// The device.
        device: String,
    },
    /// A device recovered, or the reason it is unhealthy changed.
    HealthEased {
        /// The device.
        device: String,
    },
    /// A device's capacity fell, or rose by at least the threshold.
    CapacityMoved {
        /// The device.
        device: String,
        /// Published before.
        from: u64,
        /// To publish now.
        to: u64,
    },
}

/// How soon a write for a [`SlicePublishReason`] may follow the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlicePace {
    /// At once: the slice would otherwise offer devices that are gone or unhealthy.
    Now,
    /// After the minimum interval: capacity that fell (offered memory that is gone).
    Soon,
    /// After the slow interval: capacity that rose, a device that recovered. Offering less
    /// than there is for a while is safe; a GPU whose free memory or health wobbles across a
    /// boundary would otherwise rewrite the slice at every minimum interval.
    Slow,
}

/// How many minimum intervals a [`SlicePace::Slow`] write waits after the last one: a GPU whose
/// free memory wobbles across a step otherwise rewrites the slice at every minimum interval
/// (each rise written, each fall after it too).
pub const SLOW_PACE_FACTOR: u32 = 10;

impl SlicePace {
    /// How long after the last write a write at this pace may go, given the minimum interval.
    pub fn wait(self, min_interval: std::time::Duration) -> std::time::Duration {
        match self {
            SlicePace::Now => std::time::Duration::ZERO,
            SlicePace::Soon => min_interval,
            SlicePace::Slow => min_interval.saturating_mul(SLOW_PACE_FACTOR),
        }
    }
}

impl SlicePublishReason {
    /// How soon this write may follow the last one.
    pub fn pace(&self) -> SlicePace {
        match self {
            SlicePublishReason::First
            | SlicePublishReason::DevicesChanged
            | SlicePublishReason::FellUnhealthy { .. } => SlicePace::Now,
            SlicePublishReason::CapacityMoved { from, to, .. } if to < from => SlicePace::Soon,
            SlicePublishReason::CapacityMoved { .. } | SlicePublishReason::HealthEased { .. } => {
                SlicePace::Slow
            }
        }
    }
}

impl fmt::Display for SlicePublishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlicePublishReason::First => f.write_str("first slice"),
            SlicePublishReason::DevicesChanged => f.write_str("devices changed"),
            SlicePublishReason::FellUnhealthy { device } => write!(f, "{device} fell unhealthy"),
            SlicePublishReason::HealthEased { device } => {
                write!(f, "{device} recovered or its health reason changed")
            }
            SlicePublishReason::CapacityMoved { device, from, to } => {
                write!(f, "capacity of {device} moved from {from} to {to} bytes")
            }
        }
    }
}

/// Whether the slice must be written again, and why (the most pressing reason first): on the
/// first slice; when the device list changes (a GPU appeared, went, or was replaced); when a
/// GPU fell unhealthy; when a device's capacity fell; when a GPU recovered or its health reason
/// changed; when a capacity rose by `threshold` bytes or more. Otherwise `None`, which keeps the
/// API server's write rate bounded; the caller also paces the writes ([`SlicePublishReason::pace`]).
pub fn slice_publish_reason(
    published: Option<&[SliceDevice]>,
    next: &[SliceDevice],
    threshold: u64,
) -> Option<SlicePublishReason> {
    let Some(published) = published else {
        return Some(SlicePublishReason::First);
    };
    let identity = |d: &SliceDevice| {
        (
            d.name.clone(),
            d.uuid.clone(),
            d.model.clone(),
            d.advertised_bytes,
        )
    };
    if published.len() != next.len() || published.iter().map(identity).ne(next.iter().map(identity))
    {
        return Some(SlicePublishReason::DevicesChanged);
    }
    let pairs = || published.iter().zip(next);
    if let Some((_, new)) =
        pairs().find(|(old, new)| old.unhealthy.is_none() && new.unhealthy.is_some())
    {
        return Some(SlicePublishReason::FellUnhealthy {
            device: new.name.clone(),
        });
    }
    let moved = |(old, new): (&SliceDevice, &SliceDevice)| SlicePublishReason::CapacityMoved {
        device: new.name.clone(),
        from: old.capacity_bytes,
        to: new.capacity_bytes,
    };
    // Any fall (it is whole steps): kube-scheduler would otherwise promise memory that is gone.
    if let Some(fell) = pairs().find(|(old, new)| new.capacity_bytes < old.capacity_bytes) {
        return Some(moved(fell));
    }
    if let Some((_, new)) = pairs().find(|(old, new)| old.unhealthy != new.unhealthy) {
        return Some(SlicePublishReason::HealthEased {
            device: new.name.clone(),
        });
    }
    // A rise only by the threshold, which bounds the write rate with the slow pace.
    pairs()
        .find(|(old, new)| new.capacity_bytes - old.capacity_bytes >= threshold.max(1))
        .map(moved)
}

/// One device of a claim's allocation that this node's driver must prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimGrant {
    /// The request of the claim it satisfies, as containers name it ([`base_request_name`]).
    pub request: String,
    /// The device name in the slice.
    pub device: String,
    /// The GPU's UUID.
    pub gpu_uuid: String,
    /// `consumedCapacity.memory`, in bytes.
    pub bytes: u64,
}

/// Why a claim's allocation cannot be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimPlanError {
    /// No device of this driver in the allocation.
    #[error("claim {claim} has no device of this driver in its allocation")]
    NoDevices {
        /// Claim `namespace/name`.
        claim: String,
    },
    /// A device was granted no memory.
    #[error("claim {claim} was granted no memory on device {device}")]
    NothingGranted {
        /// Claim `namespace/name`.
        claim: String,
        /// The device.
        device: String,
    },
    /// A GPU UUID the limit file cannot carry.
    #[error("claim {claim}: {source}")]
    Limits {
        /// Claim `namespace/name`.
        claim: String,
        /// What is wrong.
        source: GpuLimitsError,
    },
}

/// What preparing a claim decides: the limit per GPU, the limit file, the container edits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    /// GPU UUID → limit in bytes, in the order the containers see the GPUs.
    pub limits: Vec<(String, u64)>,
    /// The text of the claim's limit file.
    pub limit_file: String,
    /// Environment, mounts and visible GPUs for every container using the claim.
    pub edits: ContainerEdits,
}

/// A claim's allocation on this node, as one prepare saw it: its (device, share ID) pairs and
/// the limits its grants gave (GPU UUID → bytes).
#[derive(Debug, Clone, Copy)]
pub struct AllocationSeen<'a> {
    /// The (device, share ID) of each result of this driver in this node's pool.
    pub devices: &'a [(String, Option<String>)],
    /// The limits the grants gave; `None` when they could not be read.
    pub limits: Option<&'a [(String, u64)]>,
}

/// Whether a claim prepared as `prepared` is allocated otherwise `now` (a claim keeps its UID
/// when it is deallocated and allocated again). Other results (devices or share IDs, in any
/// order) say so on their own, even when their limits cannot be read; the same results differ
/// only by the bytes their limits grant. The GPUs the limits name do not count: the same
/// allocation whose device names another GPU now (renumbered after a reboot) is not a new one
/// ([`gpus_changed`] tells that apart). No results now (not allocated here as far as the API
/// server says) is not a new allocation: nothing new to prepare.
pub fn allocated_again(prepared: AllocationSeen<'_>, now: AllocationSeen<'_>) -> bool {
    if now.devices.is_empty() {
        return false;
    }
    let sorted = |d: &[(String, Option<String>)]| {
        let mut d = d.to_vec();
        d.sort_unstable();
        d
    };
    if sorted(prepared.devices) != sorted(now.devices) {
        return true;
    }
    let bytes = |limits: &[(String, u64)]| limits.iter().map(|(_, b)| *b).collect::<Vec<_>>();
    matches!((prepared.limits, now.limits), (Some(a), Some(b)) if bytes(a) != bytes(b))
}

/// The GPUs a prepared claim's devices name now, when they are not those it was prepared on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpusChanged {
    /// The GPUs (UUIDs) the claim was prepared on, sorted.
    pub then: Vec<String>,
    /// Its device names, sorted.
    pub devices: Vec<String>,
    /// The GPU each of them names now (`None`: no GPU has the name any more).
    pub now: Vec<Option<String>>,
}

/// Whether the claim prepared on GPUs `prepared_on` (UUIDs) with devices `devices` would now
/// land elsewhere: device names follow the NVML index, so after a reboot that lost a GPU, or
/// numbered them otherwise, a name can mean another GPU (`uuid_of`: the GPU a device name
/// means now). `None` when they are the same GPUs, or nothing was prepared.
pub fn gpus_changed<'a>(
    prepared_on: impl IntoIterator<Item = &'a str>,
    devices: impl IntoIterator<Item = &'a str>,
    uuid_of: impl Fn(&str) -> Option<String>,
) -> Option<GpusChanged> {
    let then: std::collections::BTreeSet<&str> = prepared_on.into_iter().collect();
    let devices: std::collections::BTreeSet<&str> = devices.into_iter().collect();
    if then.is_empty() {
        return None;
    }
    let now: Vec<Option<String>> = devices.iter().map(|d| uuid_of(d)).collect();
    let same = now.iter().all(Option::is_some)
        && now
            .iter()
            .flatten()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>()
            == then;
    (!same).then(|| GpusChanged {
        then: then.iter().map(|u| u.to_string()).collect(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        now,
    })
}

/// The accounting key of a claim: `claim-<uid>` with any character unsafe in a path component
/// replaced by `_`.
pub fn claim_key(claim_uid: &str) -> String {
    let safe: String = claim_uid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("claim-{safe}")
}

/// Plan a claim's preparation. Grants on the same GPU (two requests of one claim) add up into
/// one limit; GPUs are ordered by first appearance. Every container using the claim shares
/// one accounting directory and so one limit per GPU, as they share the claim.
pub fn plan_claim(
    claim: &str,
    claim_uid: &str,
    grants: &[ClaimGrant],
    settings: &AllocationSettings,
) -> Result<ClaimPlan, ClaimPlanError> {
    if grants.is_empty() {
        return Err(ClaimPlanError::NoDevices {
            claim: claim.to_string(),
        });
    }
    let mut limits: Vec<(String, u64)> = Vec::new();
    for grant in grants {
        if grant.bytes == 0 {
            return Err(ClaimPlanError::NothingGranted {
                claim: claim.to_string(),
                device: grant.device.clone(),
            });
        }
        match limits.iter_mut().find(|(uuid, _)| *uuid == grant.gpu_uuid) {
            Some((_, bytes)) => *bytes = bytes.saturating_add(grant.bytes),
            None => limits.push((grant.gpu_uuid.clone(), grant.bytes)),
        }
    }
    let gpus = GpuLimits::new(limits.iter().map(|(u, b)| (u.as_str(), *b))).map_err(|source| {
        ClaimPlanError::Limits {
            claim: claim.to_string(),
            source,
        }
    })?;
    let limit_file = gpu_limits_file_content(&gpus);
    let edits = container_edits(&gpus, settings, &claim_key(claim_uid));
    Ok(ClaimPlan {
        limits,
        limit_file,
        edits,
    })
}

/// The request a container names for an allocation result's request: `<request>` of a
/// `firstAvailable` alternative's `<request>/<subrequest>` (containers can name only the
/// former, and the kubelet matches prepared devices to them by it), the name itself otherwise.
pub fn base_request_name(request: &str) -> &str {
    request.split_once('/').map_or(request, |(base, _)| base)
}

#[cfg(test)]
mod tests;
