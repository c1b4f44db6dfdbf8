//! Which accounting directories and limit files of ended allocations to delete.
//!
//! Every Allocate leaves `<accountingRoot>/<key>/` and `<accountingRoot>/<key>.limit` on the host
//! (`crate::node::allocation`). Nothing else removes them, so a long-lived node would collect one pair
//! per container ever started. The device plugin lists the root and the kubelet's live
//! allocations (PodResources) each poll; [`sweep`] decides, as a pure function of what was seen
//! and when, which keys have been absent from the kubelet's record long enough to delete.
//!
//! Deleting what a running container still uses would be far worse than keeping a stale file,
//! so the rule is conservative: only names that are allocation keys are ever touched; a key
//! whose files changed within the grace period counts as live (an Allocate the kubelet has not
//! recorded yet); a key must be seen dead in every sweep for a whole grace period (seen live
//! once, it starts over); and the caller sweeps only with a fresh PodResources answer.
//!
//! PodResources never lists plain init containers, so an init container that runs (or waits to
//! run, or restarts) longer than the grace period would lose its files while it still needs
//! them; and one that completed needs them again when the kubelet recreates its pod's sandbox
//! and re-runs it with the mounts it checkpointed. The caller passes what such containers may
//! hold ([`InitHold`], from the node's pods: every plain init container of a pod that may still
//! run), and keys that match one count as live ([`held_by_init`]): a GPU of the pod and the
//! container's unit count, since the kubelet's choice of units is not known.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::node::allocation::{LIMIT_FILE_HOST_SUFFIX, path_safe};
use crate::node::publish::ContainerAllocationRecord;

/// What the sweeper remembers between polls: when each dead key was first seen dead (time
/// since an epoch of the caller's choosing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepState {
    dead_since: BTreeMap<String, Duration>,
}

impl SweepState {
    /// Keys currently waiting out their grace period.
    pub fn pending(&self) -> usize {
        self.dead_since.len()
    }
}

/// One sweep's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepVerdict {
    /// The state for the next sweep.
    pub state: SweepState,
    /// Keys whose directory and limit file are to be deleted now.
    pub remove: Vec<String>,
}

/// The allocation key an entry of the accounting root belongs to: the directory `<key>`, the
/// limit file `<key>.limit`, or its temporary `<key>.limit.tmp`. `None` for anything else, which
/// the sweeper never touches.
pub fn entry_key(name: &str) -> Option<&str> {
    let key = name
        .strip_suffix(".tmp")
        .and_then(|n| n.strip_suffix(LIMIT_FILE_HOST_SUFFIX))
        .or_else(|| name.strip_suffix(LIMIT_FILE_HOST_SUFFIX))
        .unwrap_or(name);
    is_allocation_key(key).then_some(key)
}

/// Whether `s` has the shape of `crate::node::allocation::allocation_key`:
/// `<uuid>.u<first unit>.n<count>.<16 hex digits>`, the UUID made of `[A-Za-z0-9_.-]`.
pub fn is_allocation_key(s: &str) -> bool {
    parse_key(s).is_some()
}

/// An allocation key's parts that say what it holds.
struct KeyParts<'a> {
    /// `<uuid>` for one GPU, `<first uuid>.g<N>` for several (path-safe UUIDs).
    gpus: &'a str,
    /// Units held in all.
    units: u64,
}

/// The parts of `s` when it has the shape of an allocation key ([`is_allocation_key`]).
fn parse_key(s: &str) -> Option<KeyParts<'_>> {
    let mut parts = s.rsplitn(4, '.');
    let (hash, count, first, gpus) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let valid = hash.len() == 16
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && first.strip_prefix('u').is_some_and(digits)
        && !gpus.is_empty()
        && gpus
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let units = count
        .strip_prefix('n')
        .filter(|n| digits(n))
        .and_then(|n| n.parse().ok())?;
    valid.then_some(KeyParts { gpus, units })
}

/// What a plain init container of a pod that may still run (or re-run it) may hold: `units`
/// units in all, on the GPUs of `gpus` (its pod's `vramslice.io/gpu-uuid`, one or several; empty when the pod is not
/// annotated: any GPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitHold {
    /// The pod's GPU UUIDs.
    pub gpus: Vec<String>,
    /// The container's units.
    pub units: u64,
    /// When it ran to completion (its files are kept for a re-run after the pod's sandbox is
    /// recreated): from its pod's start (the kubelet allocates at admission) to its finish. It
    /// then holds only the matching keys changed within that time ([`init_held_keys`]); `None`
    /// (it has not completed, or the times are not known) holds every matching key.
    pub completed_between: Option<(SystemTime, SystemTime)>,
}

