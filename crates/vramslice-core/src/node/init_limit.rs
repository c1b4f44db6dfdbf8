//! A pod's limit on its GPUs while one of its plain init containers has not completed.
//!
//! The kubelet allocates devices to every container of a pod at admission, init containers
//! included, but its PodResources record lists only app and sidecar containers; so the limit
//! [`build_report`](crate::node::publish::build_report) gives a pod (its listed units) leaves out
//! a plain init container. Such a container runs before the app containers and may use more than
//! they do (an 8 GiB engine build before a 4 GiB server); measured against the apps' limit it
//! would be a breach, and with no app container asking for VRAM its processes would belong to no
//! listed pod at all.
//!
//! [`apply_init_limits`] fixes the report: while a pod has a plain init container asking for
//! units that has not completed, its limit on each of its GPUs is at least its even share of the
//! pod's effective request over the containers that may still run (Kubernetes' rule,
//! [`pod_units`]: the largest init container plus the sidecars started before it, or the app
//! containers plus all sidecars). Its GPUs are those the report lists it on (its containers'
//! device IDs); when it lists none, those its `vramslice.io/gpu-uuid` annotation names, where it
//! is added with no units held so that its processes count as its own. A pod with neither is
//! left as it is.

use crate::cluster::placement::{InitUnits, PodRequest, pod_units};
use crate::node::publish::{GpuSample, NodeReport, PodReport};
use crate::node::sample::ProcessSample;

/// A pod of the node with a plain init container asking for units that has not completed, as
/// [`apply_init_limits`] reads it. Units are those of the report's resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitPhasePod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, when known.
    pub uid: Option<String>,
    /// The GPUs its `vramslice.io/gpu-uuid` annotation names (empty when not annotated).
    pub annotated_gpus: Vec<String>,
    /// Units of each app container.
    pub app: Vec<u64>,
    /// Its sidecars and its plain init containers not yet completed, in spec order (completed
    /// ones will not run again).
    pub init: Vec<InitUnits>,
}

impl InitPhasePod {
    /// Whether a plain init container asking for units is among [`InitPhasePod::init`].
    pub fn initialising(&self) -> bool {
        self.init.iter().any(|c| !c.sidecar && c.units > 0)
    }

    /// The pod's effective request over the containers that may still run, in units.
    pub fn units(&self) -> u64 {
        pod_units(&self.app, &self.init)
    }

    fn is(&self, p: &PodReport) -> bool {
        let uid_agrees = match (&self.uid, &p.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        p.namespace == self.namespace && p.name == self.name && uid_agrees
    }
}

/// Raise the limits of `pods` in `report` (built from `samples`) to what their unfinished plain
/// init containers may use, adding a pod on its annotated GPUs when the report lists it on none.
/// Limits are only ever raised; allocated units and the summary stay as the kubelet's record
/// says.
pub fn apply_init_limits(report: &mut NodeReport, samples: &[GpuSample], pods: &[InitPhasePod]) {
    for pod in pods.iter().filter(|p| p.initialising()) {
        let listed: Vec<usize> = (0..report.gpus.len())
            .filter(|&i| report.gpus[i].pods.iter().any(|p| pod.is(p)))
            .collect();
        // Its init container's units are spread over the pod's assigned GPUs (a sidecar listed
        // on one GPU alone, having taken another pod's place, does not make it one GPU's).
        let annotated = annotated(report, pod);
        let mut targets = listed;
        for i in &annotated {
            if !targets.contains(i) {
                targets.push(*i);
            }
        }
        if targets.is_empty() {
            continue;
        }
        let spread = if annotated.is_empty() {
            targets.len()
        } else {
            annotated.len()
        };
        let count = u32::try_from(spread).unwrap_or(u32::MAX);
        let share = PodRequest::spanning(report.unit, pod.units(), count).share_bytes();
        for i in targets {
            let gpu = &mut report.gpus[i];
            if let Some(entry) = gpu.pods.iter_mut().find(|p| pod.is(p)) {
                entry.limit_bytes = entry.limit_bytes.max(share);
                entry.initialising = true;
                continue;
            }
            let sample = samples.iter().find(|s| s.uuid == gpu.uuid);
            let is_own = |p: &ProcessSample| pod.uid.is_some() && p.pod_uid == pod.uid;
            let own: Vec<u32> = sample
                .map(GpuSample::listed_processes)
                .unwrap_or_default()
                .iter()
                .filter(|p| is_own(p))
                .map(|p| p.pid)
                .collect();
            gpu.processes_without_pod.retain(|s| !own.contains(&s.pid));
            let entry = PodReport {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                allocated_units: 0,
                limit_bytes: share,
                used_bytes: pod.uid.as_ref().and(sample).and_then(|s| s.used_by(is_own)),
                initialising: true,
                sharing_uids: Vec::new(),
            };
            let at = gpu
                .pods
                .partition_point(|p| (&p.namespace, &p.name) < (&entry.namespace, &entry.name));
            gpu.pods.insert(at, entry);
        }
    }
}

/// Positions in the report of the GPUs the pod's annotation names (those the node has).
fn annotated(report: &NodeReport, pod: &InitPhasePod) -> Vec<usize> {
    let mut out: Vec<usize> = pod
        .annotated_gpus
        .iter()
        .filter_map(|uuid| report.gpus.iter().position(|g| &g.uuid == uuid))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests;
