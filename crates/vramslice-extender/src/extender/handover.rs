//! Handing over to another leader: the extender stops taking binds and waits until none is in
//! flight and no reservation is unsettled (its Binding may still land), so that the next
//! leader's extender, whose ledger never held them, cannot promise the same room again.
//!
//! The chart's kube-scheduler container calls `GET /drain` from its preStop hook: it keeps its
//! lease (and so the new leader waits) until this extender is quiet. The extender drains too when
//! it is told to stop, before its servers go.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use super::Extender;

/// The most a drain waits: a Binding given up may land for up to a minute after
/// (`bind::MAY_STILL_LAND`) after taking up to 20 s (`bind::BINDING_TIMEOUT`), and the
/// read-back that settles it takes a few seconds more.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(90);

/// How long binds stay refused after a drain began, when no stop follows it: a `GET /drain`
/// from anyone who reaches the probe port, not the pod's own preStop hook, must not stop
/// placement for good.
pub const DRAIN_EXPIRY: Duration = Duration::from_secs(120);

/// Binds in flight, and since when the extender is draining.
#[derive(Debug, Default)]
pub struct Handover {
    draining_since: std::sync::Mutex<Option<SystemTime>>,
    binds: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// One bind in flight, counted until it ends.
pub(super) struct BindInFlight(Arc<Extender>);

impl Drop for BindInFlight {
    fn drop(&mut self) {
        self.0.handover.binds.fetch_sub(1, Ordering::SeqCst);
        self.0.handover.changed.notify_waiters();
    }
}

impl Handover {
    /// Whether binds are refused at `now`: a drain began less than [`DRAIN_EXPIRY`] before.
    pub fn draining(&self, now: SystemTime) -> bool {
        self.since().is_some_and(|since| within(since, now))
    }

    fn since(&self) -> Option<SystemTime> {
        *self
            .draining_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(&self, now: SystemTime) {
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !since.is_some_and(|at| within(at, now)) {
            *since = Some(now);
        }
    }
}

/// Whether `now` is less than [`DRAIN_EXPIRY`] after `since` (a clock set back counts as within).
fn within(since: SystemTime, now: SystemTime) -> bool {
    now.duration_since(since)
        .map_or(true, |age| age < DRAIN_EXPIRY)
}

impl Extender {
    /// Count a bind that starts now; `None` while draining (the bind is refused).
    pub(super) fn bind_starts(self: &Arc<Self>) -> Option<BindInFlight> {
        self.handover.binds.fetch_add(1, Ordering::SeqCst);
        let counted = BindInFlight(Arc::clone(self));
        (!self.handover.draining(self.now())).then_some(counted)
    }

    /// Stop taking binds, and wait (at most `limit`) until none is in flight and no reservation
    /// is unsettled.
    ///
    /// # Errors
    /// What is still open when `limit` passes.
    pub async fn drain(&self, limit: Duration) -> Result<(), String> {
        self.handover.begin(self.now());
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.handover.changed.notified();
            let binds = self.handover.binds.load(Ordering::SeqCst);
            let unsettled = self.ledger().unsettled_count();
            if binds == 0 && unsettled == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{binds} bind(s) in flight and {unsettled} reservation(s) unsettled after {}s",
                    limit.as_secs()
                ));
            }
            // Unsettled reservations settle in background tasks: look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
        }
    }
}
