//! The device plugin's watchdog: what to do when a pod's *measured* GPU memory passes its limit.
//!
//! The guard enforces the limit inside the container, but a static binary, a program that
//! bypasses the preload, or a tampered accounting file escapes it; NVML's per-process readings do
//! not. [`evaluate`] compares, for each pod holding units of a GPU, the memory its processes use
//! on that GPU (all its containers' processes, context memory included, as NVML counts it) with
//! its limit plus a tolerance, and decides:
//!
//! - a breach starts → [`WatchdogEvent::BreachStarted`] (the plugin emits a Kubernetes Event);
//! - over for the grace period in all (a reading over adds the time since the pod was last
//!   judged: all of it after a reading over, up to two reading intervals after one within;
//!   dips within the limit neither count nor reset it; time it could not be judged counts
//!   neither as over nor as within) →
//!   [`WatchdogEvent::Act`] with the configured action and the offending PIDs (repeated after
//!   every further grace period over, at least [`MIN_REPEAT`], while the breach lasts);
//! - back within for a grace period → [`WatchdogEvent::BreachEnded`]; a shorter dip keeps the
//!   breach and its timer (a process that held twice its limit and dipped under it for one poll
//!   every grace period would otherwise never be acted on, and would start a new breach, with
//!   its Event, at every dip);
//! - a GPU process of no pod holding units → [`WatchdogEvent::ProcessWithoutPod`] (once per PID);
//! - a pod whose self-reported usage (its accounting file) differs from NVML by more than the
//!   tolerance → its self-report is untrusted ([`SelfReport`]).
//!
//! Data enters as a [`NodeReport`] (limits, pod UIDs), the [`GpuSample`]s it was built from
//! (PIDs, with pod UIDs filled), the self-reported bytes, and a monotonic `now`; it leaves as the
//! next [`WatchdogState`] and the events. No clock, no I/O.
//!
//! Granularity: a pod's containers on one GPU are compared together (NVML PIDs map to pods; the
//! limit is the sum of the pod's units on that GPU, or more while a plain init container of the
//! pod has not completed: the caller passes a report adjusted by
//! [`apply_init_limits`](crate::node::init_limit::apply_init_limits)).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::node::allocation::UnknownVariant;
use crate::node::publish::{GpuSample, NodeReport};
use crate::node::sample::ProcessSample;

/// What the watchdog does once a breach outlasts the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub enum WatchdogAction {
    /// Events, logs and metrics only.
    #[default]
    Report,
    /// SIGKILL the offending pod's processes on the GPU.
    KillProcess,
    /// Evict the pod through the Eviction API.
    EvictPod,
}

impl WatchdogAction {
    /// Every action.
    pub const ALL: [WatchdogAction; 3] = [
        WatchdogAction::Report,
        WatchdogAction::KillProcess,
        WatchdogAction::EvictPod,
    ];

    /// The action as configuration and metric labels write it.
    pub const fn as_str(self) -> &'static str {
        match self {
            WatchdogAction::Report => "report",
            WatchdogAction::KillProcess => "kill-process",
            WatchdogAction::EvictPod => "evict-pod",
        }
    }
}

impl FromStr for WatchdogAction {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WatchdogAction::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownVariant {
                what: "watchdog action",
                value: s.to_string(),
                expected: "report, kill-process, evict-pod",
            })
    }
}

impl fmt::Display for WatchdogAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shortest pause between repeated actions on one breach, whatever the grace period (a grace of
/// 0 acts at once, but must not turn into an Event or a kill attempt per poll).
pub const MIN_REPEAT: Duration = Duration::from_secs(10);

/// The least age at which a reading is too old to judge by, however short the poll interval
/// ([`reading_too_old`]).
pub const STALE_READING_FLOOR: Duration = Duration::from_secs(5);

/// Whether a reading taken `age` ago (the backend's last successful read: its reads failing or
/// hung since) is too old to judge a pod by: more than three poll intervals, and at least
/// [`STALE_READING_FLOOR`]. Its process lists are then to be passed as unreadable, so that the
/// time counts neither as over nor as within, and no action is taken on a frozen figure (nor on
/// process IDs that may have been reused since).
pub fn reading_too_old(policy: &WatchdogPolicy, age: Duration) -> bool {
    age > policy
        .poll_interval
        .saturating_mul(3)
        .max(STALE_READING_FLOOR)
}

/// The watchdog's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogPolicy {
    /// Usage up to limit + tolerance is no breach (and self-reports within it are trusted).
    pub tolerance_bytes: u64,
    /// How long a pod may be over its limit in one breach before the action (and between
    /// repeated actions).
    pub grace: Duration,
    /// What to do then.
    pub action: WatchdogAction,
    /// How often readings come: a reading over the limit after one within adds up to twice
    /// this to the time over (so that two spikes far apart do not add up).
    pub poll_interval: Duration,
}

