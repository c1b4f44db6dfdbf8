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

use crate::device_id::{DeviceIdError, GpuSelection};
use crate::inventory::{GpuInventory, InventoryError};

/// In-container path of the guard library (mounted read-only from the host).
pub const GUARD_CONTAINER_PATH: &str = "/usr/local/vramslice/lib/libvramslice_guard.so";
/// In-container path of the container's accounting directory.
pub const ACCOUNTING_CONTAINER_DIR: &str = "/var/run/vramslice/accounting";
/// In-container path of the read-only limit file (see [`limit_file_content`]). The guard always
/// reads this path, whatever the environment says, so a process cannot escape it by renaming it.
pub const LIMIT_FILE_CONTAINER_PATH: &str = "/var/run/vramslice/limit";
/// Suffix of the host limit file beside the allocation's accounting directory:
/// `<accountingRoot>/<key>.limit`. Not inside the directory: that one is mounted writable.
pub const LIMIT_FILE_HOST_SUFFIX: &str = ".limit";
/// In-container path the preload file is mounted at in `ld-so-preload-file` mode.
pub const PRELOAD_CONTAINER_PATH: &str = "/etc/ld.so.preload";
/// The CDI kind of NVIDIA GPUs: a CDI device is `nvidia.com/gpu=<uuid>`.
pub const CDI_GPU_KIND: &str = "nvidia.com/gpu";

/// Env var names of the allocation (the values of `vramslice_api::names`, repeated here because
/// the core depends on nothing; a test in the device plugin checks they agree).
pub mod env {
    /// Limit in bytes.
    pub const VRAM_LIMIT_BYTES: &str = "VRAMSLICE_VRAM_LIMIT_BYTES";
    /// The GPU's UUID.
    pub const GPU_UUID: &str = "VRAMSLICE_GPU_UUID";
    /// In-container accounting directory.
    pub const ACCOUNTING_DIR: &str = "VRAMSLICE_ACCOUNTING_DIR";
    /// Which GPUs the NVIDIA runtime exposes.
    pub const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
    /// The dynamic loader's preload list.
    pub const LD_PRELOAD: &str = "LD_PRELOAD";
    /// In-container path of the read-only limit file.
    pub const LIMIT_FILE: &str = "VRAMSLICE_LIMIT_FILE";
}

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
    /// The one GPU.
    pub gpu_uuid: String,
    /// Units granted.
    pub units: u64,
    /// Limit in bytes: units × unit bytes.
    pub limit_bytes: u64,
    /// Environment for the container.
    pub envs: BTreeMap<String, String>,
    /// Host paths to mount.
    pub mounts: Vec<MountSpec>,
    /// CDI devices (`nvidia.com/gpu=<uuid>`) in the `cdi` strategy.
    pub cdi_devices: Vec<String>,
    /// Host accounting directory of this allocation (to be created by the plugin).
    pub host_accounting_dir: PathBuf,
    /// Host limit file of this allocation (to be written by the plugin, with
    /// [`limit_file_content`], before answering).
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
}

/// Decide one container's allocation from its unit IDs.
pub fn plan_allocation<S: AsRef<str>>(
    inventory: &GpuInventory,
    settings: &AllocationSettings,
    ids: &[S],
) -> Result<ContainerAllocation, AllocationError> {
    let selection = GpuSelection::from_ids(ids)?;
    let gpu = inventory.resolve(&selection)?;
    let limit_bytes = inventory.limit_bytes(&selection);
    let key = allocation_key(&selection.gpu_uuid, &selection.units);
    let host_accounting_dir = settings.accounting_root.join(&key);
    let host_limit_file = settings
        .accounting_root
        .join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}"));

    let mut envs = BTreeMap::new();
    envs.insert(env::VRAM_LIMIT_BYTES.to_string(), limit_bytes.to_string());
    envs.insert(env::GPU_UUID.to_string(), gpu.uuid.clone());
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
            envs.insert(env::NVIDIA_VISIBLE_DEVICES.to_string(), gpu.uuid.clone());
        }
        DeviceListStrategy::Cdi => cdi_devices.push(format!("{CDI_GPU_KIND}={}", gpu.uuid)),
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

    Ok(ContainerAllocation {
        gpu_uuid: gpu.uuid.clone(),
        units: selection.unit_count(),
        limit_bytes,
        envs,
        mounts,
        cdi_devices,
        host_accounting_dir,
        host_limit_file,
    })
}

