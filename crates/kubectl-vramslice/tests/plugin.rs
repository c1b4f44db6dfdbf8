//! The real `kubectl-vramslice` binary against a loopback API server that serves recorded
//! responses (tests/data): every subcommand in every output format, colour rules, exit codes.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const NOW: &str = "2026-11-22T10:00:00Z";

#[derive(Clone)]
struct Recorded {
    data: PathBuf,
    crd_installed: bool,
    /// Whether cluster-scoped lists (GpuNodes, ResourceSlices) are allowed.
    cluster_readable: bool,
    /// Whether pods may be listed in all namespaces at once (not for a user with a namespaced
    /// Role plus the chart's gpunode-reader ClusterRole).
    all_pods_readable: bool,
    /// The `extender.yaml` of the scheduler ConfigMap; `None`: listing ConfigMaps is forbidden.
    extender_yaml: Arc<Mutex<Option<String>>>,
    log: Arc<Mutex<Vec<String>>>,
}

fn load(data: &Path, file: &str) -> Option<Value> {
    std::fs::read_to_string(data.join(file))
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap())
}

fn not_found(what: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

fn forbidden(resource: &str, verb: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": format!("{resource} is forbidden: cannot {verb} resource at the cluster scope")});
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

fn filter_items(mut list: Value, keep: impl Fn(&Value) -> bool) -> Value {
    let items: Vec<Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| keep(i))
        .cloned()
        .collect();
    list["items"] = Value::Array(items);
    list
}

async fn serve(State(rec): State<Recorded>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let impersonating: Vec<String> = ["impersonate-user", "impersonate-group"]
        .iter()
        .flat_map(|h| req.headers().get_all(*h).iter())
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    rec.log.lock().unwrap().push(if impersonating.is_empty() {
        format!("{} {path}", req.method())
    } else {
        format!("{} {path} as {}", req.method(), impersonating.join(","))
    });
    if req.method() != axum::http::Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "the plugin must only read").into_response();
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = match parts.as_slice() {
        ["apis", "vramslice.io", "v1alpha1", "gpunodes"] if !rec.cluster_readable => {
            return forbidden("gpunodes.vramslice.io", "list");
        }
        ["apis", "vramslice.io", "v1alpha1", "gpunodes"] if rec.crd_installed => {
            load(&rec.data, "gpunodes.json")
        }
        ["apis", "vramslice.io", "v1alpha1", "gpunodes"] => {
            return not_found("the server could not find the requested resource");
        }
        ["api", "v1", "pods"] if !rec.all_pods_readable => return forbidden("pods", "list"),
        ["api", "v1", "pods"] => load(&rec.data, "pods.json"),
        ["api", "v1", "namespaces", ns, "pods"] => load(&rec.data, "pods.json")
            .map(|l| filter_items(l, |p| p["metadata"]["namespace"] == *ns)),
        ["api", "v1", "namespaces", ns, "pods", name] => {
            load(&rec.data, &format!("pod-{ns}-{name}.json"))
        }
        ["api", "v1", "configmaps"] => {
            let Some(yaml) = rec.extender_yaml.lock().unwrap().clone() else {
                return forbidden("configmaps", "list");
            };
            assert!(
                query.contains("labelSelector=app.kubernetes.io%2Fcomponent%3Dscheduler"),
                "{query}"
            );
            Some(
                json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
                "items": [{"metadata": {"name": "vramslice-scheduler", "namespace": "vramslice-system",
                    "labels": {"app.kubernetes.io/component": "scheduler"}},
                    "data": {"extender.yaml": yaml, "scheduler-config.yaml": "kind: KubeSchedulerConfiguration\n"}}]}),
            )
        }
        // A reader allowed to list claims in its own namespace only (a namespaced Role).
        ["apis", "resource.k8s.io", "v1", "resourceclaims"] => {
            return forbidden("resourceclaims.resource.k8s.io", "list");
        }
        [
            "apis",
            "resource.k8s.io",
            "v1",
            "namespaces",
            ns,
            "resourceclaims",
        ] => load(&rec.data, "resourceclaims.json")
            .map(|l| filter_items(l, |c| c["metadata"]["namespace"] == *ns)),
        ["apis", "resource.k8s.io", "v1", "resourceslices"] if rec.cluster_readable => {
            load(&rec.data, "resourceslices.json")
        }
        ["apis", "resource.k8s.io", "v1", "resourceslices"] => {
            return forbidden("resourceslices.resource.k8s.io", "list");
        }
        ["api", "v1", "namespaces", ns, "events"] => {
            let list = load(&rec.data, &format!("events-{ns}.json"))
                .or_else(|| load(&rec.data, "events-empty.json"));
            let decoded = query.replace("%3D", "=").replace("%2C", ",");
            // The field selector, as the API server reads it: name, and UID when asked.
            let field = |key: &str| {
                decoded
                    .split(&format!("involvedObject.{key}="))
                    .nth(1)
                    .map(|s| s.split([',', '&']).next().unwrap_or("").to_string())
            };
            let (name, uid) = (field("name"), field("uid"));
            list.map(|l| {
                filter_items(l, |e| {
                    name.as_deref()
                        .is_none_or(|n| e["involvedObject"]["name"] == n)
                        && uid
                            .as_deref()
                            .is_none_or(|u| e["involvedObject"]["uid"] == u)
                })
            })
        }
        _ => None,
    };
    match body {
        Some(v) => axum::Json(v).into_response(),
        None => not_found(&path),
    }
}

