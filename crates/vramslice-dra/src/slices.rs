//! Writing the node's ResourceSlice: the core decides whether the devices changed enough
//! ([`slice_publish_reason`]); this module keeps what was published, bumps the pool
//! generation on every write, holds writes at least a minimum interval apart, and writes
//! through a [`SliceWriter`] (the API server, or memory in tests).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::Client;
use kube::api::{Api, PostParams};
use vramslice_api::convert::dra::{SliceSettings, resource_slice, slice_name};
use vramslice_core::node::dra::{SliceDevice, SlicePublishReason, slice_publish_reason};

/// A future a slice writer returns.
pub type WriteFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, WriteError>> + Send + 'a>>;

/// Why the slice could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("writing ResourceSlice {name}: {detail}")]
pub struct WriteError {
    /// The slice.
    pub name: String,
    /// What failed.
    pub detail: String,
}

/// Stores the node's slice.
pub trait SliceWriter: Send + Sync + 'static {
    /// The pool generation of the slice stored now, if any.
    fn current_generation<'a>(&'a self, name: &'a str) -> WriteFuture<'a, Option<i64>>;
    /// Create or replace the slice.
    fn write(&self, slice: ResourceSlice) -> WriteFuture<'_, ()>;
}

/// Slices held in memory, for tests of what is published (here and in the node agent): every
/// slice written is kept, oldest first, and the last one is the stored one; a write fails
/// while `failing` is set.
#[derive(Clone, Default)]
pub struct MemorySlices {
    /// Every slice written, oldest first.
    pub stored: std::sync::Arc<std::sync::Mutex<Vec<ResourceSlice>>>,
    /// Writes fail (as the API server's 503) while set.
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Reads of the stored slice fail while set.
    pub reads_failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MemorySlices {
    /// The slices written so far.
    pub fn written(&self) -> Vec<ResourceSlice> {
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl SliceWriter for MemorySlices {
    fn current_generation<'a>(&'a self, name: &'a str) -> WriteFuture<'a, Option<i64>> {
        if self.reads_failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async move {
                Err(WriteError {
                    name: name.to_string(),
                    detail: "503 Service Unavailable".into(),
                })
            });
        }
        let last = self.written().last().map(|s| s.spec.pool.generation);
        Box::pin(async move { Ok(last) })
    }

    fn write(&self, slice: ResourceSlice) -> WriteFuture<'_, ()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            let name = slice.metadata.name.clone().unwrap_or_default();
            return Box::pin(async move {
                Err(WriteError {
                    name,
                    detail: "503 Service Unavailable".into(),
                })
            });
        }
        self.stored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(slice);
        Box::pin(async { Ok(()) })
    }
}

/// Slices in the API server.
#[derive(Clone)]
pub struct KubeSlices {
    api: Api<ResourceSlice>,
}

impl KubeSlices {
    /// Write slices through `client`.
    pub fn new(client: Client) -> Self {
        KubeSlices {
            api: Api::all(client),
        }
    }
}

impl SliceWriter for KubeSlices {
    fn current_generation<'a>(&'a self, name: &'a str) -> WriteFuture<'a, Option<i64>> {
        Box::pin(async move {
            crate::bounded(self.api.get_opt(name))
                .await
                .map(|found| found.map(|s| s.spec.pool.generation))
                .map_err(|detail| WriteError {
                    name: name.to_string(),
                    detail,
                })
        })
    }

    fn write(&self, mut slice: ResourceSlice) -> WriteFuture<'_, ()> {
        Box::pin(async move {
            let name = slice.metadata.name.clone().unwrap_or_default();
            let err = |detail: String| WriteError {
                name: name.clone(),
                detail,
            };
            match crate::bounded(self.api.get_opt(&name)).await.map_err(err)? {
                Some(existing) => {
                    slice.metadata.resource_version = existing.metadata.resource_version;
                    crate::bounded(self.api.replace(&name, &PostParams::default(), &slice))
                        .await
                        .map_err(err)?;
                }
                None => {
                    crate::bounded(self.api.create(&PostParams::default(), &slice))
                        .await
                        .map_err(err)?;
                }
            }
            Ok(())
        })
    }
}

/// When and what to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePolicy {
    /// A capacity change smaller than this is not published.
    pub threshold_bytes: u64,
    /// Writes are at least this far apart (the first write, device changes and a GPU falling
    /// unhealthy excepted); a rise of capacity or a recovery waits
    /// [`vramslice_core::node::dra::SLOW_PACE_FACTOR`] times
    /// as long.
    pub min_interval: Duration,
    /// How often the stored slice is checked while nothing needs writing: deleted (a
    /// starting kubelet's wipe, which retries for minutes, or a person) or written by someone
    /// else, it is written again.
    pub verify_interval: Duration,
}

