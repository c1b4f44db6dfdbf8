//! What the extender remembers of the pods kube-scheduler has asked it to filter, by UID, so
//! that bind need not read the pod back from the API server.
//!
//! kube-scheduler sends the whole pod with every filter call and only its name, namespace and
//! UID with bind; without this memory every bind began with a GET of the pod. A bind whose UID
//! is not remembered (the extender restarted between filter and bind, the entry was evicted, no
//! filter verb is configured) falls back to the GET, so the memory is only ever a shortcut. The
//! UID is the key: a pod deleted and re-created under the same name has a new UID, and the
//! Binding itself carries the UID as a precondition.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use vramslice_core::cluster::placement::{PodRequest, Policy};

/// Entries kept before old ones are dropped (a pending pod costs well under 200 bytes).
pub const CAPACITY: usize = 16_384;

/// Entries older than this are dropped first when the memory is full: a pod filtered this
/// long ago and still not bound has been retried (and re-remembered) or deleted.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// A pending pod as the scheduler last showed it in a filter call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its VRAM request (`None`: it asks for none).
    pub request: Option<PodRequest>,
    /// Its placement policy (annotation or the configured default).
    pub policy: Policy,
}

/// The memory: UID -> pending pod, bounded.
#[derive(Debug, Default)]
pub struct PendingPods {
    by_uid: Mutex<HashMap<String, (SystemTime, PendingPod)>>,
}

impl PendingPods {
    /// An empty memory.
    pub fn new() -> Self {
        PendingPods::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SystemTime, PendingPod)>> {
        // The map has no invariant a panicking holder could break.
        self.by_uid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember `pod` under `uid` (a pod without a UID is not remembered).
    pub fn remember(&self, uid: &str, pod: PendingPod, now: SystemTime) {
        if uid.is_empty() {
            return;
        }
        let mut map = self.lock();
        if map.len() >= CAPACITY && !map.contains_key(uid) {
            map.retain(|_, (seen, _)| now.duration_since(*seen).unwrap_or_default() < MAX_AGE);
            if map.len() >= CAPACITY {
                // Still full of recent pods: start over (binds fall back to reading the pod).
                map.clear();
            }
        }
        map.insert(uid.to_string(), (now, pod));
    }

    /// Take the pod remembered under `uid`, if any.
    pub fn take(&self, uid: &str) -> Option<PendingPod> {
        self.lock().remove(uid).map(|(_, pod)| pod)
    }

    /// How many pods are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(name: &str) -> PendingPod {
        PendingPod {
            namespace: "default".into(),
            name: name.into(),
            request: None,
            policy: Policy::default(),
        }
    }

    #[test]
    fn take_returns_the_last_remembered_pod_once() {
        let memory = PendingPods::new();
        let t0 = SystemTime::UNIX_EPOCH;
        memory.remember("u1", pending("a"), t0);
        memory.remember("u1", pending("b"), t0);
        memory.remember("", pending("no-uid"), t0);
        assert_eq!(memory.len(), 1);
        assert_eq!(memory.take("u1"), Some(pending("b")));
        assert_eq!(memory.take("u1"), None);
        assert!(memory.is_empty());
    }

    #[test]
    fn a_full_memory_drops_old_entries_first_then_everything() {
        let memory = PendingPods::new();
        let t0 = SystemTime::UNIX_EPOCH;
        for i in 0..CAPACITY - 1 {
            memory.remember(&format!("old-{i}"), pending("old"), t0);
        }
        let later = t0 + MAX_AGE / 2;
        memory.remember("recent", pending("recent"), later);
        assert_eq!(memory.len(), CAPACITY);
        // Full: the old ones (MAX_AGE before this insert) go, the recent one stays.
        memory.remember("new", pending("new"), t0 + MAX_AGE);
        assert_eq!(memory.len(), 2);
        assert_eq!(memory.take("recent"), Some(pending("recent")));
        // Refill with recent pods only: the next insert clears the memory.
        let now = t0 + MAX_AGE;
        for i in 0..CAPACITY - 1 {
            memory.remember(&format!("r-{i}"), pending("r"), now);
        }
        assert_eq!(memory.len(), CAPACITY);
        memory.remember("one-more", pending("x"), now);
        assert_eq!(memory.len(), 1);
        assert_eq!(memory.take("one-more"), Some(pending("x")));
        // Re-remembering a known UID in a full memory evicts nothing.
        memory.take("one-more");
        for i in 0..CAPACITY {
            memory.remember(&format!("k-{i}"), pending("k"), now);
        }
        memory.remember("k-0", pending("k0"), now);
        assert_eq!(memory.len(), CAPACITY);
        assert_eq!(memory.take("k-0"), Some(pending("k0")));
    }
}
