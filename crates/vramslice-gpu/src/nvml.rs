//! The NVML backend: real NVIDIA GPUs through nvml-wrapper, which loads `libnvidia-ml.so.1` at
//! run time (so this builds and starts on machines without a GPU and fails with a clear
//! [`BackendError::NvmlUnavailable`]). Every NVML call of vramslice lives in this module.
//!
//! Health: at construction each GPU gets an NVML event set for critical XID and double-bit ECC
//! events (a GPU that cannot deliver events is logged and read without them). Each
//! [`GpuBackend::read`] drains the pending events without blocking; a critical XID that is not an
//! application error marks the GPU unhealthy (`XID <n>`) until the process restarts, as does a
//! double-bit ECC error or a GPU that fell off the bus. A GPU whose handle can no longer be
//! queried is reported unhealthy with its last known memory figures; one that NVML no longer
//! finds at all is left out. A GPU with MIG mode on is unhealthy ([`MIG_ENABLED`]) for as long
//! as it is on: CUDA then sees only its MIG instances, not the memory vramslice would advertise.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::{Mutex, MutexGuard};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{EventSet, Nvml};

use crate::{BackendError, GpuBackend, GpuSample, Health, ProcessSample};

/// Why a GPU with MIG mode on takes no pods: vramslice shares whole GPUs.
pub const MIG_ENABLED: &str = "MIG mode is on: vramslice shares whole GPUs (turn MIG off, or leave this GPU to a MIG-aware device plugin)";

/// XIDs caused by applications, not by the GPU (the same set NVIDIA's device plugin ignores):
/// 13 graphics engine exception, 31 GPU memory page fault, 43 GPU stopped processing,
/// 45 preemptive cleanup, 68 video processor exception, 109 context switch timeout.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Events that mark a GPU unhealthy.
fn health_events() -> EventTypes {
    EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR
}

/// Most events drained from one GPU's set in one read (a storm cannot stall a reading).
const MAX_EVENTS_PER_READ: usize = 256;

/// A [`GpuBackend`] over NVML.
///
/// NVML stays initialised for the rest of the process once a backend is made (the event sets
/// borrow the library handle, so it is never shut down); make one backend per process.
pub struct NvmlBackend {
    nvml: &'static Nvml,
    state: Mutex<State>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// Per GPU UUID: its event set, or `None` when the GPU cannot deliver health events.
    events: HashMap<String, Option<EventSet<'static>>>,
    /// Sticky unhealthy reasons by UUID (critical XID, ECC, lost).
    sticky: HashMap<String, String>,
    /// Last good reading per index, to report a GPU that stopped answering.
    last: HashMap<u32, GpuSample>,
    /// GPUs currently failing queries (to log transitions, not every poll).
    broken: HashSet<u32>,
    /// Consecutive reads in which a GPU failed a query for a reason that is not sticky: it is
    /// reported Unhealthy from the [`UNHEALTHY_AFTER_FAILED_READS`]th on.
    failed_reads: HashMap<u32, u32>,
}

/// Consecutive failed reads of a GPU (not lost, no critical event) before it is reported
/// Unhealthy: one transient NVML error must not flip it to the kubelet, which fails the pods
/// it admits meanwhile (`UnexpectedAdmissionError`).
pub const UNHEALTHY_AFTER_FAILED_READS: u32 = 3;

/// The outcome of querying one device index.
enum DeviceRead {
    Ok(GpuSample),
    Vanished,
    Broken { reason: String, sticky: bool },
}

impl NvmlBackend {
    /// Load NVML from the default library (`libnvidia-ml.so`) and register health events.
    pub fn new() -> Result<Self, BackendError> {
        Self::init(None)
    }

    /// Load NVML from a given library path (for unusual driver layouts, and for tests).
    pub fn with_library_path(path: &OsStr) -> Result<Self, BackendError> {
        Self::init(Some(path))
    }

    fn init(path: Option<&OsStr>) -> Result<Self, BackendError> {
        let mut builder = Nvml::builder();
        if let Some(path) = path {
            builder.lib_path(path);
        }
        let nvml = builder.init().map_err(|e| {
            let what = match &e {
                NvmlError::LibloadingError(_) => "cannot load the NVML library",
                NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded",
                NvmlError::NoPermission => "no permission to talk to the NVIDIA driver",
                _ => "NVML initialisation failed",
            };
            BackendError::NvmlUnavailable(format!("{what}: {e}"))
        })?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let backend = NvmlBackend {
            nvml,
            state: Mutex::new(State::default()),
        };
        let count = nvml
            .device_count()
            .map_err(|e| nvml_error("nvmlDeviceGetCount", e))?;
        {
            let mut state = backend.lock();
            for index in 0..count {
                match nvml.device_by_index(index).and_then(|d| d.uuid()) {
                    Ok(uuid) => backend.register_events(&mut state, index, &uuid),
                    Err(e) => {
                        tracing::warn!(index, error = %e, "cannot identify GPU for health events")
                    }
                }
            }
        }
        tracing::info!(gpus = count, "NVML initialised");
        Ok(backend)
    }