impl Default for WatchdogPolicy {
    fn default() -> Self {
        WatchdogPolicy {
            tolerance_bytes: 64 << 20,
            grace: Duration::from_secs(30),
            action: WatchdogAction::Report,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// A pod on a GPU: the unit the watchdog watches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodOnGpu {
    /// GPU UUID.
    pub gpu_uuid: String,
    /// Pod UID.
    pub pod_uid: String,
}

/// Who is over, with the names an Event needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    /// The pod on the GPU.
    pub key: PodOnGpu,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// GPU index.
    pub gpu_index: u32,
    /// Other pods judged with it (sharing a DRA claim's grant on this GPU): their processes
    /// are the breach's too.
    pub sharing_uids: Vec<String>,
}

impl PodTarget {
    /// Whether a process of the pod `uid` is one the breach judged (the pod's, or a pod's
    /// sharing its limit).
    pub fn judges(&self, uid: &str) -> bool {
        judged_with(&self.key.pod_uid, &self.sharing_uids, uid)
    }
}

/// Whether a process of pod `uid` counts for the entry of pod `own` and the pods sharing its
/// limit: the one rule the judgement and the kill's re-check both follow.
fn judged_with(own: &str, sharing: &[String], uid: &str) -> bool {
    own == uid || sharing.iter().any(|s| s == uid)
}

/// The numbers of a breach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    /// Who.
    pub target: PodTarget,
    /// Measured bytes of the pod's processes on the GPU.
    pub used_bytes: u64,
    /// The pod's limit on the GPU.
    pub limit_bytes: u64,
    /// The tolerance in force.
    pub tolerance_bytes: u64,
    /// How long it has been over in this breach, dips within the limit left out (0 when it
    /// just started).
    pub over_for: Duration,
    /// The pod's processes on the GPU as (host PID, bytes), by PID: the ones to kill.
    pub processes: Vec<(u32, u64)>,
}

/// One decision of an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogEvent {
    /// A pod went over limit + tolerance.
    BreachStarted(Breach),
    /// The breach outlasted the grace period: apply `action`.
    Act {
        /// The configured action.
        action: WatchdogAction,
        /// The breach.
        breach: Breach,
    },
    /// A pod in breach is back within limit + tolerance (or gone).
    BreachEnded {
        /// Who.
        key: PodOnGpu,
        /// Measured bytes now (0 when the pod is gone).
        used_bytes: u64,
    },
    /// A GPU process that belongs to no pod holding units of that GPU, seen for the first time.
    ProcessWithoutPod {
        /// GPU UUID.
        gpu_uuid: String,
        /// Host PID.
        pid: u32,
        /// Bytes it uses, when the driver says.
        used_bytes: Option<u64>,
    },
}

/// A pod's self-reported usage (its accounting file) against NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfReport {
    /// What the accounting file says.
    pub self_reported_bytes: u64,
    /// What NVML measured.
    pub measured_bytes: u64,
    /// Within the tolerance of each other.
    pub trusted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BreachState {
    /// Time over the limit so far in this breach: a reading over adds the time since the pod
    /// was last judged, all of it when it was over then too, else up to two reading intervals.
    over: Duration,
    /// When the pod was last judged, or could not be (that time counts as neither).
    last_judged: Duration,
    /// Whether the last judgement was over.
    last_over: bool,
    /// `over` when the last action was taken.
    acted_at: Option<Duration>,
    /// Since when the pod is back within its limit (the breach ends after a grace period so).
    within_since: Option<Duration>,
}

/// What the watchdog remembers between evaluations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchdogState {
    breaches: BTreeMap<PodOnGpu, BreachState>,
    strays: BTreeSet<(String, u32)>,
}

