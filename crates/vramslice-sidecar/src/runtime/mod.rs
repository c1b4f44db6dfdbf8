//! The runtime: admits jobs by memory, tracks their peaks while they run, and hands out
//! [`Permit`]s that give the memory back when dropped.

mod error;
mod inner;
mod permit;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::job::Job;
use crate::metrics::Metrics;
use crate::policy::{self};
use crate::profile::Profiles;
use crate::queue::AdmissionQueue;
use crate::usage::{UsageError, UsageSource};
pub use error::{AdmitError, RuntimeError};
use inner::{Enqueued, Inner, Look, Reclaim, State, lock, sampler};
pub use permit::Permit;

/// How often [`Runtime::admit_blocking_unless`] asks whether it was cancelled while it waits.
pub const CANCEL_POLL: Duration = Duration::from_millis(20);

/// The sidecar runtime. Cheap to clone; clones share everything.
///
/// ```
/// use vramslice_sidecar::{Config, Job, ManualUsage, Runtime};
/// let usage = ManualUsage::new(0, 0);
/// let config = Config { limit: Some(10 << 30), ..Config::default() };
/// let rt = Runtime::new(config, usage.clone()).unwrap();
/// let permit = rt.admit_blocking(&Job::new("resnet").need(2 << 30)).unwrap();
/// assert_eq!(permit.reserved(), 2 << 30);
/// usage.add(1 << 30); // the job allocates
/// permit.complete();  // records its peak for next time
/// assert!(rt.render_metrics().contains("vramslice_sidecar_jobs_running 0"));
/// ```
#[derive(Debug, Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

/// What [`Runtime::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The limit in bytes.
    pub limit: u64,
    /// The most admitted at once (limit × high-water mark).
    pub capacity: u64,
    /// Live usage at the last reading.
    pub live: u64,
    /// Sum of running jobs' reservations.
    pub reserved: u64,
    /// Bytes still admissible.
    pub free: u64,
    /// Jobs running.
    pub running: usize,
    /// Jobs waiting.
    pub queued: usize,
}

impl Runtime {
    /// A runtime with this configuration, reading usage from `usage`.
    pub fn new(config: Config, usage: impl UsageSource + 'static) -> Result<Self, RuntimeError> {
        config.validate()?;
        let first = usage.read()?;
        let limit = config.limit.or(first.total).ok_or(RuntimeError::NoLimit)?;
        let profiles = match &config.profile_dir {
            Some(dir) => Profiles::in_dir(dir)?,
            None => Profiles::in_memory(),
        };
        let capacity = policy::admission_capacity(limit, &config.policy);
        let queue = AdmissionQueue::new(limit, capacity, config.queue_max);
        let metrics = Metrics::new();
        metrics.limit_bytes.set(limit);
        let inner = Arc::new(Inner {
            usage: Box::new(usage),
            profiles,
            metrics,
            state: Mutex::new(State {
                queue,
                jobs: HashMap::new(),
                last_live: first.used,
                last_own: first.own,
                reclaimed_for: None,
                last_read: 0,
            }),
            cond: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            reads: AtomicU64::new(0),
            reclaim: Reclaim::default(),
            metrics_server: std::sync::Mutex::new(None),
            config,
        });
        inner.publish(&lock(&inner.state));
        if !inner.config.sample_interval.is_zero() {
            let weak = Arc::downgrade(&inner);
            let interval = inner.config.sample_interval;
            std::thread::Builder::new()
                .name("vramslice-sampler".into())
                .spawn(move || sampler(weak, interval))
                .map_err(RuntimeError::Thread)?;
        }
        Ok(Self { inner })
    }

    /// A runtime configured from the environment (see [`crate::config`]): usage from the
    /// guard's accounting file when `VRAMSLICE_ACCOUNTING_DIR` is set, otherwise from the CUDA
    /// driver; `/metrics` served when `VRAMSLICE_METRICS_ADDR` is set.
    pub fn from_env() -> Result<Self, RuntimeError> {
        let config = Config::from_env()?;
        let rt = match &config.accounting_dir {
            Some(dir) => {
                let source =
                    crate::usage::AccountingFile::in_dir_for(dir, config.gpu_uuid.as_deref());
                Self::new(config.clone(), source)?
            }
            None => Self::new(
                config.clone(),
                crate::ffi::cuda::CudaMemInfo::load().map_err(UsageError::from)?,
            )?,
        };
        rt.serve_configured_metrics()?;
        Ok(rt)
    }

    /// Serve this runtime's `/metrics` on the configured `VRAMSLICE_METRICS_ADDR`, if one is
    /// set, until the runtime (its last clone) is dropped; returns the bound address.
    /// [`from_env`] and the C ABI's constructors call it; a runtime built with
    /// [`new`](Self::new) serves nothing until it is called.
    ///
    /// [`from_env`]: Self::from_env
    pub fn serve_configured_metrics(&self) -> Result<Option<std::net::SocketAddr>, RuntimeError> {
        let Some(addr) = &self.inner.config.metrics_addr else {
            return Ok(None);
        };
        // The endpoint must not keep the runtime alive: it holds it weakly, and the runtime
        // holds the endpoint, which stops when the runtime goes.
        let weak = Arc::downgrade(&self.inner);
        let render = move || {
            weak.upgrade()
                .map(|inner| Runtime { inner }.render_metrics())
                .unwrap_or_default()
        };
        let server = crate::serve::MetricsServer::start(render, addr).map_err(|source| {
            RuntimeError::Metrics {
                addr: addr.clone(),
                source,
            }
        })?;
        let bound = server.addr();
        *self
            .inner
            .metrics_server
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(server);
        Ok(Some(bound))
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        lock(&self.inner.state).queue.limit()
    }

