//! What the device plugin's Allocate hands one container, decided from the unit IDs alone: the
//! GPU, the memory limit, the environment, the guard's mounts and preload, the accounting
//! directory, and the visible GPU (env var or CDI device).
//!
//! Also the naming of the per-allocation accounting directory: a pure function of the device IDs,
//! so the plugin can find a pod's directory again from the kubelet's PodResources record.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::container::limit::{GpuLimits, GpuLimitsError};
use crate::device_id::{DeviceIdError, GpuSelection};
use crate::names::env;
use crate::node::inventory::{GpuInventory, InventoryError};

/// In-container path of the guard library (mounted read-only from the host).
pub const GUARD_CONTAINER_PATH: &str = "/usr/local/vramslice/lib/libvramslice_guard.so";
/// In-container path of the container's accounting directory.
pub const ACCOUNTING_CONTAINER_DIR: &str = "/var/run/vramslice/accounting";
/// In-container path of the read-only limit file (see [`crate::container::limit`]). The guard always
/// reads this path, whatever the environment says, so a process cannot escape it by renaming it.
pub const LIMIT_FILE_CONTAINER_PATH: &str = "/var/run/vramslice/limit";
/// Suffix of the host limit file beside the allocation's accounting directory:
/// `<accountingRoot>/<key>.limit`. Not inside the directory: that one is mounted writable.
pub const LIMIT_FILE_HOST_SUFFIX: &str = ".limit";
/// In-container path the preload file is mounted at in `ld-so-preload-file` mode.
pub const PRELOAD_CONTAINER_PATH: &str = "/etc/ld.so.preload";
/// The CDI kind of NVIDIA GPUs: a CDI device is `nvidia.com/gpu=<uuid>`.
pub const CDI_GPU_KIND: &str = "nvidia.com/gpu";

/// How the guard library gets loaded into the container's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InjectionMode {
    /// Mount the library and set `LD_PRELOAD` to it.
    #[default]
    LdPreloadEnv,
    /// Mount the library and a host file listing it at `/etc/ld.so.preload`.
    LdSoPreloadFile,
    /// Inject nothing (the limit is advisory; accounting dir and env still given).
    None,
}

/// How the container is told which GPU it may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceListStrategy {
    /// `NVIDIA_VISIBLE_DEVICES=<uuid>`.
    #[default]
    Envvar,
    /// CDI device `nvidia.com/gpu=<uuid>`.
    Cdi,
}

/// A configuration word that names no mode or strategy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}: expected one of {expected}")]
pub struct UnknownVariant {
    /// What was being parsed.
    pub what: &'static str,
    /// The text given.
    pub value: String,
    /// The accepted words.
    pub expected: &'static str,
}

impl InjectionMode {
    /// Every mode.
    pub const ALL: [InjectionMode; 3] = [
        InjectionMode::LdPreloadEnv,
        InjectionMode::LdSoPreloadFile,
        InjectionMode::None,
    ];

    /// The mode as configuration writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            InjectionMode::LdPreloadEnv => "ld-preload-env",
            InjectionMode::LdSoPreloadFile => "ld-so-preload-file",
            InjectionMode::None => "none",
        }
    }
}

impl FromStr for InjectionMode {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InjectionMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownVariant {
                what: "injection mode",
                value: s.to_string(),
                expected: "ld-preload-env, ld-so-preload-file, none",
            })
    }
}

impl fmt::Display for InjectionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DeviceListStrategy {
    /// The strategy as configuration writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceListStrategy::Envvar => "envvar",
            DeviceListStrategy::Cdi => "cdi",
        }
    }
}

impl FromStr for DeviceListStrategy {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "envvar" => Ok(DeviceListStrategy::Envvar),
            "cdi" => Ok(DeviceListStrategy::Cdi),
            other => Err(UnknownVariant {
                what: "device list strategy",
                value: other.to_string(),
                expected: "envvar, cdi",
            }),
        }
    }
}

impl fmt::Display for DeviceListStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of the plugin's configuration Allocate depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationSettings {
    /// How the guard is injected.
    pub injection: InjectionMode,
    /// How the GPU is made visible.
    pub device_list_strategy: DeviceListStrategy,
    /// Host path of `libvramslice_guard.so`.
    pub guard_library_host_path: PathBuf,
    /// Host path of the file mounted as `/etc/ld.so.preload`.
    pub preload_file_host_path: PathBuf,
    /// Host directory holding one accounting directory per allocation.
    pub accounting_root: PathBuf,
}