/// How far outside a completed init container's run its key's last change may lie (clocks and
/// status times are read at different moments, in whole seconds).
pub const INIT_RUN_SLACK: Duration = Duration::from_secs(120);

/// Whether allocation `key` may be one an init container of `holds` holds: it counts that
/// container's units and starts with one of its pod's GPUs (a key of several GPUs is named
/// after the first by UUID, which is one of them).
pub fn held_by_init(key: &str, holds: &[InitHold]) -> bool {
    let Some(KeyParts {
        gpus: gpu_part,
        units,
    }) = parse_key(key)
    else {
        return false;
    };
    let spanning_first = gpu_part
        .rsplit_once('.')
        .filter(|(_, g)| {
            g.strip_prefix('g')
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|(uuid, _)| uuid);
    let names = |gpu: &str| {
        let safe = path_safe(gpu);
        safe == gpu_part || spanning_first == Some(safe.as_str())
    };
    holds
        .iter()
        .any(|h| h.units == units && (h.gpus.is_empty() || h.gpus.iter().any(|g| names(g))))
}

/// The `present` keys (with the age at `now` of their most recent change) that plain init
/// containers may hold, besides the `live` ones. An init container that has not completed may
/// hold any key that matches it ([`held_by_init`]; which units the kubelet chose is not known).
/// One that completed holds the matching keys last changed while it could have been writing
/// them: between its pod's start and its own finish ([`INIT_RUN_SLACK`] either side). Its key
/// was made at the pod's admission and written while it ran; ended allocations of the same
/// shape from other pods (a Deployment's earlier replicas, a Job run since) fall outside, so
/// they are not kept for as long as a pod of that shape lives, and do not push its own key out.
pub fn init_held_keys(
    present: &BTreeMap<String, Duration>,
    holds: &[InitHold],
    now: SystemTime,
) -> BTreeSet<String> {
    let mut held = BTreeSet::new();
    for hold in holds {
        let one = std::slice::from_ref(hold);
        let within = |age: Duration| match hold.completed_between {
            None => true,
            Some((from, to)) => now.checked_sub(age).is_some_and(|changed| {
                changed + INIT_RUN_SLACK >= from && changed <= to + INIT_RUN_SLACK
            }),
        };
        held.extend(
            present
                .iter()
                .filter(|(k, age)| within(**age) && held_by_init(k, one))
                .map(|(k, _)| k.clone()),
        );
    }
    held
}

/// The running pods (`running`: namespace, name, by the API server) that the kubelet's
/// PodResources record (`records`) does not list. A record that misses any is no ground to
/// sweep by: a kubelet restarted while it cannot reach the API server lists no pods at all while
/// their containers run on, and a sweep by that record would delete their accounting
/// directories and limit files.
pub fn unlisted_running_pods<'a>(
    records: &[ContainerAllocationRecord],
    running: &'a [(String, String)],
) -> Vec<&'a (String, String)> {
    let listed: BTreeSet<(&str, &str)> = records
        .iter()
        .map(|r| (r.namespace.as_str(), r.pod.as_str()))
        .collect();
    running
        .iter()
        .filter(|(ns, name)| !listed.contains(&(ns.as_str(), name.as_str())))
        .collect()
}

