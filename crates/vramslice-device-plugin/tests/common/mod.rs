//! Test harness: a test kubelet (Registration server that dials plugins back like the real one),
//! the real plugin binary on a fake-GPU file, and a loopback API server that answers pod lists.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vramslice_device_plugin::proto::deviceplugin::device_plugin_client::DevicePluginClient;
use vramslice_device_plugin::proto::deviceplugin::registration_server::{
    Registration, RegistrationServer,
};
use vramslice_device_plugin::proto::deviceplugin::{Device, Empty, RegisterRequest};
use vramslice_device_plugin::uds;

/// What the test kubelet saw.
#[derive(Default)]
pub struct Seen {
    /// Register requests, in order, with when they arrived.
    pub registrations: Vec<(Instant, RegisterRequest)>,
    /// ListAndWatch answers, in order, with when they arrived.
    pub lists: Vec<(Instant, Vec<Device>)>,
    /// Options each registration's dial-back returned.
    pub options_ok: usize,
}

struct KubeletService {
    dir: PathBuf,
    /// How long Register takes besides the dial-back (a slow kubelet).
    answer_delay: Duration,
    seen: Arc<Mutex<Seen>>,
    streams: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

#[tonic::async_trait]
impl Registration for KubeletService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        self.seen
            .lock()
            .unwrap()
            .registrations
            .push((Instant::now(), req.clone()));
        // Like the kubelet: dial the endpoint back and ask for the options before answering.
        let channel = uds::connect(&self.dir.join(&req.endpoint), Duration::from_secs(2))
            .await
            .map_err(|e| Status::unavailable(format!("dial back: {e}")))?;
        let mut client = DevicePluginClient::new(channel);
        client.get_device_plugin_options(Empty {}).await?;
        self.seen.lock().unwrap().options_ok += 1;
        tokio::time::sleep(self.answer_delay).await;
        let seen = Arc::clone(&self.seen);
        let task = tokio::spawn(async move {
            let Ok(response) = client.list_and_watch(Empty {}).await else {
                return;
            };
            let mut stream = response.into_inner();
            while let Some(Ok(msg)) = stream.next().await {
                seen.lock()
                    .unwrap()
                    .lists
                    .push((Instant::now(), msg.devices));
            }
        });
        self.streams.lock().unwrap().push(task);
        Ok(Response::new(Empty {}))
    }
}

