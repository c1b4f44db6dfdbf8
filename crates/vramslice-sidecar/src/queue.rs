//! The admission queue as a pure state machine: which job runs, which waits, which is refused.
//!
//! Memory, not a count, bounds concurrency. The queue is strict FIFO: a job at the head that does
//! not fit blocks the jobs behind it, so a large job is never starved by a stream of small ones.
//!
//! Accounting: while jobs run, the memory they hold is `baseline + max(growth, reserved)`, where
//! `baseline` is the live usage when the first of them was admitted, `growth` is live usage above
//! it and `reserved` the sum of their reservations. A job that has not allocated yet still counts
//! in full; memory that grows beyond the reservations (a neighbour, another worker) counts too.
//! With nothing running the holding is just the live usage.
//!
//! A job that ends while others run may leave memory behind (a model load's weights). What the
//! remaining reservations cannot explain, `live − reserved`, then joins the baseline, so it is
//! not hidden behind those reservations and later jobs are not admitted on top of it. That is a
//! lower bound (the remaining jobs may not have allocated yet); the baseline is exact again once
//! nothing runs. It is never more than the live usage: memory held outside the jobs cannot
//! exceed all memory in use, so when usage falls below the baseline (a job that had grown past
//! its reservation freed its memory, a cache was emptied) the baseline falls with it.

use std::collections::{BTreeMap, VecDeque};

use crate::policy::{Ask, Reservation, human};

/// Identifies one admission request within a runtime.
pub type JobId = u64;

/// Why a job was refused without waiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The job needs more than the runtime ever admits.
    #[error(
        "needs {}, limit {} (admits at most {} at the high-water mark)",
        human(*need),
        human(*limit),
        human(*capacity)
    )]
    NeverFits {
        /// Bytes the job needs.
        need: u64,
        /// The container's limit.
        limit: u64,
        /// The admission capacity (limit × high-water mark).
        capacity: u64,
    },
    /// The queue holds its maximum number of waiting jobs.
    #[error("needs {}, {} free, {queued} jobs queued (queue full)", human(*need), human(*free))]
    QueueFull {
        /// Bytes the job needs.
        need: u64,
        /// Bytes free below the high-water mark now.
        free: u64,
        /// Jobs waiting.
        queued: usize,
    },
}

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The job may run now.
    Admitted,
    /// The job waits; `position` 0 is the head.
    Queued {
        /// Jobs ahead of it.
        position: usize,
    },
}

/// Admission state for one runtime.
#[derive(Debug, Clone)]
pub struct AdmissionQueue {
    limit: u64,
    capacity: u64,
    max_queued: usize,
    baseline: u64,
    running: BTreeMap<JobId, Reservation>,
    waiting: VecDeque<(JobId, Ask)>,
}

