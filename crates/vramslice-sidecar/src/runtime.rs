//! The runtime: admits jobs by memory, tracks their peaks while they run, and hands out
//! [`Permit`]s that give the memory back when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::job::Job;
use crate::metrics::Metrics;
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
struct Running {
    start_live: u64,
    peak_live: u64,
    overlapped: bool,
    admitted: Instant,
}

#[derive(Debug)]
struct State {
    queue: AdmissionQueue,
    jobs: HashMap<JobId, Running>,
    last_live: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    usage: Box<dyn UsageSource>,
    pub(crate) profiles: Profiles,
    pub(crate) metrics: Metrics,
    state: Mutex<State>,
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

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
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
                .map_err(|source| RuntimeError::Metrics {
                    addr: "sampler thread".into(),
                    source,
                })?;
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
        let (ticket, need, source) = match self.inner.enqueue(job)? {
            Enqueued::Now(permit) => return Ok(permit),
            Enqueued::Wait(ticket, need, source) => (ticket, need, source),
        };
        let deadline = ticket.requested + self.inner.config.queue_timeout;
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.inner.progress(ticket.id) {
                Progress::Admitted => return Ok(ticket.into_permit(job, need, source)),
                Progress::Gone => return Err(self.inner.gone(job, need)),
                Progress::Waiting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.inner.time_out(ticket, job, need));
            }
            let wait = (deadline - now).min(self.inner.poll());
            let _ = tokio::time::timeout(wait, notified).await;
        }
    }

    /// Admit `job`, blocking the calling thread while memory is short.
    pub fn admit_blocking(&self, job: &Job) -> Result<Permit, AdmitError> {
        let (ticket, need, source) = match self.inner.enqueue(job)? {
            Enqueued::Now(permit) => return Ok(permit),
            Enqueued::Wait(ticket, need, source) => (ticket, need, source),
        };
        let deadline = ticket.requested + self.inner.config.queue_timeout;
        loop {
            match self.inner.progress(ticket.id) {
                Progress::Admitted => return Ok(ticket.into_permit(job, need, source)),
                Progress::Gone => return Err(self.inner.gone(job, need)),
                Progress::Waiting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.inner.time_out(ticket, job, need));
            }
            let wait = (deadline - now).min(self.inner.poll());
            let state = lock(&self.inner.state);
            if state.queue.is_waiting(ticket.id) {
                let _ = self.inner.cond.wait_timeout(state, wait);
            }
        }
    }
}

enum Enqueued {
    Now(Permit),
    Wait(Ticket, u64, ReserveSource),
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
                start_live: live,
                peak_live: live,
                overlapped,
                admitted: Instant::now(),
            },
        );
    }

    /// Admit whatever fits now; wakes waiters when anything was admitted.
    fn pump(&self, state: &mut State, live: u64) {
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
        let limit = lock(&self.state).queue.limit();
        let r = policy::reserve(job.declared_need(), learned, limit, &self.config.policy);
        if learned.is_some() {
            self.metrics.profile_hits.inc();
        } else {
            self.metrics.profile_misses.inc();
        }
        let live = self.read_live().map_err(|source| AdmitError::Usage {
            key: job.key().to_string(),
            source,
        })?;
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
                Ok(Enqueued::Wait(ticket, r.bytes, r.source))
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
    fn finish(&self, id: JobId) -> Option<(u64, bool, Duration)> {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        let job = state.jobs.remove(&id);
        state.queue.release(id);
        let live = live.unwrap_or(state.last_live);
        self.pump(&mut state, live);
        drop(state);
        self.cond.notify_all();
        self.notify.notify_waiters();
        job.map(|j| {
            let peak = j.peak_live.max(live).saturating_sub(j.start_live);
            (peak, j.overlapped, j.admitted.elapsed())
        })
    }
}

/// A place in line; leaving it (drop) cancels the wait or returns an unclaimed admission.
struct Ticket {
    inner: Arc<Inner>,
    id: JobId,
    requested: Instant,
    armed: bool,
}

impl Ticket {
    fn into_permit(mut self, job: &Job, reserved: u64, source: ReserveSource) -> Permit {
        self.armed = false;
        self.inner
            .metrics
            .admission_wait
            .observe(self.requested.elapsed().as_secs_f64());
        Permit {
            inner: Arc::clone(&self.inner),
            id: self.id,
            job: job.clone(),
            reserved,
            source,
            done: false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = lock(&self.inner.state);
        if !state.queue.cancel(self.id) && state.queue.is_running(self.id) {
            drop(state);
            let _ = self.inner.finish(self.id);
            return;
        }
        let live = state.last_live;
        self.inner.pump(&mut state, live);
    }
}

/// Memory reserved for one admitted job. Give it back with [`Permit::complete`] (records the
/// measured peak), [`Permit::out_of_memory`] (raises the recorded peak) or by dropping it
/// (records nothing).
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    id: JobId,
    job: Job,
    reserved: u64,
    source: ReserveSource,
    done: bool,
}

impl Permit {
    /// Bytes reserved for the job.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Whether the reservation came from a learned peak, a declared need or the first-run rule.
    pub fn source(&self) -> ReserveSource {
        self.source
    }

    /// The job this permit admits.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Usage above the job's start seen so far (its peak, when it ran alone).
    pub fn peak_so_far(&self) -> u64 {
        let state = lock(&self.inner.state);
        state
            .jobs
            .get(&self.id)
            .map(|j| j.peak_live.saturating_sub(j.start_live))
            .unwrap_or(0)
    }

    fn end(&mut self) -> Option<(u64, bool)> {
        if self.done {
            return None;
        }
        self.done = true;
        let (peak, overlapped, held) = self.inner.finish(self.id)?;
        self.inner.metrics.job_duration.observe(held.as_secs_f64());
        Some((peak, overlapped))
    }

    /// The job succeeded: give the memory back and record its measured peak. A peak measured
    /// while other jobs of this runtime ran at the same time is not recorded, since their
    /// allocations would be counted in it. Returns the recorded peak, if one was recorded.
    pub fn complete(mut self) -> Option<u64> {
        let (peak, overlapped) = self.end()?;
        if overlapped || peak == 0 {
            return None;
        }
        match self
            .inner
            .profiles
            .record(self.job.key(), self.job.params(), peak)
        {
            Ok(stored) => Some(stored),
            Err(e) => {
                tracing::warn!(key = self.job.key(), error = %e, "could not record peak");
                None
            }
        }
    }

    /// The job failed with out-of-memory: give the memory back and raise its recorded peak so
    /// the next attempt reserves more. Returns the new recorded peak.
    pub fn out_of_memory(mut self) -> u64 {
        self.inner.metrics.oom_errors.inc();
        let observed = self.end().map(|(p, _)| p).unwrap_or(0);
        let recorded = self.inner.profiles.peak(self.job.key(), self.job.params());
        let raised =
            policy::raise_after_oom(recorded, observed, self.reserved, &self.inner.config.policy);
        match self
            .inner
            .profiles
            .record(self.job.key(), self.job.params(), raised)
        {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(key = self.job.key(), error = %e, "could not raise peak");
                raised
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.end();
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
        for job in state.jobs.values_mut() {
            job.peak_live = job.peak_live.max(live);
        }
        inner.pump(&mut state, live);
    }
}
