//! The plugin's YAML configuration: every field defaulted, unknown keys rejected, values checked
//! with errors that name the field and what is wrong with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vramslice_core::node::allocation::{AllocationSettings, DeviceListStrategy, InjectionMode};
use vramslice_core::node::publish::PublishPolicy;
use vramslice_core::node::watchdog::WatchdogPolicy;
use vramslice_core::{VramUnit, parse_bytes, parse_duration};
use vramslice_gpu::BackendKind;

/// Default kubelet device-plugin directory.
pub const DEFAULT_SOCKET_DIR: &str = "/var/lib/kubelet/device-plugins";
/// Default kubelet PodResources socket.
pub const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// Environment variable the node name defaults from.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown keys or wrong types.
    #[error("config file {path} is invalid: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (names the key and position).
        message: String,
    },
    /// A value is impossible.
    #[error("config field `{field}`: {message}")]
    Value {
        /// The field, dotted (`publish.heartbeat`).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn value_err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        field,
        message: message.into(),
    }
}

/// A byte amount written as a quantity (`256Mi`) or plain integer bytes. Anything else is read
/// too, so that [`bytes`] can name the field it is wrong in (serde's own error for an untagged
/// enum names neither field nor value).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Int(u64),
    Negative(i64),
    Float(f64),
    Text(String),
    Other(serde::de::IgnoredAny),
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawConfig {
    mode: String,
    backend: String,
    fake_gpu_file: String,
    unit: String,
    socket_dir: String,
    pod_resources_socket: String,
    node_name: String,
    poll_interval: String,
    publish: RawPublish,
    injection: RawInjection,
    device_list_strategy: String,
    accounting_root: String,
    accounting_sweep_after: String,
    metrics_addr: String,
    proc_root: String,
    watchdog: RawWatchdog,
    dra: RawDra,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawDra {
    registry_dir: String,
    plugin_dir: String,
    cdi_dir: String,
    checkpoint: String,
    headroom: RawBytes,
    publish_threshold: RawBytes,
    min_publish_interval: String,
}

impl Default for RawDra {
    fn default() -> Self {
        RawDra {
            registry_dir: "/var/lib/kubelet/plugins_registry".into(),
            plugin_dir: "/var/lib/kubelet/plugins/vramslice.io".into(),
            cdi_dir: "/var/run/cdi".into(),
            checkpoint: "/var/lib/vramslice/dra/checkpoint.json".into(),
            headroom: RawBytes::Text("512Mi".into()),
            publish_threshold: RawBytes::Text(String::new()),
            min_publish_interval: "2s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawWatchdog {
    tolerance: RawBytes,
    grace: String,
    action: String,
}

impl Default for RawWatchdog {
    fn default() -> Self {
        RawWatchdog {
            tolerance: RawBytes::Text("64Mi".into()),
            grace: "30s".into(),
            action: "report".into(),
        }
    }
}

/// How often a change of usage alone may be written to the `GpuNode` by default (never more
/// often than the heartbeat).
const DEFAULT_PUBLISH_MIN_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawPublish {
    threshold_bytes: RawBytes,
    heartbeat: String,
    /// Empty: 5s, or the heartbeat when that is shorter.
    min_interval: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawInjection {
    mode: String,
    guard_library_host_path: String,
    preload_file_host_path: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            mode: "devicePlugin".into(),
            backend: "nvml".into(),
            fake_gpu_file: String::new(),
            unit: "1Gi".into(),
            socket_dir: DEFAULT_SOCKET_DIR.into(),
            pod_resources_socket: DEFAULT_POD_RESOURCES_SOCKET.into(),
            node_name: String::new(),
            poll_interval: "500ms".into(),
            publish: RawPublish::default(),
            injection: RawInjection::default(),
            device_list_strategy: "envvar".into(),
            accounting_root: "/var/lib/vramslice/accounting".into(),
            accounting_sweep_after: "10m".into(),
            metrics_addr: "0.0.0.0:9400".into(),
            proc_root: "/proc".into(),
            watchdog: RawWatchdog::default(),
            dra: RawDra::default(),
        }
    }
}

impl Default for RawPublish {
    fn default() -> Self {
        RawPublish {
            threshold_bytes: RawBytes::Text("256Mi".into()),
            heartbeat: "30s".into(),
            min_interval: String::new(),
        }
    }
}

impl Default for RawInjection {
    fn default() -> Self {
        RawInjection {
            mode: "ld-preload-env".into(),
            guard_library_host_path: "/var/lib/vramslice/lib/libvramslice_guard.so".into(),
            preload_file_host_path: "/var/lib/vramslice/ld.so.preload".into(),
        }
    }
}

/// Which kubelet API the plugin serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A device plugin advertising VRAM units (with the scheduler extender).
    #[default]
    DevicePlugin,
    /// A DRA driver publishing each GPU's memory as consumable capacity in a ResourceSlice.
    Dra,
}

/// DRA mode's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraSettings {
    /// The kubelet's plugin registry directory.
    pub registry_dir: PathBuf,
    /// The plugin's socket directory.
    pub plugin_dir: PathBuf,
    /// Where CDI specs are written for the container runtime.
    pub cdi_dir: PathBuf,
    /// The prepared-claims checkpoint.
    pub checkpoint: PathBuf,
    /// Memory kept free on every GPU, off the published capacity.
    pub headroom_bytes: u64,
    /// A capacity rise smaller than this is not published (a fall always is; default: one
    /// unit).
    pub publish_threshold_bytes: u64,
    /// Slice writes are at least this far apart (device changes excepted).
    pub min_publish_interval: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Device plugin or DRA driver.
    pub mode: Mode,
    /// DRA mode's settings (read in every mode, so a wrong value is caught early).
    pub dra: DraSettings,
    /// Where readings come from.
    pub backend: BackendKind,
    /// The unit (and so the resource name).
    pub unit: VramUnit,
    /// Kubelet device-plugin directory (holds `kubelet.sock` and our socket).
    pub socket_dir: PathBuf,
    /// Kubelet PodResources socket.
    pub pod_resources_socket: PathBuf,
    /// This node's name, when known (needed for publishing and pending-pod lookups).
    pub node_name: Option<String>,
    /// How often the backend is read.
    pub poll_interval: Duration,
    /// When readings are written to the API server.
    pub publish: PublishPolicy,
    /// What Allocate hands containers.
    pub allocation: AllocationSettings,
    /// Where `/metrics` and `/healthz` listen.
    pub metrics_addr: SocketAddr,
    /// The `/proc` to map GPU process PIDs to pods through.
    pub proc_root: PathBuf,
    /// What to do when a pod's measured usage passes its limit.
    pub watchdog: WatchdogPolicy,
    /// How long an allocation must be gone from the kubelet's record before its accounting
    /// directory and limit file are deleted; `None` (`off`) keeps them forever.
    pub accounting_sweep_after: Option<Duration>,
}

