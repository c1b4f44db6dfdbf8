//! Publishing: the real plugin binary with a kubeconfig pointing at a loopback API server and a
//! PodResources server, writing the node's GpuNode (create with owner, then status updates only
//! when the publish rule says so), plus the metrics endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{FakeApi, Node, Plugin, http_get, start_pod_resources, wait_for, write_atomic};
use serde_json::{Value, json};
use vramslice_device_plugin::proto::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources,
};

const GIB: u64 = 1 << 30;
const UID_BATCH: &str = "0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0";

fn fake_file(web_used: &str) -> String {
    format!(
        "gpus:
  - uuid: GPU-aaaa
    index: 0
    model: Fake H100
    total: 80Gi
    used: 10Gi
    processes:
      - pid: 100
        used: {web_used}
        podUid: uid-web
      - pid: 200
        used: 1Gi
      - pid: 300
        used: 512Mi
  - uuid: GPU-bbbb
    index: 1
    total: 24Gi
    healthy: false
    unhealthyReason: XID 79
"
    )
}

fn container(name: &str, resource: &str, ids: &[&str]) -> ContainerResources {
    ContainerResources {
        name: name.into(),
        devices: vec![ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        }],
        ..Default::default()
    }
}

fn api_answer(method: &str, uri: &str, n: usize) -> (u16, Value) {
    let gpunode = json!({"apiVersion": "vramslice.io/v1alpha1", "kind": "GpuNode",
        "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}});
    match (method, uri) {
        ("GET", u) if u.starts_with("/api/v1/pods") => (
            200,
            json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                "items": [
                    {"metadata": {"name": "web", "namespace": "ml", "uid": "uid-web"}},
                    {"metadata": {"name": "batch", "namespace": "ml", "uid": UID_BATCH}}
                ]
            }),
        ),
        ("GET", "/api/v1/nodes/node-a") => (
            200,
            json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "node-uid-1"}
            }),
        ),
        ("PATCH", "/apis/vramslice.io/v1alpha1/gpunodes/node-a/status?")
        | ("PATCH", "/apis/vramslice.io/v1alpha1/gpunodes/node-a/status")
            if n == 0 =>
        {
            (
                404,
                json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "gpunodes.vramslice.io \"node-a\" not found", "reason": "NotFound", "code": 404
                }),
            )
        }
        ("PATCH", _) => (200, gpunode),
        ("POST", _) => (201, gpunode),
        _ => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        ),
    }
}

