use super::*;
use vramslice_core::node::watchdog::WatchdogAction;

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
            heartbeat: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
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
    assert_eq!(s.accounting_sweep_after, Some(Duration::from_secs(600)));
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
accountingSweepAfter: 2h
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
    assert_eq!(s.publish.min_interval, Duration::from_secs(5));
    assert_eq!(s.allocation.injection, InjectionMode::LdSoPreloadFile);
    assert_eq!(s.allocation.device_list_strategy, DeviceListStrategy::Cdi);
    assert_eq!(
        s.allocation.preload_file_host_path,
        Path::new("/opt/preload")
    );
    assert_eq!(s.proc_root, Path::new("/host/proc"));
    assert_eq!(s.accounting_sweep_after, Some(Duration::from_secs(7200)));
    assert_eq!(
        parse("accountingSweepAfter: off")
            .unwrap()
            .accounting_sweep_after,
        None
    );
    assert_eq!(
        s.watchdog,
        WatchdogPolicy {
            tolerance_bytes: 1 << 30,
            grace: Duration::ZERO,
            action: WatchdogAction::KillProcess,
            poll_interval: Duration::from_millis(200),
        }
    );
    let s = parse("watchdog: { tolerance: 0, action: evict-pod }").unwrap();
    assert_eq!(s.watchdog.tolerance_bytes, 0);
    assert_eq!(s.watchdog.action, WatchdogAction::EvictPod);
    let s = parse("publish: { thresholdBytes: 1048576 }").unwrap();
    assert_eq!(s.publish.threshold_bytes, 1 << 20);
    // YAML reads 1e9 as a float: a whole number of bytes all the same.
    let s = parse("publish: { thresholdBytes: 1e9 }").unwrap();
    assert_eq!(s.publish.threshold_bytes, 1_000_000_000);
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
    let cases: [(&str, &str); 25] = [
        (
            "accountingSweepAfter: never",
            "config field `accountingSweepAfter`: \"never\" is not a duration",
        ),
        (
            "accountingSweepAfter: 10ms",
            "config field `accountingSweepAfter`: \"10ms\" is too short: at least 1000ms",
        ),
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
            "publish: { heartbeat: 10s, minInterval: 20s }",
            "config field `publish.minInterval`: \"20s\" is longer than publish.heartbeat \"10s\"",
        ),
        (
            "publish: { minInterval: soon }",
            "config field `publish.minInterval`: \"soon\" is not a duration",
        ),
        (
            "publish: { thresholdBytes: lots }",
            "config field `publish.thresholdBytes`: \"lots\" is not a quantity",
        ),
        (
            "publish: { thresholdBytes: -5 }",
            "config field `publish.thresholdBytes`: -5 is negative",
        ),
        (
            "watchdog: { tolerance: 1.5 }",
            "config field `watchdog.tolerance`: 1.5 is not a whole number of bytes",
        ),
        (
            "accountingRoot: var/lib/vramslice",
            "config field `accountingRoot`: \"var/lib/vramslice\" must be an absolute path",
        ),
        (
            "injection: { guardLibraryHostPath: lib/guard.so }",
            "config field `injection.guardLibraryHostPath`: \"lib/guard.so\" must be an absolute path",
        ),
        (
            "dra: { headroom: true }",
            "config field `dra.headroom`: expected a byte amount",
        ),
        (
            "dra: { publishThreshold: [1] }",
            "config field `dra.publishThreshold`: expected a byte amount",
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

#[test]
fn dra_mode_and_its_settings() {
    let s = Settings::from_yaml("unit: 512Mi", "t", None).unwrap();
    assert_eq!(s.mode, Mode::DevicePlugin);
    assert_eq!(
        s.dra.publish_threshold_bytes,
        512 << 20,
        "one unit by default"
    );
    assert_eq!(s.dra.headroom_bytes, 512 << 20);
    assert_eq!(s.dra.cdi_dir, Path::new("/var/run/cdi"));
    let s = Settings::from_yaml(
        "mode: dra\ndra: { headroom: 1Gi, publishThreshold: 2Gi, minPublishInterval: 5s, cdiDir: /etc/cdi }",
        "t",
        None,
    )
    .unwrap();
    assert_eq!(s.mode, Mode::Dra);
    assert_eq!(
        (s.dra.headroom_bytes, s.dra.publish_threshold_bytes),
        (1 << 30, 2 << 30)
    );
    assert_eq!(s.dra.min_publish_interval, Duration::from_secs(5));
    assert_eq!(s.dra.cdi_dir, Path::new("/etc/cdi"));
}

#[test]
fn dra_mistakes_name_the_field() {
    assert_eq!(
        error_of("mode: DRA"),
        "config field `mode`: unknown mode \"DRA\": expected devicePlugin or dra"
    );
    assert!(error_of("dra: { headroom: lots }").starts_with("config field `dra.headroom`"));
    assert!(
        error_of("dra: { minPublishInterval: 1ms }")
            .starts_with("config field `dra.minPublishInterval`")
    );
    assert!(
        error_of("dra: { cdiDir: '' }").starts_with("config field `dra.cdiDir`: must not be empty")
    );
}