impl AdmissionQueue {
    /// A queue admitting up to `capacity` bytes of a `limit`, holding at most `max_queued` waiters.
    pub fn new(limit: u64, capacity: u64, max_queued: usize) -> Self {
        Self {
            limit,
            capacity: capacity.min(limit),
            max_queued,
            baseline: 0,
            running: BTreeMap::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Change the limit and capacity (the usage source may learn the GPU's size late).
    pub fn set_limit(&mut self, limit: u64, capacity: u64) {
        self.limit = limit;
        self.capacity = capacity.min(limit);
    }

    /// The container's limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The most this queue admits at once.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Sum of the reservations of running jobs.
    pub fn reserved(&self) -> u64 {
        self.running
            .values()
            .fold(0u64, |a, b| a.saturating_add(b.bytes))
    }

    /// Memory counted as held, given live usage.
    pub fn held(&self, live: u64) -> u64 {
        if self.running.is_empty() {
            live
        } else {
            let baseline = self.baseline.min(live);
            baseline.saturating_add((live - baseline).max(self.reserved()))
        }
    }

    /// Usage that stays when none of this queue's jobs runs: the live usage when idle, else
    /// the usage when the current run of jobs began (less whatever of it was freed since).
    pub fn floor(&self, live: u64) -> u64 {
        if self.running.is_empty() {
            live
        } else {
            self.baseline.min(live)
        }
    }

    /// A reading of live usage: the baseline never stays above it (see the module doc).
    fn observe(&mut self, live: u64) {
        self.baseline = self.baseline.min(live);
    }

    /// What a job may take at most, given live usage: the capacity less the [floor](Self::floor).
    /// An estimated need is cut to it when the job is admitted.
    pub fn room(&self, live: u64) -> u64 {
        self.capacity.saturating_sub(self.floor(live))
    }

    /// Bytes still admissible below the high-water mark.
    pub fn free(&self, live: u64) -> u64 {
        self.capacity.saturating_sub(self.held(live))
    }

    /// Jobs running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `id` holds a reservation.
    pub fn is_running(&self, id: JobId) -> bool {
        self.running.contains_key(&id)
    }

    /// What running job `id` reserved when it was admitted.
    pub fn reservation(&self, id: JobId) -> Option<Reservation> {
        self.running.get(&id).copied()
    }

    /// The most `ask` could reserve (with nothing else in use): more than the capacity means
    /// it can never run.
    pub fn largest(&self, ask: Ask) -> u64 {
        ask.reservation(self.capacity).bytes
    }

    /// Whether `id` waits.
    pub fn is_waiting(&self, id: JobId) -> bool {
        self.waiting.iter().any(|(w, _)| *w == id)
    }

    fn fits(&self, need: u64, live: u64) -> bool {
        self.held(live).saturating_add(need) <= self.capacity
    }

    fn start(&mut self, id: JobId, reservation: Reservation, live: u64) {
        if self.running.is_empty() {
            self.baseline = live;
        }
        self.running.insert(id, reservation);
    }

    /// Ask to run job `id` asking for `ask` (a declared byte count converts) with `live` bytes
    /// in use now. Its reservation is decided when it is admitted ([`Self::reservation`]).
    pub fn request(
        &mut self,
        id: JobId,
        ask: impl Into<Ask>,
        live: u64,
    ) -> Result<Verdict, Refusal> {
        let ask = ask.into();
        self.observe(live);
        let largest = self.largest(ask);
        if largest > self.capacity {
            return Err(Refusal::NeverFits {
                need: largest,
                limit: self.limit,
                capacity: self.capacity,
            });
        }
        let now = ask.reservation(self.room(live));
        if self.waiting.is_empty() && self.fits(now.bytes, live) {
            self.start(id, now, live);
            return Ok(Verdict::Admitted);
        }
        if self.waiting.len() >= self.max_queued {
            return Err(Refusal::QueueFull {
                need: now.bytes,
                free: self.free(live),
                queued: self.waiting.len(),
            });
        }
        self.waiting.push_back((id, ask));
        Ok(Verdict::Queued {
            position: self.waiting.len() - 1,
        })
    }

    /// Admit waiting jobs from the head while they fit, each sized with the room there is now;
    /// returns the admitted IDs in order.
    pub fn pump(&mut self, live: u64) -> Vec<JobId> {
        self.observe(live);
        let mut admitted = Vec::new();
        while let Some(&(id, ask)) = self.waiting.front() {
            if self.largest(ask) > self.capacity {
                // The limit shrank under it: it can never run. Its waiter sees it gone.
                self.waiting.pop_front();
                continue;
            }
            let now = ask.reservation(self.room(live));
            if !self.fits(now.bytes, live) {
                break;
            }
            self.waiting.pop_front();
            self.start(id, now, live);
            admitted.push(id);
        }
        admitted
    }

    /// The job at the head of the line when it does not fit although none of this queue's jobs
    /// runs: only memory held outside them (a cache, another process) stands in its way, and no
    /// release of this queue will make room.
    pub fn stalled_head(&self, live: u64) -> Option<JobId> {
        let &(id, ask) = self.waiting.front()?;
        let fits = self.fits(ask.reservation(self.room(live)).bytes, live);
        (self.running.is_empty() && !fits).then_some(id)
    }

    /// A running job ended, with `live` bytes in use now; its reservation is returned. What the
    /// remaining reservations cannot explain joins the baseline (see the module doc).
    pub fn release(&mut self, id: JobId, live: u64) -> bool {
        self.observe(live);
        let was_running = self.running.remove(&id).is_some();
        if was_running && !self.running.is_empty() {
            self.baseline = self.baseline.max(live.saturating_sub(self.reserved()));
        }
        was_running
    }

    /// A waiting job gave up (timeout); returns whether it was waiting.
    pub fn cancel(&mut self, id: JobId) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|(w, _)| *w != id);
        before != self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ReserveSource;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn q() -> AdmissionQueue {
        // limit 10 GiB, capacity 8.5 GiB
        AdmissionQueue::new(10 * GIB, 17 * GIB / 2, 4)
    }

    #[test]
    fn admits_until_the_high_water_mark() {
        let mut q = q();
        assert_eq!(q.request(1, 4 * GIB, 0), Ok(Verdict::Admitted));
        assert_eq!(q.request(2, 4 * GIB, 0), Ok(Verdict::Admitted));
        assert_eq!(q.request(3, GIB, 0), Ok(Verdict::Queued { position: 0 }));
        assert_eq!(q.free(0), GIB / 2);
        assert!(q.release(1, 0));
        assert_eq!(q.pump(0), vec![3]);
        assert_eq!(q.running(), 2);
    }

    #[test]
    fn never_fits_is_refused_at_once_with_the_numbers() {
        let mut q = AdmissionQueue::new(4 * GIB, 34 * GIB / 10, 4);
        let err = q.request(1, 6 * GIB, 0).unwrap_err();
        assert!(matches!(err, Refusal::NeverFits { need, .. } if need == 6 * GIB));
        assert!(
            err.to_string().starts_with("needs 6.0 GiB, limit 4.0 GiB"),
            "{err}"
        );
        assert_eq!(q.queued(), 0);
    }

    #[test]
    fn queue_full_names_free_and_queued() {
        let mut q = AdmissionQueue::new(10 * GIB, 10 * GIB, 2);
        assert_eq!(q.request(1, 8 * GIB + GIB / 2, 0), Ok(Verdict::Admitted));
        q.request(2, 6 * GIB, 0).unwrap();
        q.request(3, 6 * GIB, 0).unwrap();
        let err = q.request(4, 6 * GIB, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "needs 6.0 GiB, 1.5 GiB free, 2 jobs queued (queue full)"
        );
    }

    #[test]
    fn fifo_head_blocks_smaller_jobs_behind_it() {
        let mut q = q();
        q.request(1, 6 * GIB, 0).unwrap();
        assert_eq!(
            q.request(2, 5 * GIB, 0),
            Ok(Verdict::Queued { position: 0 })
        );
        // 1 GiB would fit now, but the big job is first in line.
        assert_eq!(q.request(3, GIB, 0), Ok(Verdict::Queued { position: 1 }));
        assert_eq!(q.pump(0), Vec::<JobId>::new());
        q.release(1, 0);
        assert_eq!(q.pump(0), vec![2, 3]);
    }

    #[test]
    fn an_estimate_is_sized_when_it_is_admitted_not_when_it_joins() {
        let mut q = q(); // capacity 8.5 GiB
        let est = Ask::Estimate {
            bytes: 8 * GIB,
            source: ReserveSource::FirstRun,
            declared: None,
        };
        q.request(1, 2 * GIB, 4 * GIB).unwrap(); // baseline 4 GiB: room 4.5 GiB
        assert_eq!(
            q.request(2, est, 4 * GIB),
            Ok(Verdict::Queued { position: 0 })
        );
        q.release(1, 0); // the 4 GiB went too
        assert_eq!(q.pump(0), vec![2]);
        assert_eq!(q.reservation(2).map(|r| r.bytes), Some(8 * GIB));
        assert_eq!(q.request(3, GIB, 0), Ok(Verdict::Queued { position: 0 }));
    }

    #[test]
    fn a_head_that_does_not_fit_beside_idle_usage_is_stalled() {
        let mut q = q(); // capacity 8.5 GiB
        q.request(1, GIB, 0).unwrap();
        q.request(2, 8 * GIB, 0).unwrap();
        assert_eq!(q.stalled_head(0), None, "a release will make room");
        q.release(1, 3 * GIB); // 3 GiB stay cached
        assert_eq!(q.pump(3 * GIB), Vec::<JobId>::new());
        assert_eq!(q.stalled_head(3 * GIB), Some(2));
        assert_eq!(q.pump(0), vec![2], "the cache went");
        assert_eq!(q.stalled_head(0), None);
    }

    #[test]
    fn live_growth_beyond_reservations_counts() {
        let mut q = q();
        q.request(1, GIB, 2 * GIB).unwrap(); // baseline 2 GiB
        assert_eq!(q.held(2 * GIB), 3 * GIB);
        // the job (or a neighbour) grew to 5 GiB above baseline
        assert_eq!(q.held(7 * GIB), 7 * GIB);
        assert_eq!(
            q.request(2, 2 * GIB, 7 * GIB),
            Ok(Verdict::Queued { position: 0 })
        );
        q.release(1, 0);
        // nothing running: live usage alone counts
        assert_eq!(q.pump(GIB), vec![2]);
    }

    #[test]
    fn memory_a_finished_job_leaves_behind_is_not_hidden_by_running_reservations() {
        let mut q = q(); // capacity 8.5 GiB
        q.request(1, 4 * GIB, 0).unwrap(); // a model load
        q.request(2, 2 * GIB, 0).unwrap(); // a request beside it, not allocated yet
        q.release(1, 4 * GIB); // the load ends; its 4 GiB of weights stay
        assert_eq!(
            q.held(4 * GIB),
            4 * GIB,
            "weights counted, not hidden behind 2 GiB reserved"
        );
        assert_eq!(q.request(3, 2 * GIB, 4 * GIB), Ok(Verdict::Admitted));
        assert_eq!(q.request(4, 2 * GIB, 4 * GIB), Ok(Verdict::Admitted));
        // Before: held stayed max(4, reserved) = 6 GiB here and a fourth request fit (12 GiB).
        assert_eq!(
            q.request(5, 2 * GIB, 4 * GIB),
            Ok(Verdict::Queued { position: 0 })
        );
        q.release(2, 4 * GIB);
        q.release(3, 4 * GIB);
        q.release(4, 4 * GIB);
        assert_eq!(q.held(4 * GIB), 4 * GIB, "idle: live alone");
    }

    #[test]
    fn memory_of_running_jobs_never_joins_the_baseline() {
        let mut q = q();
        q.request(1, 2 * GIB, GIB).unwrap(); // baseline 1 GiB
        q.request(2, 3 * GIB, GIB).unwrap();
        // Job 2 used all of its 3 GiB; job 1 ends having freed everything.
        q.release(1, 4 * GIB);
        assert_eq!(q.held(4 * GIB), 4 * GIB);
        q.request(3, GIB, 4 * GIB).unwrap();
        // Job 2 frees its memory and ends: nothing was left behind, held is live + job 3.
        q.release(2, GIB);
        assert_eq!(q.held(GIB), 2 * GIB);
    }

    #[test]
    fn growth_of_a_job_past_its_reservation_leaves_the_baseline_when_freed() {
        let mut q = AdmissionQueue::new(10 * GIB, 17 * GIB / 2, 4);
        q.request(1, GIB, 0).unwrap();
        q.request(2, GIB, 0).unwrap();
        // Job 2 grows to 5 GiB; job 1 ends: 4 GiB the reservations cannot explain.
        q.release(1, 5 * GIB);
        assert_eq!(q.held(5 * GIB), 5 * GIB);
        // Job 2 frees all of it but still runs: only its reservation is held.
        assert_eq!(q.held(0), GIB);
        assert_eq!(q.free(0), 15 * GIB / 2);
        assert_eq!(q.request(3, 4 * GIB, 0), Ok(Verdict::Admitted));
        // And the baseline stays down when usage rises again within the reservations.
        assert_eq!(q.held(3 * GIB), 5 * GIB);
    }

    #[test]
    fn cancel_removes_a_waiter_and_unblocks_the_line() {
        let mut q = q();
        q.request(1, 6 * GIB, 0).unwrap();
        q.request(2, 5 * GIB, 0).unwrap();
        q.request(3, GIB, 0).unwrap();
        assert!(q.cancel(2));
        assert!(!q.cancel(2));
        assert_eq!(q.pump(0), vec![3]);
    }

    #[test]
    fn shrunk_limit_drops_waiters_that_can_never_run() {
        let mut q = q();
        q.request(1, 8 * GIB, 0).unwrap();
        q.request(2, 8 * GIB, 0).unwrap();
        q.set_limit(4 * GIB, 3 * GIB);
        q.release(1, 0);
        assert!(q.pump(0).is_empty());
        assert!(!q.is_waiting(2));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request(u64),
        Estimate(u64),
        Release(usize),
        Cancel(usize),
        Pump,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..6).prop_map(|g| Op::Request(g * GIB / 2)),
            (1u64..10).prop_map(|g| Op::Estimate(g * GIB / 2)),
            (0usize..20).prop_map(Op::Release),
            (0usize..20).prop_map(Op::Cancel),
            Just(Op::Pump),
        ]
    }