    /// Per GPU UUID (sorted): whether its critical-XID / double-bit-ECC events are subscribed
    /// (false: the GPU cannot deliver them, health then comes from queries only).
    pub fn health_events_subscribed(&self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = self
            .lock()
            .events
            .iter()
            .map(|(uuid, set)| (uuid.clone(), set.is_some()))
            .collect();
        out.sort();
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Create and register an event set for the GPU, once per UUID.
    fn register_events(&self, state: &mut State, index: u32, uuid: &str) {
        if state.events.contains_key(uuid) {
            return;
        }
        let set = self.try_register(index).map_err(|why| {
            tracing::warn!(index, uuid, %why, "GPU health events unavailable; health comes from queries only");
        });
        state.events.insert(uuid.to_string(), set.ok());
    }

    fn try_register(&self, index: u32) -> Result<EventSet<'static>, String> {
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(|e| e.to_string())?;
        let supported = device.supported_event_types().map_err(|e| e.to_string())?;
        let wanted = supported & health_events();
        if wanted.is_empty() {
            return Err("the GPU supports neither critical XID nor double-bit ECC events".into());
        }
        let set = self.nvml.create_event_set().map_err(|e| e.to_string())?;
        device
            .register_events(wanted, set)
            .map_err(|e| e.error.to_string())
    }

    /// Drain every GPU's pending events without waiting and record sticky failures.
    fn drain_events(state: &mut State) {
        let State { events, sticky, .. } = state;
        for (uuid, set) in events.iter() {
            let Some(set) = set else { continue };
            for _ in 0..MAX_EVENTS_PER_READ {
                match set.wait(0) {
                    Ok(event) => {
                        if let Some(reason) =
                            event_reason(event.event_type, event.event_data.as_ref())
                        {
                            mark_sticky(sticky, uuid, reason);
                        } else {
                            tracing::debug!(uuid, event = ?event.event_type, xid = ?event.event_data, "ignoring application-level GPU event");
                        }
                    }
                    Err(NvmlError::Timeout) => break,
                    Err(NvmlError::GpuLost) => {
                        mark_sticky(sticky, uuid, lost_reason());
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(uuid, error = %e, "cannot wait for GPU events");
                        break;
                    }
                }
            }
        }
    }