/// Decide which of the `present` keys (found under the accounting root, each with the age of
/// its most recently changed entry) to delete at `now`: those neither `live` nor changed within
/// `grace`, in every sweep since at least `grace` ago.
pub fn sweep(
    state: &SweepState,
    present: &BTreeMap<String, Duration>,
    live: &BTreeSet<String>,
    now: Duration,
    grace: Duration,
) -> SweepVerdict {
    let mut next = SweepState::default();
    let mut remove = Vec::new();
    let dead = present
        .iter()
        .filter(|(key, age)| !live.contains(*key) && **age >= grace);
    for (key, _) in dead {
        let since = state.dead_since.get(key).copied().unwrap_or(now);
        if now.saturating_sub(since) >= grace {
            remove.push(key.clone());
        } else {
            next.dead_since.insert(key.clone(), since);
        }
    }
    SweepVerdict {
        state: next,
        remove,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::allocation::allocation_key;
    use proptest::prelude::*;

    const GRACE: Duration = Duration::from_secs(600);

    #[test]
    fn a_record_that_misses_a_running_pod_is_no_ground_to_sweep_by() {
        let record = |ns: &str, pod: &str| ContainerAllocationRecord {
            namespace: ns.into(),
            pod: pod.into(),
            pod_uid: None,
            device_ids: vec!["GPU-a::0".into()],
        };
        let running = vec![
            ("team".to_string(), "llm".to_string()),
            ("team".to_string(), "embed".to_string()),
        ];
        let complete = [
            record("team", "llm"),
            record("team", "embed"),
            record("x", "y"),
        ];
        assert!(unlisted_running_pods(&complete, &running).is_empty());
        // The same name in another namespace is another pod.
        let partial = [record("team", "llm"), record("other", "embed")];
        assert_eq!(
            unlisted_running_pods(&partial, &running),
            [&("team".to_string(), "embed".to_string())]
        );
        // A kubelet that lists nothing while pods run.
        assert_eq!(unlisted_running_pods(&[], &running).len(), 2);
        assert!(unlisted_running_pods(&[], &[]).is_empty());
    }

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    /// Keys found on disk, all last changed long ago.
    fn old(keys: &[&str]) -> BTreeMap<String, Duration> {
        keys.iter().map(|k| (k.to_string(), GRACE * 10)).collect()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn entries_map_to_their_key_and_nothing_else_is_touched() {
        let key = allocation_key("GPU-8f6a9c2e-1b3d-4e5f-a6b7-c8d9e0f1a2b3", &[3, 4, 5]);
        assert_eq!(entry_key(&key), Some(key.as_str()));
        assert_eq!(entry_key(&format!("{key}.limit")), Some(key.as_str()));
        assert_eq!(entry_key(&format!("{key}.limit.tmp")), Some(key.as_str()));
        for other in [
            "",
            "lost+found",
            ".limit",
            "notes.txt",
            "GPU-a.u1.n2.0123456789abcdeg",
            "GPU-a.u1.n2.0123456789abcde",
            "GPU-a.ux.n2.0123456789abcdef",
            "GPU-a.u1.2.0123456789abcdef",
            "GPU a.u1.n2.0123456789abcdef",
            ".u1.n2.0123456789abcdef",
        ] {
            assert_eq!(entry_key(other), None, "{other:?}");
            assert_eq!(
                entry_key(&format!("{other}.limit")),
                None,
                "{other:?}.limit"
            );
        }
        // A temporary without `.limit` before it is not ours.
        assert_eq!(entry_key(&format!("{key}.tmp")), None);
    }

    #[test]
    fn a_key_dead_for_the_whole_grace_period_goes_and_a_live_sighting_starts_over() {
        let present = old(&["a", "b"]);
        let v = sweep(
            &SweepState::default(),
            &present,
            &set(&["a"]),
            secs(0),
            GRACE,
        );
        assert!(v.remove.is_empty());
        assert_eq!(v.state.pending(), 1);
        let v = sweep(&v.state, &present, &set(&["a"]), secs(599), GRACE);
        assert!(v.remove.is_empty());
        // b seen live once: its clock restarts.
        let v = sweep(&v.state, &present, &set(&["a", "b"]), secs(600), GRACE);
        assert!(v.remove.is_empty());
        assert_eq!(v.state.pending(), 0);
        let v = sweep(&v.state, &present, &set(&["a"]), secs(700), GRACE);
        let v = sweep(&v.state, &present, &set(&["a"]), secs(1299), GRACE);
        assert!(v.remove.is_empty());
        let v = sweep(&v.state, &present, &set(&["a"]), secs(1300), GRACE);
        assert_eq!(v.remove, vec!["b".to_string()]);
        assert_eq!(v.state.pending(), 0);
        // Gone from disk (deleted by someone else): forgotten.
        let v = sweep(
            &SweepState::default(),
            &old(&["c"]),
            &set(&[]),
            secs(0),
            GRACE,
        );
        let v = sweep(&v.state, &old(&[]), &set(&[]), secs(10), GRACE);
        assert_eq!(v.state.pending(), 0);
    }

    #[test]
    fn keys_an_unfinished_init_container_may_hold_are_recognised() {
        use crate::node::allocation::allocation_key_for_ids;
        let one = allocation_key("GPU-a", &[4, 5, 6]);
        let two =
            allocation_key_for_ids(&["GPU-b::0", "GPU-a::1", "GPU-b::2", "GPU-a::3"]).unwrap();
        let odd = allocation_key("GPU/x", &[0]);
        let hold = |gpus: &[&str], units: u64| InitHold {
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            units,
            completed_between: None,
        };
        // The pod's GPU and the container's units.
        assert!(held_by_init(&one, &[hold(&["GPU-a"], 3)]));
        assert!(!held_by_init(&one, &[hold(&["GPU-a"], 2)]));
        assert!(!held_by_init(&one, &[hold(&["GPU-b"], 3)]));
        // An unannotated pod: any GPU.
        assert!(held_by_init(&one, &[hold(&[], 3)]));
        // Several GPUs: named after the first by UUID, units counted over all.
        assert!(held_by_init(&two, &[hold(&["GPU-b", "GPU-a"], 4)]));
        assert!(!held_by_init(&two, &[hold(&["GPU-b"], 4)]));
        assert!(!held_by_init(&two, &[hold(&["GPU-a", "GPU-b"], 2)]));
        // UUIDs are compared as keys spell them.
        assert!(held_by_init(&odd, &[hold(&["GPU/x"], 1)]));
        assert!(!held_by_init(&one, &[]));
        assert!(!held_by_init("not-a-key", &[hold(&[], 3)]));
    }

    #[test]
    fn a_completed_init_container_holds_the_keys_changed_while_it_could_run() {
        let keys: Vec<String> = (0..3u64)
            .map(|i| allocation_key("GPU-a", &[i * 2, i * 2 + 1]))
            .collect();
        let now = SystemTime::UNIX_EPOCH + secs(100_000);
        // Three ended 2-unit allocations on GPU-a, last changed 30000 s, 20000 s and 1000 s ago:
        // an earlier replica's, the pod's own (its init container ran from 21000 s to 19000 s
        // ago), and a Job's run since.
        let ages = [30_000, 20_000, 1_000];
        let present: BTreeMap<String, Duration> = keys
            .iter()
            .zip(ages)
            .map(|(k, a)| (k.clone(), secs(a)))
            .collect();
        let ago = |s: u64| now - secs(s);
        let hold = |completed_between| InitHold {
            gpus: vec!["GPU-a".into()],
            units: 2,
            completed_between,
        };
        // Not completed (or its times unknown): any of them may be its own.
        assert_eq!(init_held_keys(&present, &[hold(None)], now).len(), 3);
        // Completed: the one changed while it could run, whatever came before or since.
        let own = hold(Some((ago(21_000), ago(19_000))));
        assert_eq!(
            init_held_keys(&present, std::slice::from_ref(&own), now),
            BTreeSet::from([keys[1].clone()])
        );
        let verdict = sweep(
            &SweepState::default(),
            &present,
            &init_held_keys(&present, &[own], now),
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            Duration::ZERO,
        );
        assert_eq!(verdict.remove, vec![keys[0].clone(), keys[2].clone()]);
    }

    #[test]
    fn files_changed_within_the_grace_period_count_as_live() {
        // An Allocate the kubelet has not recorded yet: the key is not live, but its files are
        // new. However long that lasts, it stays while they are younger than the grace period.
        let fresh = BTreeMap::from([("k".to_string(), secs(599))]);
        let mut state = SweepState::default();
        for t in [0, 600, 1200, 5000] {
            let v = sweep(&state, &fresh, &set(&[]), secs(t), GRACE);
            assert!(v.remove.is_empty());
            assert_eq!(v.state.pending(), 0);
            state = v.state;
        }
        let aged = BTreeMap::from([("k".to_string(), GRACE)]);
        let v = sweep(&state, &aged, &set(&[]), secs(6000), GRACE);
        assert!(v.remove.is_empty());
        let v = sweep(&v.state, &aged, &set(&[]), secs(6600), GRACE);
        assert_eq!(v.remove, vec!["k".to_string()]);
    }

    proptest! {
        /// Whatever the sightings, a key is removed only if it was present, not live and not
        /// freshly written in every sweep of the last `grace`, and never while live.
        #[test]
        fn nothing_live_or_recently_live_is_removed(
            rounds in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), 0..400u64), 1..60)
        ) {
            let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
            let mut state = SweepState::default();
            let mut now = Duration::ZERO;
            // Last time each key was live or absent from disk (both restart the clock).
            let mut last_safe: BTreeMap<String, Duration> = BTreeMap::new();
            for (present_mask, live_mask, fresh_mask, step) in rounds {
                now += Duration::from_secs(step);
                let pick = |mask: u8| -> BTreeSet<String> {
                    keys.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, k)| k.to_string()).collect()
                };
                let (live, fresh) = (pick(live_mask), pick(fresh_mask));
                let present: BTreeMap<String, Duration> = pick(present_mask)
                    .into_iter()
                    .map(|k| {
                        let age = if fresh.contains(&k) { GRACE / 2 } else { GRACE };
                        (k, age)
                    })
                    .collect();
                for k in keys {
                    if live.contains(k) || fresh.contains(k) || !present.contains_key(k) {
                        last_safe.insert(k.to_string(), now);
                    }
                }
                let v = sweep(&state, &present, &live, now, GRACE);
                for k in &v.remove {
                    prop_assert!(present.contains_key(k) && !live.contains(k) && !fresh.contains(k));
                    let safe = last_safe.get(k).copied().unwrap_or(Duration::ZERO);
                    prop_assert!(now.saturating_sub(safe) >= GRACE, "{k} removed {now:?}, safe {safe:?}");
                    last_safe.insert(k.clone(), now);
                }
                state = v.state;
            }
        }
    }
}