    proptest! {
        /// Reservations never pass the capacity, admission order is request order, and a job
        /// that fits behind an empty queue is never left waiting.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..80)) {
            let mut q = AdmissionQueue::new(4 * GIB, 3 * GIB, 6);
            let mut next = 0u64;
            let mut order = Vec::new();
            let mut ids = Vec::new();
            for op in ops {
                match op {
                    Op::Request(n) => {
                        next += 1;
                        ids.push(next);
                        if let Ok(Verdict::Admitted) = q.request(next, n, 0) { order.push(next) }
                    }
                    Op::Estimate(n) => {
                        next += 1;
                        ids.push(next);
                        let ask = Ask::Estimate { bytes: n, source: ReserveSource::FirstRun, declared: None };
                        if let Ok(Verdict::Admitted) = q.request(next, ask, 0) { order.push(next) }
                    }
                    Op::Release(i) => { if let Some(id) = ids.get(i) { q.release(*id, 0); } }
                    Op::Cancel(i) => { if let Some(id) = ids.get(i) { q.cancel(*id); } }
                    Op::Pump => {
                        order.extend(q.pump(0));
                        if let Some(&(_, ask)) = q.waiting.front() {
                            let need = ask.reservation(q.room(0)).bytes;
                            prop_assert!(q.held(0) + need > q.capacity());
                        }
                    }
                }
                prop_assert!(q.reserved() <= q.capacity());
            }
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(order, sorted);
        }
    }
}
