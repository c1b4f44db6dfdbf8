//! Pods of this node from the API server: the pending pods whose assigned GPU
//! GetPreferredAllocation prefers (pure selection in [`assigned_gpus`]), and the UID of each pod
//! for the publisher.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use vramslice_api::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID};
use vramslice_core::parse_bytes;

/// A pod lookup that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list pods of node {node}: {source}")]
pub struct PodListError {
    /// The node.
    pub node: String,
    /// The API error.
    #[source]
    pub source: kube::Error,
}

/// Lists this node's pods through the API server.
#[derive(Clone)]
pub struct PodLister {
    client: kube::Client,
    node: String,
}

impl std::fmt::Debug for PodLister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLister")
            .field("node", &self.node)
            .finish()
    }
}

impl PodLister {
    /// A lister for `node`'s pods.
    pub fn new(client: kube::Client, node: impl Into<String>) -> Self {
        PodLister {
            client,
            node: node.into(),
        }
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Pods bound to this node; only those in phase Pending when `pending_only`.
    pub async fn list(&self, pending_only: bool) -> Result<Vec<Pod>, PodListError> {
        let mut selector = format!("spec.nodeName={}", self.node);
        if pending_only {
            selector.push_str(",status.phase=Pending");
        }
        let api: Api<Pod> = Api::all(self.client.clone());
        api.list(&ListParams::default().fields(&selector))
            .await
            .map(|list| list.items)
            .map_err(|source| PodListError {
                node: self.node.clone(),
                source,
            })
    }
}

/// Whether none of the pod's containers has started yet.
fn not_started(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    if status.phase.as_deref().is_some_and(|p| p != "Pending") {
        return false;
    }
    status.container_statuses.iter().flatten().all(|cs| {
        cs.state
            .as_ref()
            .is_none_or(|s| s.running.is_none() && s.terminated.is_none())
    })
}

/// Units of `resource` one container asks for (limits, else requests), in whole units.
fn container_request(
    container: &k8s_openapi::api::core::v1::Container,
    resource: &str,
) -> Option<u64> {
    let resources = container.resources.as_ref()?;
    let quantity = resources
        .limits
        .as_ref()
        .and_then(|l| l.get(resource))
        .or_else(|| resources.requests.as_ref().and_then(|r| r.get(resource)))?;
    parse_bytes(&quantity.0).ok()
}

/// GPUs of pending pods that are waiting for an allocation of exactly `size` units of
/// `resource`, oldest assignment first (by the `assigned-at` annotation, then creation time,
/// then name). A pod qualifies when it is bound (`spec.nodeName` set), carries the GPU
/// annotation, has not started any container, is not in `already_allocated` (namespace, name),
/// and has a container asking for exactly `size` units. GPUs appear once, at their first pod.
pub fn assigned_gpus(
    pods: &[Pod],
    resource: &str,
    size: u64,
    already_allocated: &BTreeSet<(String, String)>,
) -> Vec<String> {
    let mut candidates: Vec<(String, String, String, String)> = pods
        .iter()
        .filter(|pod| pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()))
        .filter(|pod| not_started(pod))
        .filter(|pod| {
            let key = (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            );
            !already_allocated.contains(&key)
        })
        .filter(|pod| {
            pod.spec.as_ref().is_some_and(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .any(|c| container_request(c, resource) == Some(size))
            })
        })
        .filter_map(|pod| {
            let annotations = pod.metadata.annotations.as_ref()?;
            let gpu = annotations.get(ANNOTATION_GPU_UUID)?.trim().to_string();
            if gpu.is_empty() {
                return None;
            }
            let assigned = annotations
                .get(ANNOTATION_ASSIGNED_AT)
                .cloned()
                .unwrap_or_default();
            let created = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            Some((assigned, created, name, gpu))
        })
        .collect();
    candidates.sort();
    let mut seen = BTreeSet::new();
    candidates
        .into_iter()
        .filter_map(|(_, _, _, gpu)| seen.insert(gpu.clone()).then_some(gpu))
        .collect()
}

/// (namespace, name) → UID of the given pods.
pub fn uids_by_name(pods: &[Pod]) -> BTreeMap<(String, String), String> {
    pods.iter()
        .filter_map(|p| {
            Some((
                (p.metadata.namespace.clone()?, p.metadata.name.clone()?),
                p.metadata.uid.clone()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, gpu: Option<&str>, assigned_at: &str, units: u64, started: bool) -> Pod {
        let mut annotations = serde_json::Map::new();
        if let Some(gpu) = gpu {
            annotations.insert(ANNOTATION_GPU_UUID.into(), json!(gpu));
            annotations.insert(ANNOTATION_ASSIGNED_AT.into(), json!(assigned_at));
        }
        let state = if started {
            json!({"running": {}})
        } else {
            json!({"waiting": {"reason": "ContainerCreating"}})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "side", "image": "x"},
                {"name": "main", "image": "x", "resources": {"limits": {"vramslice.io/vram-gib": units.to_string()}}}
            ]},
            "status": {"phase": if started { "Running" } else { "Pending" },
                       "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}
        }))
        .unwrap()
    }

    const RES: &str = "vramslice.io/vram-gib";

    #[test]
    fn picks_pending_pods_of_the_right_size_oldest_first() {
        let pods = vec![
            pod("late", Some("GPU-b"), "2026-01-01T00:00:05Z", 6, false),
            pod("early", Some("GPU-a"), "2026-01-01T00:00:01Z", 6, false),
            pod(
                "other-size",
                Some("GPU-c"),
                "2026-01-01T00:00:00Z",
                4,
                false,
            ),
            pod("running", Some("GPU-d"), "2026-01-01T00:00:00Z", 6, true),
            pod("unassigned", None, "", 6, false),
            pod("same-gpu", Some("GPU-a"), "2026-01-01T00:00:09Z", 6, false),
        ];
        let none = BTreeSet::new();
        assert_eq!(assigned_gpus(&pods, RES, 6, &none), vec!["GPU-a", "GPU-b"]);
        assert_eq!(assigned_gpus(&pods, RES, 4, &none), vec!["GPU-c"]);
        assert!(assigned_gpus(&pods, RES, 5, &none).is_empty());
        assert!(assigned_gpus(&pods, "vramslice.io/vram-512mib", 6, &none).is_empty());
        let done = BTreeSet::from([("default".to_string(), "early".to_string())]);
        assert_eq!(assigned_gpus(&pods, RES, 6, &done), vec!["GPU-b", "GPU-a"]);
    }

    #[test]
    fn unbound_pods_do_not_count() {
        let mut p = pod("x", Some("GPU-a"), "t", 1, false);
        p.spec.as_mut().unwrap().node_name = None;
        assert!(assigned_gpus(&[p], RES, 1, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn uids_are_keyed_by_namespace_and_name() {
        let pods = vec![pod("a", None, "", 1, true)];
        assert_eq!(
            uids_by_name(&pods)
                .get(&("default".to_string(), "a".to_string()))
                .map(String::as_str),
            Some("uid-a")
        );
    }
}
