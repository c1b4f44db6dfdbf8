//! The runtime's shared state and its steps: reading live usage, starting jobs, judging a
//! waiting job (admitted, gone, timed out), and the sampler that tracks running jobs' peaks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::config::{Config, PeakScope};
use crate::job::Job;
use crate::metrics::{Metrics, RejectReason};
use crate::policy::{self, Ask, Reservation};
use crate::profile::Profiles;
use crate::queue::{AdmissionQueue, JobId, Refusal, Verdict};
use crate::usage::{UsageError, UsageSource};

use super::AdmitError;
use super::permit::{Permit, Ticket};

#[derive(Debug)]
pub(crate) struct Running {
    pub(crate) reported: Option<u64>,
    pub(crate) start_live: u64,
    pub(crate) peak_live: u64,
    /// This process's usage when the job started, when the source knows it.
    pub(crate) start_own: Option<u64>,
    pub(crate) peak_own: u64,
    pub(crate) overlapped: bool,
    pub(crate) admitted: Instant,
    /// The measured peak fixed by [`Inner::end_measurement`]: what the process frees or
    /// allocates after it (the embedder's cache release) is not the job's.
    pub(crate) final_measured: Option<u64>,
    /// Readings begun before the job started (their tickets are at most this): what they saw
    /// is not the job's, whenever they end.
    pub(crate) started_after: u64,
}

impl Running {
    /// The job's peak above its start, with usage now `live` (the container's) and `own` (this
    /// process's): what the embedder reported, else [`policy::measured_peak`].
    pub(crate) fn peak(&self, live: u64, own: Option<u64>, scope: PeakScope) -> u64 {
        self.reported
            .unwrap_or_else(|| self.measured_peak(live, own, scope))
    }

    /// Whether the job's usage is still being sampled ([`Inner::end_measurement`] not called).
    pub(crate) fn measuring(&self) -> bool {
        self.final_measured.is_none()
    }

    /// The peak sampled so far ([`Running::peak`] without a report).
    pub(crate) fn measured_peak(&self, live: u64, own: Option<u64>, scope: PeakScope) -> u64 {
        if let Some(fixed) = self.final_measured {
            return fixed;
        }
        let own = self
            .start_own
            .zip(own)
            .map(|(start, now)| (start, self.peak_own.max(now)));
        policy::measured_peak((self.start_live, self.peak_live.max(live)), own, scope)
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) queue: AdmissionQueue,
    pub(crate) jobs: HashMap<JobId, Running>,
    pub(crate) last_live: u64,
    /// This process's usage at the last reading, when the source knows it.
    pub(crate) last_own: Option<u64>,
    /// The stalled head the reclaim hook last ran for (it runs once per job).
    pub(crate) reclaimed_for: Option<JobId>,
    /// The ticket of the reading `last_live` and `last_own` are from: an older one ending later
    /// does not overwrite them.
    pub(crate) last_read: u64,
}

/// What the embedder gives back when a job cannot fit while none runs
/// ([`Runtime::set_reclaim`](super::Runtime::set_reclaim)).
pub(crate) type ReclaimHook = Arc<dyn Fn() + Send + Sync>;

/// The reclaim hook, if one is set.
#[derive(Default)]
pub(crate) struct Reclaim(pub(crate) Mutex<Option<ReclaimHook>>);

impl std::fmt::Debug for Reclaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|h| h.is_some()).unwrap_or(false);
        f.debug_struct("Reclaim").field("set", &set).finish()
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(super) usage: Box<dyn UsageSource>,
    pub(crate) profiles: Profiles,
    pub(crate) metrics: Metrics,
    pub(crate) state: Mutex<State>,
    pub(super) cond: Condvar,
    pub(super) notify: tokio::sync::Notify,
    pub(super) next_id: AtomicU64,
    /// Readings begun so far: each reading's ticket. The usage source is read outside the
    /// state's lock, so readings of several threads end in any order.
    pub(super) reads: AtomicU64,
    pub(super) reclaim: Reclaim,
    /// The `/metrics` endpoint this runtime opened ([`crate::Runtime::serve_configured_metrics`]);
    /// it stops with the runtime.
    pub(super) metrics_server: std::sync::Mutex<Option<crate::serve::MetricsServer>>,
}

pub(crate) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) enum Progress {
    Admitted(Reservation),
    Waiting,
    Gone,
}

/// A job in line: its place, what it asks for (sized when it is admitted), and when it gives
/// up.
pub(super) struct Waiting {
    pub(super) ticket: Ticket,
    pub(super) ask: Ask,
    pub(super) deadline: Instant,
}