fn status_patches(api: &FakeApi) -> Vec<Value> {
    api.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| {
            c.line
                .starts_with("PATCH /apis/vramslice.io/v1alpha1/gpunodes/node-a/status")
        })
        .map(|c| c.body.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_gpunode_with_owner_allocations_and_usage_only_on_change() {
    let api = FakeApi::start_with(api_answer).await;
    let proc_root = tempfile::tempdir().unwrap();
    // PID 200 belongs to pod "batch" (systemd cgroup driver); PID 300 to no pod.
    std::fs::create_dir_all(proc_root.path().join("200")).unwrap();
    std::fs::write(
        proc_root.path().join("200/cgroup"),
        format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-abc.scope\n", UID_BATCH.replace('-', "_")),
    )
    .unwrap();
    std::fs::create_dir_all(proc_root.path().join("300")).unwrap();
    std::fs::write(
        proc_root.path().join("300/cgroup"),
        "0::/system.slice/sshd.service\n",
    )
    .unwrap();

    let node = Node::new(
        &[("GPU-aaaa", "80Gi", true)],
        &format!(
            "nodeName: node-a\nprocRoot: {}\npublish: {{ thresholdBytes: 256Mi, heartbeat: 30s, minInterval: 0s }}",
            proc_root.path().display()
        ),
    );
    write_atomic(&node.fake_file, &fake_file("2Gi"));
    let _pod_resources = start_pod_resources(
        &node.pod_resources_socket(),
        ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "web".into(),
                    namespace: "ml".into(),
                    containers: vec![container(
                        "server",
                        "vramslice.io/vram-gib",
                        &["GPU-aaaa::0", "GPU-aaaa::1", "GPU-aaaa::2", "GPU-aaaa::3"],
                    )],
                    ..Default::default()
                },
                PodResources {
                    name: "batch".into(),
                    namespace: "ml".into(),
                    containers: vec![
                        container(
                            "worker",
                            "vramslice.io/vram-gib",
                            &["GPU-aaaa::4", "GPU-aaaa::5"],
                        ),
                        container("other", "nvidia.com/gpu", &["GPU-bbbb"]),
                    ],
                    ..Default::default()
                },
            ],
        },
    )
    .await;
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let plugin = Plugin::start(&node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);

    let status = wait_for("a successful status write", Duration::from_secs(15), || {
        let patches = status_patches(&api);
        (patches.len() >= 2).then(|| patches[1].clone())
    })
    .await;
    let log = plugin.log_text();

    // Created with an owner reference to the Node, between the 404 and the retried patch.
    let calls = api.calls.lock().unwrap().clone();
    let create = calls
        .iter()
        .find(|c| {
            c.line
                .starts_with("POST /apis/vramslice.io/v1alpha1/gpunodes")
        })
        .expect("GpuNode created");
    assert_eq!(create.body["metadata"]["name"], "node-a");
    assert_eq!(create.body["spec"]["nodeName"], "node-a");
    let owner = &create.body["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["apiVersion"].as_str(), owner["kind"].as_str()),
        (Some("v1"), Some("Node"))
    );
    assert_eq!(
        (owner["name"].as_str(), owner["uid"].as_str()),
        (Some("node-a"), Some("node-uid-1"))
    );

    let s = &status["status"];
    assert_eq!(s["unit"], "1Gi", "{log}");
    assert_eq!(s["resourceName"], "vramslice.io/vram-gib");
    assert!(
        s["observedAt"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{s}"
    );
    let gpus = s["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    let a = &gpus[0];
    assert_eq!(a["uuid"], "GPU-aaaa");
    assert_eq!(a["totalBytes"], 80 * GIB);
    assert_eq!(a["usedBytes"], 10 * GIB);
    assert_eq!(a["freeBytes"], 70 * GIB);
    assert_eq!(a["units"], 80);
    assert_eq!(a["allocatedUnits"], 6);
    assert_eq!(a["healthy"], true);
    assert_eq!(
        a["pods"],
        json!([
            {"namespace": "ml", "name": "batch", "uid": UID_BATCH, "allocatedUnits": 2, "limitBytes": 2 * GIB, "usedBytes": GIB},
            {"namespace": "ml", "name": "web", "uid": "uid-web", "allocatedUnits": 4, "limitBytes": 4 * GIB, "usedBytes": 2 * GIB},
        ])
    );
    assert_eq!(
        a["processesWithoutPod"],
        json!([{"pid": 300, "usedBytes": 512 << 20}])
    );
    let b = &gpus[1];
    assert_eq!(
        (b["healthy"].as_bool(), b["healthReason"].as_str()),
        (Some(false), Some("XID 79"))
    );
    assert_eq!(
        s["summary"],
        json!({"gpus": 2, "total": "104 GiB", "liveFree": "70 GiB", "allocated": "6 GiB", "healthy": "1/2"})
    );

    // Nothing changes: no further writes (poll every 100 ms, heartbeat 30 s).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(status_patches(&api).len(), 2, "wrote without a change");

    // A change above the threshold is published promptly.
    write_atomic(
        &node.fake_file,
        &fake_file("3Gi").replace("used: 10Gi", "used: 11Gi"),
    );
    let status = wait_for("the usage update", Duration::from_secs(3), || {
        status_patches(&api).get(2).cloned()
    })
    .await;
    assert_eq!(status["status"]["gpus"][0]["usedBytes"], 11 * GIB);
    assert_eq!(status["status"]["gpus"][0]["pods"][1]["usedBytes"], 3 * GIB);
    // And a change below it is not.
    // (11 GiB + 100 MiB: below the 256 MiB threshold.)
    write_atomic(
        &node.fake_file,
        &fake_file("3Gi").replace("used: 10Gi", "used: 11364Mi"),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        status_patches(&api).len(),
        3,
        "a sub-threshold change was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_report_gpus_allocations_and_registration() {
    let node = Node::new(&[("GPU-aaaa", "80Gi", true)], "");
    write_atomic(&node.fake_file, &fake_file("2Gi"));
    let _pod_resources = start_pod_resources(
        &node.pod_resources_socket(),
        ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "web".into(),
                namespace: "ml".into(),
                containers: vec![container(
                    "server",
                    "vramslice.io/vram-gib",
                    &["GPU-aaaa::0", "GPU-aaaa::1"],
                )],
                ..Default::default()
            }],
        },
    )
    .await;
    let kubelet = common::TestKubelet::start(&node.socket_dir).await;
    let plugin = Plugin::start(&node, &[]);
    wait_for("registration", Duration::from_secs(15), || {
        (!kubelet.registrations().is_empty()).then_some(())
    })
    .await;
    let addr: String = wait_for(
        "the metrics address in the log",
        Duration::from_secs(5),
        || plugin.metrics_addr(),
    )
    .await;
    let text = wait_for(
        "allocated bytes in /metrics",
        Duration::from_secs(5),
        || {
            let text = http_get(&addr, "/metrics")?;
            text.contains("vramslice_gpu_allocated_bytes{gpu=\"GPU-aaaa\",index=\"0\"} 2147483648")
                .then_some(text)
        },
    )
    .await;
    for want in [
        "vramslice_gpu_total_bytes{gpu=\"GPU-aaaa\",index=\"0\"} 85899345920",
        "vramslice_gpu_used_bytes{gpu=\"GPU-aaaa\",index=\"0\"} 10737418240",
        "vramslice_gpu_free_bytes{gpu=\"GPU-aaaa\",index=\"0\"} 75161927680",
        "vramslice_gpu_healthy{gpu=\"GPU-bbbb\",index=\"1\"} 0",
        "vramslice_plugin_registered 1",
        "vramslice_kubelet_restarts_total 0",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    let health = http_get(&addr, "/healthz").unwrap();
    assert!(health.starts_with("ok"), "{health}");
}

