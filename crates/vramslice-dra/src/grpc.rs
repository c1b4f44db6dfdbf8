//! The kubelet's `v1.DRAPlugin` service over the [`Driver`]: each claim of a call is prepared
//! or unprepared on its own, and its error (if any) goes back in that claim's entry, so one bad
//! claim never fails the others.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::driver::{ClaimRef, Driver};
use crate::proto::dra::dra_plugin_server::DraPlugin;
use crate::proto::dra::{
    Claim, Device, NodePrepareResourceResponse, NodePrepareResourcesRequest,
    NodePrepareResourcesResponse, NodeUnprepareResourceResponse, NodeUnprepareResourcesRequest,
    NodeUnprepareResourcesResponse,
};

/// The gRPC face of a [`Driver`].
#[derive(Clone)]
pub struct DraService {
    driver: Arc<Driver>,
}

impl DraService {
    /// Serve `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        DraService { driver }
    }
}

fn claim_ref(claim: &Claim) -> Result<ClaimRef, String> {
    if claim.uid.is_empty() || claim.name.is_empty() || claim.namespace.is_empty() {
        return Err(format!(
            "claim {}/{} (uid {:?}) lacks a namespace, name or UID",
            claim.namespace, claim.name, claim.uid
        ));
    }
    Ok(ClaimRef {
        namespace: claim.namespace.clone(),
        name: claim.name.clone(),
        uid: claim.uid.clone(),
    })
}

#[tonic::async_trait]
impl DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<NodePrepareResourcesRequest>,
    ) -> Result<Response<NodePrepareResourcesResponse>, Status> {
        let mut claims = HashMap::new();
        for claim in &request.get_ref().claims {
            let outcome = match claim_ref(claim) {
                Ok(claim_ref) => self
                    .driver
                    .prepare(&claim_ref)
                    .await
                    .map_err(|e| e.to_string()),
                Err(bad) => Err(bad),
            };
            let answer = match outcome {
                Ok(devices) => NodePrepareResourceResponse {
                    devices: devices
                        .into_iter()
                        .map(|d| Device {
                            request_names: d.request_names,
                            pool_name: d.pool,
                            device_name: d.device,
                            cdi_device_ids: d.cdi_device_ids,
                            share_id: d.share_id,
                        })
                        .collect(),
                    error: String::new(),
                },
                Err(error) => {
                    tracing::warn!(claim = %format_args!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, %error, "prepare failed");
                    NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    }
                }
            };
            claims.insert(claim.uid.clone(), answer);
        }
        Ok(Response::new(NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<NodeUnprepareResourcesRequest>,
    ) -> Result<Response<NodeUnprepareResourcesResponse>, Status> {
        let mut claims = HashMap::new();
        for claim in &request.get_ref().claims {
            let outcome = match claim_ref(claim) {
                Ok(claim_ref) => self
                    .driver
                    .unprepare(&claim_ref)
                    .await
                    .map_err(|e| e.to_string()),
                Err(bad) => Err(bad),
            };
            let error = outcome.err().unwrap_or_default();
            if !error.is_empty() {
                tracing::warn!(claim = %format_args!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, %error, "unprepare failed");
            }
            claims.insert(claim.uid.clone(), NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(NodeUnprepareResourcesResponse { claims }))
    }
}