/// One look at a job in line ([`Inner::look`]).
pub(super) enum Look {
    /// Admitted, refused or timed out.
    Done(Result<Permit, AdmitError>),
    /// Still in line: look again after this long at most (sooner when woken).
    Again(Waiting, Duration),
}

pub(super) enum Enqueued {
    Now(Permit),
    Wait(Waiting),
}

impl Inner {
    pub(super) fn poll(&self) -> Duration {
        self.config
            .sample_interval
            .max(Duration::from_millis(1))
            .min(Duration::from_millis(100))
    }

    pub(super) fn read_live(&self) -> Result<u64, UsageError> {
        let ticket = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
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
        if ticket > state.last_read {
            state.last_live = reading.used;
            state.last_own = reading.own;
            state.last_read = ticket;
        }
        let peak = reading.peak.unwrap_or(0).max(reading.used);
        // Only jobs that had started when the reading began: one begun before a job started
        // (a sampler's, ending after the admission's own reading) saw what came before it.
        for job in state
            .jobs
            .values_mut()
            .filter(|j| j.measuring() && j.started_after < ticket)
        {
            job.peak_live = job.peak_live.max(peak);
            let own = reading.own_peak.max(reading.own).unwrap_or(0);
            job.peak_own = job.peak_own.max(own);
        }
        Ok(reading.used)
    }

    pub(super) fn publish(&self, state: &State) {
        let live = state.last_live;
        self.metrics
            .used_bytes
            .set(state.queue.held(live).max(live));
        self.metrics.available_bytes.set(state.queue.free(live));
        self.metrics.jobs_running.set(state.queue.running() as u64);
        self.metrics.jobs_queued.set(state.queue.queued() as u64);
    }