/// A host path mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Where the container sees it.
    pub container_path: String,
    /// Where it is on the host.
    pub host_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Everything one container's Allocate answer carries, plus the host directory the plugin must
/// create before answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerAllocation {
    /// The one GPU; for units of several GPUs, their UUIDs comma-separated by index.
    pub gpu_uuid: String,
    /// Units granted (over all GPUs).
    pub units: u64,
    /// Limit in bytes: units × unit bytes (over all GPUs).
    pub limit_bytes: u64,
    /// Each GPU's limit, by index (one entry for a one-GPU allocation): what the limit file
    /// says ([`crate::container::limit::gpu_limits_file_content`]).
    pub limits: GpuLimits,
    /// Environment for the container.
    pub envs: BTreeMap<String, String>,
    /// Host paths to mount.
    pub mounts: Vec<MountSpec>,
    /// CDI devices (`nvidia.com/gpu=<uuid>`) in the `cdi` strategy.
    pub cdi_devices: Vec<String>,
    /// Host accounting directory of this allocation (to be created by the plugin).
    pub host_accounting_dir: PathBuf,
    /// Host limit file of this allocation (to be written by the plugin, with
    /// [`crate::container::limit::gpu_limits_file_content`] of `limits`, before answering).
    pub host_limit_file: PathBuf,
}

/// Why a set of unit IDs cannot be allocated. The text is the core's, passed through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// Malformed, duplicate, empty or mixed-GPU IDs.
    #[error(transparent)]
    Ids(#[from] DeviceIdError),
    /// IDs of GPUs or units this node does not have.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// A GPU UUID the limit file cannot carry.
    #[error(transparent)]
    Limits(#[from] GpuLimitsError),
}

/// Decide one container's allocation from its unit IDs.
///
/// IDs of one GPU give that GPU. IDs of several GPUs are accepted only as equal shares, the
/// shape `vramslice.io/gpus` asks for (units / N of each of N GPUs, N ≤ 8; any other shape is
/// refused naming the GPUs and their counts): the container sees the GPUs in index order, each
/// with its share as its limit (`VRAMSLICE_VRAM_LIMITS`, the limit file's `limits=` form).
/// Which pod asked is not known here (the kubelet does not say), so an equal split of a size no
/// pending pod asked for is accepted too: the ledger follows the next reading.
pub fn plan_allocation<S: AsRef<str>>(
    inventory: &GpuInventory,
    settings: &AllocationSettings,
    ids: &[S],
) -> Result<ContainerAllocation, AllocationError> {
    let mut selections = GpuSelection::spanning(ids)?;
    let mut resolved = Vec::with_capacity(selections.len());
    for selection in &selections {
        resolved.push((
            inventory.resolve(selection)?.index,
            selection.gpu_uuid.clone(),
        ));
    }
    // The container sees its GPUs in index order.
    let mut order: Vec<usize> = (0..selections.len()).collect();
    order.sort_by_key(|i| (resolved[*i].0, resolved[*i].1.clone()));
    selections = order.into_iter().map(|i| selections[i].clone()).collect();
    let key = spanning_key(&selections);
    let limits = GpuLimits::new(
        selections
            .iter()
            .map(|s| (s.gpu_uuid.as_str(), inventory.limit_bytes(s))),
    )?;
    let edits = container_edits(&limits, settings, &key);
    let units: u64 = selections.iter().map(GpuSelection::unit_count).sum();
    let uuids: Vec<&str> = selections.iter().map(|s| s.gpu_uuid.as_str()).collect();
    Ok(ContainerAllocation {
        gpu_uuid: uuids.join(","),
        units,
        limit_bytes: inventory.unit().bytes_for(units),
        limits,
        envs: edits.envs,
        mounts: edits.mounts,
        cdi_devices: edits.cdi_devices,
        host_accounting_dir: edits.host_accounting_dir,
        host_limit_file: edits.host_limit_file,
    })
}

/// What a container holding memory of some GPUs gets, whichever API granted it (Allocate in
/// device-plugin mode, a prepared claim's CDI spec in DRA mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEdits {
    /// Environment for the container.
    pub envs: BTreeMap<String, String>,
    /// Host paths to mount.
    pub mounts: Vec<MountSpec>,
    /// CDI devices (`nvidia.com/gpu=<uuid>`) in the `cdi` strategy.
    pub cdi_devices: Vec<String>,
    /// Host accounting directory (to be created before the container starts).
    pub host_accounting_dir: PathBuf,
    /// Host limit file (to be written before the container starts).
    pub host_limit_file: PathBuf,
}

