//! Pods of this node from the API server: a watch-fed cache of them ([`NodePods`]), read by
//! GetPreferredAllocation and the publisher through `vramslice_api::convert::node_pods`.
//!
//! GetPreferredAllocation is asked at every container start, so it reads the cache; only when
//! the cache does not yet hold a pod waiting for the requested size (the watch is behind the
//! kubelet's, or not synced yet) does it fall back to a consistent LIST ([`NodePods::list`]).

use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

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

/// This node's pods: a cache fed by one watch (`spec.nodeName=<node>`), and a consistent LIST
/// for the rare lookup the cache cannot answer yet.
#[derive(Clone)]
pub struct NodePods {
    client: kube::Client,
    node: String,
    cache: Store<Pod>,
}

impl std::fmt::Debug for NodePods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePods")
            .field("node", &self.node)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl NodePods {
    /// Pods of `node`, with a cache kept by a watch that runs until `shutdown` fires. The
    /// watch re-lists with backoff after errors; until its first list arrives, lookups LIST.
    pub fn watched(
        client: kube::Client,
        node: impl Into<String>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Self {
        let node = node.into();
        let (store, writer) = reflector::store::<Pod>();
        let api: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&node_selector(&node));
        let events = watcher(api, config)
            .default_backoff()
            // Managed fields are most of a pod's bytes and nothing here reads them.
            .modify(|pod| pod.metadata.managed_fields = None)
            .reflect(writer);
        let watched_node = node.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::warn!(node = %watched_node, error = %e, "pod watch failed; re-listing with backoff"),
                        None => return,
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        });
        NodePods {
            client,
            node,
            cache: store,
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

    /// The cached pods, or `None` while the watch has not delivered its first list. May miss
    /// the newest pods and still hold just-deleted ones.
    pub fn cached(&self) -> Option<Vec<Arc<Pod>>> {
        match self.cache.wait_until_ready().now_or_never() {
            Some(Ok(())) => Some(self.cache.state()),
            _ => None,
        }
    }

    /// Pods bound to this node, read from the API server now (a consistent LIST).
    pub async fn list(&self) -> Result<Vec<Pod>, PodListError> {
        let api: Api<Pod> = Api::all(self.client.clone());
        api.list(&ListParams::default().fields(&node_selector(&self.node)))
            .await
            .map(|list| list.items)
            .map_err(|source| PodListError {
                node: self.node.clone(),
                source,
            })
    }
}

/// The field selector of the pods bound to `node`.
fn node_selector(node: &str) -> String {
    format!("spec.nodeName={node}")
}