/// A bare HTTP/1.0 GET returning the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_back_off_instead_of_retrying_every_poll() {
    let api = FakeApi::start_with(|method, _, _| match method {
        "GET" => (200, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []})),
        _ => (500, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd is sad", "reason": "InternalError", "code": 500})),
    })
    .await;
    let node = Node::new(&[("GPU-aaaa", "80Gi", true)], "nodeName: node-a");
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let plugin = Plugin::start(&node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    wait_for("a first write attempt", Duration::from_secs(15), || {
        (!status_patches(&api).is_empty()).then_some(())
    })
    .await;
    // Poll every 100 ms for 2.5 s: without backoff ~25 attempts; with 1 s, 2 s pauses at most 3.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let attempts = status_patches(&api).len();
    assert!(
        (2..=3).contains(&attempts),
        "{attempts} write attempts\n{}",
        plugin.log_text()
    );
    assert!(plugin.log_text().contains("cannot write GpuNode status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_allocations_lose_their_accounting_files_after_the_grace_period() {
    let node = Node::new(&[], "accountingSweepAfter: 1s");
    write_atomic(&node.fake_file, &fake_file("2Gi"));
    let key = |ids: &[&str]| vramslice_core::node::allocation::allocation_key_for_ids(ids).unwrap();
    let live = key(&["GPU-aaaa::0", "GPU-aaaa::1", "GPU-aaaa::2", "GPU-aaaa::3"]);
    let ended = key(&["GPU-aaaa::7"]);
    std::fs::create_dir_all(&node.accounting).unwrap();
    for k in [&live, &ended] {
        std::fs::create_dir(node.accounting.join(k)).unwrap();
        std::fs::write(
            node.accounting.join(k).join("vramslice-accounting.v1"),
            b"x",
        )
        .unwrap();
        std::fs::write(node.accounting.join(format!("{k}.limit")), b"limit=1\n").unwrap();
    }
    std::fs::write(node.accounting.join("keep.me"), b"not an allocation").unwrap();
    let _pod_resources = start_pod_resources(
        &node.pod_resources_socket(),
        ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "web".into(),
                namespace: "ml".into(),
                containers: vec![container(
                    "server",
                    "vramslice.io/vram-gib",
                    &["GPU-aaaa::0", "GPU-aaaa::1", "GPU-aaaa::2", "GPU-aaaa::3"],
                )],
                ..Default::default()
            }],
        },
    )
    .await;
    let _plugin = Plugin::start(&node, &[]);
    wait_for(
        "the ended allocation's files to be deleted",
        Duration::from_secs(20),
        || {
            (!node.accounting.join(&ended).exists()
                && !node.accounting.join(format!("{ended}.limit")).exists())
            .then_some(())
        },
    )
    .await;
    // The kubelet's live allocation and files that are not allocations stay.
    assert!(
        node.accounting
            .join(&live)
            .join("vramslice-accounting.v1")
            .exists()
    );
    assert!(node.accounting.join(format!("{live}.limit")).exists());
    assert!(node.accounting.join("keep.me").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_while_the_gpus_cannot_be_read_keep_the_readings_time() {
    // Regression: observedAt was the write's time, so a reading frozen by a failing backend was
    // republished as fresh at every heartbeat and the extender's staleness rule never fired.
    let api = FakeApi::start_with(api_answer).await;
    let node = Node::new(
        &[("GPU-aaaa", "80Gi", true)],
        "nodeName: node-a\npublish: { heartbeat: 1s }",
    );
    let kubeconfig = api.kubeconfig(node.tmp.path());
    let plugin = Plugin::start(&node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    wait_for("a successful status write", Duration::from_secs(15), || {
        (status_patches(&api).len() >= 2).then_some(())
    })
    .await;
    write_atomic(&node.fake_file, "gpus: [this is not a GPU list");
    let written = status_patches(&api).len();
    let frozen = wait_for(
        "two heartbeats after the reads fail",
        Duration::from_secs(10),
        || {
            let patches = status_patches(&api);
            (patches.len() >= written + 3).then(|| patches[written + 1..].to_vec())
        },
    )
    .await;
    let times: Vec<&str> = frozen
        .iter()
        .map(|p| p["status"]["observedAt"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] == w[1]),
        "observedAt moved while nothing was read: {times:?}\n{}",
        plugin.log_text()
    );
    assert!(plugin.log_text().contains("cannot read GPUs"));
}
