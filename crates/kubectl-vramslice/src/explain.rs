//! `kubectl vramslice explain <pod>`: why a pod does (not) fit, node by node, in the
//! extender's own words (the same ledger and the same rejection reasons), plus what the
//! scheduler last said in the pod's events.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Event, Pod};
use serde::Serialize;
use vramslice_api::GpuNode;
use vramslice_api::convert::{bound_pod_request, pod_name, pod_request, policy_of};
use vramslice_api::names::{ANNOTATION_GPU_UUID, SCHEDULER_NAME};
use vramslice_core::VramUnit;
use vramslice_core::cluster::ledger::Ledger;
use vramslice_core::cluster::placement::Policy;

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `namespace/name`.
    pub pod: String,
    /// What the pod is in placement terms.
    pub state: PodState,
    /// The VRAM resource the pod asks for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Units of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    /// Bytes the pod needs on one GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// The pod's scheduler name.
    pub scheduler_name: String,
    /// The largest GPU (advertised bytes) of any node with a usable reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_gpu_bytes: Option<u64>,
    /// One verdict per node that publishes a `GpuNode`, by name.
    pub nodes: Vec<NodeVerdict>,
    /// Messages of the pod's scheduling events, newest first.
    pub events: Vec<EventLine>,
    /// Things the user should know beyond the verdicts.
    pub notes: Vec<String>,
}

/// Where the pod stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum PodState {
    /// Bound to a node.
    Bound {
        /// The node.
        node: String,
        /// The GPU the extender chose, when annotated.
        #[serde(skip_serializing_if = "Option::is_none")]
        gpu_uuid: Option<String>,
    },
    /// Not bound; `fits_on` nodes could take it now.
    Pending {
        /// Nodes that could take it now.
        fits_on: usize,
    },
    /// The pod asks for no vramslice memory.
    NoVram,
    /// The pod's VRAM request cannot be read.
    InvalidRequest {
        /// Why.
        reason: String,
    },
}

/// One node's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeVerdict {
    /// Node name.
    pub node: String,
    /// Whether it can take the pod now.
    pub fits: bool,
    /// The extender's reason when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether preemption could never help (kube-scheduler's "unresolvable").
    pub unresolvable: bool,
}

/// One scheduling event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// Event reason (`FailedScheduling`, `Scheduled`, ...).
    pub reason: String,
    /// Its message.
    pub message: String,
    /// How many times it happened.
    pub count: i32,
    /// When it last happened (RFC 3339), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// When an event last happened: its series' last observation (kube-scheduler records through
/// events.k8s.io/v1, whose repeats are a series), else `lastTimestamp`, else `eventTime`.
fn last_seen(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0)
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
}

fn event_line(e: &Event) -> EventLine {
    // A series counts its repeats; a core event its `count`; one occurrence otherwise.
    let count = e
        .series
        .as_ref()
        .and_then(|s| s.count)
        .or(e.count)
        .filter(|c| *c > 0)
        .unwrap_or(1);
    EventLine {
        reason: e.reason.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        count,
        last_seen: last_seen(e).map(|t| t.to_string()),
    }
}

/// Explain `pod` against the cluster's ledger at `now`.
pub fn explain(
    pod: &Pod,
    gpunodes: &[GpuNode],
    ledger: &Ledger,
    events: &[Event],
    now: SystemTime,
) -> Explanation {
    let scheduler_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.scheduler_name.clone())
        .unwrap_or_default();
    let mut events: Vec<&Event> = events
        .iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("FailedScheduling" | "Scheduled" | "FailedBinding")
            )
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(last_seen(e)));
    let mut out = Explanation {
        pod: pod_name(pod),
        state: PodState::NoVram,
        resource: None,
        units: None,
        request_bytes: None,
        scheduler_name: scheduler_name.clone(),
        largest_gpu_bytes: ledger.largest_gpu_bytes(),
        nodes: Vec::new(),
        events: events.into_iter().map(event_line).collect(),
        notes: Vec::new(),
    };
    // A bad `vramslice.io/policy` annotation fails the extender's filter as a bad request does
    // (any default policy: only whether the annotation reads matters).
    // A pod already bound is read as the books read it: a placement rule added since does not
    // make it invalid.
    let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
    let read = if bound {
        bound_pod_request
    } else {
        pod_request
    };
    let request = read(pod, &VramUnit::ALL).and_then(|r| {
        if r.is_some() {
            policy_of(
                &pod_name(pod),
                pod.metadata.annotations.as_ref(),
                Policy::Binpack,
            )?;
        }
        Ok(r)
    });
    let request = match request {
        Ok(Some(r)) => r,
        Ok(None) => return out,
        Err(e) => {
            out.state = PodState::InvalidRequest {
                reason: e.to_string(),
            };
            return out;
        }
    };
    out.resource = Some(request.unit.resource_name().to_string());
    out.units = Some(request.units);
    out.request_bytes = Some(request.bytes());
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        let gpu_uuid = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_GPU_UUID))
            .cloned();
        out.state = PodState::Bound { node, gpu_uuid };
        return out;
    }
    let mut names: Vec<String> = gpunodes
        .iter()
        .filter_map(|g| g.metadata.name.clone())
        .collect();
    names.sort();
    names.dedup();
    for node in names {
        let verdict = match ledger.check(&node, request, now) {
            Ok(()) => NodeVerdict {
                node,
                fits: true,
                reason: None,
                unresolvable: false,
            },
            Err(rejection) => NodeVerdict {
                node,
                fits: false,
                unresolvable: rejection.is_unresolvable(),
                reason: Some(rejection.to_string()),
            },
        };
        out.nodes.push(verdict);
    }
    let fits_on = out.nodes.iter().filter(|n| n.fits).count();
    out.state = PodState::Pending { fits_on };
    if scheduler_name != SCHEDULER_NAME {
        out.notes.push(format!(
            "the pod's schedulerName is {scheduler_name:?}, not {SCHEDULER_NAME:?}: vramslice does not place it \
             (is the vramslice webhook installed, or was the pod created before it?)"
        ));
    }
    if gpunodes.is_empty() {
        out.notes.push(
            "no GpuNode objects: is the vramslice device plugin running on GPU nodes?".into(),
        );
    }
    if let Some(largest) = out.largest_gpu_bytes
        && request.share_bytes() > largest
    {
        // A pod spanning GPUs (vramslice.io/gpus) needs its share on each.
        let on = if request.gpus > 1 {
            format!("on each of {} GPUs", request.gpus)
        } else {
            "on one GPU".to_string()
        };
        out.notes.push(format!(
            "the pod needs {} {on} but the largest GPU in the cluster advertises {}: it can never fit; \
             lower its request",
            vramslice_core::format_bytes(request.share_bytes()),
            vramslice_core::format_bytes(largest)
        ));
    } else if fits_on > 0 && scheduler_name == SCHEDULER_NAME {
        out.notes.push(
            "it fits now: the scheduler should bind it on its next attempt (pending pods are retried with backoff)"
                .into(),
        );
    }
    out
}