    fn read_device(&self, index: u32) -> DeviceRead {
        let broken = |what: &str, e: NvmlError| match e {
            NvmlError::NotFound => DeviceRead::Vanished,
            NvmlError::GpuLost => DeviceRead::Broken {
                reason: lost_reason(),
                sticky: true,
            },
            e => DeviceRead::Broken {
                reason: format!("cannot query {what}: {e}"),
                sticky: false,
            },
        };
        let device = match self.nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => return broken("the GPU", e),
        };
        let uuid = match device.uuid() {
            Ok(u) => u,
            Err(e) => return broken("the UUID", e),
        };
        let memory = match device.memory_info() {
            Ok(m) => m,
            Err(e) => return broken("memory", e),
        };
        let model = device.name().unwrap_or_else(|e| {
            tracing::debug!(index, error = %e, "cannot read GPU name");
            "unknown NVIDIA GPU".to_string()
        });
        // The compute list missing leaves the processes unknown (their usage is not 0). The
        // graphics list missing leaves the compute list standing: a GPU without a graphics
        // engine answers `NotSupported` (none), and a sandbox's NVML may fail it while the
        // compute list, where CUDA processes are, reads fine; losing that would leave every
        // pod on the GPU unjudged.
        let mut lists = Some(Vec::with_capacity(2));
        for (kind, list) in [
            ("compute", device.running_compute_processes()),
            ("graphics", device.running_graphics_processes()),
        ] {
            match list {
                Ok(l) => {
                    if let Some(lists) = &mut lists {
                        lists.push(l);
                    }
                }
                Err(NvmlError::GpuLost) => return broken("processes", NvmlError::GpuLost),
                Err(NvmlError::NotSupported) if kind == "graphics" => {}
                Err(e) if kind == "graphics" => {
                    tracing::debug!(index, error = %e, "cannot list graphics processes; compute processes only");
                }
                Err(e) => {
                    tracing::debug!(index, kind, error = %e, "cannot list GPU processes");
                    lists = None;
                }
            }
        }
        let free = memory.free.min(memory.total);
        // With MIG on, CUDA lists only the GPU's MIG devices (addressed by `MIG-` UUIDs): a
        // container given the whole GPU's UUID gets one instance or none, never the memory
        // advertised, and NVML cannot tell its processes' usage.
        let health = match device.mig_mode() {
            Ok(mode) if mode.current == 1 => Health::Unhealthy {
                reason: MIG_ENABLED.to_string(),
            },
            Ok(_) | Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
                Health::Healthy
            }
            Err(NvmlError::GpuLost) => return broken("MIG mode", NvmlError::GpuLost),
            Err(e) => {
                tracing::debug!(index, error = %e, "cannot read MIG mode");
                Health::Healthy
            }
        };
        DeviceRead::Ok(GpuSample {
            index,
            uuid,
            model,
            total_bytes: memory.total,
            used_bytes: memory.total - free,
            free_bytes: free,
            health,
            processes: lists.map(|l| merge_processes(l.iter().flatten())),
        })
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    /// Read every GPU. `used_bytes` is `total − free` (NVML's own `used` leaves out the memory
    /// the driver reserves, which no workload can get either).
    fn read(&self) -> Result<Vec<GpuSample>, BackendError> {
        let mut state = self.lock();
        Self::drain_events(&mut state);
        let count = self
            .nvml
            .device_count()
            .map_err(|e| nvml_error("nvmlDeviceGetCount", e))?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.read_device(index) {
                DeviceRead::Ok(mut reading) => {
                    state.failed_reads.remove(&index);
                    if state.broken.remove(&index) {
                        tracing::info!(index, uuid = reading.uuid, "GPU answers queries again");
                    }
                    self.register_events(&mut state, index, &reading.uuid);
                    state.last.insert(index, reading.clone());
                    if let Some(reason) = state.sticky.get(&reading.uuid) {
                        reading.health = Health::Unhealthy {
                            reason: reason.clone(),
                        };
                    }
                    out.push(reading);
                }
                DeviceRead::Vanished => {
                    if let Some(gone) = state.last.remove(&index) {
                        tracing::warn!(index, uuid = gone.uuid, "GPU vanished");
                    }
                }
                DeviceRead::Broken { reason, sticky } => {
                    if state.broken.insert(index) {
                        tracing::warn!(index, %reason, "GPU cannot be queried");
                    }
                    let Some(mut last) = state.last.get(&index).cloned() else {
                        tracing::debug!(
                            index,
                            "a GPU never read successfully fails queries; leaving it out"
                        );
                        continue;
                    };
                    if sticky {
                        mark_sticky(&mut state.sticky, &last.uuid, reason.clone());
                    }
                    let failed = state.failed_reads.entry(index).or_insert(0);
                    *failed = failed.saturating_add(1);
                    if sticky
                        || *failed >= UNHEALTHY_AFTER_FAILED_READS
                        || state.sticky.contains_key(&last.uuid)
                    {
                        let reason = state.sticky.get(&last.uuid).cloned().unwrap_or(reason);
                        last.health = Health::Unhealthy { reason };
                    }
                    // Its figures are the last read; its processes are unknown now.
                    last.processes = None;
                    out.push(last);
                }
            }
        }
        Ok(out)
    }

    fn driver_version(&self) -> Result<Option<String>, BackendError> {
        self.nvml
            .sys_driver_version()
            .map(Some)
            .map_err(|e| nvml_error("nvmlSystemGetDriverVersion", e))
    }
}

fn nvml_error(call: &'static str, e: NvmlError) -> BackendError {
    BackendError::Nvml {
        call,
        message: e.to_string(),
    }
}

fn lost_reason() -> String {
    "GPU lost (fell off the bus)".to_string()
}

/// Record the first sticky reason of a GPU (later ones do not overwrite it).
fn mark_sticky(sticky: &mut HashMap<String, String>, uuid: &str, reason: String) {
    if !sticky.contains_key(uuid) {
        tracing::warn!(uuid, %reason, "GPU marked unhealthy until restart");
        sticky.insert(uuid.to_string(), reason);
    }
}

/// True for XIDs caused by an application rather than the GPU ([`APPLICATION_XIDS`]).
pub fn is_application_xid(xid: u64) -> bool {
    APPLICATION_XIDS.contains(&xid)
}

/// The unhealthy reason an NVML event implies, or `None` for events that leave the GPU healthy.
fn event_reason(types: EventTypes, xid: Option<&XidError>) -> Option<String> {
    if types.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        return Some("double-bit ECC error".to_string());
    }
    if types.contains(EventTypes::CRITICAL_XID_ERROR) {
        return match xid {
            Some(XidError::Value(n)) if is_application_xid(*n) => None,
            Some(XidError::Value(n)) => Some(format!("XID {n}")),
            Some(XidError::Unknown) | None => Some("XID unknown".to_string()),
        };
    }
    None
}