struct Server {
    now: String,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    extender_yaml: Arc<Mutex<Option<String>>>,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn start(crd_installed: bool) -> Server {
    start_with("tests/data", crd_installed)
}

fn start_with(data: &str, crd_installed: bool) -> Server {
    start_as(data, crd_installed, true)
}

fn start_as(data: &str, crd_installed: bool, all_pods_readable: bool) -> Server {
    let rec = Recorded {
        data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(data),
        crd_installed,
        cluster_readable: data != "tests/data/namespaced-reader",
        all_pods_readable,
        extender_yaml: Arc::default(),
        log: Arc::default(),
    };
    let log = rec.log.clone();
    let extender_yaml = rec.extender_yaml.clone();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let app = Router::new().fallback(serve).with_state(rec);
            axum::serve(listener, app).await.unwrap();
        });
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: recorded\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: reader\n  user: {{}}\ncontexts:\n- name: recorded\n  context:\n    cluster: recorded\n    user: reader\n    namespace: team-b\n\
             current-context: recorded\n"
        ),
    )
    .unwrap();
    Server {
        port,
        log,
        extender_yaml,
        _dir: dir,
        kubeconfig,
        now: NOW.to_string(),
    }
}

impl Server {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kubectl-vramslice"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--now", self.now.as_str()])
            .args(args)
            .env_remove("NO_COLOR")
            .output()
            .unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

