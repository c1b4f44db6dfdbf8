//! Permits (memory reserved for an admitted job) and tickets (a place in the admission line).

use std::sync::Arc;
use std::time::Instant;

use super::inner::{Inner, lock};
use crate::job::Job;
use crate::policy::{self, ReserveSource};
use crate::queue::JobId;

/// A place in line; leaving it (drop) cancels the wait or returns an unclaimed admission.
pub(crate) struct Ticket {
    pub(crate) inner: Arc<Inner>,
    pub(crate) id: JobId,
    pub(crate) requested: Instant,
    pub(crate) armed: bool,
}

impl Ticket {
    pub(crate) fn into_permit(mut self, job: &Job, reserved: u64, source: ReserveSource) -> Permit {
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

    /// Usage above the job's start seen so far (its peak, when it ran alone), measured as
    /// [`Config::peak_scope`](crate::Config::peak_scope) says.
    pub fn peak_so_far(&self) -> u64 {
        let state = lock(&self.inner.state);
        state
            .jobs
            .get(&self.id)
            .map(|j| {
                j.measured_peak(
                    state.last_live,
                    state.last_own,
                    self.inner.config.peak_scope,
                )
            })
            .unwrap_or(0)
    }

    /// Report the job's own peak in bytes, measured by the embedder: its growth above what was
    /// in use when it started, not an absolute figure (with PyTorch and one job at a time on the
    /// device, `max_memory_allocated()` after `reset_peak_memory_stats()`, minus
    /// `memory_allocated()` taken at the job's start: the weights are in both). A reported peak
    /// is recorded instead of the sampled one, even when other jobs ran at the same time, so it
    /// must be this job's alone (PyTorch's peak statistics are the process's, and reset for all
    /// jobs). The highest report counts.
    pub fn report_peak(&self, bytes: u64) {
        let mut state = lock(&self.inner.state);
        if let Some(j) = state.jobs.get_mut(&self.id) {
            j.reported = Some(j.reported.unwrap_or(0).max(bytes));
        }
    }

    /// Take the job's final reading now: its peak is fixed, and what the process frees or
    /// allocates from here on is not counted in it, while its memory stays reserved until
    /// [`Permit::complete`], [`Permit::out_of_memory`] or a drop gives it back.
    ///
    /// For an embedder with a caching allocator (PyTorch): end the measurement, release the
    /// cache (`torch.cuda.empty_cache()`), then end the permit. The next job is admitted when
    /// the memory goes back, and its growth is measured from the usage it starts at: with the
    /// finished job's cached blocks still counted there, a job reusing them shows no growth and
    /// its peak is learned too low. Returns whether another job of this runtime is still being
    /// measured (the release then teaches nothing: peaks of overlapping jobs are not recorded).
    pub fn end_measurement(&self) -> bool {
        if self.done {
            return false;
        }
        self.inner.end_measurement(self.id)
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

    /// The job failed with out-of-memory: give the memory back and raise its peak so the next
    /// attempt reserves at least as much (more, unless a provisional raise had it reserve more
    /// than its measured need already). Returns the peak the next attempt reserves by.
    ///
    /// Alone, the job caused the error: the raise (from the larger of the sampled and the
    /// recorded peak, never from a provisional raise) is recorded like a measured peak, and
    /// this process keeps reserving at least what it reserved by before. Beside other jobs of
    /// this runtime, its sampled peak holds their allocations and any of them may have caused
    /// the error: the raise starts from the peak it reserved by (recorded, or provisional; with
    /// neither, the reservation) and is provisional, kept in this process until the job's peak
    /// is next recorded, never written
    /// ([`Profiles::raise_provisionally`](crate::profile::Profiles::raise_provisionally)).
    pub fn out_of_memory(mut self) -> u64 {
        self.inner.metrics.oom_errors.inc();
        let alone = match self.end() {
            Some((peak, false)) => Some(peak),
            _ => None,
        };
        let profiles = &self.inner.profiles;
        // Alone, from what was recorded and sampled: a provisional raise (a neighbour's doing)
        // must not reach the profile through this one.
        let recorded = match alone {
            Some(_) => profiles.recorded(self.job.key(), self.job.params()),
            None => profiles.peak(self.job.key(), self.job.params()),
        };
        let raised = policy::raise_after_oom(
            recorded,
            alone.unwrap_or(0),
            self.reserved,
            &self.inner.config.policy,
        );
        if alone.is_none() {
            return profiles.raise_provisionally(self.job.key(), self.job.params(), raised);
        }
        // What this process reserved by before, a provisional raise included: the retry must
        // not reserve less than the attempt that failed.
        let before = profiles.peak(self.job.key(), self.job.params());
        let stored = match profiles.record(self.job.key(), self.job.params(), raised) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(key = self.job.key(), error = %e, "could not raise peak");
                raised
            }
        };
        match before {
            Some(before) if before > stored => {
                profiles.raise_provisionally(self.job.key(), self.job.params(), before)
            }
            _ => stored,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.end();
    }
}
