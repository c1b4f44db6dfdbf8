//! Why a node or a GPU cannot take a pod, worded for `kubectl describe pod` and the scheduler's
//! FailedNodes map. Reasons are built only for nodes that fail, and rendered only when shown.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::quantity::ByteSize;
use crate::units::VramUnit;

/// Why one node cannot take a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The device plugin has published no `GpuNode` for the node.
    #[error("no GpuNode reading for node {node}")]
    NoReading {
        /// Node name.
        node: String,
    },
    /// The node's `GpuNode` exists but cannot be used.
    #[error("GpuNode {node} is unusable: {reason}")]
    InvalidReading {
        /// Node name.
        node: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The node's `GpuNode` lists no GPUs.
    #[error("node {node} reports no GPUs")]
    NoGpus {
        /// Node name.
        node: String,
    },
    /// The node counts VRAM in another unit than the pod's resource.
    #[error("node {node} advertises {node_resource}, the pod requests {pod_resource}")]
    UnitMismatch {
        /// Node name.
        node: String,
        /// Resource the node advertises.
        node_resource: &'static str,
        /// Resource the pod requests.
        pod_resource: &'static str,
    },
    /// The pod needs more than the largest GPU of the node advertises: no preemption can help.
    #[error(
        "pod needs {}, more than any GPU on node {node} advertises (largest {})",
        ByteSize(*need),
        ByteSize(*largest)
    )]
    TooLarge {
        /// Node name.
        node: String,
        /// Bytes the pod needs.
        need: u64,
        /// Bytes the node's largest GPU advertises.
        largest: u64,
    },
    /// The pod spans several GPUs and the node has fewer GPUs large enough for its share:
    /// no preemption can help.
    #[error(
        "pod needs {gpus} GPUs with {} each; node {node} has {have} GPU{} that large",
        ByteSize(*need),
        if *have == 1 { "" } else { "s" }
    )]
    TooFewGpus {
        /// Node name.
        node: String,
        /// GPUs the pod spans.
        gpus: usize,
        /// Bytes the pod needs on each.
        need: u64,
        /// GPUs of the node that advertise at least `need`.
        have: usize,
    },
    /// The pod spans several GPUs and fewer than that many have its share effectively free:
    /// the count, then why the others cannot take it (as [`Rejection::Gpus`] words them).
    #[error(
        "needs {gpus} GPUs with {} effective free each; {fitting} {}{}{}",
        ByteSize(*need),
        if *fitting == 1 { "has" } else { "have" },
        if .reasons.is_empty() { "" } else { "; " },
        GpuList(.reasons)
    )]
    Spanning {
        /// GPUs the pod spans.
        gpus: usize,
        /// Bytes the pod needs on each.
        need: u64,
        /// GPUs that could take their share now.
        fitting: usize,
        /// Why each other GPU cannot.
        reasons: Vec<GpuRejection>,
    },
    /// A pod of the same size but another GPU count waits for its units on the node: the
    /// device plugin, matching requests by size, could give each the other's GPUs.
    #[error(
        "pod {pod} of the same size ({}) waits for its units on node {node} over {waiting_gpus} GPU{}; the device plugin cannot tell pods of one size apart, so this pod over {gpus} GPU{} waits until that one has its units",
        ByteSize(*size),
        if *waiting_gpus == 1 { "" } else { "s" },
        if *gpus == 1 { "" } else { "s" }
    )]
    SameSizeWaiting {
        /// Node name.
        node: String,
        /// The waiting pod, `namespace/name`.
        pod: String,
        /// The size both pods ask for, bytes.
        size: u64,
        /// GPUs the waiting pod spans.
        waiting_gpus: usize,
        /// GPUs this pod spans.
        gpus: usize,
    },
    /// Each GPU of the node, and why it cannot take the pod. Rendered compactly: a reading age
    /// shared by several GPUs once, unhealthy GPUs each, and of the GPUs short of memory the
    /// one closest to fitting, with a count of the others.
    #[error("{}", GpuList(.0))]
    Gpus(Vec<GpuRejection>),
}