impl Settings {
    /// The resource name, e.g. `vramslice.io/vram-gib`.
    pub fn resource_name(&self) -> &'static str {
        self.unit.resource_name()
    }

    /// File name of the plugin's socket: `vramslice-<suffix>.sock`, suffix = resource name after
    /// `vramslice.io/` (`vramslice-vram-gib.sock`).
    pub fn socket_name(&self) -> String {
        socket_name(self.unit)
    }

    /// Full path of the plugin's socket.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(self.socket_name())
    }

    /// Full path of the kubelet's registration socket.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.socket_dir.join("kubelet.sock")
    }

    /// Read and validate the file at `path`; `env_node_name` is `$NODE_NAME`.
    pub fn load(path: &Path, env_node_name: Option<String>) -> Result<Settings, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: display.clone(),
            source,
        })?;
        Settings::from_yaml(&text, &display, env_node_name)
    }

    /// Validate YAML text (`origin` names it in errors).
    pub fn from_yaml(
        text: &str,
        origin: &str,
        env_node_name: Option<String>,
    ) -> Result<Settings, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Syntax {
                path: origin.to_string(),
                message: e.to_string(),
            })?
        };
        validate(raw, env_node_name)
    }

    /// All defaults (no file given).
    pub fn defaults(env_node_name: Option<String>) -> Result<Settings, ConfigError> {
        validate(RawConfig::default(), env_node_name)
    }
}

