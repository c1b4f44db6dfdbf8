//! The watchdog, end to end: the real plugin binary over the fake backend, a loopback API server
//! and a PodResources server. A container whose measured usage passes its limit gets a Warning
//! Event (the POST the API server received), the breach metric and — in `kill-process` mode —
//! exactly its own process killed: a real child process this test spawned, mapped to the pod
//! through a fake cgroup file under a temporary proc root. A neighbour's process survives, a
//! GPU process of no pod is reported, and a tampered or damaged accounting file is handled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{FakeApi, Node, Plugin, http_get, start_pod_resources, wait_for, write_atomic};
use serde_json::{Value, json};
use vramslice_core::container::accounting::{self, ACCOUNTING_FILE_NAME, header};
use vramslice_core::node::allocation::allocation_key_for_ids;
use vramslice_device_plugin::proto::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesResponse, PodResources,
};

const GIB: u64 = 1 << 30;
const UID_GREEDY: &str = "1a1a1a1a-0000-4000-8000-000000000001";
const UID_CALM: &str = "2b2b2b2b-0000-4000-8000-000000000002";
const STRAY_PID: u32 = 4_194_000;

fn pod(name: &str, ids: &[&str]) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: "ml".into(),
        containers: vec![ContainerResources {
            name: "main".into(),
            devices: vec![ContainerDevices {
                resource_name: "vramslice.io/vram-gib".into(),
                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                topology: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn api_answer(method: &str, uri: &str, _n: usize) -> (u16, Value) {
    match (method, uri) {
        ("GET", u) if u.starts_with("/api/v1/pods") => (
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
            "items": [
                {"metadata": {"name": "greedy", "namespace": "ml", "uid": UID_GREEDY}},
                {"metadata": {"name": "calm", "namespace": "ml", "uid": UID_CALM}}
            ]}),
        ),
        ("GET", "/api/v1/nodes/node-a") => (
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "n1"}}),
        ),
        ("POST", u) if u.starts_with("/api/v1/namespaces/ml/events") => (
            201,
            json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e", "namespace": "ml"},
                "involvedObject": {}}),
        ),
        ("POST", u) if u.contains("/eviction") => (
            201,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
        ),
        (_, u) if u.starts_with("/apis/vramslice.io/") => (
            200,
            json!({"apiVersion": "vramslice.io/v1alpha1", "kind": "GpuNode",
                "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}}),
        ),
        _ => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        ),
    }
}

fn posts(api: &FakeApi, prefix: &str) -> Vec<Value> {
    api.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.line.starts_with(&format!("POST {prefix}")))
        .map(|c| c.body.clone())
        .collect()
}

fn sleeper() -> Child {
    Command::new("sleep").arg("600").spawn().unwrap()
}

/// `pid` in the fake proc root: its cgroup file names pod `uid`; its stat file is the real one,
/// so the plugin can tell a signal to `pid` reaches that process.
fn cgroup_of(root: &std::path::Path, pid: u32, uid: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(format!("/proc/{pid}/stat"), dir.join("stat")).unwrap();
    std::fs::write(
        dir.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{:064x}.scope\n",
            uid.replace('-', "_"),
            pid
        ),
    )
    .unwrap();
}

struct Scene {
    api: FakeApi,
    node: Node,
    greedy: Child,
    calm: Child,
    _proc_root: tempfile::TempDir,
    _pod_resources: tokio::task::JoinHandle<()>,
}

