//! The Kubernetes calls bind needs, behind a small trait so the bind logic and the HTTP layer
//! can be tested without a cluster: read a pod, create its Binding (which carries the
//! placement annotations: the API server merges a Binding's annotations into the pod in the
//! same write that sets `spec.nodeName`, so a pod is never seen bound without its GPU).

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

/// A failed API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The object does not exist.
    #[error("not found")]
    NotFound,
    /// The API server refused (forbidden, invalid...): the write did not happen.
    #[error("{0}")]
    Refused(String),
    /// A conflict (409): the object is not as the write needs it (a pod already assigned, a
    /// UID precondition failed), which is also what a client's retry of a write that took
    /// gets: reading the object back tells which.
    #[error("{0}")]
    Conflict(String),
    /// A server error (5xx, such as a timeout while the write commits): the write may have
    /// happened, or may still.
    #[error("{0}")]
    Unsure(String),
    /// The API server could not be reached or answered garbage.
    #[error("{0}")]
    Transport(String),
}

impl From<kube::Error> for ApiError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(status) if status.code == 404 => ApiError::NotFound,
            kube::Error::Api(status) if status.code == 409 => {
                ApiError::Conflict(format!("{} ({})", status.message, status.code))
            }
            kube::Error::Api(status) if status.code >= 500 => {
                ApiError::Unsure(format!("{} ({})", status.message, status.code))
            }
            kube::Error::Api(status) => {
                ApiError::Refused(format!("{} ({})", status.message, status.code))
            }
            other => ApiError::Transport(other.to_string()),
        }
    }
}

/// What bind needs from the API server.
pub trait ClusterApi: Send + Sync + 'static {
    /// Read a pod.
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Pod, ApiError>>;

    /// Create the pod's Binding to `node` (POST pods/{name}/binding), guarded by its UID; the
    /// API server merges `annotations` into the pod's annotations in the same update.
    fn bind_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
        node: &'a str,
        annotations: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ApiError>>;
}

/// [`ClusterApi`] over a kube client.
#[derive(Clone)]
pub struct KubeCluster {
    client: kube::Client,
}

impl KubeCluster {
    /// Wrap a client.
    pub fn new(client: kube::Client) -> Self {
        KubeCluster { client }
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

impl ClusterApi for KubeCluster {
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Pod, ApiError>> {
        Box::pin(async move { Ok(self.pods(namespace).get(name).await?) })
    }

    fn bind_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
        node: &'a str,
        annotations: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    uid: (!uid.is_empty()).then(|| uid.to_string()),
                    annotations: (!annotations.is_empty()).then_some(annotations),
                    ..ObjectMeta::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.to_string()),
                    ..ObjectReference::default()
                },
            };
            let _: serde_json::Value = self
                .pods(namespace)
                .create_subresource("binding", name, &PostParams::default(), &binding)
                .await?;
            Ok(())
        })
    }
}