/// Socket file name for `unit`.
pub fn socket_name(unit: VramUnit) -> String {
    let suffix = unit
        .resource_name()
        .strip_prefix("vramslice.io/")
        .unwrap_or(unit.resource_name());
    format!("vramslice-{suffix}.sock")
}

fn non_empty_path(field: &'static str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.trim().is_empty() {
        return Err(value_err(field, "must not be empty"));
    }
    Ok(PathBuf::from(value))
}

/// A path on the host that the kubelet hands to the container runtime (a mount's source): the
/// runtime would not read a relative one against the plugin's working directory.
fn host_path(field: &'static str, value: &str) -> Result<PathBuf, ConfigError> {
    let path = non_empty_path(field, value)?;
    if path.is_relative() {
        return Err(value_err(
            field,
            format!(
                "{value:?} must be an absolute path: it is mounted into containers by the container runtime, which does not read it against the plugin's directory"
            ),
        ));
    }
    Ok(path)
}

fn duration(field: &'static str, value: &str, min: Duration) -> Result<Duration, ConfigError> {
    let d = parse_duration(value).map_err(|e| value_err(field, e.to_string()))?;
    if d < min {
        return Err(value_err(
            field,
            format!("{value:?} is too short: at least {}ms", min.as_millis()),
        ));
    }
    Ok(d)
}

fn bytes(field: &'static str, raw: &RawBytes) -> Result<u64, ConfigError> {
    match raw {
        RawBytes::Int(b) => Ok(*b),
        RawBytes::Negative(n) => Err(value_err(
            field,
            format!("{n} is negative: a byte amount must be zero or more"),
        )),
        // 1e9 reads as a float in YAML: a whole number of bytes is still one.
        RawBytes::Float(f)
            if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_615.0).contains(f) =>
        {
            // The range check makes the conversion exact.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(*f as u64)
        }
        RawBytes::Float(f) => Err(value_err(
            field,
            format!(
                "{f} is not a whole number of bytes: write a quantity such as 256Mi or an integer"
            ),
        )),
        RawBytes::Text(t) => parse_bytes(t).map_err(|e| value_err(field, e.to_string())),
        RawBytes::Other(_) => Err(value_err(
            field,
            "expected a byte amount: a quantity such as 256Mi, or an integer number of bytes",
        )),
    }
}

fn dra_settings(raw: &RawDra, unit: VramUnit) -> Result<DraSettings, ConfigError> {
    let publish_threshold_bytes = match &raw.publish_threshold {
        RawBytes::Text(t) if t.trim().is_empty() => unit.bytes(),
        other => bytes("dra.publishThreshold", other)?,
    };
    Ok(DraSettings {
        registry_dir: non_empty_path("dra.registryDir", &raw.registry_dir)?,
        plugin_dir: non_empty_path("dra.pluginDir", &raw.plugin_dir)?,
        cdi_dir: non_empty_path("dra.cdiDir", &raw.cdi_dir)?,
        checkpoint: non_empty_path("dra.checkpoint", &raw.checkpoint)?,
        headroom_bytes: bytes("dra.headroom", &raw.headroom)?,
        publish_threshold_bytes,
        min_publish_interval: duration(
            "dra.minPublishInterval",
            &raw.min_publish_interval,
            Duration::from_millis(100),
        )?,
    })
}

