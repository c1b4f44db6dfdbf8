//! Reads the GPU backend every poll interval and keeps two watch channels: the latest readings
//! (replaced on every poll) and the advertised device list (changed only when a device or its
//! health changes, so ListAndWatch sends only real changes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vramslice_core::{AdvertisedDevice, GpuInventory, GpuUnitsView, VramUnit};
use vramslice_gpu::{BackendError, GpuBackend, GpuSample};

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

/// Why a read of the backend gave no readings.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The backend said why.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The blocking task that read it panicked.
    #[error("GPU read task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Run `call` (a driver call) on a blocking thread; `None` when `shutdown` fires first. A call
/// hung in the driver is left behind on its thread (nothing can cancel it), so that shutdown is
/// not held up by it; the process exits without waiting for that thread.
pub async fn blocking_unless_shutdown<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Result<T, tokio::task::JoinError>> {
    if *shutdown.borrow_and_update() {
        return None;
    }
    let call = tokio::task::spawn_blocking(call);
    tokio::select! {
        result = call => Some(result),
        _ = shutdown.changed() => None,
    }
}

/// Read `backend` once ([`blocking_unless_shutdown`]).
pub async fn read_unless_shutdown(
    backend: &Arc<dyn GpuBackend>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Result<Vec<GpuSample>, ReadError>> {
    let reader = Arc::clone(backend);
    let result = blocking_unless_shutdown(move || reader.read(), shutdown).await?;
    Some(match result {
        Ok(Ok(readings)) => Ok(readings),
        Ok(Err(e)) => Err(ReadError::Backend(e)),
        Err(e) => Err(ReadError::Task(e)),
    })
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
        let Some(result) = read_unless_shutdown(&backend, &mut shutdown).await else {
            return;
        };
        match result {
            Ok(readings) => {
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
            Err(e) => {
                metrics.backend_error();
                if !failing {
                    tracing::warn!(backend = backend.name(), error = %e, "cannot read GPUs; keeping the last reading");
                    failing = true;
                }
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

    /// A backend whose reads hang until the test lets them go (by dropping `release`).
    struct HungBackend {
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl GpuBackend for HungBackend {
        fn name(&self) -> &'static str {
            "hung"
        }
        fn read(&self) -> Result<Vec<GpuSample>, BackendError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(release) = self.release.lock() {
                let _ = release.recv();
            }
            Ok(Vec::new())
        }
        fn driver_version(&self) -> Result<Option<String>, BackendError> {
            Ok(None)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_hung_in_the_driver_holds_up_neither_shutdown_nor_starts_a_second_read() {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let backend = Arc::new(HungBackend {
            release: std::sync::Mutex::new(hold),
            reads: std::sync::atomic::AtomicUsize::new(0),
        });
        let (state, watch) = NodeState::new(VramUnit::Gib1);
        let (stop, shutdown) = watch::channel(false);
        let metrics = Metrics::new();
        let poller = tokio::spawn(run(
            backend.clone(),
            state,
            Duration::from_millis(10),
            metrics.clone(),
            shutdown,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            backend.reads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a poll started while one is hung"
        );
        assert_eq!(metrics.since_last_read(), None);
        assert_eq!(watch.snapshot.borrow().generation, 0);
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), poller)
            .await
            .expect("the poller returns on shutdown while its read hangs")
            .expect("the poller does not panic");
        drop(release);
    }
}
