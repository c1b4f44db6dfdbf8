//! The kubelet's PodResources API: which containers hold which of our device IDs. The kubelet's
//! record is the source of truth for allocations.

use std::path::Path;
use std::time::Duration;

use vramslice_core::node::publish::ContainerAllocationRecord;

use crate::proto::podresources::ListPodResourcesRequest;
use crate::proto::podresources::pod_resources_lister_client::PodResourcesListerClient;

/// The PodResources call failed.
#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    /// The socket cannot be dialled.
    #[error("cannot connect to the kubelet PodResources socket {path}: {message}")]
    Connect {
        /// The socket.
        path: String,
        /// Why, with its causes.
        message: String,
    },
    /// List failed.
    #[error("kubelet PodResources List failed: {0}")]
    List(#[from] tonic::Status),
}

/// Every container's device IDs of `resource`, per pod (pod UIDs are not in this API).
pub async fn list_allocations(
    socket: &Path,
    resource: &str,
) -> Result<Vec<ContainerAllocationRecord>, PodResourcesError> {
    let channel = crate::uds::connect(socket, Duration::from_secs(2))
        .await
        .map_err(|e| PodResourcesError::Connect {
            path: socket.display().to_string(),
            message: crate::uds::error_chain(&e),
        })?;
    let response = PodResourcesListerClient::new(channel)
        .list(ListPodResourcesRequest {})
        .await?
        .into_inner();
    Ok(records_of(response, resource))
}

/// The records of `resource` in a List answer.
pub fn records_of(
    response: crate::proto::podresources::ListPodResourcesResponse,
    resource: &str,
) -> Vec<ContainerAllocationRecord> {
    let mut out = Vec::new();
    for pod in response.pod_resources {
        for container in pod.containers {
            let device_ids: Vec<String> = container
                .devices
                .into_iter()
                .filter(|d| d.resource_name == resource)
                .flat_map(|d| d.device_ids)
                .collect();
            if !device_ids.is_empty() {
                out.push(ContainerAllocationRecord {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    pod_uid: None,
                    device_ids,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::podresources::{
        ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources,
    };

    #[test]
    fn keeps_only_our_resource() {
        let response = ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "web".into(),
                namespace: "ns".into(),
                containers: vec![
                    ContainerResources {
                        name: "a".into(),
                        devices: vec![
                            ContainerDevices {
                                resource_name: "vramslice.io/vram-gib".into(),
                                device_ids: vec!["GPU-a::0".into()],
                                topology: None,
                            },
                            ContainerDevices {
                                resource_name: "nvidia.com/gpu".into(),
                                device_ids: vec!["GPU-a".into()],
                                topology: None,
                            },
                        ],
                        ..Default::default()
                    },
                    ContainerResources {
                        name: "b".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        };
        let records = records_of(response, "vramslice.io/vram-gib");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].device_ids, vec!["GPU-a::0".to_string()]);
        assert_eq!(
            (records[0].namespace.as_str(), records[0].pod.as_str()),
            ("ns", "web")
        );
    }
}
