//! Handing over to another leader: the extender stops taking binds and waits until none is in
//! flight and no reservation is unsettled (its Binding may still land), so that the next
//! leader's extender, whose ledger never held them, cannot promise the same room again.
//!
//! The chart's kube-scheduler container calls `GET /drain` from its preStop hook: it keeps its
//! lease (and so the new leader waits) until this extender is quiet. `/drain` is honoured only
//! while the extender's own pod is terminating (read from the API server), so that anyone who
//! reaches the probe port cannot stop placement. The extender drains too when it is told to
//! stop, before its servers go.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::Extender;

/// The most a drain waits: a Binding given up may land for up to a minute after
/// (`bind::MAY_STILL_LAND`) after taking up to 20 s (`bind::BINDING_TIMEOUT`), and the
/// read-back that settles it takes a few seconds more.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(90);

/// Binds in flight, and whether the extender is draining (it never stops, once begun: the
/// process is on its way out).
#[derive(Debug, Default)]
pub struct Handover {
    draining: AtomicBool,
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
    /// Whether binds are refused (a drain began).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

impl Extender {
    /// Count a bind that starts now; `None` while draining (the bind is refused).
    pub(super) fn bind_starts(self: &Arc<Self>) -> Option<BindInFlight> {
        self.handover.binds.fetch_add(1, Ordering::SeqCst);
        let counted = BindInFlight(Arc::clone(self));
        (!self.handover.draining()).then_some(counted)
    }

    /// Stop taking binds, and wait (at most `limit`) until none is in flight and no reservation
    /// is unsettled.
    ///
    /// # Errors
    /// What is still open when `limit` passes.
    pub async fn drain(&self, limit: Duration) -> Result<(), String> {
        self.handover.draining.store(true, Ordering::SeqCst);
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

/// Whether `/drain` may begin: the extender's own pod is being deleted.
#[derive(Debug, PartialEq, Eq)]
pub enum DrainPermission {
    /// It is terminating (or the extender does not know its pod: outside the chart).
    Granted,
    /// It is not: the request does not come from its stop.
    NotTerminating,
    /// The pod could not be read.
    Unknown(String),
}

impl Extender {
    /// Whether a `/drain` request is for real: the pod this extender runs in
    /// ([`Extender::with_own_pod`]) is terminating.
    pub async fn drain_permission(&self) -> DrainPermission {
        let Some((namespace, name)) = &self.own_pod else {
            return DrainPermission::Granted;
        };
        match self.cluster.get_pod(namespace, name).await {
            Ok(pod) if pod.metadata.deletion_timestamp.is_some() => DrainPermission::Granted,
            Ok(_) => DrainPermission::NotTerminating,
            Err(e) => DrainPermission::Unknown(format!("reading pod {namespace}/{name}: {e}")),
        }
    }
}
