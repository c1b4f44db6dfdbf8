//! The configuration the Helm chart renders (committed as manifests/vramslice.yaml, kept equal to
//! the chart by scripts/render-manifests.sh --check) is accepted by each binary's own parser, and
//! the pieces that must agree do: the scheduler calls the extender's port, manages the resource
//! the unit names, and the preload file names the path Allocate mounts the guard at.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use serde_json::Value;

fn documents() -> Vec<Value> {
    documents_of("vramslice.yaml")
}

/// The objects of `manifests/<file>`.
fn documents_of(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../manifests")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    text.split("\n---\n")
        .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .collect()
}

fn config_map(docs: &[Value], name: &str) -> serde_json::Map<String, Value> {
    docs.iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("ConfigMap {name} missing"))["data"]
        .as_object()
        .unwrap()
        .clone()
}

#[test]
fn device_plugin_accepts_the_rendered_config() {
    let docs = documents();
    let data = config_map(&docs, "vramslice-device-plugin");
    let text = data["device-plugin.yaml"].as_str().unwrap();
    let settings = vramslice_device_plugin::config::Settings::from_yaml(
        text,
        "chart",
        Some("gpu-node-1".into()),
    )
    .unwrap_or_else(|e| panic!("the plugin rejects the chart's config: {e}\n{text}"));
    assert_eq!(
        settings.node_name.as_deref(),
        Some("gpu-node-1"),
        "nodeName comes from NODE_NAME"
    );
    let rendered = format!("{settings:?}");
    assert!(rendered.contains("LdSoPreloadFile"), "{rendered}");
}

#[test]
fn extender_and_webhook_accept_the_rendered_config() {
    let docs = documents();
    let data = config_map(&docs, "vramslice-scheduler");
    let text = data["extender.yaml"].as_str().unwrap();
    // The extender reads the whole file, its `webhook:` block included.
    let config = vramslice_extender::Config::parse(text, "chart")
        .unwrap_or_else(|e| panic!("the extender rejects the chart's config: {e}\n{text}"));
    assert_eq!(config.listen_addr.port(), 8888);
    let webhook = config.webhook.expect("webhook block rendered");
    let valid = webhook.validate(None).unwrap();
    assert_eq!(valid.listen_addr.port(), 8443);

    // The bundled kube-scheduler calls that port and manages the resource of the chart's unit.
    let sched: Value =
        serde_saphyr::from_str(data["scheduler-config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(sched["profiles"][0]["schedulerName"], "vramslice-scheduler");
    let ext = &sched["extenders"][0];
    assert_eq!(ext["urlPrefix"], "http://127.0.0.1:8888");
    assert_eq!(ext["managedResources"][0]["name"], "vramslice.io/vram-gib");
    assert_eq!(ext["nodeCacheCapable"], true);
    assert_eq!(ext["bindVerb"], "bind");
}

#[test]
fn the_kubectl_plugin_finds_and_reads_the_extenders_settings() {
    use kubectl_vramslice::settings;
    let docs = documents();
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "vramslice-scheduler")
        .unwrap();
    let (key, value) = settings::SCHEDULER_CONFIG_SELECTOR.split_once('=').unwrap();
    assert_eq!(
        cm["metadata"]["labels"][key], value,
        "the plugin's selector"
    );
    let text = cm["data"][settings::EXTENDER_CONFIG_KEY].as_str().unwrap();
    let found =
        settings::pick(&[("vramslice-system/vramslice-scheduler".into(), text.into())]).unwrap();
    let config = vramslice_extender::Config::parse(text, "chart").unwrap();
    let (ledger, warning) = settings::resolve(None, None, Some(Ok(found))).unwrap();
    assert_eq!(warning, None);
    assert_eq!(ledger.headroom_bytes, config.headroom_bytes);
    assert_eq!(ledger.staleness, config.staleness);
}

#[test]
fn preload_file_names_the_path_allocate_mounts() {
    let docs = documents();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let script = ds["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
        .as_str()
        .unwrap();
    let want = vramslice_core::node::allocation::preload_file_content();
    assert!(
        script.contains(&format!("printf '%s\\n' {}", want.trim())),
        "{script}"
    );
}

#[test]
fn every_object_is_namespaced_to_the_release_or_cluster_scoped() {
    let cluster_scoped = [
        "ClusterRole",
        "ClusterRoleBinding",
        "FlowSchema",
        "MutatingWebhookConfiguration",
        "Namespace",
        "DeviceClass",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    for d in documents()
        .into_iter()
        .chain(documents_of("dra/vramslice.yaml"))
    {
        let kind = d["kind"].as_str().unwrap();
        let ns = d["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&kind) {
            assert!(ns.is_none(), "{kind} must not carry a namespace");
        } else if kind == "RoleBinding" && ns == Some("kube-system") {
            // kube-scheduler reads extension-apiserver-authentication there.
            assert_eq!(
                d["roleRef"]["name"],
                "extension-apiserver-authentication-reader"
            );
        } else {
            assert_eq!(
                ns,
                Some("vramslice-system"),
                "{kind} {}",
                d["metadata"]["name"]
            );
        }
    }
}

// DRA mode (manifests/dra/vramslice.yaml, the chart with `mode: dra`).

#[test]
fn device_plugin_accepts_the_rendered_dra_config_and_the_daemonset_mounts_its_paths() {
    let docs = documents_of("dra/vramslice.yaml");
    let data = config_map(&docs, "vramslice-device-plugin");
    let text = data["device-plugin.yaml"].as_str().unwrap();
    let settings = vramslice_device_plugin::config::Settings::from_yaml(
        text,
        "chart (dra)",
        Some("gpu-node-1".into()),
    )
    .unwrap_or_else(|e| panic!("the plugin rejects the chart's dra config: {e}\n{text}"));
    assert_eq!(settings.mode, vramslice_device_plugin::config::Mode::Dra);
    // One unit by default.
    assert_eq!(settings.dra.publish_threshold_bytes, 1 << 30);

    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let mounts: Vec<&str> = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let mounted = |path: &std::path::Path| mounts.iter().any(|m| path.starts_with(m));
    for path in [
        &settings.dra.registry_dir,
        &settings.dra.plugin_dir,
        &settings.dra.cdi_dir,
        &settings.dra.checkpoint,
        &settings.allocation.accounting_root,
    ] {
        assert!(
            mounted(path),
            "{} is not under a mount: {mounts:?}",
            path.display()
        );
    }
    assert!(
        !mounts.iter().any(|m| m.ends_with("/device-plugins")),
        "dra mode mounts no device-plugins directory: {mounts:?}"
    );
}

#[test]
fn dra_rendering_has_the_device_class_and_no_extender() {
    let docs = documents_of("dra/vramslice.yaml");
    let class = docs
        .iter()
        .find(|d| d["kind"] == "DeviceClass")
        .expect("DeviceClass rendered");
    assert_eq!(class["apiVersion"], "resource.k8s.io/v1");
    assert_eq!(
        class["metadata"]["name"],
        vramslice_core::names::DRA_DEVICE_CLASS
    );
    assert_eq!(
        class["spec"]["selectors"][0]["cel"]["expression"],
        format!(
            "device.driver == \"{0}\" && device.attributes[\"{0}\"].healthy",
            vramslice_core::names::DRA_DRIVER
        )
    );
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            kind != "MutatingWebhookConfiguration" && kind != "Deployment",
            "{kind} {name} rendered in dra mode"
        );
        assert!(
            !name.contains("scheduler") && !name.contains("webhook"),
            "{kind} {name}"
        );
    }
}