/// The publisher's memory of what it wrote.
pub struct SlicePublisher<W: SliceWriter> {
    writer: W,
    settings: SliceSettings,
    policy: SlicePolicy,
    published: Option<Vec<SliceDevice>>,
    last_write: Option<Instant>,
    /// When the stored slice was last known to be ours (checked or written).
    verified_at: Option<Instant>,
    /// When a change held back by the pace may be written ([`SlicePublisher::deferred_until`]).
    deferred: Option<Instant>,
    writes: u64,
}

impl<W: SliceWriter> SlicePublisher<W> {
    /// A publisher for the node of `settings`.
    pub fn new(writer: W, settings: SliceSettings, policy: SlicePolicy) -> Self {
        SlicePublisher {
            writer,
            settings,
            policy,
            published: None,
            last_write: None,
            verified_at: None,
            deferred: None,
            writes: 0,
        }
    }

    /// Slices written so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// When the change the last [`SlicePublisher::observe`] held back (its pace's wait since
    /// the last write had not passed) may be written: the caller observes again then, even if
    /// no new reading comes (with a long poll interval the next one could be far later).
    /// `None` when nothing is held back.
    pub fn deferred_until(&self) -> Option<Instant> {
        self.deferred
    }

    /// Forget what was published, so the next [`SlicePublisher::observe`] writes the slice
    /// again (reason "first"), continuing the stored pool generation: for when the slice may
    /// have been deleted behind our back (a starting kubelet wipes its node's slices).
    pub fn republish(&mut self) {
        self.published = None;
    }

    /// Whether the slice has its owner (the Node's UID was read).
    pub fn has_owner(&self) -> bool {
        self.settings.node_uid.is_some()
    }

    /// The node's UID for the slice's owner reference, read again (the Node may have been
    /// deleted and made again with a new UID, as a restarted kubelet does after
    /// `kubectl delete node`): a changed UID rewrites the slice at once, since the garbage
    /// collector deletes a slice whose owner is gone.
    /// Returns whether it changed.
    pub fn set_node_uid(&mut self, uid: Option<String>) -> bool {
        if uid.is_none() || uid == self.settings.node_uid {
            return false;
        }
        tracing::info!(old = ?self.settings.node_uid, new = ?uid, "the Node's UID changed; writing the slice with the new owner");
        self.settings.node_uid = uid;
        self.published = None;
        true
    }

    /// Once every verify interval, check that the stored slice is the one last written (its
    /// pool generation); when it is gone or another, forget what was published so that it is
    /// written again at once.
    async fn verify(&mut self, now: Instant) -> Result<(), WriteError> {
        let due = self.published.is_some()
            && self
                .verified_at
                .is_none_or(|at| now.saturating_duration_since(at) >= self.policy.verify_interval);
        if !due {
            return Ok(());
        }
        let stored = self
            .writer
            .current_generation(&slice_name(&self.settings.node))
            .await?;
        self.verified_at = Some(now);
        if stored != Some(self.settings.generation) {
            tracing::warn!(stored = ?stored, ours = self.settings.generation, "ResourceSlice deleted or replaced behind our back; writing it again");
            self.published = None;
        }
        Ok(())
    }

    /// Consider `devices` at `now`: write the slice when the core says it changed and the
    /// minimum interval has passed (a changed device list is written at once). Once every
    /// verify interval the stored slice is checked first, and written again when it is gone.
    ///
    /// # Errors
    /// [`WriteError`]; what was published stays as it was, so the next call retries.
    pub async fn observe(
        &mut self,
        devices: Vec<SliceDevice>,
        now: Instant,
    ) -> Result<Option<SlicePublishReason>, WriteError> {
        // A check that cannot read the stored slice must not hold back what is to be written
        // (a GPU fallen unhealthy, a stale reading's taint): it is tried again next time.
        if let Err(e) = self.verify(now).await {
            tracing::warn!(error = %e, "cannot check the stored ResourceSlice; publishing on what was written");
        }
        self.deferred = None;
        let Some(reason) = slice_publish_reason(
            self.published.as_deref(),
            &devices,
            self.policy.threshold_bytes,
        ) else {
            return Ok(None);
        };
        let wait = reason.pace().wait(self.policy.min_interval);
        if let Some(at) = self.last_write
            && now.saturating_duration_since(at) < wait
        {
            self.deferred = Some(at + wait);
            return Ok(None);
        }
        if self.published.is_none() {
            // Continue the pool's generations across restarts: the scheduler trusts the
            // highest generation it sees.
            let name = slice_name(&self.settings.node);
            let stored = self.writer.current_generation(&name).await?;
            self.settings.generation = stored.unwrap_or(0);
        }
        let mut settings = self.settings.clone();
        settings.generation += 1;
        self.writer
            .write(resource_slice(&devices, &settings))
            .await?;
        self.settings = settings;
        self.published = Some(devices);
        self.last_write = Some(now);
        self.verified_at = Some(now);
        self.writes += 1;
        tracing::info!(generation = self.settings.generation, %reason, "published ResourceSlice");
        Ok(Some(reason))
    }
}
