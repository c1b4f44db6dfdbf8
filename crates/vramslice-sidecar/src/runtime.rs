//! The runtime: admits jobs by memory, tracks their peaks while they run, and hands out
//! [`Permit`]s that give the memory back when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::job::Job;
use crate::metrics::Metrics;
pub use crate::permit::Permit;
use crate::permit::Ticket;
use crate::policy::{self, ReserveSource, human};
use crate::profile::{ProfileError, Profiles};
use crate::queue::{AdmissionQueue, JobId, Refusal, Verdict};
use crate::usage::{UsageError, UsageSource};

/// A runtime that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Neither `VRAMSLICE_VRAM_LIMIT_BYTES` nor the usage source gives a limit.
    #[error(
        "no memory limit: set VRAMSLICE_VRAM_LIMIT_BYTES or use a usage source that reports the GPU's total"
    )]
    NoLimit,
    /// The usage source failed on first read.
    #[error("reading GPU memory usage: {0}")]
    Usage(#[from] UsageError),
    /// The profile directory is unusable.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The usage sampling thread could not be started.
    #[error("starting the usage sampler thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The metrics port could not be opened.
    #[error("metrics address {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// A job that was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// Refused at once: it can never fit, or the queue is full.
    #[error("job {key:?} refused: {refusal}")]
    Refused {
        /// The job's key.
        key: String,
        /// Why.
        refusal: Refusal,
    },
    /// It waited the configured timeout without memory freeing.
    #[error(
        "job {key:?} timed out after {waited:?} waiting for memory: needs {}, {} free, {queued} jobs queued",
        human(*need),
        human(*free)
    )]
    Timeout {
        /// The job's key.
        key: String,
        /// Bytes it needed.
        need: u64,
        /// Bytes free when it gave up.
        free: u64,
        /// Jobs still waiting.
        queued: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// Live usage could not be read.
    #[error("job {key:?}: {source}")]
    Usage {
        /// The job's key.
        key: String,
        /// The source's error.
        #[source]
        source: UsageError,
    },
}

#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) reported: Option<u64>,
    pub(crate) start_live: u64,
    pub(crate) peak_live: u64,
    pub(crate) overlapped: bool,
    pub(crate) admitted: Instant,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) queue: AdmissionQueue,
    pub(crate) jobs: HashMap<JobId, Running>,
    pub(crate) last_live: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    usage: Box<dyn UsageSource>,
    pub(crate) profiles: Profiles,
    pub(crate) metrics: Metrics,
    pub(crate) state: Mutex<State>,
    cond: Condvar,
    notify: tokio::sync::Notify,
    next_id: AtomicU64,
}

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

pub(crate) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

enum Progress {
    Admitted,
    Waiting,
    Gone,
}

impl Runtime {
    /// A runtime with this configuration, reading usage from `usage`.
    pub fn new(config: Config, usage: impl UsageSource + 'static) -> Result<Self, RuntimeError> {
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
            }),
            cond: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
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
                let source = crate::usage::AccountingFile::in_dir(dir);
                Self::new(config.clone(), source)?
            }
            None => Self::new(config.clone(), crate::ffi::cuda::CudaMemInfo::load()?)?,
        };
        if let Some(addr) = &config.metrics_addr {
            crate::serve::serve_metrics(&rt, addr).map_err(|source| RuntimeError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        }
        Ok(rt)
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

    /// The learned peak of a job, if any.
    pub fn learned_peak(&self, job: &Job) -> Option<u64> {
        self.inner.profiles.peak(job.key(), job.params())
    }

    /// The metrics in Prometheus text format, for the embedder's `/metrics`.
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
    /// its time driver. Dropping the future while it waits gives up its place in line.
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
            let state = lock(&self.inner.state);
            if state.queue.is_waiting(waiting.ticket.id) {
                let _ = self.inner.cond.wait_timeout(state, wait);
            }
        }
    }
}

/// A job in line: its place, what admitting it reserves, and when it gives up.
struct Waiting {
    ticket: Ticket,
    need: u64,
    source: ReserveSource,
    deadline: Instant,
}

/// One look at a job in line ([`Inner::look`]).
enum Look {
    /// Admitted, refused or timed out.
    Done(Result<Permit, AdmitError>),
    /// Still in line: look again after this long at most (sooner when woken).
    Again(Waiting, Duration),
}

enum Enqueued {
    Now(Permit),
    Wait(Waiting),
}