/// The host files of the allocation or claim `key` under `accounting_root`: its accounting
/// directory and, beside it (never inside: the directory is mounted writable), its limit file.
pub fn host_files(accounting_root: &Path, key: &str) -> (PathBuf, PathBuf) {
    (
        accounting_root.join(key),
        accounting_root.join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}")),
    )
}

/// The environment, mounts and visible GPUs for a container holding `limits` (one entry per
/// GPU, in the order the container should see them), with its accounting files under `key` in
/// the accounting root. One GPU gets `VRAMSLICE_VRAM_LIMIT_BYTES` and `VRAMSLICE_GPU_UUID`;
/// several get `VRAMSLICE_VRAM_LIMITS` (`<uuid>:<bytes>,...`) and `VRAMSLICE_VRAM_LIMIT_BYTES`
/// too, as the contract gives every container: units × unit bytes, the sum over its GPUs (beside
/// the per-GPU list it lowers no GPU's limit: no share exceeds the sum).
pub fn container_edits(
    limits: &GpuLimits,
    settings: &AllocationSettings,
    key: &str,
) -> ContainerEdits {
    let (host_accounting_dir, host_limit_file) = host_files(&settings.accounting_root, key);

    let mut envs = BTreeMap::new();
    if limits.len() == 1 {
        let (uuid, bytes) = limits.first();
        envs.insert(env::VRAM_LIMIT_BYTES.to_string(), bytes.to_string());
        envs.insert(env::GPU_UUID.to_string(), uuid.to_string());
    } else {
        envs.insert(env::VRAM_LIMITS.to_string(), limits.to_string());
        let total = limits
            .iter()
            .map(|(_, bytes)| bytes)
            .fold(0u64, u64::saturating_add);
        envs.insert(env::VRAM_LIMIT_BYTES.to_string(), total.to_string());
    }
    envs.insert(
        env::ACCOUNTING_DIR.to_string(),
        ACCOUNTING_CONTAINER_DIR.to_string(),
    );
    envs.insert(
        env::LIMIT_FILE.to_string(),
        LIMIT_FILE_CONTAINER_PATH.to_string(),
    );
    let mut cdi_devices = Vec::new();
    match settings.device_list_strategy {
        DeviceListStrategy::Envvar => {
            let visible: Vec<&str> = limits.iter().map(|(uuid, _)| uuid).collect();
            envs.insert(env::NVIDIA_VISIBLE_DEVICES.to_string(), visible.join(","));
        }
        DeviceListStrategy::Cdi => {
            cdi_devices.extend(
                limits
                    .iter()
                    .map(|(uuid, _)| format!("{CDI_GPU_KIND}={uuid}")),
            );
        }
    }

    let mut mounts = vec![
        MountSpec {
            container_path: ACCOUNTING_CONTAINER_DIR.to_string(),
            host_path: path_text(&host_accounting_dir),
            read_only: false,
        },
        MountSpec {
            container_path: LIMIT_FILE_CONTAINER_PATH.to_string(),
            host_path: path_text(&host_limit_file),
            read_only: true,
        },
    ];
    let guard_mount = MountSpec {
        container_path: GUARD_CONTAINER_PATH.to_string(),
        host_path: path_text(&settings.guard_library_host_path),
        read_only: true,
    };
    match settings.injection {
        InjectionMode::LdPreloadEnv => {
            mounts.push(guard_mount);
            envs.insert(
                env::LD_PRELOAD.to_string(),
                GUARD_CONTAINER_PATH.to_string(),
            );
        }
        InjectionMode::LdSoPreloadFile => {
            mounts.push(guard_mount);
            mounts.push(MountSpec {
                container_path: PRELOAD_CONTAINER_PATH.to_string(),
                host_path: path_text(&settings.preload_file_host_path),
                read_only: true,
            });
        }
        InjectionMode::None => {}
    }
    ContainerEdits {
        envs,
        mounts,
        cdi_devices,
        host_accounting_dir,
        host_limit_file,
    }
}