/// Compute and graphics process lists, one entry per PID (a PID in both lists is one process
/// with one context; its larger figure counts, and a known one over none), sorted by PID.
fn merge_processes<'a>(lists: impl IntoIterator<Item = &'a ProcessInfo>) -> Vec<ProcessSample> {
    let mut by_pid: HashMap<u32, Option<u64>> = HashMap::new();
    for p in lists {
        let used = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => {
                tracing::debug!(pid = p.pid, "NVML reports no memory figure for the process");
                None
            }
        };
        // Listed as compute and graphics: the larger known figure.
        let entry = by_pid.entry(p.pid).or_insert(used);
        *entry = (*entry).max(used);
    }
    let mut out: Vec<ProcessSample> = by_pid
        .into_iter()
        .map(|(pid, used_bytes)| ProcessSample {
            pid,
            used_bytes,
            pod_uid: None,
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, used: UsedGpuMemory) -> ProcessInfo {
        ProcessInfo {
            pid,
            used_gpu_memory: used,
            gpu_instance_id: None,
            compute_instance_id: None,
        }
    }

    #[test]
    fn missing_library_is_a_clear_unavailable_error() {
        let err = NvmlBackend::with_library_path(OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .unwrap_err();
        let BackendError::NvmlUnavailable(message) = &err else {
            panic!("expected NvmlUnavailable, got {err:?}");
        };
        assert!(
            message.contains("cannot load the NVML library"),
            "{message}"
        );
        let shown = err.to_string();
        assert!(shown.contains("NVML is not available"), "{shown}");
        assert!(shown.contains("libnvidia-ml.so.1"), "{shown}");
    }

    #[test]
    fn default_new_never_panics_and_fails_only_as_unavailable() {
        // On a machine without the driver this is the clear error; on a GPU machine it works.
        match NvmlBackend::new() {
            Ok(backend) => {
                let readings = backend.read().unwrap();
                assert!(
                    readings
                        .iter()
                        .all(|r| r.used_bytes + r.free_bytes == r.total_bytes)
                );
            }
            Err(BackendError::NvmlUnavailable(message)) => assert!(!message.is_empty()),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn application_xids_are_ignored() {
        for xid in APPLICATION_XIDS {
            assert_eq!(
                event_reason(EventTypes::CRITICAL_XID_ERROR, Some(&XidError::Value(xid))),
                None,
                "XID {xid}"
            );
        }
    }

    #[test]
    fn critical_xids_make_a_reason() {
        for xid in [48, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120] {
            assert_eq!(
                event_reason(EventTypes::CRITICAL_XID_ERROR, Some(&XidError::Value(xid))),
                Some(format!("XID {xid}"))
            );
        }
        assert_eq!(
            event_reason(EventTypes::CRITICAL_XID_ERROR, Some(&XidError::Unknown)),
            Some("XID unknown".to_string())
        );
    }

    #[test]
    fn double_bit_ecc_is_unhealthy_and_other_events_are_not() {
        assert_eq!(
            event_reason(EventTypes::DOUBLE_BIT_ECC_ERROR, None),
            Some("double-bit ECC error".to_string())
        );
        assert_eq!(event_reason(EventTypes::PSTATE_CHANGE, None), None);
        assert_eq!(event_reason(EventTypes::SINGLE_BIT_ECC_ERROR, None), None);
    }

    #[test]
    fn sticky_keeps_the_first_reason() {
        let mut sticky = HashMap::new();
        mark_sticky(&mut sticky, "GPU-a", "XID 79".into());
        mark_sticky(&mut sticky, "GPU-a", "XID 48".into());
        assert_eq!(sticky.get("GPU-a").map(String::as_str), Some("XID 79"));
    }

    #[test]
    fn processes_are_deduplicated_by_pid_with_unavailable_as_unknown() {
        let compute = [
            info(30, UsedGpuMemory::Used(300)),
            info(10, UsedGpuMemory::Used(100)),
            info(20, UsedGpuMemory::Unavailable),
        ];
        let graphics = [
            info(10, UsedGpuMemory::Used(150)),
            info(40, UsedGpuMemory::Used(40)),
            info(20, UsedGpuMemory::Unavailable),
            info(30, UsedGpuMemory::Unavailable),
        ];
        let merged = merge_processes(compute.iter().chain(graphics.iter()));
        let got: Vec<(u32, Option<u64>)> = merged.iter().map(|p| (p.pid, p.used_bytes)).collect();
        assert_eq!(
            got,
            vec![(10, Some(150)), (20, None), (30, Some(300)), (40, Some(40))]
        );
        assert!(merged.iter().all(|p| p.pod_uid.is_none()));
    }
}
