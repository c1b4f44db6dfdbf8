//! How a reservation ends when its bind does not confirm it: released (the Binding failed),
//! left unsettled (nobody knows whether the Binding took), or expired (the API server never
//! showed the pod bound).

use std::time::{Duration, SystemTime};

use super::Ledger;

impl Ledger {
    /// Drop a reservation (its bind failed, or an unsettled one was found not bound). Bound pods
    /// are not touched. Returns whether a reservation was dropped.
    pub fn release(&mut self, uid: &str) -> bool {
        let reserved = self
            .pods
            .get(uid)
            .is_some_and(|e| e.reserved_since.is_some());
        reserved && self.forget_pod(uid)
    }

    /// The bind of reservation `uid` ended without knowing whether its Binding took (the API
    /// server's answer was lost and it could not be asked again). The room stays reserved, as
    /// the pod may be bound there, until the API server shows the pod ([`Ledger::observe_pod`])
    /// or the reservation expires; meanwhile another bind of the pod gets
    /// [`super::ReserveError::Unsettled`] instead of `InFlight`, so that it may check and
    /// release it. Returns whether `uid` was reserved.
    pub fn unsettle(&mut self, uid: &str) -> bool {
        match self.pods.get_mut(uid) {
            Some(e) if e.reserved_since.is_some() => {
                e.unsettled = true;
                true
            }
            _ => false,
        }
    }

    /// A bind about to read back whether the unsettled reservation of `uid` took: it is marked
    /// settled meanwhile, so that another bind of the pod gets `InFlight` and
    /// [`Ledger::release_unsettled`] leaves it alone. Returns whether it was unsettled (`false`:
    /// someone else is checking it, or it is gone).
    pub fn take_unsettled(&mut self, uid: &str) -> bool {
        match self.pods.get_mut(uid) {
            Some(e) if e.reserved_since.is_some() && e.unsettled => {
                e.unsettled = false;
                true
            }
            _ => false,
        }
    }

    /// Drop the reservation of `uid` if it is still unsettled (no bind took it since): the
    /// API server showed its pod not bound. Returns whether it was dropped.
    pub fn release_unsettled(&mut self, uid: &str) -> bool {
        let unsettled = self
            .pods
            .get(uid)
            .is_some_and(|e| e.reserved_since.is_some() && e.unsettled);
        unsettled && self.forget_pod(uid)
    }

    /// Drop reservations older than `ttl` that the API server never showed bound; returns their
    /// UIDs.
    pub fn expire_reservations(&mut self, now: SystemTime, ttl: Duration) -> Vec<String> {
        let expired: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, e)| {
                e.reserved_since
                    .is_some_and(|since| now.duration_since(since).unwrap_or_default() > ttl)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &expired {
            self.forget_pod(uid);
        }
        expired
    }
}
