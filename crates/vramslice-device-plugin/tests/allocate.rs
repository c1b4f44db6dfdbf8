//! Allocate and GetPreferredAllocation of the real plugin binary, called over its socket as the
//! kubelet calls them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{FakeApi, Node, Plugin, plugin_client, wait_for};
use serde_json::json;
use vramslice_device_plugin::proto::deviceplugin::{
    AllocateRequest, ContainerAllocateRequest, ContainerAllocateResponse,
    ContainerPreferredAllocationRequest, Mount, PreferredAllocationRequest,
};

const TWO_GPUS: &[(&str, &str, bool)] = &[("GPU-aaaa", "80Gi", true), ("GPU-bbbb", "24Gi", true)];
const GUARD_IN_CONTAINER: &str = "/usr/local/vramslice/lib/libvramslice_guard.so";
const ACCOUNTING_IN_CONTAINER: &str = "/var/run/vramslice/accounting";
const LIMIT_IN_CONTAINER: &str = "/var/run/vramslice/limit";

fn ids(gpu: &str, units: std::ops::Range<u64>) -> Vec<String> {
    units.map(|k| format!("{gpu}::{k}")).collect()
}

async fn allocate(
    client: &mut vramslice_device_plugin::proto::deviceplugin::device_plugin_client::DevicePluginClient<tonic::transport::Channel>,
    devices: Vec<String>,
) -> Result<ContainerAllocateResponse, tonic::Status> {
    let response = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: devices,
            }],
        })
        .await?
        .into_inner();
    assert_eq!(response.container_responses.len(), 1);
    Ok(response.container_responses.into_iter().next().unwrap())
}