impl Inner {
    fn poll(&self) -> Duration {
        self.config
            .sample_interval
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(100))
    }

    fn read_live(&self) -> Result<u64, UsageError> {
        let reading = self.usage.read()?;
        let mut state = lock(&self.state);
        if self.config.limit.is_none()
            && let Some(total) = reading.total
            && total != state.queue.limit()
        {
            let capacity = policy::admission_capacity(total, &self.config.policy);
            state.queue.set_limit(total, capacity);
            self.metrics.limit_bytes.set(total);
        }
        state.last_live = reading.used;
        let peak = reading.peak.unwrap_or(0).max(reading.used);
        for job in state.jobs.values_mut() {
            job.peak_live = job.peak_live.max(peak);
        }
        Ok(reading.used)
    }

    fn publish(&self, state: &State) {
        let live = state.last_live;
        self.metrics
            .used_bytes
            .set(state.queue.held(live).max(live));
        self.metrics.available_bytes.set(state.queue.free(live));
        self.metrics.jobs_running.set(state.queue.running() as u64);
        self.metrics.jobs_queued.set(state.queue.queued() as u64);
    }

    fn start_job(&self, state: &mut State, id: JobId, live: u64) {
        let overlapped = !state.jobs.is_empty();
        for other in state.jobs.values_mut() {
            other.overlapped = true;
        }
        state.jobs.insert(
            id,
            Running {
                reported: None,
                start_live: live,
                peak_live: live,
                overlapped,
                admitted: Instant::now(),
            },
        );
    }

    /// Admit whatever fits now; wakes waiters when anything was admitted.
    pub(crate) fn pump(&self, state: &mut State, live: u64) {
        let admitted = state.queue.pump(live);
        for id in &admitted {
            self.start_job(state, *id, live);
        }
        self.publish(state);
        if !admitted.is_empty() {
            self.cond.notify_all();
            self.notify.notify_waiters();
        }
    }

    /// Where a job in line stands now: the one decision both admission loops wait on.
    fn look(&self, waiting: Waiting, job: &Job) -> Look {
        match self.progress(waiting.ticket.id) {
            Progress::Admitted => {
                let Waiting {
                    ticket,
                    need,
                    source,
                    ..
                } = waiting;
                return Look::Done(Ok(ticket.into_permit(job, need, source)));
            }
            Progress::Gone => return Look::Done(Err(self.gone(job, waiting.need))),
            Progress::Waiting => {}
        }
        let now = Instant::now();
        if now >= waiting.deadline {
            let need = waiting.need;
            return Look::Done(Err(self.time_out(waiting.ticket, job, need)));
        }
        let wait = (waiting.deadline - now).min(self.poll());
        Look::Again(waiting, wait)
    }

    fn progress(&self, id: JobId) -> Progress {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        if let Some(live) = live {
            self.pump(&mut state, live);
        }
        if state.queue.is_running(id) {
            Progress::Admitted
        } else if state.queue.is_waiting(id) {
            Progress::Waiting
        } else {
            Progress::Gone
        }
    }

    fn enqueue(self: &Arc<Self>, job: &Job) -> Result<Enqueued, AdmitError> {
        let requested = Instant::now();
        let learned = self.profiles.peak(job.key(), job.params());
        let live = self.read_live().map_err(|source| AdmitError::Usage {
            key: job.key().to_string(),
            source,
        })?;
        let (limit, floor) = {
            let state = lock(&self.state);
            (state.queue.limit(), state.queue.floor(live))
        };
        let r = policy::reserve(
            job.declared_need(),
            learned,
            limit,
            floor,
            &self.config.policy,
        );
        if learned.is_some() {
            self.metrics.profile_hits.inc();
        } else {
            self.metrics.profile_misses.inc();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        let verdict = state.queue.request(id, r.bytes, live);
        let ticket = Ticket {
            inner: Arc::clone(self),
            id,
            requested,
            armed: true,
        };
        match verdict {
            Ok(Verdict::Admitted) => {
                self.start_job(&mut state, id, live);
                self.publish(&state);
                drop(state);
                Ok(Enqueued::Now(ticket.into_permit(job, r.bytes, r.source)))
            }
            Ok(Verdict::Queued { position }) => {
                self.publish(&state);
                drop(state);
                tracing::debug!(key = job.key(), need = r.bytes, position, "job queued");
                let deadline =
                    ticket.requested + job.admission_timeout().unwrap_or(self.config.queue_timeout);
                Ok(Enqueued::Wait(Waiting {
                    ticket,
                    need: r.bytes,
                    source: r.source,
                    deadline,
                }))
            }
            Err(refusal) => {
                let mut ticket = ticket;
                ticket.armed = false;
                self.metrics.rejected.inc();
                drop(state);
                Err(AdmitError::Refused {
                    key: job.key().to_string(),
                    refusal,
                })
            }
        }
    }

    fn gone(&self, job: &Job, need: u64) -> AdmitError {
        self.metrics.rejected.inc();
        let state = lock(&self.state);
        AdmitError::Refused {
            key: job.key().to_string(),
            refusal: Refusal::NeverFits {
                need,
                limit: state.queue.limit(),
                capacity: state.queue.capacity(),
            },
        }
    }

    fn time_out(&self, ticket: Ticket, job: &Job, need: u64) -> AdmitError {
        let waited = ticket.requested.elapsed();
        drop(ticket); // leaves the queue
        self.metrics.rejected.inc();
        let state = lock(&self.state);
        AdmitError::Timeout {
            key: job.key().to_string(),
            need,
            free: state.queue.free(state.last_live),
            queued: state.queue.queued(),
            waited,
        }
    }

    /// End job `id`: give its reservation back and return what was measured.
    pub(crate) fn finish(&self, id: JobId) -> Option<(u64, bool, Duration)> {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        let job = state.jobs.remove(&id);
        state.queue.release(id);
        let live = live.unwrap_or(state.last_live);
        self.pump(&mut state, live);
        drop(state);
        self.cond.notify_all();
        self.notify.notify_waiters();
        job.map(|j| match j.reported {
            // The embedder measured this job alone: trust it even when jobs overlapped.
            Some(reported) => (reported, false, j.admitted.elapsed()),
            None => {
                let peak = j.peak_live.max(live).saturating_sub(j.start_live);
                (peak, j.overlapped, j.admitted.elapsed())
            }
        })
    }
}

fn sampler(weak: Weak<Inner>, interval: Duration) {
    loop {
        std::thread::sleep(interval);
        let Some(inner) = weak.upgrade() else { return };
        let busy = {
            let state = lock(&inner.state);
            !state.jobs.is_empty() || state.queue.queued() > 0
        };
        if !busy {
            continue;
        }
        let Ok(live) = inner.read_live() else {
            continue;
        };
        let mut state = lock(&inner.state);
        inner.pump(&mut state, live);
    }
}
