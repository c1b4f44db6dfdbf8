//! The plugin's YAML configuration: every field defaulted, unknown keys rejected, values checked
//! with errors that name the field and what is wrong with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vramslice_core::allocation::{AllocationSettings, DeviceListStrategy, InjectionMode};
use vramslice_core::publish::PublishPolicy;
use vramslice_core::watchdog::WatchdogPolicy;
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

/// A byte amount written as a quantity (`256Mi`) or plain integer bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Int(u64),
    Text(String),
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawConfig {
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
    metrics_addr: String,
    proc_root: String,
    watchdog: RawWatchdog,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawPublish {
    threshold_bytes: RawBytes,
    heartbeat: String,
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
            metrics_addr: "0.0.0.0:9400".into(),
            proc_root: "/proc".into(),
            watchdog: RawWatchdog::default(),
        }
    }
}

impl Default for RawPublish {
    fn default() -> Self {
        RawPublish {
            threshold_bytes: RawBytes::Text("256Mi".into()),
            heartbeat: "30s".into(),
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

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
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

fn validate(raw: RawConfig, env_node_name: Option<String>) -> Result<Settings, ConfigError> {
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
    let threshold_bytes = match &raw.publish.threshold_bytes {
        RawBytes::Int(b) => *b,
        RawBytes::Text(t) => {
            parse_bytes(t).map_err(|e| value_err("publish.thresholdBytes", e.to_string()))?
        }
    };
    let tolerance_bytes = match &raw.watchdog.tolerance {
        RawBytes::Int(b) => *b,
        RawBytes::Text(t) => {
            parse_bytes(t).map_err(|e| value_err("watchdog.tolerance", e.to_string()))?
        }
    };
    let watchdog = WatchdogPolicy {
        tolerance_bytes,
        grace: duration("watchdog.grace", &raw.watchdog.grace, Duration::ZERO)?,
        action: raw.watchdog.action.parse().map_err(
            |e: vramslice_core::allocation::UnknownVariant| {
                value_err("watchdog.action", e.to_string())
            },
        )?,
    };
    let injection: InjectionMode =
        raw.injection
            .mode
            .parse()
            .map_err(|e: vramslice_core::allocation::UnknownVariant| {
                value_err("injection.mode", e.to_string())
            })?;
    let device_list_strategy: DeviceListStrategy = raw.device_list_strategy.parse().map_err(
        |e: vramslice_core::allocation::UnknownVariant| {
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
    Ok(Settings {
        backend,
        unit,
        socket_dir: non_empty_path("socketDir", &raw.socket_dir)?,
        pod_resources_socket: non_empty_path("podResourcesSocket", &raw.pod_resources_socket)?,
        node_name,
        poll_interval,
        publish: PublishPolicy {
            threshold_bytes,
            heartbeat,
        },
        allocation: AllocationSettings {
            injection,
            device_list_strategy,
            guard_library_host_path: non_empty_path(
                "injection.guardLibraryHostPath",
                &raw.injection.guard_library_host_path,
            )?,
            preload_file_host_path: non_empty_path(
                "injection.preloadFileHostPath",
                &raw.injection.preload_file_host_path,
            )?,
            accounting_root: non_empty_path("accountingRoot", &raw.accounting_root)?,
        },
        metrics_addr,
        proc_root: non_empty_path("procRoot", &raw.proc_root)?,
        watchdog,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_core::watchdog::WatchdogAction;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_yaml(text, "test.yaml", None)
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::defaults(Some("node-a".into())).unwrap();
        assert_eq!(s.backend, BackendKind::Nvml);
        assert_eq!(s.unit, VramUnit::Gib1);
        assert_eq!(
            s.socket_path(),
            Path::new("/var/lib/kubelet/device-plugins/vramslice-vram-gib.sock")
        );
        assert_eq!(
            s.kubelet_socket(),
            Path::new("/var/lib/kubelet/device-plugins/kubelet.sock")
        );
        assert_eq!(
            s.pod_resources_socket,
            Path::new(DEFAULT_POD_RESOURCES_SOCKET)
        );
        assert_eq!(s.node_name.as_deref(), Some("node-a"));
        assert_eq!(s.poll_interval, Duration::from_millis(500));
        assert_eq!(
            s.publish,
            PublishPolicy {
                threshold_bytes: 256 << 20,
                heartbeat: Duration::from_secs(30)
            }
        );
        assert_eq!(s.allocation.injection, InjectionMode::LdPreloadEnv);
        assert_eq!(
            s.allocation.device_list_strategy,
            DeviceListStrategy::Envvar
        );
        assert_eq!(
            s.allocation.accounting_root,
            Path::new("/var/lib/vramslice/accounting")
        );
        assert_eq!(s.metrics_addr, "0.0.0.0:9400".parse().unwrap());
        assert_eq!(s.watchdog, WatchdogPolicy::default());
        assert_eq!(s.watchdog.action, WatchdogAction::Report);
        assert_eq!(s.watchdog.grace, Duration::from_secs(30));
        assert_eq!(parse("").unwrap(), Settings::defaults(None).unwrap());
        assert_eq!(parse("{}").unwrap(), Settings::defaults(None).unwrap());
    }

    #[test]
    fn every_field_is_read() {
        let s = Settings::from_yaml(
            r#"
backend: fake
fakeGpuFile: /tmp/gpus.yaml
unit: 512Mi
socketDir: /tmp/dp
podResourcesSocket: /tmp/pr.sock
nodeName: node-b
pollInterval: 200ms
publish: { thresholdBytes: 1Gi, heartbeat: 1m }
injection:
  mode: ld-so-preload-file
  guardLibraryHostPath: /opt/guard.so
  preloadFileHostPath: /opt/preload
deviceListStrategy: cdi
accountingRoot: /tmp/acct
metricsAddr: 127.0.0.1:0
procRoot: /host/proc
watchdog: { tolerance: 1Gi, grace: 0s, action: kill-process }
"#,
            "t",
            Some("ignored".into()),
        )
        .unwrap();
        assert_eq!(
            s.backend,
            BackendKind::Fake {
                path: "/tmp/gpus.yaml".into()
            }
        );
        assert_eq!(s.unit, VramUnit::Mib512);
        assert_eq!(
            s.socket_path(),
            Path::new("/tmp/dp/vramslice-vram-512mib.sock")
        );
        assert_eq!(s.node_name.as_deref(), Some("node-b"));
        assert_eq!(s.poll_interval, Duration::from_millis(200));
        assert_eq!(s.publish.threshold_bytes, 1 << 30);
        assert_eq!(s.publish.heartbeat, Duration::from_secs(60));
        assert_eq!(s.allocation.injection, InjectionMode::LdSoPreloadFile);
        assert_eq!(s.allocation.device_list_strategy, DeviceListStrategy::Cdi);
        assert_eq!(
            s.allocation.preload_file_host_path,
            Path::new("/opt/preload")
        );
        assert_eq!(s.proc_root, Path::new("/host/proc"));
        assert_eq!(
            s.watchdog,
            WatchdogPolicy {
                tolerance_bytes: 1 << 30,
                grace: Duration::ZERO,
                action: WatchdogAction::KillProcess
            }
        );
        let s = parse("watchdog: { tolerance: 0, action: evict-pod }").unwrap();
        assert_eq!(s.watchdog.tolerance_bytes, 0);
        assert_eq!(s.watchdog.action, WatchdogAction::EvictPod);
        let s = parse("publish: { thresholdBytes: 1048576 }").unwrap();
        assert_eq!(s.publish.threshold_bytes, 1 << 20);
    }

    #[test]
    fn socket_names_follow_the_resource() {
        assert_eq!(socket_name(VramUnit::Gib1), "vramslice-vram-gib.sock");
        assert_eq!(socket_name(VramUnit::Mib128), "vramslice-vram-128mib.sock");
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_are_named() {
        let cases: [(&str, &str); 15] = [
            (
                "watchdog: { action: kill }",
                "config field `watchdog.action`: unknown watchdog action \"kill\"",
            ),
            (
                "watchdog: { grace: soon }",
                "config field `watchdog.grace`: \"soon\" is not a duration",
            ),
            (
                "watchdog: { tolerance: much }",
                "config field `watchdog.tolerance`: \"much\" is not a quantity",
            ),
            (
                "backend: cuda",
                "config field `backend`: unknown backend \"cuda\"",
            ),
            (
                "backend: fake",
                "config field `fakeGpuFile`: required when backend is fake",
            ),
            (
                "unit: 2Gi",
                "config field `unit`: unknown VRAM unit \"2Gi\"",
            ),
            (
                "pollInterval: fast",
                "config field `pollInterval`: \"fast\" is not a duration",
            ),
            (
                "pollInterval: 1ms",
                "config field `pollInterval`: \"1ms\" is too short",
            ),
            (
                "publish: { heartbeat: 100ms }",
                "config field `publish.heartbeat`: \"100ms\" is too short",
            ),
            (
                "pollInterval: 10s\npublish: { heartbeat: 5s }",
                "shorter than pollInterval",
            ),
            (
                "publish: { thresholdBytes: lots }",
                "config field `publish.thresholdBytes`: \"lots\" is not a quantity",
            ),
            (
                "injection: { mode: magic }",
                "config field `injection.mode`: unknown injection mode \"magic\"",
            ),
            (
                "deviceListStrategy: volume-mounts",
                "config field `deviceListStrategy`: unknown device list strategy",
            ),
            (
                "metricsAddr: localhost",
                "config field `metricsAddr`: \"localhost\" is not a socket address",
            ),
            (
                "socketDir: ''",
                "config field `socketDir`: must not be empty",
            ),
        ];
        for (text, want) in cases {
            let got = error_of(text);
            assert!(got.contains(want), "{text:?}: {got}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_rejected() {
        let got = error_of("socketdir: /tmp");
        assert!(
            got.contains("test.yaml") && got.contains("socketdir"),
            "{got}"
        );
        let got = error_of("publish: { threshold: 1Gi }");
        assert!(got.contains("threshold"), "{got}");
        let got = error_of("injection: [a, b]");
        assert!(got.starts_with("config file test.yaml is invalid"), "{got}");
    }

    #[test]
    fn node_name_comes_from_the_file_then_the_environment() {
        let s = Settings::from_yaml("nodeName: ' '", "t", Some("env-node".into())).unwrap();
        assert_eq!(s.node_name.as_deref(), Some("env-node"));
        let s = Settings::from_yaml("{}", "t", Some("".into())).unwrap();
        assert_eq!(s.node_name, None);
    }

    #[test]
    fn missing_file_is_named() {
        let err = Settings::load(Path::new("/nonexistent/vramslice.yaml"), None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /nonexistent/vramslice.yaml")
        );
    }
}
