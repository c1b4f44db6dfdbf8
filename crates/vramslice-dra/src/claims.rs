//! Where prepared claims come from: the API server's `ResourceClaim`s, and the pods they are
//! reserved for. A plain trait, so the driver is tested against objects held in memory.

use std::future::Future;
use std::pin::Pin;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::ListParams;
use kube::{Api, Client};

/// A future the claim source returns.
pub type ClaimFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ResourceClaim, FetchError>> + Send + 'a>>;

/// A future for a pod (`None`: there is none of that name).
pub type PodFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<Pod>, FetchError>> + Send + 'a>>;

/// Why a claim could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The API server has no such claim.
    #[error("claim {0} not found")]
    NotFound(String),
    /// The API server could not be asked.
    #[error("reading claim {claim}: {detail}")]
    Api {
        /// `namespace/name`.
        claim: String,
        /// What failed.
        detail: String,
    },
}

/// Reads one `ResourceClaim`, or one pod.
pub trait ClaimSource: Send + Sync + 'static {
    /// The claim `namespace/name` as the API server holds it now.
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> ClaimFuture<'a>;
    /// The pod `namespace/name` as the API server holds it now.
    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> PodFuture<'a>;
}

/// Claims from the API server.
#[derive(Clone)]
pub struct KubeClaims {
    client: Client,
}

impl KubeClaims {
    /// Read claims through `client`.
    pub fn new(client: Client) -> Self {
        KubeClaims { client }
    }
}

impl ClaimSource for KubeClaims {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> ClaimFuture<'a> {
        Box::pin(async move {
            let api: Api<ResourceClaim> = Api::namespaced(self.client.clone(), namespace);
            let claim = format!("{namespace}/{name}");
            match crate::bounded(api.get_opt(name)).await {
                Ok(Some(found)) => Ok(found),
                Ok(None) => Err(FetchError::NotFound(claim)),
                Err(detail) => Err(FetchError::Api { claim, detail }),
            }
        })
    }

    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> PodFuture<'a> {
        Box::pin(async move {
            // Listed by name: the node agent may list pods (it watches them), not get them.
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            crate::bounded(
                api.list(&ListParams::default().fields(&format!("metadata.name={name}"))),
            )
            .await
            .map(|l| l.items.into_iter().next())
            .map_err(|detail| FetchError::Api {
                claim: format!("pod {namespace}/{name}"),
                detail,
            })
        })
    }
}