fn mount<'a>(r: &'a ContainerAllocateResponse, container_path: &str) -> Option<&'a Mount> {
    r.mounts.iter().find(|m| m.container_path == container_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_in_ld_preload_env_mode_with_envvar_strategy() {
    let node = Node::new(
        TWO_GPUS,
        "injection:\n  mode: ld-preload-env\n  guardLibraryHostPath: GUARD\n",
    );
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;

    let r = allocate(
        &mut client,
        vec![
            "GPU-bbbb::5".into(),
            "GPU-bbbb::2".into(),
            "GPU-bbbb::9".into(),
        ],
    )
    .await
    .unwrap();
    let want_env: HashMap<String, String> = [
        ("VRAMSLICE_VRAM_LIMIT_BYTES", "3221225472"),
        ("VRAMSLICE_GPU_UUID", "GPU-bbbb"),
        ("NVIDIA_VISIBLE_DEVICES", "GPU-bbbb"),
        ("VRAMSLICE_ACCOUNTING_DIR", ACCOUNTING_IN_CONTAINER),
        ("LD_PRELOAD", GUARD_IN_CONTAINER),
        ("VRAMSLICE_LIMIT_FILE", LIMIT_IN_CONTAINER),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(r.envs, want_env);
    assert!(r.cdi_devices.is_empty());
    let guard = mount(&r, GUARD_IN_CONTAINER).expect("guard mount");
    let placed = node.tmp.path().join("lib/libvramslice_guard.so");
    assert_eq!(guard.host_path, placed.display().to_string());
    assert!(guard.read_only);
    let acct = mount(&r, ACCOUNTING_IN_CONTAINER).expect("accounting mount");
    assert!(!acct.read_only);
    let key = vramslice_core::node::allocation::allocation_key("GPU-bbbb", &[2, 5, 9]);
    assert_eq!(
        acct.host_path,
        node.accounting.join(&key).display().to_string()
    );
    let meta = std::fs::metadata(&acct.host_path).expect("accounting dir created");
    assert!(meta.is_dir());
    // The limit file: beside the writable directory, mounted read-only, written before answering.
    let limit = mount(&r, LIMIT_IN_CONTAINER).expect("limit file mount");
    assert!(limit.read_only);
    assert_eq!(
        limit.host_path,
        node.accounting
            .join(format!("{key}.limit"))
            .display()
            .to_string()
    );
    assert_eq!(
        std::fs::read_to_string(&limit.host_path).unwrap(),
        "limit=3221225472\ngpu=GPU-bbbb\n"
    );
    assert_eq!(r.mounts.len(), 3);
    assert!(mount(&r, "/etc/ld.so.preload").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_refuses_when_the_guard_library_is_not_on_the_node() {
    // A mistyped injection.guardLibraryHostPath: the runtime would mount an empty directory
    // there and the container would run without its limit enforced.
    let node = Node::new(
        TWO_GPUS,
        "injection:\n  mode: ld-preload-env\n  guardLibraryHostPath: /nonexistent/libvramslice_guard.so\n",
    );
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    let err = allocate(&mut client, ids("GPU-aaaa", 0..2))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .contains("the guard library /nonexistent/libvramslice_guard.so (injection.guardLibraryHostPath) cannot be read"),
        "{err:?}"
    );
    // A directory in its place (what the runtime leaves after such a mount) is refused too.
    let node = Node::new(
        TWO_GPUS,
        "injection:\n  mode: ld-preload-env\n  guardLibraryHostPath: GUARD\n",
    );
    let placed = node.tmp.path().join("lib/libvramslice_guard.so");
    std::fs::remove_file(&placed).unwrap();
    std::fs::create_dir(&placed).unwrap();
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    let err = allocate(&mut client, ids("GPU-aaaa", 0..2))
        .await
        .unwrap_err();
    assert!(err.message().contains("is not a file"), "{err:?}");
    // Without injection nothing is mounted, so nothing is needed.
    let node = Node::new(
        TWO_GPUS,
        "injection:\n  mode: none\n  guardLibraryHostPath: /nonexistent/x.so\n",
    );
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    assert!(allocate(&mut client, ids("GPU-aaaa", 0..2)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_allocated_again_get_an_empty_accounting_directory() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::new(TWO_GPUS, "");
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    // What the pod that had these units before left behind: an account, and a FIFO where the
    // guard expects a plain file (opening it would wait forever).
    let key = vramslice_core::node::allocation::allocation_key("GPU-bbbb", &[0, 1]);
    let dir = node.accounting.join(&key);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vramslice-accounting.v1"), b"left behind").unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("vramslice-accounting.v1.slots"))
        .status()
        .unwrap();
    assert!(made.success());
    let r = allocate(&mut client, ids("GPU-bbbb", 0..2)).await.unwrap();
    let acct = mount(&r, ACCOUNTING_IN_CONTAINER).expect("accounting mount");
    assert_eq!(acct.host_path, dir.display().to_string());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o1777);

    // A container restarted after its limit file was swept: the runtime made a directory
    // where the mount's source was. The units are allocated again, with a limit file.
    let key = vramslice_core::node::allocation::allocation_key("GPU-bbbb", &[2, 3]);
    let limit = node.accounting.join(format!("{key}.limit"));
    std::fs::create_dir_all(limit.join("made-by-the-runtime")).unwrap();
    std::fs::create_dir_all(node.accounting.join(format!("{key}.limit.tmp"))).unwrap();
    allocate(&mut client, ids("GPU-bbbb", 2..4)).await.unwrap();
    let text = std::fs::read_to_string(&limit).expect("a limit file, not a directory");
    assert!(text.contains("limit=2147483648"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_in_ld_so_preload_file_mode_with_cdi_strategy() {
    let node = Node::new(
        TWO_GPUS,
        "deviceListStrategy: cdi\ninjection:\n  mode: ld-so-preload-file\n  guardLibraryHostPath: GUARD\n  preloadFileHostPath: PRELOAD\n",
    );
    let preload_path = node.tmp.path().join("ld.so.preload");
    let text = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace("PRELOAD", preload_path.to_str().unwrap());
    std::fs::write(&node.config, text).unwrap();
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;

    let r = allocate(&mut client, ids("GPU-aaaa", 0..6)).await.unwrap();
    assert_eq!(
        r.envs.get("VRAMSLICE_VRAM_LIMIT_BYTES").map(String::as_str),
        Some("6442450944")
    );
    assert_eq!(
        r.envs.get("VRAMSLICE_GPU_UUID").map(String::as_str),
        Some("GPU-aaaa")
    );
    assert_eq!(
        r.envs.get("NVIDIA_VISIBLE_DEVICES"),
        None,
        "CDI replaces the env var"
    );
    assert_eq!(
        r.envs.get("LD_PRELOAD"),
        None,
        "the preload file replaces LD_PRELOAD"
    );
    let cdi: Vec<&str> = r.cdi_devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(cdi, vec!["nvidia.com/gpu=GPU-aaaa"]);
    let file = mount(&r, "/etc/ld.so.preload").expect("preload file mount");
    assert_eq!(file.host_path, preload_path.display().to_string());
    assert!(file.read_only);
    assert!(mount(&r, GUARD_IN_CONTAINER).is_some_and(|m| m.read_only));
    // The plugin writes the preload file: it lists the guard's in-container path.
    let written = wait_for("the preload file", Duration::from_secs(5), || {
        std::fs::read_to_string(&preload_path).ok()
    })
    .await;
    assert_eq!(written, format!("{GUARD_IN_CONTAINER}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_rejects_mixed_gpus_and_unknown_ids_by_name() {
    let node = Node::new(TWO_GPUS, "");
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;

    let refusals: [(&[&str], &str); 4] = [
        (
            &["GPU-aaaa::0", "GPU-aaaa::1", "GPU-aaaa::2", "GPU-bbbb::0"],
            "IDs span GPU-aaaa (3 units) and GPU-bbbb (1 unit): vramslice maps several GPUs only as equal shares",
        ),
        (
            &["GPU-bbbb::24"],
            "device ID GPU-bbbb::24 is unknown: GPU GPU-bbbb advertises units 0..24",
        ),
        (&["GPU-cccc::0"], "GPU GPU-cccc is not on this node"),
        (&["garbage"], "\"garbage\""),
    ];
    for (ids, message) in refusals {
        let err = allocate(&mut client, ids.iter().map(|s| s.to_string()).collect())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{ids:?}");
        assert!(
            err.message().contains(message),
            "{ids:?}: {}",
            err.message()
        );
    }
    // Nothing was created for refused requests.
    assert!(
        !node.accounting.exists()
            || std::fs::read_dir(&node.accounting)
                .unwrap()
                .next()
                .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_maps_equal_shares_of_two_gpus_to_per_gpu_limits() {
    let node = Node::new(TWO_GPUS, "");
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    let ids_given: Vec<String> = ["GPU-bbbb::4", "GPU-aaaa::1", "GPU-bbbb::3", "GPU-aaaa::0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let r = allocate(&mut client, ids_given.clone()).await.unwrap();
    let env = |k: &str| r.envs.get(k).map(String::as_str);
    assert_eq!(
        env("VRAMSLICE_VRAM_LIMITS"),
        Some("GPU-aaaa:2147483648,GPU-bbbb:2147483648")
    );
    assert_eq!(env("NVIDIA_VISIBLE_DEVICES"), Some("GPU-aaaa,GPU-bbbb"));
    assert_eq!(env("VRAMSLICE_VRAM_LIMIT_BYTES"), Some("4294967296"));
    assert_eq!(env("VRAMSLICE_GPU_UUID"), None);
    assert_eq!(
        env("VRAMSLICE_ACCOUNTING_DIR"),
        Some(ACCOUNTING_IN_CONTAINER)
    );
    // The accounting directory is named from the IDs alone, so PodResources maps back to it.
    let key = vramslice_core::node::allocation::allocation_key_for_ids(&ids_given).unwrap();
    let acct = mount(&r, ACCOUNTING_IN_CONTAINER).expect("accounting mount");
    assert_eq!(
        acct.host_path,
        node.accounting.join(&key).display().to_string()
    );
    assert!(std::fs::metadata(&acct.host_path).unwrap().is_dir());
    let limit = mount(&r, LIMIT_IN_CONTAINER).expect("limit file mount");
    assert!(limit.read_only);
    assert_eq!(
        std::fs::read_to_string(&limit.host_path).unwrap(),
        "limits=GPU-aaaa:2147483648,GPU-bbbb:2147483648\n"
    );
}

fn preferred_request(size: i32) -> PreferredAllocationRequest {
    let mut available = ids("GPU-aaaa", 0..80);
    available.extend(ids("GPU-bbbb", 0..24));
    PreferredAllocationRequest {
        container_requests: vec![ContainerPreferredAllocationRequest {
            available_device_i_ds: available,
            must_include_device_i_ds: Vec::new(),
            allocation_size: size,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_binpacks_without_the_api() {
    let node = Node::new(TWO_GPUS, "");
    let _plugin = Plugin::start(&node, &[]);
    let mut client = plugin_client(&node).await;
    let answer = client
        .get_preferred_allocation(preferred_request(4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.container_responses.len(), 1);
    // Binpack: the GPU with fewer available units that still fits.
    assert_eq!(
        answer.container_responses[0].device_i_ds,
        ids("GPU-bbbb", 0..4)
    );
}

fn pod(name: &str, gpu: &str, units: u32, phase: &str, assigned_at: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "namespace": "ml", "uid": format!("uid-{name}"),
            "annotations": {"vramslice.io/gpu-uuid": gpu, "vramslice.io/assigned-at": assigned_at}
        },
        "spec": {"nodeName": "node-a", "schedulerName": "vramslice-scheduler", "containers": [{
            "name": "server", "image": "vllm",
            "resources": {"limits": {"vramslice.io/vram-gib": units.to_string()}}
        }]},
        "status": {"phase": phase}
    })
}

/// The plugin's consistent LIST of node-a's pods (its watch cache lists with `limit=500`).
const CONSISTENT_LIST: &str = "GET /api/v1/pods?&fieldSelector=spec.nodeName%3Dnode-a";

fn pod_list(items: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items})
}

/// The IDs the plugin prefers for one container of `size` units.
async fn preferred_ids(
    client: &mut vramslice_device_plugin::proto::deviceplugin::device_plugin_client::DevicePluginClient<
        tonic::transport::Channel,
    >,
    size: i32,
) -> Vec<String> {
    let answer = client
        .get_preferred_allocation(preferred_request(size))
        .await
        .unwrap()
        .into_inner();
    answer.container_responses[0].device_i_ds.clone()
}

/// Starts a plugin for node-a against `api` and waits until its pod watch is open (so its
/// cache holds what the watch's list returned).
async fn plugin_with_pod_cache(api: &FakeApi, node: &Node) -> Plugin {
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let plugin = Plugin::start(
        node,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--no-publish"],
    );
    let requests = Arc::clone(&api.requests);
    wait_for("the plugin's pod watch", Duration::from_secs(10), || {
        requests
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("GET /api/v1/pods?") && common::is_watch(l))
            .then_some(())
    })
    .await;
    plugin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_prefers_the_pending_pods_assigned_gpu() {
    let api = FakeApi::start(pod_list(vec![
        pod(
            "other-size",
            "GPU-bbbb",
            6,
            "Pending",
            "2026-01-01T00:00:00Z",
        ),
        pod("mine", "GPU-aaaa", 4, "Pending", "2026-01-01T00:00:01Z"),
    ]))
    .await;
    let node = Node::new(TWO_GPUS, "nodeName: node-a");
    let plugin = plugin_with_pod_cache(&api, &node).await;
    let mut client = plugin_client(&node).await;

    // The pod waiting for 4 units is in the watch cache: each answer reads it, no LIST.
    for _ in 0..3 {
        let chosen = preferred_ids(&mut client, 4).await;
        assert_eq!(
            chosen,
            ids("GPU-aaaa", 0..4),
            "plugin log:\n{}",
            plugin.log_text()
        );
    }
    assert_eq!(api.count(CONSISTENT_LIST), 0, "{:?}", api.requests);
    // --no-publish: no GpuNode writes, only the pod list and watch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests: Vec<String> = api.requests.lock().unwrap().iter().cloned().collect();
    assert!(
        requests.iter().all(|r| r.starts_with("GET /api/v1/pods?")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:?}"
    );

    // A size no pending pod asks for: the cache cannot know the pod, so one LIST confirms,
    // then binpacking, not the other pod's GPU.
    let answer = client
        .get_preferred_allocation(preferred_request(5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.container_responses[0].device_i_ds,
        ids("GPU-bbbb", 0..5)
    );
    assert_eq!(api.count(CONSISTENT_LIST), 1, "{:?}", api.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_lists_when_the_pod_cache_is_behind() {
    // The watch's list predates the pod being started; the API server has it by now.
    let api = FakeApi::start_with(|_, path, _| {
        let mut items = vec![pod(
            "other-size",
            "GPU-bbbb",
            6,
            "Pending",
            "2026-01-01T00:00:00Z",
        )];
        if !path.contains("limit=") {
            items.push(pod("new", "GPU-aaaa", 4, "Pending", "2026-01-01T00:00:01Z"));
        }
        (200, pod_list(items))
    })
    .await;
    let node = Node::new(TWO_GPUS, "nodeName: node-a");
    let plugin = plugin_with_pod_cache(&api, &node).await;
    let mut client = plugin_client(&node).await;
    let chosen = preferred_ids(&mut client, 4).await;
    assert_eq!(
        chosen,
        ids("GPU-aaaa", 0..4),
        "plugin log:\n{}",
        plugin.log_text()
    );
    assert_eq!(api.count(CONSISTENT_LIST), 1, "{:?}", api.requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_splits_a_spanning_pods_units_over_its_gpus() {
    let mut tp = pod(
        "tp",
        "GPU-bbbb,GPU-aaaa",
        8,
        "Pending",
        "2026-01-01T00:00:01Z",
    );
    tp["metadata"]["annotations"]["vramslice.io/gpus"] = json!("2");
    let api = FakeApi::start(pod_list(vec![tp])).await;
    let node = Node::new(TWO_GPUS, "nodeName: node-a");
    let plugin = plugin_with_pod_cache(&api, &node).await;
    let mut client = plugin_client(&node).await;
    let mut want = ids("GPU-aaaa", 0..4);
    want.extend(ids("GPU-bbbb", 0..4));
    assert_eq!(
        preferred_ids(&mut client, 8).await,
        want,
        "plugin log:\n{}",
        plugin.log_text()
    );
    // ... which Allocate accepts as two equal shares.
    let r = allocate(&mut client, want).await.unwrap();
    assert_eq!(
        r.envs.get("VRAMSLICE_VRAM_LIMITS").map(String::as_str),
        Some("GPU-aaaa:4294967296,GPU-bbbb:4294967296")
    );
}
