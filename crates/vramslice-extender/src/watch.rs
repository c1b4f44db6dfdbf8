//! Keeps the ledger current from the API server: a watch of every pod (filtered client-side to
//! bound pods that request a `vramslice.io/vram-*` resource) and a watch of `GpuNode` objects.
//!
//! Each watch (kube-runtime's `watcher`, which re-lists after a desync) buffers the objects of
//! a (re-)list and swaps them into the ledger at `InitDone`, so pods or readings that vanished
//! while the watch was down are dropped; after the first complete list the extender is marked
//! synced for that kind. Binds in flight survive a re-list. The drivers take any stream of
//! watcher events, so tests feed them `futures::stream::iter`.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use vramslice_api::GpuNode;
use vramslice_core::cluster::ledger::{NodeReading, PodRecord};

use crate::convert::{PodFate, node_reading, pod_fate};
use crate::extender::Extender;

/// How long a reservation may wait for the API server to show its pod bound.
pub const RESERVATION_TTL: Duration = Duration::from_secs(300);

/// What the watches list from: the API server's most recent state, not whatever its cache
/// holds (`resourceVersion=0`, kube-runtime's default). The ledger a restarted extender
/// rebuilds from its first list is what it places by once ready; a stale one misses pods
/// bound just before and promises their room again. (Since 1.31 the API server serves such
/// lists from its cache once that has caught up, so they cost little more.)
fn from_latest() -> watcher::Config {
    watcher::Config::default().list_semantic(watcher::ListSemantic::MostRecent)
}

/// The watch of every pod in the cluster, with kube-runtime's default backoff.
pub fn pod_events(client: Client) -> impl Stream<Item = Result<Event<Pod>, watcher::Error>> + Send {
    watcher::watcher(Api::<Pod>::all(client), from_latest()).default_backoff()
}

/// The watch of every `GpuNode`, with kube-runtime's default backoff.
pub fn gpunode_events(
    client: Client,
) -> impl Stream<Item = Result<Event<GpuNode>, watcher::Error>> + Send {
    watcher::watcher(Api::<GpuNode>::all(client), from_latest()).default_backoff()
}

/// Apply pod events to the ledger until the stream ends.
pub async fn drive_pods<S, E>(ext: Arc<Extender>, events: S)
where
    S: Stream<Item = Result<Event<Pod>, E>>,
    E: std::fmt::Display,
{
    let accepted = ext.config().resources.clone();
    let mut buffer: Vec<PodRecord> = Vec::new();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(pod)) => {
                if let PodFate::Bound(record) = pod_fate(&pod, &accepted) {
                    buffer.push(record);
                }
            }
            Ok(Event::InitDone) => {
                let count = buffer.len();
                ext.ledger_mut().replace_pods(std::mem::take(&mut buffer));
                ext.mark_pods_synced();
                tracing::info!(pods = count, "pod list synced into the ledger");
            }
            Ok(Event::Apply(pod)) => match pod_fate(&pod, &accepted) {
                PodFate::Bound(record) => ext.ledger_mut().observe_pod(record),
                // Most pods in a cluster hold no VRAM: skip the write lock for them.
                PodFate::Gone(uid) if ext.ledger().has_pod(&uid) => {
                    ext.ledger_mut().forget_pod(&uid);
                }
                PodFate::Gone(_) => {}
                PodFate::Pending => {}
            },
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref()
                    && ext.ledger().has_pod(uid)
                {
                    ext.ledger_mut().forget_pod(uid);
                }
            }
            Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
        }
    }
}

/// Apply `GpuNode` events to the ledger until the stream ends.
pub async fn drive_gpunodes<S, E>(ext: Arc<Extender>, events: S)
where
    S: Stream<Item = Result<Event<GpuNode>, E>>,
    E: std::fmt::Display,
{
    let mut buffer: Vec<(String, Result<NodeReading, String>)> = Vec::new();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(gpunode)) => {
                let (node, reading) = node_reading(&gpunode);
                buffer.push((node, reading.map_err(|e| e.to_string())));
            }
            Ok(Event::InitDone) => {
                let count = buffer.len();
                ext.ledger_mut()
                    .replace_readings(std::mem::take(&mut buffer));
                ext.mark_gpunodes_synced();
                tracing::info!(gpunodes = count, "GpuNode list synced into the ledger");
            }
            Ok(Event::Apply(gpunode)) => {
                let (node, reading) = node_reading(&gpunode);
                let mut ledger = ext.ledger_mut();
                match reading {
                    Ok(reading) => ledger.set_reading(&node, reading),
                    Err(reason) => {
                        tracing::warn!(node = %node, reason = %reason, "GpuNode unusable");
                        ledger.set_reading_invalid(&node, reason.to_string());
                    }
                }
            }
            Ok(Event::Delete(gpunode)) => {
                if let Some(node) = gpunode.metadata.name.as_deref() {
                    ext.ledger_mut().remove_reading(node);
                }
            }
            Err(e) => tracing::warn!(error = %e, "GpuNode watch error; retrying"),
        }
    }
}

/// Every `period`, drop reservations the API server has not shown bound within `ttl`.
pub async fn expire_reservations(ext: Arc<Extender>, period: Duration, ttl: Duration) {
    let mut ticker = tokio::time::interval(period);
    loop {
        ticker.tick().await;
        let now = ext.now();
        let expired = ext.ledger_mut().expire_reservations(now, ttl);
        for uid in expired {
            tracing::warn!(uid = %uid, "reservation expired without the pod showing up bound");
        }
    }
}