/// What the plugin's limit file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitFile {
    /// The container's limit in bytes.
    pub limit_bytes: u64,
    /// The GPU the limit is on.
    pub gpu_uuid: String,
}

/// Why a limit file's text is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitFileError {
    /// No `limit=` line.
    #[error("limit file has no \"limit=<bytes>\" line")]
    MissingLimit,
    /// The limit is not a decimal byte count.
    #[error("limit file's limit {0:?} is not a decimal byte count")]
    BadLimit(String),
    /// A line that is not `key=value`, an unknown key, or a key given twice.
    #[error("limit file line {line} is invalid: {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// Longer than any file the plugin writes.
    #[error("limit file is {0} bytes, longer than any the plugin writes")]
    TooLong(usize),
}

/// Largest limit file accepted (the plugin writes well under 200 bytes).
pub const LIMIT_FILE_MAX_BYTES: usize = 4096;

/// The text of an allocation's limit file: `limit=<bytes>` and `gpu=<uuid>` lines.
pub fn limit_file_content(limit_bytes: u64, gpu_uuid: &str) -> String {
    format!("limit={limit_bytes}\ngpu={gpu_uuid}\n")
}

/// Parses a limit file strictly: `key=value` lines (`limit` required, `gpu` optional, each at
/// most once), blank lines and `#` comments ignored. Never panics.
///
/// # Errors
/// [`LimitFileError`] naming the first problem.
pub fn parse_limit_file(text: &str) -> Result<LimitFile, LimitFileError> {
    if text.len() > LIMIT_FILE_MAX_BYTES {
        return Err(LimitFileError::TooLong(text.len()));
    }
    let mut limit: Option<u64> = None;
    let mut gpu: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || LimitFileError::BadLine {
            line: i + 1,
            text: raw.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        match key.trim() {
            "limit" if limit.is_none() => {
                let value = value.trim();
                let parsed = if value.bytes().all(|b| b.is_ascii_digit()) {
                    value.parse::<u64>().ok()
                } else {
                    None
                };
                limit = Some(parsed.ok_or_else(|| LimitFileError::BadLimit(value.to_string()))?);
            }
            "gpu" if gpu.is_none() => gpu = Some(value.trim().to_string()),
            _ => return Err(bad()),
        }
    }
    Ok(LimitFile {
        limit_bytes: limit.ok_or(LimitFileError::MissingLimit)?,
        gpu_uuid: gpu.unwrap_or_default(),
    })
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
    let safe: String = gpu_uuid
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let first = sorted.first().copied().unwrap_or(0);
    format!("{safe}.u{first}.n{}.{:016x}", sorted.len(), hash.finish())
}

