//! How a reservation ends: confirmed bound (the Binding took), released (it failed), left
//! unsettled (nobody knows whether it took), or expired (the API server never showed the pod
//! bound).

use std::time::{Duration, SystemTime};

use super::{Ledger, Unsettled};

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

    /// The bind of reservation `uid` ended at `now` without knowing whether its Binding took
    /// (the API server's answer was lost or unsure, and reading the pod back could not tell).
    /// The room stays reserved, as the pod may be bound there, until the API server shows the
    /// pod ([`Ledger::observe_pod`]), a read-back releases it ([`Ledger::release_unsettled`]
    /// with the token returned here), or it expires; meanwhile another bind of the pod gets
    /// [`super::ReserveError::Unsettled`]. Returns the token, or `None` when `uid` was not
    /// reserved.
    pub fn unsettle(&mut self, uid: &str, now: SystemTime) -> Option<u64> {
        self.unsettles += 1;
        let token = self.unsettles;
        match self.pods.get_mut(uid) {
            Some(e) if e.reserved_since.is_some() => {
                e.unsettled = Some(Unsettled { token, at: now });
                Some(token)
            }
            _ => None,
        }
    }

    /// A bind about to read back itself whether the unsettled reservation of `uid` took: it is
    /// marked settled meanwhile, so that another bind of the pod gets `InFlight` and a
    /// background read-back leaves it alone. Only a reservation unsettled at least `min_age`
    /// before `now` is taken: a younger one's Binding may still be committing, which a single
    /// read cannot tell. Returns whether it was taken.
    pub fn take_unsettled(&mut self, uid: &str, now: SystemTime, min_age: Duration) -> bool {
        match self.pods.get_mut(uid) {
            Some(e)
                if e.reserved_since.is_some()
                    && e.unsettled.is_some_and(|u| {
                        now.duration_since(u.at).unwrap_or_default() >= min_age
                    }) =>
            {
                e.unsettled = None;
                true
            }
            _ => false,
        }
    }

    /// How many reservations are unsettled: their Bindings may still land.
    pub fn unsettled_count(&self) -> usize {
        self.pods
            .values()
            .filter(|e| e.reserved_since.is_some() && e.unsettled.is_some())
            .count()
    }

    /// The token of the unsettled reservation of `uid`, if it is one.
    pub fn unsettled_token(&self, uid: &str) -> Option<u64> {
        self.pods
            .get(uid)
            .filter(|e| e.reserved_since.is_some())
            .and_then(|e| e.unsettled)
            .map(|u| u.token)
    }

    /// Drop the reservation of `uid` if it is still the one unsettled under `token` (no bind
    /// took it, and it was not unsettled again, since): its pod was read back not bound.
    /// Returns whether it was dropped.
    pub fn release_unsettled(&mut self, uid: &str, token: u64) -> bool {
        self.unsettled_token(uid) == Some(token) && self.forget_pod(uid)
    }

    /// The API server confirmed the Binding of reservation `uid` (it answered 201, or the pod
    /// read back bound here): the pod is bound, whether or not the pod watch has shown it yet,
    /// so its booking no longer expires (a watch stalled past the reservation TTL would
    /// otherwise drop a bound pod's room and promise it again). The next re-list keeps it (it
    /// may have been listed before the Binding); one after that which does not hold the pod
    /// forgets it, as any bound pod. Returns whether a reservation was confirmed.
    pub fn confirm_bound(&mut self, uid: &str) -> bool {
        let relists = self.relists;
        match self.pods.get_mut(uid) {
            Some(e) if e.reserved_since.is_some() => {
                e.reserved_since = None;
                e.unsettled = None;
                e.confirmed_in = Some(relists);
                true
            }
            _ => false,
        }
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