#[test]
fn nodes_table_json_yaml() {
    let s = start(true);
    let o = s.run(&["nodes"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let t = stdout(&o);
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("EFFECTIVE FREE"),
        "{t}"
    );
    assert_eq!(lines.len(), 5, "header + one line per GPU:\n{t}");
    let gpu_a0 = lines
        .iter()
        .find(|l| l.starts_with("gpu-a") && l.contains("NVIDIA H100"))
        .unwrap();
    // 81559 MiB total, 19 GiB used, 20 units allocated.
    assert!(
        gpu_a0.contains("79.6 GiB") && gpu_a0.contains("19 GiB") && gpu_a0.contains("20 GiB"),
        "{gpu_a0}"
    );
    assert!(
        t.contains("unhealthy: XID 79: GPU has fallen off the bus"),
        "{t}"
    );
    assert!(t.contains("120s ago (stale)"), "{t}");
    assert!(
        !t.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );

    let j: Value = serde_json::from_slice(&s.run(&["nodes", "-o", "json"]).stdout).unwrap();
    let nodes = j.as_array().unwrap();
    assert_eq!(
        nodes
            .iter()
            .map(|n| n["node"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["gpu-a", "gpu-b", "gpu-c"]
    );
    let a0 = &nodes[0]["gpus"][0];
    assert_eq!(a0["totalBytes"], 81559u64 << 20);
    assert_eq!(a0["allocatedBytes"], 20u64 << 30);
    // Effective free of gpu-a GPU 0 = min(79 - 20 units, live free - unobserved - headroom):
    // declared 59 GiB; live 60.6 GiB - unobserved (20 - 18) GiB - 0.5 GiB = 58.1 GiB.
    let eff = a0["effectiveFreeBytes"].as_u64().unwrap();
    assert_eq!(
        eff,
        (81559u64 << 20) - (19u64 << 30) - (2u64 << 30) - (512u64 << 20)
    );
    assert_eq!(nodes[2]["stale"], true);
    assert_eq!(nodes[0]["stale"], false);
    assert_eq!(nodes[1]["gpus"][0]["healthy"], false);

    let y = stdout(&s.run(&["nodes", "-o", "yaml"]));
    assert!(
        y.contains("node: gpu-a")
            && y.contains("healthReason: 'XID 79: GPU has fallen off the bus'")
            || y.contains("healthReason: \"XID 79"),
        "{y}"
    );
    assert!(y.contains("effectiveFreeBytes:"), "{y}");
    assert!(s.log.lock().unwrap().iter().all(|l| l.starts_with("GET ")));
}

#[test]
fn pods_table_json_yaml_and_namespaces() {
    let s = start(true);
    let o = s.run(&["pods", "-A"]);
    assert_eq!(code(&o), 0);
    let t = stdout(&o);
    assert!(t.lines().next().unwrap().starts_with("NAMESPACE"), "{t}");
    assert_eq!(
        t.lines().count(),
        1 + 5,
        "five VRAM pods (cpu-only left out):\n{t}"
    );
    let mid = t.lines().find(|l| l.contains("llm-mid")).unwrap();
    assert!(
        mid.contains("gpu-a")
            && mid.contains("1 (GPU-0b22ce00")
            && mid.contains("40 GiB")
            && mid.contains("41 GiB"),
        "{mid}"
    );
    let huge = t.lines().find(|l| l.contains("llm-huge")).unwrap();
    assert!(
        huge.contains("100 GiB") && huge.contains("Pending"),
        "{huge}"
    );
    assert!(!t.contains("cpu-only"));

    // None: stdout stays empty (scripts counting rows count none); the hint goes to stderr.
    let o = s.run(&["pods", "-n", "nobody-here"]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o), "");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No pods request vramslice memory."),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Default namespace comes from the kubeconfig context (team-b).
    let j: Value = serde_json::from_slice(&s.run(&["pods", "-o", "json"]).stdout).unwrap();
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["embedder", "legacy", "llm-huge"]);
    let j: Value =
        serde_json::from_slice(&s.run(&["pods", "-n", "team-a", "-o", "json"]).stdout).unwrap();
    let small = &j.as_array().unwrap()[1];
    assert_eq!(small["name"], "llm-small");
    assert_eq!(small["usedBytes"], 18u64 << 30);
    assert_eq!(small["limitBytes"], 20u64 << 30);
    assert_eq!(small["gpuIndex"], 0);

    let y = stdout(&s.run(&["pods", "-A", "-o", "yaml"]));
    assert!(
        y.contains("name: llm-huge") && y.contains("limitBytes: 107374182400"),
        "{y}"
    );

    // A reader with a namespaced Role only: no GpuNodes, still the pods, with a warning.
    let narrow = start_with("tests/data/namespaced-reader", true);
    let o = narrow.run(&["pods", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["embedder", "legacy", "llm-huge"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("list gpunodes") && stderr.contains("shown without live use"),
        "{stderr}"
    );
}

#[test]
fn a_gpunode_reader_who_may_list_pods_in_one_namespace_gets_nodes_and_explain_with_a_warning() {
    // `rbac.gpuNodeReaders` with a namespaced `view`: GpuNodes yes, pods of all namespaces no.
    let s = start_as("tests/data", true, false);
    let o = s.run(&["nodes", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(!rows.as_array().unwrap().is_empty(), "{rows}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("pods is forbidden")
            && stderr.contains("only pods of namespace team-b are counted"),
        "{stderr}"
    );
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l == "GET /api/v1/namespaces/team-b/pods"),
        "{log:?}"
    );

    let o = s.run(&["explain", "bad-policy", "-n", "team-a"]);
    assert_eq!(code(&o), 4, "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("only pods of namespace team-a are counted"),
        "{stderr}"
    );
}

#[test]
fn kubeconfig_env_skips_missing_files_and_an_unknown_context_is_an_error_not_in_cluster() {
    let s = start(true);
    let missing = s._dir.path().join("not-there");
    let env = std::env::join_paths([&missing, &s.kubeconfig]).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kubectl-vramslice"))
            .env("KUBECONFIG", &env)
            // In-cluster settings present: they must not be used while a kubeconfig exists.
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", "1")
            .env_remove("NO_COLOR")
            .args(["--now", s.now.as_str()])
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["nodes"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["--context", "prod", "nodes"]);
    assert_eq!(code(&o), 1);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("prod") && stderr.contains("kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn explain_a_pod_whose_request_cannot_be_placed_exits_4() {
    // A 2 GiB pod fits on gpu-a, but `Spread` is no policy: the extender refuses it everywhere.
    let s = start(true);
    let o = s.run(&["explain", "bad-policy", "-n", "team-a"]);
    assert_eq!(code(&o), 4, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("Spread"), "{}", stdout(&o));
}

#[test]
fn explain_a_pod_that_can_never_fit() {
    let s = start(true);
    let o = s.run(&["explain", "llm-huge"]);
    assert_eq!(code(&o), 4, "does-not-fit exit code");
    let t = stdout(&o);
    assert!(t.contains("Pod team-b/llm-huge needs 100 GiB (100 × vramslice.io/vram-gib) on one GPU and fits on none of 3 GPU nodes"), "{t}");
    assert!(
        t.contains("more than any GPU on node gpu-a advertises (largest 79 GiB)"),
        "{t}"
    );
    assert!(t.contains("never"), "{t}");
    assert!(
        t.contains("Last scheduler event: FailedScheduling (×7, 2026-11-22T09:59:00Z)"),
        "newest event of this pod first (not the newer one of an earlier pod of its name):\n{t}"
    );
    assert!(t.contains("it can never fit"), "{t}");

    let j: Value =
        serde_json::from_slice(&s.run(&["explain", "llm-huge", "-o", "json"]).stdout).unwrap();
    assert_eq!(j["state"], json!({"kind": "pending", "fitsOn": 0}));
    assert_eq!(j["requestBytes"], 100u64 << 30);
    assert!(
        j["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["unresolvable"] == true)
    );
    assert_eq!(j["events"].as_array().unwrap().len(), 2);
    let y = s.run(&["explain", "llm-huge", "-o", "yaml"]);
    assert_eq!(code(&y), 4);
    assert!(stdout(&y).contains("fitsOn: 0"));
}

#[test]
fn explain_a_pod_that_fits_and_the_per_node_reasons() {
    let s = start(true);
    let o = s.run(&["explain", "embedder", "-o", "json"]);
    assert_eq!(code(&o), 0);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["state"]["fitsOn"], 1);
    let nodes = j["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["node"], "gpu-a");
    assert_eq!(nodes[0]["fits"], true);
    let b = nodes[1]["reason"].as_str().unwrap();
    assert!(b.contains("unhealthy"), "gpu-b: {b}");
    let c = nodes[2]["reason"].as_str().unwrap();
    assert!(c.contains("120") && c.contains("old"), "gpu-c: {c}");
    assert!(
        j["events"].as_array().unwrap().is_empty(),
        "events are filtered to the pod"
    );
    let t = stdout(&s.run(&["explain", "embedder"]));
    assert!(
        t.contains("fits on 1 of 3 GPU nodes") && t.contains("should bind it"),
        "{t}"
    );
}

#[test]
fn explain_notes_scheduler_name_bound_pods_and_plain_pods() {
    let s = start(true);
    let t = stdout(&s.run(&["explain", "legacy"]));
    assert!(t.contains("schedulerName is \"default-scheduler\""), "{t}");
    let o = s.run(&["explain", "llm-mid", "-n", "team-a"]);
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("is bound to node gpu-a, GPU GPU-0b22ce00-1111-2222-3333-444455556666")
    );
    let o = s.run(&["explain", "cpu-only", "-n", "team-a", "-o", "json"]);
    assert_eq!(code(&o), 0);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["state"]["kind"], "noVram");
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let s = start(true);
    let t = stdout(&s.run(&["nodes", "--color", "always"]));
    assert!(
        t.contains("\x1b[32mhealthy\x1b[0m") && t.contains("\x1b[31munhealthy"),
        "{t:?}"
    );
    let t = stdout(&s.run(&["pods", "-A", "--color", "always"]));
    assert!(
        t.contains("\x1b[31m41 GiB\x1b[0m"),
        "usage over the limit is red: {t:?}"
    );
    let t = stdout(&s.run(&["explain", "llm-huge", "--color", "always"]));
    assert!(t.contains("\x1b[31mfits on none"), "{t:?}");
    let t = stdout(&s.run(&["nodes", "--color", "never"]));
    assert!(!t.contains('\x1b'));
    // JSON is never coloured.
    let t = stdout(&s.run(&["nodes", "-o", "json", "--color", "always"]));
    assert!(!t.contains('\x1b'));
    assert!(kubectl_vramslice::use_color(
        kubectl_vramslice::ColorChoice::Auto,
        true,
        false
    ));
    assert!(
        !kubectl_vramslice::use_color(kubectl_vramslice::ColorChoice::Auto, true, true),
        "NO_COLOR wins"
    );
    assert!(!kubectl_vramslice::use_color(
        kubectl_vramslice::ColorChoice::Auto,
        false,
        false
    ));
}

/// kubectl's connection flags pass through: impersonation reaches the API server as its
/// headers; an unknown cluster or user in the kubeconfig is an error naming it; a bad
/// request timeout is named.
#[test]
fn kubectls_connection_flags_are_understood() {
    let s = start(true);
    let o = s.run(&[
        "nodes",
        "--as",
        "alice",
        "--as-group",
        "sre",
        "--request-timeout",
        "5s",
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let log = s.log.lock().unwrap().clone();
    assert!(
        !log.is_empty() && log.iter().all(|l| l.ends_with(" as alice,sre")),
        "{log:?}"
    );
    for (flags, want) in [
        (&["--cluster", "elsewhere"][..], "elsewhere"),
        (&["--user", "mallory"][..], "mallory"),
        (&["--as-group", "sre"][..], "--as-group needs --as"),
        (
            &["--request-timeout", "soon"][..],
            "--request-timeout \"soon\"",
        ),
    ] {
        let mut args = vec!["nodes"];
        args.extend_from_slice(flags);
        let o = s.run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_ne!(code(&o), 0, "{flags:?}");
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
}

#[test]
fn exit_codes_for_failures() {
    let s = start(true);
    let o = s.run(&["explain", "nobody"]);
    assert_eq!(code(&o), 3);
    assert!(String::from_utf8_lossy(&o.stderr).contains("pod team-b/nobody not found"));
    let o = s.run(&["nodes", "-o", "xml"]);
    assert_eq!(code(&o), 2, "usage error");
    let o = s.run(&["nodes", "--headroom", "lots"]);
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--headroom"));

    let no_crd = start(false);
    let o = no_crd.run(&["nodes"]);
    assert_eq!(code(&o), 3);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("GpuNode CRD"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Nothing listening: an API error, exit 1.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let cfg = std::fs::read_to_string(&s.kubeconfig)
        .unwrap()
        .replace(&s.port.to_string(), &port.to_string());
    let path = s._dir.path().join("dead");
    std::fs::write(&path, cfg).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_kubectl-vramslice"))
        .arg("--kubeconfig")
        .arg(&path)
        .arg("nodes")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    assert!(String::from_utf8_lossy(&o.stderr).contains("list gpunodes"));
}

#[test]
fn nodes_use_the_extenders_own_headroom_and_staleness() {
    let s = start(true);
    let effective_free = |o: &Output| -> u64 {
        assert_eq!(code(o), 0, "{}", String::from_utf8_lossy(&o.stderr));
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        j[0]["gpus"][0]["effectiveFreeBytes"].as_u64().unwrap()
    };
    // ConfigMaps not readable: the extender's defaults, and a warning that says so.
    let o = s.run(&["nodes", "-o", "json"]);
    let with_defaults = effective_free(&o);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        stderr
            .contains("warning: the extender's configuration was not read (cannot list ConfigMaps")
            && stderr.contains("pass --headroom and --staleness"),
        "{stderr}"
    );
    // The chart's ConfigMap says 2Gi and 150s: gpu-a's figure drops by 1.5 GiB, and gpu-c's
    // 120 s old reading is fresh, exactly as with the flags, with nothing on stderr.
    *s.extender_yaml.lock().unwrap() =
        Some("listenAddr: 0.0.0.0:8888\npolicy: binpack\nheadroom: 2Gi\nstaleness: 150s\n".into());
    let o = s.run(&["nodes", "-o", "json"]);
    assert_eq!(String::from_utf8_lossy(&o.stderr), "");
    let from_config = effective_free(&o);
    assert_eq!(from_config, with_defaults - (3u64 << 29));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j[2]["stale"], false);
    let flags = s.run(&[
        "nodes",
        "-o",
        "json",
        "--headroom",
        "2Gi",
        "--staleness",
        "150s",
    ]);
    assert_eq!(effective_free(&flags), from_config);
    // A flag wins over the configuration.
    let o = s.run(&["nodes", "-o", "json", "--headroom", "512Mi"]);
    assert_eq!(effective_free(&o), with_defaults);
}

#[test]
fn claims_of_one_namespace_need_only_that_namespace_and_show_first_available_requests() {
    let s = start(true);
    let o = s.run(&["claims", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let shown: Vec<(&str, &str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["claim"].as_str().unwrap(),
                r["state"].as_str().unwrap(),
                r["gpus"][0].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("embedder-vram", "allocated", "gpu-0 (GPU-a0)"),
            ("flex", "pending", "-")
        ]
    );
    let log = s.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|l| l == "GET /apis/resource.k8s.io/v1/namespaces/team-b/resourceclaims"),
        "{log:?}"
    );
    // A reader with a namespaced Role only: no slices or GpuNodes, still the claims.
    let narrow = start_with("tests/data/namespaced-reader", true);
    let o = narrow.run(&["claims", "-o", "json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(rows[0]["claim"], "embedder-vram");
    assert_eq!(rows[0]["gpus"][0], "gpu-0");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("list resourceslices")
            && stderr.contains("shown without GPU UUIDs")
            && stderr.contains("list gpunodes")
            && stderr.contains("shown without live use"),
        "{stderr}"
    );
    // Every namespace needs the cluster-wide list: refused here, an API error naming it.
    let o = s.run(&["claims", "-A"]);
    assert_eq!(code(&o), 1);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("list resourceclaims"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Responses recorded from the e2e cluster's real kube-apiserver (tests/data/e2e: two hollow
/// nodes with fake A100s and an L4, the real device plugin and extender, three pods).
fn e2e() -> Server {
    let mut s = start_with("tests/data/e2e", true);
    let at = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/e2e/recorded-at.txt"),
    )
    .unwrap();
    s.now = at.trim().to_string();
    s
}

#[test]
fn recorded_e2e_cluster_nodes_and_pods() {
    let s = e2e();
    let j: Value = serde_json::from_slice(&s.run(&["nodes", "-o", "json"]).stdout).unwrap();
    let nodes = j.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["node"], "gpu-node-a");
    assert_eq!(nodes[0]["stale"], false);
    let a0 = &nodes[0]["gpus"][0];
    assert_eq!(a0["model"], "NVIDIA A100-SXM4-80GB");
    assert_eq!(a0["allocatedBytes"], 30u64 << 30);
    // 80 GiB advertised - 30 GiB assigned, less the 512 MiB headroom on the live side.
    assert_eq!(
        a0["effectiveFreeBytes"],
        (80u64 << 30) - (30u64 << 30) - (512u64 << 20)
    );
    let t = stdout(&s.run(&["pods", "-n", "default"]));
    let a = t
        .lines()
        .find(|l| l.starts_with("llm-a") || l.contains(" llm-a "))
        .unwrap();
    assert!(
        a.contains("gpu-node-a") && a.contains("30 GiB") && a.contains("Running"),
        "{t}"
    );
    assert!(
        t.contains("GPU-gpu-node-a-0"),
        "short fake UUIDs are shown whole: {t}"
    );
    let y = stdout(&s.run(&["pods", "-A", "-o", "yaml"]));
    assert!(y.contains("gpuUuid: GPU-gpu-node-b-0"), "{y}");
}

#[test]
fn recorded_e2e_cluster_explain() {
    let s = e2e();
    let o = s.run(&["explain", "too-big", "-n", "default"]);
    assert_eq!(code(&o), 4);
    let t = stdout(&o);
    assert!(t.contains("needs 90 GiB"), "{t}");
    assert!(
        t.contains("more than any GPU on node gpu-node-a advertises (largest 80 GiB)"),
        "{t}"
    );
    // The real scheduler's event, with the extender's reason in it.
    assert!(
        t.contains("more than the largest GPU in the cluster advertises (80 GiB)"),
        "{t}"
    );
    let j: Value = serde_json::from_slice(
        &s.run(&["explain", "llm-a", "-n", "default", "-o", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(j["state"]["kind"], "bound");
    assert_eq!(j["state"]["gpuUuid"], "GPU-gpu-node-a-0");
    let y = s.run(&["explain", "llm-b", "-n", "default", "-o", "yaml"]);
    assert_eq!(code(&y), 0);
    assert!(stdout(&y).contains("node: gpu-node-b"));
}