impl WatchdogState {
    /// Pods currently in breach.
    pub fn in_breach(&self) -> impl Iterator<Item = &PodOnGpu> {
        self.breaches.keys()
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The state to pass to the next evaluation.
    pub state: WatchdogState,
    /// Decisions, in GPU then pod order.
    pub events: Vec<WatchdogEvent>,
    /// Self-report comparison for every pod with a self-report and a known UID.
    pub self_reports: BTreeMap<PodOnGpu, SelfReport>,
}

/// Decide what the readings mean at monotonic time `now` (any fixed epoch), given the previous
/// `state`. `self_reported` holds each pod's accounting-file total on a GPU, when read.
pub fn evaluate(
    policy: &WatchdogPolicy,
    state: &WatchdogState,
    now: Duration,
    report: &NodeReport,
    samples: &[GpuSample],
    self_reported: &BTreeMap<PodOnGpu, u64>,
) -> Verdict {
    let mut next = WatchdogState::default();
    let mut events = Vec::new();
    let mut self_reports = BTreeMap::new();
    for gpu in &report.gpus {
        let sample = samples.iter().find(|s| s.uuid == gpu.uuid);
        let processes = sample.map_or(&[][..], GpuSample::listed_processes);
        for pod in &gpu.pods {
            let Some(uid) = &pod.uid else { continue };
            let key = PodOnGpu {
                gpu_uuid: gpu.uuid.clone(),
                pod_uid: uid.clone(),
            };
            // Its processes, and those of the pods sharing its limit (a DRA claim's).
            let judged = |p: &ProcessSample| {
                p.pod_uid
                    .as_deref()
                    .is_some_and(|u| judged_with(uid, &pod.sharing_uids, u))
            };
            let mine = || processes.iter().filter(|p| judged(p));
            // A figure the driver did not give (no process list, or no figure for one of the
            // pod's processes) cannot be judged: a breach stays as it was, and the time it could
            // not be judged counts neither as over nor as within.
            let Some(used) = sample.and_then(|s| s.used_by(judged)) else {
                if let Some(previous) = state.breaches.get(&key) {
                    let mut kept = *previous;
                    // The time since the last judgement is moved out: the within period is
                    // shifted by it, and the next over reading credits from now.
                    let unjudged = now.saturating_sub(kept.last_judged);
                    if let Some(since) = kept.within_since.as_mut() {
                        *since = since.saturating_add(unjudged);
                    }
                    kept.last_judged = now;
                    next.breaches.insert(key, kept);
                }
                continue;
            };
            let mut own: Vec<(u32, u64)> =
                mine().map(|p| (p.pid, p.used_bytes.unwrap_or(0))).collect();
            own.sort_unstable();
            // An init container's accounting is not among the files read for the pod.
            let comparable = !pod.initialising;
            if let Some(&reported) = self_reported.get(&key).filter(|_| comparable) {
                self_reports.insert(
                    key.clone(),
                    SelfReport {
                        self_reported_bytes: reported,
                        measured_bytes: used,
                        trusted: reported.abs_diff(used) <= policy.tolerance_bytes,
                    },
                );
            }
            let over = used > pod.limit_bytes.saturating_add(policy.tolerance_bytes);
            let previous = state.breaches.get(&key).copied();
            if !over {
                if let Some(mut cooling) = previous {
                    cooling.last_judged = now;
                    cooling.last_over = false;
                    let since = *cooling.within_since.get_or_insert(now);
                    if now.saturating_sub(since) >= policy.grace {
                        events.push(WatchdogEvent::BreachEnded {
                            key,
                            used_bytes: used,
                        });
                    } else {
                        next.breaches.insert(key, cooling);
                    }
                }
                continue;
            }
            let mut breach_state = previous.unwrap_or(BreachState {
                over: Duration::ZERO,
                last_judged: now,
                last_over: true,
                acted_at: None,
                within_since: None,
            });
            breach_state.within_since = None;
            // Over at the last judgement too: the whole time between (a slow poll loop must not
            // slow an action down). From within: it went over somewhere in between, credited up
            // to two reading intervals, so that two spikes far apart do not add up.
            let gap = now.saturating_sub(breach_state.last_judged);
            breach_state.over += if breach_state.last_over {
                gap
            } else {
                gap.min(policy.poll_interval.saturating_mul(2))
            };
            breach_state.last_judged = now;
            breach_state.last_over = true;
            let breach = Breach {
                target: PodTarget {
                    key: key.clone(),
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    gpu_index: gpu.index,
                    sharing_uids: pod.sharing_uids.clone(),
                },
                used_bytes: used,
                limit_bytes: pod.limit_bytes,
                tolerance_bytes: policy.tolerance_bytes,
                over_for: breach_state.over,
                processes: own,
            };
            if previous.is_none() {
                events.push(WatchdogEvent::BreachStarted(breach.clone()));
            }
            let due = match breach_state.acted_at {
                None => breach_state.over >= policy.grace,
                Some(at) => breach_state.over.saturating_sub(at) >= policy.grace.max(MIN_REPEAT),
            };
            if due {
                breach_state.acted_at = Some(breach_state.over);
                events.push(WatchdogEvent::Act {
                    action: policy.action,
                    breach,
                });
            }
            next.breaches.insert(key, breach_state);
        }
        // A GPU whose process list could not be read: the strays already reported stay known
        // (reported once while they last, not again when the list is back).
        if sample.is_some_and(|s| s.processes.is_none()) {
            next.strays.extend(
                state
                    .strays
                    .iter()
                    .filter(|(uuid, _)| *uuid == gpu.uuid)
                    .cloned(),
            );
        }
        for stray in &gpu.processes_without_pod {
            let id = (gpu.uuid.clone(), stray.pid);
            if !state.strays.contains(&id) {
                events.push(WatchdogEvent::ProcessWithoutPod {
                    gpu_uuid: gpu.uuid.clone(),
                    pid: stray.pid,
                    used_bytes: stray.used_bytes,
                });
            }
            next.strays.insert(id);
        }
    }
    // Breaches of pods (or GPUs) that are gone from the report end too.
    for key in state.breaches.keys() {
        if !next.breaches.contains_key(key)
            && !events
                .iter()
                .any(|e| matches!(e, WatchdogEvent::BreachEnded { key: k, .. } if k == key))
        {
            events.push(WatchdogEvent::BreachEnded {
                key: key.clone(),
                used_bytes: 0,
            });
        }
    }
    Verdict {
        state: next,
        events,
        self_reports,
    }
}

#[cfg(test)]
mod tests;
