//! An in-memory [`ClusterApi`] for tests and benchmarks: pods in a map, every call recorded,
//! failures injectable. Binding sets the pod's `spec.nodeName` and refuses a pod already bound,
//! as the API server does.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;

use crate::cluster::{ApiError, ClusterApi};

/// A recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `get_pod(namespace, name)`.
    Get(String, String),
    /// `bind_pod(namespace, name, uid, node, annotations)`.
    Bind(String, String, String, String, BTreeMap<String, String>),
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<(String, String), Pod>,
    calls: Vec<Call>,
    fail_bind: Option<ApiError>,
    lose_bind_answer: bool,
    fail_reads_after_bind: bool,
    latency: std::time::Duration,
}

impl Inner {
    fn pod_mut(&mut self, namespace: &str, name: &str) -> Result<&mut Pod, ApiError> {
        self.pods
            .get_mut(&(namespace.to_string(), name.to_string()))
            .ok_or(ApiError::NotFound)
    }
}

/// The fake cluster.
#[derive(Default)]
pub struct FakeCluster {
    inner: Mutex<Inner>,
}

impl FakeCluster {
    /// An empty cluster.
    pub fn new() -> Self {
        FakeCluster::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add or replace a pod.
    pub fn put_pod(&self, pod: Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        self.lock().pods.insert(key, pod);
    }

    /// A pod as it is now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.lock()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Make every later bind call take `latency` (so concurrent binds overlap).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().latency = latency;
    }

    /// Wait the configured API latency, as a write to a real API server would.
    async fn api_latency(&self) {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Make later bind calls bind the pod but answer with a transport error (a lost answer).
    pub fn lose_bind_answers(&self, lose: bool) {
        self.lock().lose_bind_answer = lose;
    }

    /// Make every read of a pod fail (a transport error) once a bind call was made: the API
    /// server gone just after a Binding was sent.
    pub fn fail_reads_after_bind(&self, fail: bool) {
        self.lock().fail_reads_after_bind = fail;
    }

    /// Make every later bind call fail with `err` (or succeed again with `None`).
    pub fn fail_bind(&self, err: Option<ApiError>) {
        self.lock().fail_bind = err;
    }
}

impl ClusterApi for FakeCluster {
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Pod, ApiError>> {
        Box::pin(async move {
            let mut inner = self.lock();
            inner.calls.push(Call::Get(namespace.into(), name.into()));
            let bound_once = inner.calls.iter().any(|c| matches!(c, Call::Bind(..)));
            if inner.fail_reads_after_bind && bound_once {
                return Err(ApiError::Transport("connection refused".into()));
            }
            inner
                .pods
                .get(&(namespace.to_string(), name.to_string()))
                .cloned()
                .ok_or(ApiError::NotFound)
        })
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
            self.api_latency().await;
            let mut inner = self.lock();
            inner.calls.push(Call::Bind(
                namespace.into(),
                name.into(),
                uid.into(),
                node.into(),
                annotations.clone(),
            ));
            if let Some(err) = inner.fail_bind.clone() {
                return Err(err);
            }
            let pod = inner.pod_mut(namespace, name)?;
            if pod.metadata.uid.as_deref().unwrap_or_default() != uid {
                return Err(ApiError::Conflict(format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    pod.metadata.uid.as_deref().unwrap_or_default()
                )));
            }
            let spec = pod.spec.get_or_insert_with(Default::default);
            if let Some(bound) = &spec.node_name {
                return Err(ApiError::Conflict(format!(
                    "pod {namespace}/{name} is already assigned to node \"{bound}\" (409)"
                )));
            }
            spec.node_name = Some(node.to_string());
            pod.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .extend(annotations);
            if inner.lose_bind_answer {
                return Err(ApiError::Transport("connection reset by peer".into()));
            }
            Ok(())
        })
    }
}