impl Rejection {
    /// Whether preempting pods on the node could never make room (kube-scheduler's
    /// `FailedAndUnresolvableNodes`): evicting pods frees memory only on fresh, healthy GPUs
    /// large enough for the pod's share, so a node needs as many of those as the pod spans.
    /// Without a usable reading, with a stale one, or short of healthy GPUs, no eviction helps.
    pub fn is_unresolvable(&self) -> bool {
        match self {
            Rejection::Gpus(gpus) => count_preemption_helps(gpus) == 0,
            Rejection::Spanning {
                gpus,
                fitting,
                reasons,
                ..
            } => fitting + count_preemption_helps(reasons) < *gpus,
            Rejection::NoReading { .. }
            | Rejection::InvalidReading { .. }
            | Rejection::NoGpus { .. }
            | Rejection::UnitMismatch { .. }
            | Rejection::TooLarge { .. }
            | Rejection::TooFewGpus { .. }
            | Rejection::SameSizeWaiting { .. } => true,
        }
    }
}

/// How many of the refused GPUs only lack memory that evicting pods could free: fresh, healthy
/// and advertising at least the pod's share.
fn count_preemption_helps(gpus: &[GpuRejection]) -> usize {
    gpus.iter()
        .filter(|g| match g {
            GpuRejection::Short {
                advertised, need, ..
            } => advertised >= need,
            GpuRejection::Owed { .. } => true,
            GpuRejection::Stale { .. } | GpuRejection::Unhealthy { .. } => false,
        })
        .count()
}

/// "reading N s old", or for a reading stamped in the future "reading N s ahead of the
/// extender's clock".
struct ReadingAge(u64, bool);

impl fmt::Display for ReadingAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadingAge(secs, false) => write!(f, "reading {secs} s old"),
            ReadingAge(secs, true) => write!(f, "reading {secs} s ahead of the extender's clock"),
        }
    }
}

struct GpuList<'a>(&'a [GpuRejection]);

impl fmt::Display for GpuList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if !std::mem::take(&mut first) {
                f.write_str("; ")?;
            }
            Ok(())
        };
        let stale: Vec<(u32, u64, bool)> = self
            .0
            .iter()
            .filter_map(|g| match g {
                GpuRejection::Stale {
                    index,
                    age_secs,
                    ahead,
                } => Some((*index, *age_secs, *ahead)),
                _ => None,
            })
            .collect();
        match stale.as_slice() {
            [] => {}
            [(index, age, ahead)] => {
                sep(f)?;
                write!(f, "GPU {index}: {}", ReadingAge(*age, *ahead))?;
            }
            [(_, age, ahead), ..] => {
                sep(f)?;
                write!(f, "all {} GPUs: {}", stale.len(), ReadingAge(*age, *ahead))?;
            }
        }
        for g in self.0 {
            if let GpuRejection::Unhealthy { .. } | GpuRejection::Owed { .. } = g {
                sep(f)?;
                write!(f, "{g}")?;
            }
        }
        let mut short = self.0.iter().filter_map(|g| match g {
            GpuRejection::Short { effective, .. } => Some((*effective, g)),
            _ => None,
        });
        if let Some(first_short) = short.next() {
            let mut others = 0usize;
            // The GPU closest to fitting; ties keep the lowest index (the first listed).
            let best = short.fold(first_short, |best, next| {
                others += 1;
                if next.0 > best.0 { next } else { best }
            });
            sep(f)?;
            write!(f, "{}", best.1)?;
            match others {
                0 => {}
                1 => f.write_str("; 1 more GPU with less effective free")?,
                n => write!(f, "; {n} more GPUs with less effective free")?,
            }
        }
        Ok(())
    }
}