/// Why nothing may be allocated while injection is on: the guard library is not a plain file
/// on the node. The runtime mounts whatever is at its path, and a path with nothing there (a
/// mistyped `injection.guardLibraryHostPath`, an install that did not finish) becomes a
/// directory the loader skips, so the container would run without its limit enforced, in
/// silence. `is_file` looks at a path (following links) and says whether it is a plain file.
///
/// `None` when injection is off or the library is there; otherwise the refusal's text, naming
/// the path and the setting.
pub fn missing_guard_library(
    settings: &AllocationSettings,
    is_file: impl FnOnce(&Path) -> std::io::Result<bool>,
) -> Option<String> {
    if settings.injection == InjectionMode::None {
        return None;
    }
    let path = &settings.guard_library_host_path;
    let what = match is_file(path) {
        Ok(true) => return None,
        Ok(false) => "is not a file".to_string(),
        Err(e) => format!("cannot be read ({e})"),
    };
    Some(format!(
        "the guard library {} (injection.guardLibraryHostPath) {what} on this node: a container given VRAM would run without its limit enforced, so none is; is the plugin's install step done?",
        path.display()
    ))
}

/// The content of the host preload file for `ld-so-preload-file` mode: the guard's in-container
/// path on one line.
pub fn preload_file_content() -> String {
    format!("{GUARD_CONTAINER_PATH}\n")
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Name of the accounting directory of the allocation holding `units` of GPU `gpu_uuid`.
///
/// `<uuid>.u<first unit>.n<count>.<16 hex digits>`: the hash is FNV-1a over the sorted unit list,
/// so the name depends only on the set of IDs (not their order), is safe as one path component
/// (characters other than `[A-Za-z0-9_.-]` in the UUID become `_`), and two allocations that hold
/// different units never share a directory. The kubelet gives a unit to one container at a time,
/// so live allocations never collide.
pub fn allocation_key(gpu_uuid: &str, units: &[u64]) -> String {
    let mut sorted = units.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut hash = Fnv1a::new();
    hash.write(gpu_uuid.as_bytes());
    for unit in &sorted {
        hash.write(b",");
        hash.write(unit.to_string().as_bytes());
    }
    let first = sorted.first().copied().unwrap_or(0);
    format!(
        "{}.u{first}.n{}.{:016x}",
        path_safe(gpu_uuid),
        sorted.len(),
        hash.finish()
    )
}

/// Name of the accounting directory of an allocation holding units of several GPUs (one
/// selection per GPU): `<first uuid>.g<N>.u<first unit>.n<total units>.<16 hex digits>`, the
/// hash over every GPU's UUID and sorted units (GPUs by UUID), so, like [`allocation_key`], it
/// depends only on the set of IDs; the sweeper reads it as a key of the same shape. One
/// selection gives [`allocation_key`].
pub fn spanning_key(selections: &[GpuSelection]) -> String {
    if let [one] = selections {
        return allocation_key(&one.gpu_uuid, &one.units);
    }
    let mut sorted: Vec<(&str, Vec<u64>)> = selections
        .iter()
        .map(|s| {
            let mut units = s.units.clone();
            units.sort_unstable();
            units.dedup();
            (s.gpu_uuid.as_str(), units)
        })
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hash = Fnv1a::new();
    for (uuid, units) in &sorted {
        hash.write(b";");
        hash.write(uuid.as_bytes());
        for unit in units {
            hash.write(b",");
            hash.write(unit.to_string().as_bytes());
        }
    }
    let (first_uuid, first_units) = sorted
        .first()
        .map_or(("", &[][..]), |(u, units)| (*u, units.as_slice()));
    let total: usize = sorted.iter().map(|(_, u)| u.len()).sum();
    format!(
        "{}.g{}.u{}.n{total}.{:016x}",
        path_safe(first_uuid),
        sorted.len(),
        first_units.first().copied().unwrap_or(0),
        hash.finish()
    )
}

/// The accounting key of a container's device IDs as the kubelet records them (PodResources):
/// [`allocation_key`] for one GPU, [`spanning_key`] for equal shares of several.
pub fn allocation_key_for_ids<S: AsRef<str>>(ids: &[S]) -> Result<String, DeviceIdError> {
    let selections = GpuSelection::spanning(ids)?;
    Ok(spanning_key(&selections))
}

/// A GPU UUID as it appears in allocation keys: characters other than `[A-Za-z0-9_.-]` as `_`.
pub fn path_safe(uuid: &str) -> String {
    uuid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// 64-bit FNV-1a: tiny, stable across releases and platforms (unlike `DefaultHasher`).
struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    fn new() -> Self {
        Fnv1a(Self::OFFSET)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests;