fn validate(raw: RawConfig, env_node_name: Option<String>) -> Result<Settings, ConfigError> {
    let mode = match raw.mode.as_str() {
        "devicePlugin" => Mode::DevicePlugin,
        "dra" => Mode::Dra,
        other => {
            return Err(value_err(
                "mode",
                format!("unknown mode {other:?}: expected devicePlugin or dra"),
            ));
        }
    };
    let backend = match raw.backend.as_str() {
        "nvml" => BackendKind::Nvml,
        "fake" => {
            if raw.fake_gpu_file.trim().is_empty() {
                return Err(value_err(
                    "fakeGpuFile",
                    "required when backend is fake: the path of the fake-GPU YAML file",
                ));
            }
            BackendKind::Fake {
                path: PathBuf::from(&raw.fake_gpu_file),
            }
        }
        other => {
            return Err(value_err(
                "backend",
                format!("unknown backend {other:?}: expected nvml or fake"),
            ));
        }
    };
    let unit: VramUnit = raw
        .unit
        .parse()
        .map_err(|e: vramslice_core::UnitError| value_err("unit", e.to_string()))?;
    let poll_interval = duration(
        "pollInterval",
        &raw.poll_interval,
        Duration::from_millis(10),
    )?;
    let heartbeat = duration(
        "publish.heartbeat",
        &raw.publish.heartbeat,
        Duration::from_secs(1),
    )?;
    if heartbeat < poll_interval {
        return Err(value_err(
            "publish.heartbeat",
            format!(
                "{:?} is shorter than pollInterval {:?}",
                raw.publish.heartbeat, raw.poll_interval
            ),
        ));
    }
    let min_interval = if raw.publish.min_interval.trim().is_empty() {
        DEFAULT_PUBLISH_MIN_INTERVAL.min(heartbeat)
    } else {
        duration(
            "publish.minInterval",
            &raw.publish.min_interval,
            Duration::ZERO,
        )?
    };
    if min_interval > heartbeat {
        return Err(value_err(
            "publish.minInterval",
            format!(
                "{:?} is longer than publish.heartbeat {:?}",
                raw.publish.min_interval, raw.publish.heartbeat
            ),
        ));
    }
    let threshold_bytes = bytes("publish.thresholdBytes", &raw.publish.threshold_bytes)?;
    let tolerance_bytes = bytes("watchdog.tolerance", &raw.watchdog.tolerance)?;
    let watchdog = WatchdogPolicy {
        tolerance_bytes,
        grace: duration("watchdog.grace", &raw.watchdog.grace, Duration::ZERO)?,
        action: raw.watchdog.action.parse().map_err(
            |e: vramslice_core::node::allocation::UnknownVariant| {
                value_err("watchdog.action", e.to_string())
            },
        )?,
        poll_interval,
    };
    let injection: InjectionMode = raw.injection.mode.parse().map_err(
        |e: vramslice_core::node::allocation::UnknownVariant| {
            value_err("injection.mode", e.to_string())
        },
    )?;
    let device_list_strategy: DeviceListStrategy = raw.device_list_strategy.parse().map_err(
        |e: vramslice_core::node::allocation::UnknownVariant| {
            value_err("deviceListStrategy", e.to_string())
        },
    )?;
    let metrics_addr: SocketAddr = raw.metrics_addr.parse().map_err(|_| {
        value_err(
            "metricsAddr",
            format!(
                "{:?} is not a socket address: expected host:port, e.g. 0.0.0.0:9400",
                raw.metrics_addr
            ),
        )
    })?;
    let node_name = Some(raw.node_name.trim().to_string())
        .filter(|n| !n.is_empty())
        .or_else(|| {
            env_node_name
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
        });
    let accounting_sweep_after = match raw.accounting_sweep_after.trim() {
        "off" => None,
        after => Some(duration(
            "accountingSweepAfter",
            after,
            Duration::from_secs(1),
        )?),
    };
    let dra = dra_settings(&raw.dra, unit)?;
    Ok(Settings {
        mode,
        dra,
        backend,
        unit,
        socket_dir: non_empty_path("socketDir", &raw.socket_dir)?,
        pod_resources_socket: non_empty_path("podResourcesSocket", &raw.pod_resources_socket)?,
        node_name,
        poll_interval,
        publish: PublishPolicy {
            threshold_bytes,
            heartbeat,
            min_interval,
        },
        allocation: AllocationSettings {
            injection,
            device_list_strategy,
            guard_library_host_path: host_path(
                "injection.guardLibraryHostPath",
                &raw.injection.guard_library_host_path,
            )?,
            preload_file_host_path: host_path(
                "injection.preloadFileHostPath",
                &raw.injection.preload_file_host_path,
            )?,
            accounting_root: host_path("accountingRoot", &raw.accounting_root)?,
        },
        metrics_addr,
        proc_root: non_empty_path("procRoot", &raw.proc_root)?,
        watchdog,
        accounting_sweep_after,
    })
}

#[cfg(test)]
mod tests;