/// Why one GPU cannot take a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRejection {
    /// The node's reading is further from now than the staleness bound: older, or (a node
    /// clock ahead of the extender's) stamped in the future.
    Stale {
        /// GPU index.
        index: u32,
        /// Distance of the reading from now, whole seconds.
        age_secs: u64,
        /// Whether the reading is stamped after now.
        ahead: bool,
    },
    /// The device plugin marked the GPU unhealthy.
    Unhealthy {
        /// GPU index.
        index: u32,
        /// The plugin's reason (XID, ECC, GPU lost, MIG mode on), when given.
        reason: Option<String>,
    },
    /// Not enough effective free memory.
    Short {
        /// GPU index.
        index: u32,
        /// Effective free bytes.
        effective: u64,
        /// Live free bytes (the reading).
        live: u64,
        /// Bytes assigned pods may still take that the reading cannot show.
        unobserved: u64,
        /// Configured safety margin, bytes.
        headroom: u64,
        /// Bytes of the GPU's advertised units assigned to pods.
        assigned: u64,
        /// Bytes the GPU advertises.
        advertised: u64,
        /// Bytes the pod needs.
        need: u64,
    },
    /// Owed a pod of the request's size after an unpaired swap at the device plugin, which may
    /// hand the pod this GPU wherever it is placed, without room for what would be booked on it.
    Owed {
        /// GPU index.
        index: u32,
        /// Effective free bytes.
        effective: u64,
        /// Bytes one more pod of the size would be booked on it.
        booked: u64,
    },
}

impl fmt::Display for GpuRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRejection::Stale {
                index,
                age_secs,
                ahead,
            } => write!(f, "GPU {index}: {}", ReadingAge(*age_secs, *ahead)),
            GpuRejection::Unhealthy {
                index,
                reason: Some(reason),
            } => write!(f, "GPU {index}: unhealthy ({reason})"),
            GpuRejection::Unhealthy {
                index,
                reason: None,
            } => {
                write!(f, "GPU {index}: unhealthy")
            }
            GpuRejection::Short {
                index,
                effective,
                live,
                unobserved,
                headroom,
                assigned,
                advertised,
                need,
            } => {
                write!(f, "GPU {index}: {} effective free (", ByteSize(*effective))?;
                let declared_free = advertised.saturating_sub(*assigned);
                let live_part = crate::effective_free::live_room(*live, *unobserved, *headroom);
                if declared_free < live_part {
                    write!(
                        f,
                        "{} of {} assigned",
                        ByteSize(*assigned),
                        ByteSize(*advertised)
                    )?;
                } else {
                    write!(
                        f,
                        "live {}, {} reserved by pods not yet running",
                        ByteSize(*live),
                        ByteSize(*unobserved)
                    )?;
                    if *headroom > 0 {
                        write!(f, ", {} headroom", ByteSize(*headroom))?;
                    }
                }
                write!(f, "), need {}", ByteSize(*need))
            }
            GpuRejection::Owed {
                index,
                effective,
                booked,
            } => write!(
                f,
                "GPU {index}: owed a pod of this size after a swap at the device plugin; {} \
                 effective free for {} booked",
                ByteSize(*effective),
                ByteSize(*booked)
            ),
        }
    }
}

/// A rendered [`Rejection`]: the text for the scheduler and whether preemption could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, as [`Rejection`]'s `Display` writes it.
    pub reason: Arc<str>,
    /// [`Rejection::is_unresolvable`].
    pub unresolvable: bool,
}

impl From<&Rejection> for Refusal {
    fn from(r: &Rejection) -> Self {
        Refusal {
            reason: Arc::from(r.to_string()),
            unresolvable: r.is_unresolvable(),
        }
    }
}

/// What a node's refusal depends on besides its books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RefusalKey {
    pub unit: VramUnit,
    pub need: u64,
    pub gpus: u32,
    /// Whole seconds of age, when the reading is stale.
    pub stale_age: Option<u64>,
}

/// One remembered refusal per node. Cloning a ledger starts with empty caches.
#[derive(Debug, Default)]
pub(super) struct RefusalCache(Mutex<Option<(RefusalKey, Refusal)>>);

impl Clone for RefusalCache {
    fn clone(&self) -> Self {
        RefusalCache::default()
    }
}

impl RefusalCache {
    pub fn get(&self, key: &RefusalKey) -> Option<Refusal> {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, r)| r.clone())
    }

    pub fn put(&self, key: RefusalKey, refusal: Refusal) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, refusal));
    }

    pub fn clear(&mut self) {
        *self.0.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