    pub(super) fn start_job(&self, state: &mut State, id: JobId, live: u64) {
        // A job whose measurement has ended is still a neighbour to the new one (what it frees
        // now moves the new one's start), but the new one is no longer the ended one's.
        let overlapped = !state.jobs.is_empty();
        for other in state.jobs.values_mut().filter(|j| j.measuring()) {
            other.overlapped = true;
        }
        state.jobs.insert(
            id,
            Running {
                reported: None,
                start_live: live,
                peak_live: live,
                start_own: state.last_own,
                peak_own: state.last_own.unwrap_or(0),
                overlapped,
                admitted: Instant::now(),
                final_measured: None,
                started_after: self.reads.load(Ordering::SeqCst),
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
    pub(super) fn look(&self, waiting: Waiting, job: &Job) -> Look {
        match self.progress(waiting.ticket.id) {
            Progress::Admitted(r) => {
                return Look::Done(Ok(waiting.ticket.into_permit(job, r.bytes, r.source)));
            }
            Progress::Gone => return Look::Done(Err(self.gone(job, waiting.ask))),
            Progress::Waiting => {}
        }
        let now = Instant::now();
        if now >= waiting.deadline {
            return Look::Done(Err(self.time_out(waiting.ticket, job, waiting.ask)));
        }
        let wait = (waiting.deadline - now).min(self.poll());
        Look::Again(waiting, wait)
    }

    pub(super) fn progress(&self, id: JobId) -> Progress {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        if let Some(live) = live {
            self.pump(&mut state, live);
            if state.queue.stalled_head(live) == Some(id) && state.reclaimed_for != Some(id) {
                state.reclaimed_for = Some(id);
                drop(state);
                self.run_reclaim(id, live);
                let after = self.read_live().ok();
                state = lock(&self.state);
                if let Some(live) = after {
                    self.pump(&mut state, live);
                }
            }
        }
        if let Some(r) = state.queue.reservation(id) {
            Progress::Admitted(r)
        } else if state.queue.is_waiting(id) {
            Progress::Waiting
        } else {
            Progress::Gone
        }
    }

    /// Call the reclaim hook for job `id` at the head of the line, which does not fit beside
    /// `live` bytes although none of this runtime's jobs runs (no lock is held: the hook may
    /// take its time, and may not call back into the runtime's state).
    fn run_reclaim(&self, id: JobId, live: u64) {
        let hook = match self.reclaim.0.lock() {
            Ok(hook) => hook.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(hook) = hook else { return };
        self.metrics.reclaims.inc();
        tracing::debug!(
            job = id,
            live,
            "head of the line does not fit while idle: reclaiming"
        );
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook())).is_err() {
            tracing::warn!(job = id, "the reclaim hook panicked");
        }
    }

    pub(super) fn enqueue(self: &Arc<Self>, job: &Job) -> Result<Enqueued, AdmitError> {
        let requested = Instant::now();
        let learned = self.profiles.peak(job.key(), job.params());
        let live = self.read_live().map_err(|source| AdmitError::Usage {
            key: job.key().to_string(),
            source,
        })?;
        let limit = lock(&self.state).queue.limit();
        let ask = policy::ask(job.declared_need(), learned, limit, &self.config.policy);
        if learned.is_some() {
            self.metrics.profile_hits.inc();
        } else {
            self.metrics.profile_misses.inc();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        let verdict = state.queue.request(id, ask, live);
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
                let r = state
                    .queue
                    .reservation(id)
                    .unwrap_or_else(|| ask.reservation(state.queue.room(live)));
                drop(state);
                Ok(Enqueued::Now(ticket.into_permit(job, r.bytes, r.source)))
            }
            Ok(Verdict::Queued { position }) => {
                let need = ask.reservation(state.queue.room(live)).bytes;
                self.publish(&state);
                drop(state);
                tracing::debug!(key = job.key(), need, position, "job queued");
                // A job's own timeout is cut to a day (`MAX_WAIT`), like the runtime's.
                let wait = job.admission_timeout().unwrap_or(self.config.queue_timeout);
                let deadline = ticket.requested + wait.min(crate::config::MAX_WAIT);
                Ok(Enqueued::Wait(Waiting {
                    ticket,
                    ask,
                    deadline,
                }))
            }
            Err(refusal) => {
                let mut ticket = ticket;
                ticket.armed = false;
                self.metrics.reject(match refusal {
                    Refusal::NeverFits { .. } => RejectReason::NeverFits,
                    Refusal::QueueFull { .. } => RejectReason::QueueFull,
                });
                drop(state);
                Err(AdmitError::Refused {
                    key: job.key().to_string(),
                    refusal,
                })
            }
        }
    }

    pub(super) fn gone(&self, job: &Job, ask: Ask) -> AdmitError {
        self.metrics.reject(RejectReason::NeverFits);
        let state = lock(&self.state);
        AdmitError::Refused {
            key: job.key().to_string(),
            refusal: Refusal::NeverFits {
                need: state.queue.largest(ask),
                limit: state.queue.limit(),
                capacity: state.queue.capacity(),
            },
        }
    }

    pub(super) fn time_out(&self, ticket: Ticket, job: &Job, ask: Ask) -> AdmitError {
        let waited = ticket.requested.elapsed();
        drop(ticket); // leaves the queue
        self.metrics.reject(RejectReason::Timeout);
        let state = lock(&self.state);
        AdmitError::Timeout {
            key: job.key().to_string(),
            need: ask.reservation(state.queue.room(state.last_live)).bytes,
            free: state.queue.free(state.last_live),
            queued: state.queue.queued(),
            running: state.queue.running(),
            waited,
        }
    }

    /// Take job `id`'s final reading now and fix its measured peak; its memory stays reserved
    /// until [`Inner::finish`]. Returns whether another job of this runtime is still being
    /// measured beside it (a job started meanwhile counts it as a neighbour until it finishes;
    /// one that has ended its measurement and only settles does not count: its neighbour must
    /// settle too, or the next job starts on the neighbour's cache).
    pub(crate) fn end_measurement(&self, id: JobId) -> bool {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        let (live, own) = (live.unwrap_or(state.last_live), state.last_own);
        let scope = self.config.peak_scope;
        if let Some(job) = state.jobs.get_mut(&id)
            && job.measuring()
        {
            job.final_measured = Some(job.measured_peak(live, own, scope));
        }
        state
            .jobs
            .iter()
            .any(|(other, j)| *other != id && j.measuring())
    }

    /// End job `id`: give its reservation back and return what was measured.
    pub(crate) fn finish(&self, id: JobId) -> Option<(u64, bool, Duration)> {
        let live = self.read_live().ok();
        let mut state = lock(&self.state);
        let job = state.jobs.remove(&id);
        let live = live.unwrap_or(state.last_live);
        let own = state.last_own;
        state.queue.release(id, live);
        self.pump(&mut state, live);
        drop(state);
        self.cond.notify_all();
        self.notify.notify_waiters();
        job.map(|j| {
            (
                j.peak(live, own, self.config.peak_scope),
                j.overlapped && j.reported.is_none(),
                j.admitted.elapsed(),
            )
        })
    }
}

pub(super) fn sampler(weak: Weak<Inner>, interval: Duration) {
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