/// A Registration server on `<dir>/kubelet.sock`.
pub struct TestKubelet {
    pub dir: PathBuf,
    pub seen: Arc<Mutex<Seen>>,
    streams: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestKubelet {
    pub async fn start(dir: &Path) -> TestKubelet {
        Self::start_answering_after(dir, Duration::ZERO).await
    }

    /// A kubelet that answers Register `delay` after the dial-back.
    pub async fn start_answering_after(dir: &Path, delay: Duration) -> TestKubelet {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("kubelet.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let service = KubeletService {
            dir: dir.to_path_buf(),
            answer_delay: delay,
            seen: Arc::clone(&seen),
            streams: Arc::clone(&streams),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestKubelet {
            dir: dir.to_path_buf(),
            seen,
            streams,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stop serving, drop the plugin streams and delete kubelet.sock (a kubelet going away).
    pub async fn stop(&mut self) {
        for task in self.streams.lock().unwrap().drain(..) {
            task.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        let _ = std::fs::remove_file(self.dir.join("kubelet.sock"));
    }

    pub fn registrations(&self) -> Vec<RegisterRequest> {
        self.seen
            .lock()
            .unwrap()
            .registrations
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn last_list(&self) -> Option<Vec<Device>> {
        self.seen
            .lock()
            .unwrap()
            .lists
            .last()
            .map(|(_, l)| l.clone())
    }
}

/// Wait until `check` returns `Some`, polling every 10 ms; panic with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Write a file atomically (temporary file + rename), as a fake-GPU script must.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A fake-GPU file: (uuid, total, healthy).
pub fn fake_gpus(gpus: &[(&str, &str, bool)]) -> String {
    let mut out = String::from("gpus:\n");
    for (i, (uuid, total, healthy)) in gpus.iter().enumerate() {
        out.push_str(&format!(
            "  - uuid: {uuid}\n    index: {i}\n    model: Fake H100\n    total: {total}\n    healthy: {healthy}\n"
        ));
        if !healthy {
            out.push_str("    unhealthyReason: XID 79\n");
        }
    }
    out
}

/// A temporary node: socket dir, fake file, accounting root, config.
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub socket_dir: PathBuf,
    pub fake_file: PathBuf,
    pub accounting: PathBuf,
    pub config: PathBuf,
}

impl Node {
    /// A node with `gpus` and extra config lines (YAML, top-level keys).
    pub fn new(gpus: &[(&str, &str, bool)], extra_config: &str) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let socket_dir = tmp.path().join("device-plugins");
        std::fs::create_dir_all(&socket_dir).unwrap();
        let fake_file = tmp.path().join("gpus.yaml");
        write_atomic(&fake_file, &fake_gpus(gpus));
        let accounting = tmp.path().join("accounting");
        let config = tmp.path().join("config.yaml");
        // The guard library Allocate mounts must be there (a placeholder: nothing loads it);
        // a test that sets `injection` names its own paths (GUARD and PRELOAD stand for these).
        let guard = tmp.path().join("lib/libvramslice_guard.so");
        std::fs::create_dir_all(tmp.path().join("lib")).unwrap();
        std::fs::write(&guard, b"").unwrap();
        let preload = tmp.path().join("ld.so.preload");
        let injection = if extra_config.contains("injection:") {
            String::new()
        } else {
            format!(
                "injection:\n  guardLibraryHostPath: {}\n  preloadFileHostPath: {}\n",
                guard.display(),
                preload.display()
            )
        };
        let extra_config = extra_config
            .replace("GUARD", &guard.display().to_string())
            .replace("PRELOAD", &preload.display().to_string());
        let text = format!(
            "backend: fake\nfakeGpuFile: {}\nsocketDir: {}\npodResourcesSocket: {}\naccountingRoot: {}\nmetricsAddr: 127.0.0.1:0\npollInterval: 100ms\n{injection}{extra_config}\n",
            fake_file.display(),
            socket_dir.display(),
            tmp.path().join("pod-resources.sock").display(),
            accounting.display(),
        );
        std::fs::write(&config, text).unwrap();
        Node {
            tmp,
            socket_dir,
            fake_file,
            accounting,
            config,
        }
    }

    pub fn pod_resources_socket(&self) -> PathBuf {
        self.tmp.path().join("pod-resources.sock")
    }

    pub fn plugin_socket(&self) -> PathBuf {
        self.socket_dir.join("vramslice-vram-gib.sock")
    }
}

/// The real plugin binary, stopped with SIGTERM on drop.
pub struct Plugin {
    pub child: Child,
    pub log: PathBuf,
}

impl Plugin {
    pub fn start(node: &Node, extra_args: &[&str]) -> Plugin {
        let log = node.tmp.path().join("plugin.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vramslice-device-plugin"))
            .arg("--config")
            .arg(&node.config)
            .args(extra_args)
            .env("RUST_LOG", "info,vramslice_device_plugin=debug")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Plugin { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the plugin logged for `/metrics` (`serving /metrics addr=...`), once logged.
    pub fn metrics_addr(&self) -> Option<String> {
        let log = self.log_text();
        let line = log.lines().find(|l| l.contains("serving /metrics"))?;
        let start = line.find("addr=")? + 5;
        Some(
            line[start..]
                .split_whitespace()
                .next()?
                .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
                .to_string(),
        )
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                panic!("plugin did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client to the plugin's socket.
pub async fn plugin_client(node: &Node) -> DevicePluginClient<tonic::transport::Channel> {
    let socket = node.plugin_socket();
    wait_for("the plugin socket", Duration::from_secs(10), || {
        socket.exists().then_some(())
    })
    .await;
    // The file can exist a moment before the plugin serves on it (or while it makes it anew):
    // connect until it answers, as the kubelet retries.
    let start = Instant::now();
    let channel = loop {
        match uds::connect(&socket, Duration::from_secs(2)).await {
            Ok(channel) => break channel,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                panic!("the plugin never accepted on {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    DevicePluginClient::new(channel)
}

/// One request the fake API server received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    /// `METHOD /path?query`.
    pub line: String,
    /// The body, parsed as JSON when it is JSON.
    pub body: serde_json::Value,
}

type Handler = dyn Fn(&str, &str, usize) -> (u16, serde_json::Value) + Send + Sync;

/// A loopback API server, recording each request line (and bodies in `calls`).
pub struct FakeApi {
    pub addr: std::net::SocketAddr,
    pub requests: Arc<Mutex<VecDeque<String>>>,
    pub calls: Arc<Mutex<Vec<ApiRequest>>>,
}

impl FakeApi {
    /// Answer every request with `body`.
    pub async fn start(body: serde_json::Value) -> FakeApi {
        FakeApi::start_with(move |_, _, _| (200, body.clone())).await
    }

    /// Answer with `handler(method, path_and_query, n)`, n = earlier requests with that line.
    pub async fn start_with(
        handler: impl Fn(&str, &str, usize) -> (u16, serde_json::Value) + Send + Sync + 'static,
    ) -> FakeApi {
        let requests = Arc::new(Mutex::new(VecDeque::new()));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&requests);
        let recorded_calls = Arc::clone(&calls);
        let handler: Arc<Handler> = Arc::new(handler);
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let recorded = Arc::clone(&recorded);
            let recorded_calls = Arc::clone(&recorded_calls);
            let handler = Arc::clone(&handler);
            async move {
                let method = request.method().to_string();
                let uri = request.uri().to_string();
                let line = format!("{method} {uri}");
                let bytes = axum::body::to_bytes(request.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let n = {
                    let mut requests = recorded.lock().unwrap();
                    let n = requests.iter().filter(|l| **l == line).count();
                    requests.push_back(line.clone());
                    n
                };
                recorded_calls
                    .lock()
                    .unwrap()
                    .push(ApiRequest { line, body });
                if is_watch(&uri) {
                    // A watch that stays open and quiet: the watcher's cache keeps what its
                    // list gave it (tests that need more answer the LIST, not the watch).
                    let quiet = futures::stream::pending::<Result<Vec<u8>, std::io::Error>>();
                    return axum::response::Response::builder()
                        .header(axum::http::header::CONTENT_TYPE, "application/json")
                        .body(axum::body::Body::from_stream(quiet))
                        .unwrap();
                }
                let (status, answer) = handler(&method, &uri, n);
                axum::response::IntoResponse::into_response((
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    answer.to_string(),
                ))
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeApi {
            addr,
            requests,
            calls,
        }
    }

    /// Requests whose line is exactly `line`.
    pub fn count(&self, line: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == line)
            .count()
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\nusers:\n- name: test\n  user:\n    token: test-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Whether a request line's query asks for a watch.
pub fn is_watch(path_and_query: &str) -> bool {
    path_and_query
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"))
}

/// A PodResources server on `socket` answering List with `response`.
pub async fn start_pod_resources(
    socket: &Path,
    response: vramslice_device_plugin::proto::podresources::ListPodResourcesResponse,
) -> tokio::task::JoinHandle<()> {
    use vramslice_device_plugin::proto::podresources::pod_resources_lister_server::{
        PodResourcesLister, PodResourcesListerServer,
    };
    use vramslice_device_plugin::proto::podresources::*;
    struct Lister(ListPodResourcesResponse);
    #[tonic::async_trait]
    impl PodResourcesLister for Lister {
        async fn list(
            &self,
            _: Request<ListPodResourcesRequest>,
        ) -> Result<Response<ListPodResourcesResponse>, Status> {
            Ok(Response::new(self.0.clone()))
        }
        async fn get_allocatable_resources(
            &self,
            _: Request<AllocatableResourcesRequest>,
        ) -> Result<Response<AllocatableResourcesResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn get(
            &self,
            _: Request<GetPodResourcesRequest>,
        ) -> Result<Response<GetPodResourcesResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(Lister(response)))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    })
}

/// GET `path` from `addr` over HTTP/1.0; the body of a 200 answer, else `None`.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    (head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")).then(|| body.to_string())
}