async fn scene(action: &str, greedy_used: &str) -> Scene {
    let api = FakeApi::start_with(api_answer).await;
    let proc_root = tempfile::tempdir().unwrap();
    let greedy = sleeper();
    let calm = sleeper();
    cgroup_of(proc_root.path(), greedy.id(), UID_GREEDY);
    cgroup_of(proc_root.path(), calm.id(), UID_CALM);
    let node = Node::new(
        &[("GPU-aaaa", "80Gi", true)],
        &format!(
            "nodeName: node-a\nprocRoot: {}\nwatchdog: {{ tolerance: 64Mi, grace: 0s, action: {action} }}",
            proc_root.path().display()
        ),
    );
    // PIDs carry no podUid: the plugin maps them through the proc root, as with NVML.
    write_atomic(
        &node.fake_file,
        &format!(
            "gpus:\n  - uuid: GPU-aaaa\n    total: 80Gi\n    processes:\n      - pid: {}\n        used: {greedy_used}\n      - pid: {}\n        used: 512Mi\n      - pid: {STRAY_PID}\n        used: 1Gi\n",
            greedy.id(),
            calm.id()
        ),
    );
    // calm's accounting file claims nothing (tampered); greedy's is garbage (damaged).
    let calm_ids = ["GPU-aaaa::2"];
    let calm_dir = node
        .accounting
        .join(allocation_key_for_ids(&calm_ids).unwrap());
    std::fs::create_dir_all(&calm_dir).unwrap();
    let mut image = accounting::initial_image(GIB, "GPU-aaaa", 4);
    image[header::USED * 8..header::USED * 8 + 8].copy_from_slice(&0u64.to_le_bytes());
    std::fs::write(calm_dir.join(ACCOUNTING_FILE_NAME), image).unwrap();
    let greedy_ids = ["GPU-aaaa::0", "GPU-aaaa::1"];
    let greedy_dir = node
        .accounting
        .join(allocation_key_for_ids(&greedy_ids).unwrap());
    std::fs::create_dir_all(&greedy_dir).unwrap();
    std::fs::write(greedy_dir.join(ACCOUNTING_FILE_NAME), b"\xff garbage").unwrap();

    let pod_resources = start_pod_resources(
        &node.pod_resources_socket(),
        ListPodResourcesResponse {
            pod_resources: vec![pod("greedy", &greedy_ids), pod("calm", &calm_ids)],
        },
    )
    .await;
    Scene {
        api,
        node,
        greedy,
        calm,
        _proc_root: proc_root,
        _pod_resources: pod_resources,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_process_mode_kills_exactly_the_offending_process_and_reports_it() {
    let mut s = scene("kill-process", "3Gi").await;
    let kubeconfig = s.api.kubeconfig(s.node.tmp.path());
    let plugin = Plugin::start(&s.node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let greedy_pid = s.greedy.id();

    let status = wait_for(
        "the greedy process to be killed",
        Duration::from_secs(20),
        || s.greedy.try_wait().unwrap(),
    )
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "SIGKILL\n{}", plugin.log_text());
    assert!(
        s.calm.try_wait().unwrap().is_none(),
        "the neighbour within its limit survives"
    );

    let events = wait_for("the watchdog's Events", Duration::from_secs(10), || {
        let e = posts(&s.api, "/api/v1/namespaces/ml/events");
        (e.len() >= 2).then_some(e)
    })
    .await;
    let started = events
        .iter()
        .find(|e| e["reason"] == "VramLimitExceeded")
        .expect("breach Event");
    assert_eq!(started["type"], "Warning");
    assert_eq!(started["involvedObject"]["kind"], "Pod");
    assert_eq!(started["involvedObject"]["name"], "greedy");
    assert_eq!(started["involvedObject"]["namespace"], "ml");
    assert_eq!(started["involvedObject"]["uid"], UID_GREEDY);
    let msg = started["message"].as_str().unwrap();
    assert!(
        msg.contains("3221225472 bytes") && msg.contains("2147483648 bytes"),
        "{msg}"
    );
    assert!(
        msg.contains("GPU-aaaa") && msg.contains("action kill-process"),
        "{msg}"
    );
    let killed = events
        .iter()
        .find(|e| e["reason"] == "VramWatchdogKilledProcess")
        .expect("kill Event");
    assert!(
        killed["message"]
            .as_str()
            .unwrap()
            .contains(&format!("killed PIDs [{greedy_pid}]")),
        "{killed}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["involvedObject"]["name"] == "greedy"),
        "no Event about the calm pod: {events:?}"
    );

    let addr = wait_for("metrics address", Duration::from_secs(5), || {
        plugin.metrics_addr()
    })
    .await;
    let text = wait_for("watchdog metrics", Duration::from_secs(5), || {
        let t = http_get(&addr, "/metrics")?;
        t.contains("vramslice_watchdog_breaches_total{action=\"kill-process\"}")
            .then_some(t)
    })
    .await;
    for want in [
        "vramslice_pod_used_bytes{namespace=\"ml\",pod=\"greedy\",gpu=\"GPU-aaaa\"} 3221225472",
        "vramslice_pod_limit_bytes{namespace=\"ml\",pod=\"greedy\",gpu=\"GPU-aaaa\"} 2147483648",
        "vramslice_pod_used_bytes{namespace=\"ml\",pod=\"calm\",gpu=\"GPU-aaaa\"} 536870912",
        // calm's accounting file says 0 while NVML measures 512 MiB: untrusted.
        "vramslice_pod_self_report_trusted{namespace=\"ml\",pod=\"calm\",gpu=\"GPU-aaaa\"} 0",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    // greedy's damaged accounting file is logged, not fatal; the stray process is reported.
    let log = plugin.log_text();
    assert!(log.contains("accounting file is damaged"), "{log}");
    assert!(log.contains("disagrees with NVML"), "{log}");
    // The stray process is logged on the poll that first sees it with the pods known, which may
    // come after the breach the checks above waited for.
    wait_for("the stray process logged", Duration::from_secs(10), || {
        let log = plugin.log_text();
        (log.contains("belongs to no pod") && log.contains(&STRAY_PID.to_string())).then_some(())
    })
    .await;
    let status_has_stray = wait_for(
        "processesWithoutPod in the GpuNode status",
        Duration::from_secs(10),
        || {
            let calls = s.api.calls.lock().unwrap().clone();
            calls
                .iter()
                .filter(|c| {
                    c.line
                        .starts_with("PATCH /apis/vramslice.io/v1alpha1/gpunodes/node-a/status")
                })
                .any(|c| {
                    c.body["status"]["gpus"][0]["processesWithoutPod"]
                        == json!([{"pid": STRAY_PID, "usedBytes": GIB}])
                })
                .then_some(())
        },
    )
    .await;
    let () = status_has_stray;
    // The same verdict reaches the GpuNode status, where the extender and kubectl read it.
    wait_for(
        "selfReportTrusted: false for calm in the GpuNode status",
        Duration::from_secs(10),
        || {
            let calls = s.api.calls.lock().unwrap().clone();
            calls
                .iter()
                .filter(|c| {
                    c.line
                        .starts_with("PATCH /apis/vramslice.io/v1alpha1/gpunodes/node-a/status")
                })
                .any(|c| {
                    c.body["status"]["gpus"][0]["pods"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["name"] == "calm" && p["selfReportTrusted"] == json!(false))
                })
                .then_some(())
        },
    )
    .await;
    let _ = s.calm.kill();
    let _ = s.calm.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_process_mode_signals_no_pid_its_proc_root_shows_as_another_process() {
    // procRoot from another PID namespace (/host/proc without hostPID): the same number there
    // is another process here. Played by a stat file whose start time is not the child's.
    let mut s = scene("kill-process", "3Gi").await;
    let stat = s
        ._proc_root
        .path()
        .join(s.greedy.id().to_string())
        .join("stat");
    let real = std::fs::read_to_string(&stat).unwrap();
    let (name, fields) = real.split_at(real.rfind(')').unwrap() + 1);
    let mut fields: Vec<String> = fields.split_whitespace().map(String::from).collect();
    fields[19] = (fields[19].parse::<u64>().unwrap() + 1).to_string(); // field 22: start time
    std::fs::write(&stat, format!("{name} {}\n", fields.join(" "))).unwrap();
    let kubeconfig = s.api.kubeconfig(s.node.tmp.path());
    let plugin = Plugin::start(&s.node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let event = wait_for("the kill Event", Duration::from_secs(20), || {
        posts(&s.api, "/api/v1/namespaces/ml/events")
            .into_iter()
            .find(|e| e["reason"] == "VramWatchdogKilledProcess")
    })
    .await;
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("killed PIDs []"),
        "{event}"
    );
    assert!(
        s.greedy.try_wait().unwrap().is_none(),
        "not signalled\n{}",
        plugin.log_text()
    );
    assert!(
        plugin
            .log_text()
            .contains("procRoot is not this plugin's PID namespace")
    );
    for c in [&mut s.greedy, &mut s.calm] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_only_reports_and_evict_mode_calls_the_eviction_api() {
    let mut s = scene("report", "3Gi").await;
    let kubeconfig = s.api.kubeconfig(s.node.tmp.path());
    let plugin = Plugin::start(&s.node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let events = wait_for("report Events", Duration::from_secs(15), || {
        let e = posts(&s.api, "/api/v1/namespaces/ml/events");
        e.iter()
            .any(|e| e["reason"] == "VramLimitStillExceeded")
            .then_some(e)
    })
    .await;
    assert!(events.iter().any(|e| e["reason"] == "VramLimitExceeded"));
    assert!(
        s.greedy.try_wait().unwrap().is_none(),
        "report mode kills nothing\n{}",
        plugin.log_text()
    );
    assert!(posts(&s.api, "/api/v1/namespaces/ml/pods/greedy/eviction").is_empty());
    drop(plugin);
    for c in [&mut s.greedy, &mut s.calm] {
        let _ = c.kill();
        let _ = c.wait();
    }

    let mut s = scene("evict-pod", "3Gi").await;
    let kubeconfig = s.api.kubeconfig(s.node.tmp.path());
    let plugin = Plugin::start(&s.node, &["--kubeconfig", kubeconfig.to_str().unwrap()]);
    let eviction = wait_for("the eviction", Duration::from_secs(15), || {
        posts(&s.api, "/api/v1/namespaces/ml/pods/greedy/eviction")
            .first()
            .cloned()
    })
    .await;
    assert_eq!(eviction["kind"], "Eviction", "{eviction}");
    assert_eq!(eviction["apiVersion"], "policy/v1", "{eviction}");
    assert_eq!(eviction["metadata"]["name"], "greedy");
    assert_eq!(
        eviction["deleteOptions"]["preconditions"]["uid"], UID_GREEDY,
        "the eviction must not hit a new pod of the same name\n{eviction}"
    );
    assert!(
        s.greedy.try_wait().unwrap().is_none(),
        "eviction kills nothing itself\n{}",
        plugin.log_text()
    );
    assert!(posts(&s.api, "/api/v1/namespaces/ml/pods/calm/eviction").is_empty());
    for c in [&mut s.greedy, &mut s.calm] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
