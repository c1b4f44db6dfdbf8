//! What this process holds: handle → bytes, in a sharded map so threads rarely contend.
//!
//! Keys carry the kind of handle (device pointer, physical allocation handle, array, context,
//! module...) because different kinds may share numeric values. Around `fork` every shard is
//! locked by the forking thread (so no shard is copied half-modified), then unlocked in the
//! parent and cleared and unlocked in the child: the child owns none of its parent's memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Kinds of tracked handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A device pointer (`cuMemAlloc*`).
    DevicePtr = 1,
    /// A physical allocation (`cuMemCreate`).
    Physical = 2,
    /// A `CUarray`.
    Array = 3,
    /// A `CUmipmappedArray`.
    Mipmapped = 4,
    /// A created context.
    Context = 5,
    /// A loaded module.
    Module = 6,
    /// A loaded library.
    Library = 7,
    /// A device's primary context (key: device ordinal).
    Primary = 8,
    /// A `cuMemMap` mapping (key: its virtual address; bytes: its size; extra: the physical
    /// allocation's handle). Never charged itself.
    Mapping = 9,
}

/// One tracked handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Bytes charged for it.
    pub bytes: u64,
    /// The memory pool it came from (async allocations), or a reference count (primary contexts).
    pub extra: u64,
    /// The account the bytes are charged to (see `crate::guard::AccountId`).
    pub account: usize,
}

impl Entry {
    /// `bytes` charged to `account`, nothing extra.
    pub fn new(bytes: u64, account: usize) -> Entry {
        Entry {
            bytes,
            extra: 0,
            account,
        }
    }
}

/// A multiply-shift hasher: keys are addresses, already well spread in their middle bits.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        let folded = (v as u64) ^ ((v >> 64) as u64).rotate_left(29);
        self.0 = (folded ^ (folded >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Shard = HashMap<u128, Entry, BuildHasherDefault<AddrHasher>>;
const SHARDS: usize = 64;

/// The sharded map.
pub struct Tracker {
    shards: Vec<Mutex<Shard>>,
}

thread_local! {
    static FORK_GUARDS: RefCell<Vec<MutexGuard<'static, Shard>>> = const { RefCell::new(Vec::new()) };
}

fn key(kind: Kind, handle: u64) -> u128 {
    (u128::from(kind as u8) << 64) | u128::from(handle)
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

impl Tracker {
    #[inline]
    fn shard(&self, handle: u64) -> MutexGuard<'_, Shard> {
        let i = ((handle >> 9) ^ (handle >> 17)) as usize % SHARDS;
        // A panic while holding a shard cannot leave a HashMap in a state unsafe to use.
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a handle; returns the entry it replaced (the caller releases its bytes).
    #[inline]
    pub fn insert(&self, kind: Kind, handle: u64, entry: Entry) -> Option<Entry> {
        self.shard(handle).insert(key(kind, handle), entry)
    }

    /// Whether a handle is tracked.
    pub fn contains(&self, kind: Kind, handle: u64) -> bool {
        self.shard(handle).contains_key(&key(kind, handle))
    }

    /// Removes a handle.
    #[inline]
    pub fn remove(&self, kind: Kind, handle: u64) -> Option<Entry> {
        self.shard(handle).remove(&key(kind, handle))
    }

    /// Changes an entry in place (for reference counts); returns the new entry.
    pub fn update(
        &self,
        kind: Kind,
        handle: u64,
        f: impl FnOnce(Option<Entry>) -> Option<Entry>,
    ) -> Option<Entry> {
        let mut shard = self.shard(handle);
        let k = key(kind, handle);
        let new = f(shard.get(&k).copied());
        match new {
            Some(e) => shard.insert(k, e),
            None => shard.remove(&k),
        };
        new
    }

    /// Number of tracked handles.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Before `fork`: the forking thread takes every shard.
    pub fn lock_for_fork(&'static self) {
        FORK_GUARDS.with(|g| {
            let mut g = g.borrow_mut();
            for s in &self.shards {
                g.push(s.lock().unwrap_or_else(PoisonError::into_inner));
            }
        });
    }

    /// After `fork`, in the parent: unlock.
    pub fn unlock_after_fork_parent(&self) {
        FORK_GUARDS.with(|g| g.borrow_mut().clear());
    }

    /// After `fork`, in the child: forget the parent's handles, unlock.
    pub fn unlock_after_fork_child(&self) {
        FORK_GUARDS.with(|g| {
            let mut g = g.borrow_mut();
            for shard in g.iter_mut() {
                shard.clear();
            }
            g.clear();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_do_not_collide() {
        let t = Tracker::default();
        assert_eq!(t.insert(Kind::DevicePtr, 0x1000, Entry::new(1, 0)), None);
        assert_eq!(t.insert(Kind::Array, 0x1000, Entry::new(2, 0)), None);
        assert_eq!(t.remove(Kind::DevicePtr, 0x1000).map(|e| e.bytes), Some(1));
        assert_eq!(t.remove(Kind::DevicePtr, 0x1000), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn update_counts_references() {
        let t = Tracker::default();
        let bump = |e: Option<Entry>| {
            Some(Entry {
                bytes: 5,
                extra: e.map_or(1, |e| e.extra + 1),
                account: 0,
            })
        };
        t.update(Kind::Primary, 0, bump);
        assert_eq!(t.update(Kind::Primary, 0, bump).map(|e| e.extra), Some(2));
        assert_eq!(t.update(Kind::Primary, 0, |_| None), None);
        assert!(t.is_empty());
    }

    #[test]
    fn fork_protocol_clears_in_child_keeps_in_parent() {
        let t: &'static Tracker = Box::leak(Box::default());
        t.insert(Kind::DevicePtr, 1, Entry::new(1, 0));
        t.lock_for_fork();
        t.unlock_after_fork_parent();
        assert_eq!(t.len(), 1);
        t.lock_for_fork();
        t.unlock_after_fork_child();
        assert!(t.is_empty());
    }
}
