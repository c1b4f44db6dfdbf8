//! Reads the GPU backend every poll interval and keeps two watch channels: the latest readings
//! (replaced on every poll) and the advertised device list (changed only when a device or its
//! health changes, so ListAndWatch sends only real changes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vramslice_core::{AdvertisedDevice, GpuInventory, GpuUnitsView, VramUnit};
use vramslice_gpu::{GpuBackend, GpuSample};

use crate::metrics::Metrics;

/// The latest reading of the node's GPUs.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Readings as the backend returned them.
    pub readings: Vec<GpuSample>,
    /// The inventory the readings make.
    pub inventory: GpuInventory,
    /// How many successful reads happened so far (0: none yet).
    pub generation: u64,
    /// When the readings were taken (`None` before the first read). Published as the
    /// GpuNode's `observedAt`, so that readings kept while the backend fails grow old there
    /// and the extender stops placing pods by them.
    pub read_at: Option<SystemTime>,
}

impl Snapshot {
    /// The empty state before the first read.
    pub fn empty(unit: VramUnit) -> Self {
        Snapshot {
            readings: Vec::new(),
            inventory: GpuInventory::new(unit, Vec::new()),
            generation: 0,
            read_at: None,
        }
    }
}

/// The inventory a set of readings makes.
pub fn inventory_of(unit: VramUnit, readings: &[GpuSample]) -> GpuInventory {
    GpuInventory::new(unit, readings.iter().map(GpuUnitsView::from).collect())
}

/// Receivers of the poller's state.
#[derive(Debug, Clone)]
pub struct NodeWatch {
    /// Latest snapshot.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Advertised devices.
    pub devices: watch::Receiver<Arc<Vec<AdvertisedDevice>>>,
}

/// Senders held by the poll loop.
#[derive(Debug)]
pub struct NodeState {
    unit: VramUnit,
    snapshot: watch::Sender<Arc<Snapshot>>,
    devices: watch::Sender<Arc<Vec<AdvertisedDevice>>>,
}

impl NodeState {
    /// Empty state and its receivers.
    pub fn new(unit: VramUnit) -> (NodeState, NodeWatch) {
        let (snapshot, snapshot_rx) = watch::channel(Arc::new(Snapshot::empty(unit)));
        let (devices, devices_rx) = watch::channel(Arc::new(Vec::new()));
        (
            NodeState {
                unit,
                snapshot,
                devices,
            },
            NodeWatch {
                snapshot: snapshot_rx,
                devices: devices_rx,
            },
        )
    }

    /// Take in a successful read. Returns whether the device list changed.
    pub fn apply(&self, readings: Vec<GpuSample>) -> bool {
        let inventory = inventory_of(self.unit, &readings);
        let devices = inventory.advertised_devices();
        let generation = self.snapshot.borrow().generation + 1;
        self.snapshot.send_replace(Arc::new(Snapshot {
            readings,
            inventory,
            generation,
            read_at: Some(SystemTime::now()),
        }));
        self.devices.send_if_modified(|current| {
            if **current == devices {
                false
            } else {
                *current = Arc::new(devices);
                true
            }
        })
    }
}

/// Poll `backend` every `interval` until `shutdown` fires.
pub async fn run(
    backend: Arc<dyn GpuBackend>,
    state: NodeState,
    interval: Duration,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let reader = Arc::clone(&backend);
        let result = tokio::task::spawn_blocking(move || reader.read()).await;
        match result {
            Ok(Ok(readings)) => {
                if failing {
                    tracing::info!(backend = backend.name(), "GPU backend readable again");
                    failing = false;
                }
                metrics.observe_readings(&readings);
                if state.apply(readings) {
                    let devices = state.devices.borrow();
                    let unhealthy = devices.iter().filter(|d| !d.healthy).count();
                    tracing::info!(
                        devices = devices.len(),
                        unhealthy,
                        "advertised device list changed"
                    );
                }
            }
            Ok(Err(e)) => {
                metrics.backend_error();
                if !failing {
                    tracing::warn!(backend = backend.name(), error = %e, "cannot read GPUs; keeping the last reading");
                    failing = true;
                }
            }
            Err(e) => {
                metrics.backend_error();
                tracing::error!(error = %e, "GPU read task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_gpu::Health;

    fn reading(uuid: &str, total: u64, healthy: bool) -> GpuSample {
        GpuSample {
            index: 0,
            uuid: uuid.into(),
            model: "m".into(),
            total_bytes: total,
            used_bytes: 0,
            free_bytes: total,
            health: if healthy {
                Health::Healthy
            } else {
                Health::Unhealthy {
                    reason: "XID 79".into(),
                }
            },
            processes: Some(Vec::new()),
        }
    }

    #[test]
    fn device_list_changes_only_when_devices_or_health_change() {
        let (state, watch) = NodeState::new(VramUnit::Gib1);
        assert!(state.apply(vec![reading("GPU-a", 4 << 30, true)]));
        assert_eq!(watch.devices.borrow().len(), 4);
        let mut used = reading("GPU-a", 4 << 30, true);
        used.used_bytes = 1 << 30;
        assert!(!state.apply(vec![used]), "usage alone is no device change");
        assert_eq!(watch.snapshot.borrow().generation, 2);
        assert!(state.apply(vec![reading("GPU-a", 4 << 30, false)]));
        assert!(watch.devices.borrow().iter().all(|d| !d.healthy));
        assert!(state.apply(vec![]));
        assert!(watch.devices.borrow().is_empty());
    }
}