    /// A snapshot of the admission state.
    pub fn stats(&self) -> Stats {
        let state = lock(&self.inner.state);
        Stats {
            limit: state.queue.limit(),
            capacity: state.queue.capacity(),
            live: state.last_live,
            reserved: state.queue.reserved(),
            free: state.queue.free(state.last_live),
            running: state.queue.running(),
            queued: state.queue.queued(),
        }
    }

    /// Set what gives cached memory back when the job at the head of the line does not fit
    /// although none of this runtime's jobs runs: then only memory held outside its jobs stands
    /// in the way, and no release will make room. In an inference server that is usually the
    /// framework's allocator cache (PyTorch keeps freed blocks, and the guard and the driver
    /// count them as used): the hook should empty it (`torch.cuda.empty_cache()`). It runs once
    /// per such job, on the thread that waits for it, with no lock of the runtime held; usage
    /// is read again after it. Without a hook the job waits for memory to free elsewhere.
    pub fn set_reclaim(&self, hook: impl Fn() + Send + Sync + 'static) {
        let mut slot = self
            .inner
            .reclaim
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *slot = Some(Arc::new(hook));
    }

    /// The learned peak of a job, if any.
    pub fn learned_peak(&self, job: &Job) -> Option<u64> {
        self.inner.profiles.peak(job.key(), job.params())
    }

    /// The metrics as OpenMetrics text (ending in `# EOF`), for the embedder's `/metrics`: serve
    /// them with the content type [`METRICS_CONTENT_TYPE`](crate::metrics::METRICS_CONTENT_TYPE)
    /// (as the classic `text/plain; version=0.0.4`, Prometheus would read the counters untyped).
    pub fn render_metrics(&self) -> String {
        let live = self.inner.read_live().ok();
        let state = lock(&self.inner.state);
        if live.is_some() {
            self.inner.publish(&state);
        }
        drop(state);
        self.inner.metrics.render()
    }

    /// Admit `job`, waiting (asynchronously) while memory is short. Needs a Tokio runtime with
    /// its time driver. Dropping the future while it waits gives up its place in line. Work
    /// nested in another admitted job runs under that job's permit: admitting it too would
    /// wait for memory only the outer permit returns.
    pub async fn admit(&self, job: &Job) -> Result<Permit, AdmitError> {
        let mut waiting = match self.inner.enqueue(job)? {
            Enqueued::Now(permit) => return Ok(permit),
            Enqueued::Wait(waiting) => waiting,
        };
        loop {
            // Listen before looking, so a wake-up between the two is not lost.
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait;
            (waiting, wait) = match self.inner.look(waiting, job) {
                Look::Done(outcome) => return outcome,
                Look::Again(waiting, wait) => (waiting, wait),
            };
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    /// Admit `job`, blocking the calling thread while memory is short.
    pub fn admit_blocking(&self, job: &Job) -> Result<Permit, AdmitError> {
        self.admit_blocking_inner(job, None)
    }

    /// [`Runtime::admit_blocking`] that gives up its place in line once `cancelled()` says so
    /// (asked at least every 20 ms, `CANCEL_POLL`), with [`AdmitError::Cancelled`]: for a thread
    /// waiting on behalf of something that cannot drop a future, such as an asyncio task run
    /// with `asyncio.to_thread`. A job admitted before the cancellation is seen is returned as
    /// usual.
    pub fn admit_blocking_unless(
        &self,
        job: &Job,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Permit, AdmitError> {
        self.admit_blocking_inner(job, Some(cancelled))
    }

    fn admit_blocking_inner(
        &self,
        job: &Job,
        cancelled: Option<&dyn Fn() -> bool>,
    ) -> Result<Permit, AdmitError> {
        let mut waiting = match self.inner.enqueue(job)? {
            Enqueued::Now(permit) => return Ok(permit),
            Enqueued::Wait(waiting) => waiting,
        };
        loop {
            let wait;
            (waiting, wait) = match self.inner.look(waiting, job) {
                Look::Done(outcome) => return outcome,
                Look::Again(waiting, wait) => (waiting, wait),
            };
            // Asked after the look, so a job admitted meanwhile (by another thread's release)
            // is returned rather than thrown away.
            if cancelled.is_some_and(|c| c()) {
                // Dropping `waiting` gives up the place in line.
                return Err(AdmitError::Cancelled {
                    key: job.key().to_string(),
                });
            }
            let wait = match cancelled {
                Some(_) => wait.min(CANCEL_POLL),
                None => wait,
            };
            let state = lock(&self.inner.state);
            if state.queue.is_waiting(waiting.ticket.id) {
                let _ = self.inner.cond.wait_timeout(state, wait);
            }
        }
    }
}