/// The accounting key of a container's device IDs as the kubelet records them (PodResources).
pub fn allocation_key_for_ids<S: AsRef<str>>(ids: &[S]) -> Result<String, DeviceIdError> {
    let selection = GpuSelection::from_ids(ids)?;
    Ok(allocation_key(&selection.gpu_uuid, &selection.units))
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
mod tests {
    use super::*;
    use crate::device_id::DeviceId;
    use crate::inventory::GpuUnitsView;
    use crate::units::VramUnit;
    use proptest::prelude::*;

    fn inventory() -> GpuInventory {
        GpuInventory::new(
            VramUnit::Gib1,
            vec![
                GpuUnitsView {
                    uuid: "GPU-a".into(),
                    index: 0,
                    total_bytes: 80 << 30,
                    healthy: true,
                },
                GpuUnitsView {
                    uuid: "GPU-b".into(),
                    index: 1,
                    total_bytes: 24 << 30,
                    healthy: true,
                },
            ],
        )
    }

    fn settings(injection: InjectionMode, strategy: DeviceListStrategy) -> AllocationSettings {
        AllocationSettings {
            injection,
            device_list_strategy: strategy,
            guard_library_host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
            preload_file_host_path: "/var/lib/vramslice/ld.so.preload".into(),
            accounting_root: "/var/lib/vramslice/accounting".into(),
        }
    }

    fn env_of<'a>(a: &'a ContainerAllocation, k: &str) -> Option<&'a str> {
        a.envs.get(k).map(String::as_str)
    }

    #[test]
    fn ld_preload_env_mode_sets_everything_the_contract_lists() {
        let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
        let a = plan_allocation(&inventory(), &s, &["GPU-b::3", "GPU-b::1", "GPU-b::2"]).unwrap();
        assert_eq!(a.gpu_uuid, "GPU-b");
        assert_eq!(a.units, 3);
        assert_eq!(a.limit_bytes, 3 << 30);
        assert_eq!(env_of(&a, "VRAMSLICE_VRAM_LIMIT_BYTES"), Some("3221225472"));
        assert_eq!(env_of(&a, "VRAMSLICE_GPU_UUID"), Some("GPU-b"));
        assert_eq!(env_of(&a, "NVIDIA_VISIBLE_DEVICES"), Some("GPU-b"));
        assert_eq!(
            env_of(&a, "VRAMSLICE_ACCOUNTING_DIR"),
            Some(ACCOUNTING_CONTAINER_DIR)
        );
        assert_eq!(env_of(&a, "LD_PRELOAD"), Some(GUARD_CONTAINER_PATH));
        assert_eq!(
            env_of(&a, "VRAMSLICE_LIMIT_FILE"),
            Some(LIMIT_FILE_CONTAINER_PATH)
        );
        assert_eq!(a.envs.len(), 6);
        assert!(a.cdi_devices.is_empty());
        let key = allocation_key("GPU-b", &[1, 2, 3]);
        assert_eq!(
            a.host_accounting_dir,
            Path::new("/var/lib/vramslice/accounting").join(&key)
        );
        assert_eq!(
            a.mounts,
            vec![
                MountSpec {
                    container_path: ACCOUNTING_CONTAINER_DIR.into(),
                    host_path: format!("/var/lib/vramslice/accounting/{key}"),
                    read_only: false,
                },
                MountSpec {
                    container_path: "/var/run/vramslice/limit".into(),
                    host_path: format!("/var/lib/vramslice/accounting/{key}.limit"),
                    read_only: true,
                },
                MountSpec {
                    container_path: GUARD_CONTAINER_PATH.into(),
                    host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
                    read_only: true,
                },
            ]
        );
    }

    #[test]
    fn preload_file_mode_mounts_the_file_and_sets_no_ld_preload() {
        let s = settings(InjectionMode::LdSoPreloadFile, DeviceListStrategy::Envvar);
        let a = plan_allocation(&inventory(), &s, &["GPU-a::0"]).unwrap();
        assert_eq!(env_of(&a, "LD_PRELOAD"), None);
        assert_eq!(a.mounts.len(), 4);
        assert_eq!(
            a.mounts[3],
            MountSpec {
                container_path: "/etc/ld.so.preload".into(),
                host_path: "/var/lib/vramslice/ld.so.preload".into(),
                read_only: true,
            }
        );
        assert_eq!(a.mounts[2].container_path, GUARD_CONTAINER_PATH);
        assert_eq!(preload_file_content(), format!("{GUARD_CONTAINER_PATH}\n"));
    }

    #[test]
    fn none_mode_mounts_only_the_accounting_dir() {
        let s = settings(InjectionMode::None, DeviceListStrategy::Envvar);
        let a = plan_allocation(&inventory(), &s, &["GPU-a::0"]).unwrap();
        assert_eq!(env_of(&a, "LD_PRELOAD"), None);
        assert_eq!(a.mounts.len(), 2);
        assert_eq!(a.mounts[0].container_path, ACCOUNTING_CONTAINER_DIR);
        assert!(
            a.mounts[1].read_only,
            "the limit file is read-only in every mode"
        );
    }

    #[test]
    fn cdi_strategy_names_a_cdi_device_instead_of_the_env_var() {
        let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Cdi);
        let a = plan_allocation(&inventory(), &s, &["GPU-a::5"]).unwrap();
        assert_eq!(a.cdi_devices, vec!["nvidia.com/gpu=GPU-a".to_string()]);
        assert_eq!(env_of(&a, "NVIDIA_VISIBLE_DEVICES"), None);
        assert_eq!(env_of(&a, "VRAMSLICE_GPU_UUID"), Some("GPU-a"));
    }

    #[test]
    fn errors_carry_the_core_text() {
        let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
        let err = plan_allocation(&inventory(), &s, &["GPU-a::0", "GPU-b::0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device IDs span more than one GPU (GPU-a, GPU-b): a container's VRAM must come from one GPU"
        );
        let err = plan_allocation(&inventory(), &s, &["GPU-b::24"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device ID GPU-b::24 is unknown: GPU GPU-b advertises units 0..24"
        );
        let err = plan_allocation(&inventory(), &s, &["GPU-zz::0"]).unwrap_err();
        assert_eq!(err.to_string(), "GPU GPU-zz is not on this node");
        let err = plan_allocation(&inventory(), &s, &["nonsense"]).unwrap_err();
        assert!(err.to_string().contains("\"nonsense\""), "{err}");
        let err = plan_allocation::<&str>(&inventory(), &s, &[]).unwrap_err();
        assert_eq!(err, AllocationError::Ids(DeviceIdError::Empty));
    }

    #[test]
    fn modes_and_strategies_parse_and_name_bad_words() {
        for m in InjectionMode::ALL {
            assert_eq!(m.as_str().parse::<InjectionMode>(), Ok(m));
        }
        assert_eq!(
            "cdi".parse::<DeviceListStrategy>(),
            Ok(DeviceListStrategy::Cdi)
        );
        assert_eq!(
            "envvar".parse::<DeviceListStrategy>(),
            Ok(DeviceListStrategy::Envvar)
        );
        let err = "preload".parse::<InjectionMode>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown injection mode \"preload\": expected one of ld-preload-env, ld-so-preload-file, none"
        );
        assert!(
            "CDI"
                .parse::<DeviceListStrategy>()
                .unwrap_err()
                .to_string()
                .contains("\"CDI\"")
        );
    }

    #[test]
    fn keys_are_path_safe_and_readable() {
        assert_eq!(
            allocation_key("GPU-a", &[3, 1]),
            allocation_key("GPU-a", &[1, 3])
        );
        let key = allocation_key("GPU-a/../x y", &[4, 5]);
        assert!(key.starts_with("GPU-a_.._x_y.u4.n2."), "{key}");
        assert!(!key.contains('/'));
        assert_eq!(
            allocation_key_for_ids(&["GPU-a::1", "GPU-a::0"]).unwrap(),
            allocation_key("GPU-a", &[0, 1])
        );
        assert!(allocation_key_for_ids(&["GPU-a::1", "GPU-b::0"]).is_err());
        // Pinned value: the name must not change between releases (running pods keep their dir).
        assert_eq!(
            allocation_key("GPU-a", &[0]),
            format!("GPU-a.u0.n1.{:016x}", {
                let mut h = Fnv1a::new();
                h.write(b"GPU-a,0");
                h.finish()
            })
        );
    }

    #[test]
    fn limit_file_is_beside_the_writable_dir_never_inside_it() {
        let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
        let a = plan_allocation(&inventory(), &s, &["GPU-a::2", "GPU-a::3"]).unwrap();
        assert!(!a.host_limit_file.starts_with(&a.host_accounting_dir));
        assert_eq!(a.host_limit_file.parent(), a.host_accounting_dir.parent());
        let limit = a
            .mounts
            .iter()
            .find(|m| m.container_path == LIMIT_FILE_CONTAINER_PATH)
            .unwrap();
        assert!(limit.read_only);
        assert_eq!(limit.host_path, a.host_limit_file.to_string_lossy());
        assert!(!LIMIT_FILE_CONTAINER_PATH.starts_with(ACCOUNTING_CONTAINER_DIR));
    }

    #[test]
    fn limit_file_round_trips() {
        let text = limit_file_content(3 << 30, "GPU-b");
        assert_eq!(text, "limit=3221225472\ngpu=GPU-b\n");
        assert_eq!(
            parse_limit_file(&text),
            Ok(LimitFile {
                limit_bytes: 3 << 30,
                gpu_uuid: "GPU-b".into()
            })
        );
        assert_eq!(
            parse_limit_file("# written by vramslice\n\n limit = 5 \n"),
            Ok(LimitFile {
                limit_bytes: 5,
                gpu_uuid: String::new()
            })
        );
    }

    #[test]
    fn limit_file_errors_name_the_problem() {
        assert_eq!(parse_limit_file(""), Err(LimitFileError::MissingLimit));
        assert_eq!(
            parse_limit_file("gpu=x\n"),
            Err(LimitFileError::MissingLimit)
        );
        for bad in [
            "limit=",
            "limit=-1",
            "limit=2Gi",
            "limit=1e9",
            "limit=99999999999999999999999",
            "limit=+5",
        ] {
            assert!(
                matches!(parse_limit_file(bad), Err(LimitFileError::BadLimit(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_limit_file("limit=5\nlimit=9999\n"),
            Err(LimitFileError::BadLine {
                line: 2,
                text: "limit=9999".into()
            })
        );
        assert!(matches!(
            parse_limit_file("limit=5\nextra=1"),
            Err(LimitFileError::BadLine { line: 2, .. })
        ));
        assert!(matches!(
            parse_limit_file("nonsense"),
            Err(LimitFileError::BadLine { line: 1, .. })
        ));
        let long = format!("limit=5\n#{}", "x".repeat(LIMIT_FILE_MAX_BYTES));
        assert!(matches!(
            parse_limit_file(&long),
            Err(LimitFileError::TooLong(_))
        ));
        let msg = parse_limit_file("limit=abc").unwrap_err().to_string();
        assert!(msg.contains("\"abc\""), "{msg}");
    }

    proptest! {
        #[test]
        fn limit_file_parses_what_it_writes(limit in any::<u64>(), uuid in "[A-Za-z0-9-]{0,60}") {
            let parsed = parse_limit_file(&limit_file_content(limit, &uuid)).unwrap();
            prop_assert_eq!(parsed.limit_bytes, limit);
            prop_assert_eq!(parsed.gpu_uuid, uuid);
        }

        #[test]
        fn limit_file_garbage_never_panics(text in "\\PC{0,200}") {
            let _ = parse_limit_file(&text);
        }

        #[test]
        fn key_depends_only_on_the_set_of_ids(
            units in proptest::collection::btree_set(0u64..200, 1..20), seed in any::<u64>()
        ) {
            let sorted: Vec<u64> = units.iter().copied().collect();
            let mut shuffled = sorted.clone();
            let n = shuffled.len();
            shuffled.rotate_left((seed as usize) % n);
            if seed % 2 == 0 { shuffled.reverse(); }
            prop_assert_eq!(allocation_key("GPU-x", &sorted), allocation_key("GPU-x", &shuffled));
            let ids: Vec<String> = shuffled.iter().map(|k| DeviceId::new("GPU-x", *k).to_string()).collect();
            prop_assert_eq!(allocation_key_for_ids(&ids).unwrap(), allocation_key("GPU-x", &sorted));
        }

        #[test]
        fn different_sets_get_different_keys(
            a in proptest::collection::btree_set(0u64..64, 1..8),
            b in proptest::collection::btree_set(0u64..64, 1..8),
        ) {
            prop_assume!(a != b);
            let a: Vec<u64> = a.into_iter().collect();
            let b: Vec<u64> = b.into_iter().collect();
            prop_assert_ne!(allocation_key("GPU-x", &a), allocation_key("GPU-x", &b));
        }

        #[test]
        fn limit_is_units_times_unit_and_within_the_gpu(
            k in 1u64..24, start in 0u64..24, unit_ix in 0usize..4
        ) {
            let unit = VramUnit::ALL[unit_ix];
            let inv = GpuInventory::new(unit, vec![GpuUnitsView {
                uuid: "GPU-b".into(), index: 0, total_bytes: 24 << 30, healthy: true,
            }]);
            let units = unit.units_in(24 << 30);
            let ids: Vec<String> = (start..start + k).map(|u| format!("GPU-b::{u}")).collect();
            let s = settings(InjectionMode::LdPreloadEnv, DeviceListStrategy::Envvar);
            match plan_allocation(&inv, &s, &ids) {
                Ok(a) => {
                    prop_assert!(start + k <= units);
                    prop_assert_eq!(a.limit_bytes, k * unit.bytes());
                    prop_assert!(a.limit_bytes <= 24 << 30);
                    prop_assert_eq!(a.envs.get("VRAMSLICE_VRAM_LIMIT_BYTES"), Some(&a.limit_bytes.to_string()));
                }
                Err(e) => {
                    prop_assert!(start + k > units);
                    prop_assert!(matches!(e, AllocationError::Inventory(InventoryError::UnknownUnit { .. })), "{}", e);
                }
            }
        }
    }
}
