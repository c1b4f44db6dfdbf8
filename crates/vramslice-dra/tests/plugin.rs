//! The DRA plugin over its real sockets, as the kubelet calls it: registration, prepare and
//! unprepare of claims held in memory, the files and checkpoint they leave, and restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{
    AllocationResult, DeviceAllocationResult, DeviceRequestAllocationResult, ResourceClaim,
    ResourceClaimConsumerReference, ResourceClaimStatus,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};
use vramslice_core::container::limit::{LimitFile, parse_limit_file};
use vramslice_core::node::allocation::{AllocationSettings, DeviceListStrategy, InjectionMode};
use vramslice_core::node::sample::{GpuSample, Health};
use vramslice_dra::checkpoint::Checkpoint;
use vramslice_dra::claims::{ClaimFuture, ClaimSource, FetchError, PodFuture};
use vramslice_dra::driver::{ClaimRef, Driver, DriverConfig, GONE_CLAIM_GRACE, Reconciled};
use vramslice_dra::proto::dra::dra_plugin_client::DraPluginClient;
use vramslice_dra::proto::dra::{
    Claim, NodePrepareResourcesRequest, NodePrepareResourcesResponse,
    NodeUnprepareResourcesRequest, NodeUnprepareResourcesResponse,
};
use vramslice_dra::proto::registration::registration_client::RegistrationClient;
use vramslice_dra::proto::registration::{InfoRequest, RegistrationStatus};
use vramslice_dra::registration::KubeletRegistration;
use vramslice_dra::serve::{Sockets, serve, serve_with_registrations};

const GIB: u64 = 1 << 30;
const NODE: &str = "node-a";

#[derive(Default)]
struct MemoryClaims {
    claims: Mutex<BTreeMap<(String, String), ResourceClaim>>,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    gets: AtomicUsize,
    /// Every claim read fails (the API server unreachable).
    failing: AtomicBool,
}

impl MemoryClaims {
    fn put(&self, claim: ResourceClaim) {
        let key = (
            claim.metadata.namespace.clone().unwrap(),
            claim.metadata.name.clone().unwrap(),
        );
        self.claims.lock().unwrap().insert(key, claim);
    }
}

impl MemoryClaims {
    fn put_pod(&self, pod: Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap(),
            pod.metadata.name.clone().unwrap(),
        );
        self.pods.lock().unwrap().insert(key, pod);
    }
}

impl ClaimSource for MemoryClaims {
    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> PodFuture<'a> {
        let found = self
            .pods
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn get<'a>(&'a self, namespace: &'a str, name: &'a str) -> ClaimFuture<'a> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            let claim = format!("{namespace}/{name}");
            return Box::pin(async move {
                Err(FetchError::Api {
                    claim,
                    detail: "connection refused".into(),
                })
            });
        }
        let found = self
            .claims
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned();
        Box::pin(
            async move { found.ok_or_else(|| FetchError::NotFound(format!("{namespace}/{name}"))) },
        )
    }
}

fn claim(name: &str, uid: &str, devices: &[(&str, &str)]) -> ResourceClaim {
    let results = devices
        .iter()
        .map(|(device, memory)| DeviceRequestAllocationResult {
            driver: "vramslice.io".into(),
            pool: NODE.into(),
            device: (*device).into(),
            request: "vram".into(),
            share_id: Some(format!("share-{uid}-{device}")),
            consumed_capacity: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity((*memory).into()),
            )])),
            ..DeviceRequestAllocationResult::default()
        })
        .collect();
    ResourceClaim {
        metadata: ObjectMeta {
            namespace: Some("ml".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..ObjectMeta::default()
        },
        status: Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                devices: Some(DeviceAllocationResult {
                    results: Some(results),
                    config: None,
                }),
                ..AllocationResult::default()
            }),
            reserved_for: Some(vec![ResourceClaimConsumerReference {
                resource: "pods".into(),
                name: format!("{name}-pod"),
                uid: format!("pod-{uid}"),
                api_group: None,
            }]),
            ..ResourceClaimStatus::default()
        }),
        ..ResourceClaim::default()
    }
}

fn samples() -> Vec<GpuSample> {
    (0..2)
        .map(|i| GpuSample {
            index: i,
            uuid: format!("GPU-{i}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            total_bytes: 80 * GIB,
            used_bytes: 0,
            free_bytes: 80 * GIB,
            health: Health::Healthy,
            processes: Some(Vec::new()),
        })
        .collect()
}

struct Node {
    root: tempfile::TempDir,
    claims: Arc<MemoryClaims>,
}

impl Node {
    /// A node with the guard library installed (a placeholder: only its presence is checked).
    fn new() -> Self {
        let node = Node {
            root: tempfile::tempdir().unwrap(),
            claims: Arc::new(MemoryClaims::default()),
        };
        std::fs::create_dir_all(node.path("lib")).unwrap();
        std::fs::write(node.path("lib/libvramslice_guard.so"), b"").unwrap();
        node
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn sockets(&self) -> Sockets {
        Sockets {
            registry_dir: self.path("kubelet/plugins_registry"),
            plugin_dir: self.path("kubelet/plugins/vramslice.io"),
        }
    }

    fn config(&self) -> DriverConfig {
        DriverConfig {
            node: NODE.into(),
            settings: AllocationSettings {
                injection: InjectionMode::LdPreloadEnv,
                device_list_strategy: DeviceListStrategy::Envvar,
                guard_library_host_path: self.path("lib/libvramslice_guard.so"),
                preload_file_host_path: self.path("ld.so.preload"),
                accounting_root: self.path("accounting"),
            },
            cdi_dir: self.path("cdi"),
            checkpoint: self.path("state/checkpoint.json"),
        }
    }

    /// Start the plugin (as after a fresh start or a restart); stop it by sending `true`.
    async fn start(&self) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        self.start_with(&samples()).await
    }

    /// [`Node::start`] on these GPUs.
    async fn start_with(
        &self,
        gpus: &[GpuSample],
    ) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let driver = Arc::new(Driver::open(self.config(), self.claims.clone()).unwrap());
        driver.set_gpus(gpus);
        let (stop, rx) = watch::channel(false);
        let sockets = self.sockets();
        let task = tokio::spawn(async move { serve(driver, &sockets, rx).await.unwrap() });
        for _ in 0..100 {
            if self.sockets().registration().exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (stop, task)
    }

    async fn dra(&self) -> DraPluginClient<Channel> {
        DraPluginClient::new(connect(&self.sockets().endpoint()).await)
    }

    /// NodePrepareResources of `request`, as the kubelet calls it.
    async fn prepare(&self, request: NodePrepareResourcesRequest) -> NodePrepareResourcesResponse {
        self.dra()
            .await
            .node_prepare_resources(request)
            .await
            .unwrap()
            .into_inner()
    }

    /// NodeUnprepareResources of `request`, as the kubelet calls it.
    async fn unprepare(
        &self,
        request: NodeUnprepareResourcesRequest,
    ) -> NodeUnprepareResourcesResponse {
        self.dra()
            .await
            .node_unprepare_resources(request)
            .await
            .unwrap()
            .into_inner()
    }
}

async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}

/// The kubelet's NodePrepareResources of claim ml/llm (UID uid-1).
fn prepare_llm() -> NodePrepareResourcesRequest {
    NodePrepareResourcesRequest {
        claims: vec![kubelet_claim("llm", "uid-1")],
    }
}

fn kubelet_claim(name: &str, uid: &str) -> Claim {
    Claim {
        namespace: "ml".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[tokio::test]
async fn the_kubelet_learns_the_driver_and_its_endpoint_from_the_registration_socket() {
    let node = Node::new();
    let (stop, task) = node.start().await;
    let mut reg = RegistrationClient::new(connect(&node.sockets().registration()).await);
    let info = reg.get_info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "DRAPlugin");
    assert_eq!(info.name, "vramslice.io");
    assert_eq!(
        info.endpoint,
        node.sockets().endpoint().display().to_string()
    );
    assert_eq!(info.supported_versions, ["v1.DRAPlugin"]);
    reg.notify_registration_status(RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    })
    .await
    .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(
        !node.sockets().registration().exists(),
        "the registration socket goes with the plugin, so the kubelet deregisters it"
    );
}

#[tokio::test]
async fn a_prepared_claim_gets_its_limit_guard_and_gpu_through_its_cdi_spec() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-1", "6Gi")]));
    let (_stop, _task) = node.start().await;
    let answer = node.prepare(prepare_llm()).await;
    let prepared = &answer.claims["uid-1"];
    assert_eq!(prepared.error, "");
    assert_eq!(prepared.devices.len(), 1);
    let device = &prepared.devices[0];
    assert_eq!(device.pool_name, NODE);
    assert_eq!(device.device_name, "gpu-1");
    assert_eq!(device.request_names, ["vram"]);
    assert_eq!(device.share_id.as_deref(), Some("share-uid-1-gpu-1"));
    assert_eq!(device.cdi_device_ids, ["vramslice.io/claim=uid-1"]);
    // Writable by a container running as any user (the guard creates its account there).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.path("accounting/claim-uid-1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o1777, "{mode:o}: writable by all, sticky");

    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(node.path("cdi/vramslice.io-claim-uid-1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["kind"], "vramslice.io/claim");
    assert_eq!(spec["devices"][0]["name"], "uid-1");
    let env: Vec<&str> = spec["devices"][0]["containerEdits"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&format!("VRAMSLICE_VRAM_LIMIT_BYTES={}", 6 * GIB).as_str()),
        "{env:?}"
    );
    assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-1"), "{env:?}");
    assert!(env.iter().any(|e| e.starts_with("LD_PRELOAD=")), "{env:?}");
    let mounts = spec["devices"][0]["containerEdits"]["mounts"]
        .as_array()
        .unwrap();
    let limit_mount = mounts
        .iter()
        .find(|m| m["containerPath"] == "/var/run/vramslice/limit")
        .expect("the limit file is mounted");
    assert_eq!(limit_mount["options"][0], "ro");
    let limit = parse_limit_file(
        &std::fs::read_to_string(limit_mount["hostPath"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        limit,
        LimitFile::Single {
            limit_bytes: 6 * GIB,
            gpu_uuid: "GPU-1".into()
        }
    );
    assert!(node.path("accounting/claim-uid-1").is_dir());
}

#[tokio::test]
async fn restarts_lose_no_prepared_claim_and_unprepare_is_idempotent() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    let (stop, task) = node.start().await;
    let first = node.prepare(prepare_llm()).await;
    assert_eq!(first.claims["uid-1"].error, "");
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(node.claims.gets.load(Ordering::SeqCst), 1);

    // The plugin restarts while the API server cannot give this claim: the kubelet's
    // repeated prepare is answered from the checkpoint, with the same devices.
    node.claims.claims.lock().unwrap().clear();
    let (_stop, _task) = node.start().await;
    let again = node.prepare(prepare_llm()).await;
    assert_eq!(again.claims["uid-1"], first.claims["uid-1"]);
    assert_eq!(
        node.claims.gets.load(Ordering::SeqCst),
        2,
        "asked once whether it was allocated again, then answered from the checkpoint"
    );

    let unprepare = || NodeUnprepareResourcesRequest {
        claims: vec![kubelet_claim("llm", "uid-1")],
    };
    for _ in 0..2 {
        let done = node.unprepare(unprepare()).await;
        assert_eq!(done.claims["uid-1"].error, "");
    }
    assert!(!node.path("cdi/vramslice.io-claim-uid-1.json").exists());
    assert!(!node.path("accounting/claim-uid-1").exists());
    assert!(!node.path("accounting/claim-uid-1.limit").exists());
    let checkpoint = Checkpoint::load(&node.path("state/checkpoint.json")).unwrap();
    assert!(checkpoint.claims.is_empty());
}

#[tokio::test]
async fn unprepare_removes_the_files_a_prepare_left_when_it_could_not_checkpoint() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    let (_stop, _task) = node.start().await;
    // The checkpoint cannot be written: its directory is a file now.
    std::fs::create_dir_all(node.path("state")).unwrap();
    std::fs::remove_dir_all(node.path("state")).unwrap();
    std::fs::write(node.path("state"), "not a directory").unwrap();
    let failed = node.prepare(prepare_llm()).await;
    assert_ne!(failed.claims["uid-1"].error, "", "the prepare fails");
    let left = [
        "cdi/vramslice.io-claim-uid-1.json",
        "accounting/claim-uid-1",
        "accounting/claim-uid-1.limit",
    ];
    assert!(
        left.iter().all(|p| node.path(p).exists()),
        "files written before the checkpoint"
    );

    // The kubelet gives up on the pod and unprepares: the claim is not in the checkpoint, but
    // its files (whose paths follow from its UID) go all the same.
    let done = node
        .unprepare(NodeUnprepareResourcesRequest {
            claims: vec![kubelet_claim("llm", "uid-1")],
        })
        .await;
    assert_eq!(done.claims["uid-1"].error, "");
    for path in left {
        assert!(!node.path(path).exists(), "{path} removed");
    }
}

#[tokio::test]
async fn a_claim_allocated_again_after_a_lost_unprepare_is_prepared_anew() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    let (_stop, _task) = node.start().await;
    let first = node.prepare(prepare_llm()).await;
    assert_eq!(first.claims["uid-1"].devices[0].device_name, "gpu-0");
    let limit_file = node.path("accounting/claim-uid-1.limit");
    let checkpoint = node.path("state/checkpoint.json");

    // The same claim (same UID) deallocated and allocated again with more memory, the unprepare
    // between lost: the old limit must not be handed to its next pod.
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "8Gi")]));
    let bigger = node.prepare(prepare_llm()).await;
    assert_eq!(bigger.claims["uid-1"].error, "");
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert!(limit.contains(&(8 * GIB).to_string()), "{limit}");
    assert_eq!(
        Checkpoint::load(&checkpoint).unwrap().claims["uid-1"].limits,
        [("GPU-0".to_string(), 8 * GIB)]
    );

    // Then on the other GPU: its device, its GPU.
    node.claims.put(claim("llm", "uid-1", &[("gpu-1", "8Gi")]));
    let moved = node.prepare(prepare_llm()).await;
    assert_eq!(moved.claims["uid-1"].error, "");
    assert_eq!(moved.claims["uid-1"].devices[0].device_name, "gpu-1");
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert!(limit.contains("GPU-1"), "{limit}");

    // The same allocation asked again: the checkpoint's answer, nothing rewritten.
    let written = std::fs::metadata(&limit_file).unwrap().modified().unwrap();
    let same = node.prepare(prepare_llm()).await;
    assert_eq!(same.claims["uid-1"], moved.claims["uid-1"]);
    assert_eq!(
        std::fs::metadata(&limit_file).unwrap().modified().unwrap(),
        written
    );

    // Two pods sharing the claim start together after it moved again: the kubelet prepares it
    // twice at once. Both get the new allocation, and its files stay.
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "2Gi")]));
    let (a, b) = tokio::join!(node.prepare(prepare_llm()), node.prepare(prepare_llm()));
    assert_eq!(a.claims["uid-1"].error, "");
    assert_eq!(a.claims["uid-1"], b.claims["uid-1"]);
    assert_eq!(a.claims["uid-1"].devices[0].device_name, "gpu-0");
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert!(limit.contains(&(2 * GIB).to_string()), "{limit}");
    assert!(node.path("cdi/vramslice.io-claim-uid-1.json").exists());
    assert_eq!(
        Checkpoint::load(&checkpoint).unwrap().claims["uid-1"].limits,
        [("GPU-0".to_string(), 2 * GIB)]
    );

    // Allocated again on a device this node does not publish: not answered from the old
    // checkpoint, but refused naming the device.
    node.claims.put(claim("llm", "uid-1", &[("gpu-7", "2Gi")]));
    let unknown = node.prepare(prepare_llm()).await;
    assert!(
        unknown.claims["uid-1"].error.contains("gpu-7"),
        "{}",
        unknown.claims["uid-1"].error
    );
    assert!(
        !Checkpoint::load(&checkpoint)
            .unwrap()
            .claims
            .contains_key("uid-1")
    );
}

#[tokio::test]
async fn after_a_reboot_emptied_the_cdi_directory_the_claim_is_prepared_with_its_files_again() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    let spec_path = node.path("cdi/vramslice.io-claim-uid-1.json");
    let limit_path = node.path("accounting/claim-uid-1.limit");
    let (stop, task) = node.start().await;
    let first = node.prepare(prepare_llm()).await;
    assert_eq!(first.claims["uid-1"].error, "");
    let (spec, limit) = (
        std::fs::read(&spec_path).unwrap(),
        std::fs::read(&limit_path).unwrap(),
    );
    stop.send(true).unwrap();
    task.await.unwrap();

    // The node reboots: /var/run/cdi is a tmpfs (and here the limit file goes too); the API
    // server is not reachable for the claim yet. The kubelet prepares the running pod's claim
    // again, and the container runtime must find the CDI device it is told.
    std::fs::remove_file(&spec_path).unwrap();
    std::fs::remove_file(&limit_path).unwrap();
    std::fs::remove_dir_all(node.path("accounting/claim-uid-1")).unwrap();
    node.claims.claims.lock().unwrap().clear();
    let (_stop, _task) = node.start().await;
    let again = node.prepare(prepare_llm()).await;
    assert_eq!(again.claims["uid-1"], first.claims["uid-1"]);
    assert_eq!(
        std::fs::read(&spec_path).unwrap(),
        spec,
        "the CDI spec is back"
    );
    assert_eq!(
        std::fs::read(&limit_path).unwrap(),
        limit,
        "the limit file is back"
    );
    assert!(node.path("accounting/claim-uid-1").is_dir());
}

/// After a reboot one GPU is gone and `gpu-0` now names the other: a claim prepared on the old
/// `gpu-0` is not prepared again there (beside the claims the scheduler counted on it), with a
/// reason; a claim whose GPU kept its name is.
/// A request per GPU (the layout with distinctAttribute): a container naming either request,
/// or the whole claim, gets the claim's CDI IDs exactly once (the runtime applies each
/// occurrence, hooks included).
#[tokio::test]
async fn a_claim_of_two_requests_hands_its_cdi_ids_once_whichever_a_container_names() {
    let node = Node::new();
    let mut two = claim("tp2", "uid-3", &[("gpu-0", "8Gi"), ("gpu-1", "8Gi")]);
    if let Some(results) = two
        .status
        .as_mut()
        .and_then(|s| s.allocation.as_mut())
        .and_then(|a| a.devices.as_mut())
        .and_then(|d| d.results.as_mut())
    {
        results[1].request = "second".into();
    }
    node.claims.put(two);
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![kubelet_claim("tp2", "uid-3")],
        })
        .await;
    let prepared = &answer.claims["uid-3"];
    assert_eq!(prepared.error, "");
    // As the kubelet collects them: every device listed under the names the container uses.
    let handed = |names: &[&str]| -> Vec<&str> {
        prepared
            .devices
            .iter()
            .filter(|d| d.request_names.iter().any(|r| names.contains(&r.as_str())))
            .flat_map(|d| d.cdi_device_ids.iter().map(String::as_str))
            .collect()
    };
    for names in [&["vram"][..], &["second"][..], &["vram", "second"][..]] {
        assert_eq!(handed(names), ["vramslice.io/claim=uid-3"], "{names:?}");
    }
}

#[tokio::test]
async fn a_claim_whose_gpu_changed_under_its_device_name_is_refused_not_moved() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    node.claims
        .put(claim("other", "uid-2", &[("gpu-1", "4Gi")]));
    let (stop, task) = node.start().await;
    assert_eq!(node.prepare(prepare_llm()).await.claims["uid-1"].error, "");
    let other = NodePrepareResourcesRequest {
        claims: vec![kubelet_claim("other", "uid-2")],
    };
    assert_eq!(node.prepare(other.clone()).await.claims["uid-2"].error, "");
    stop.send(true).unwrap();
    task.await.unwrap();

    // GPU-0 is gone; GPU-1 is now index 0, so gpu-0 names it.
    let mut left = samples();
    left.remove(0);
    left[0].index = 0;
    let (_stop, _task) = node.start_with(&left).await;
    let again = node.prepare(prepare_llm()).await;
    let error = &again.claims["uid-1"].error;
    assert!(
        error.contains("it was prepared on GPU-0, but its devices gpu-0 are now GPU-1")
            && error.contains("delete its pod"),
        "{error}"
    );
    let again = node.prepare(other).await;
    let error = &again.claims["uid-2"].error;
    assert!(
        error.contains("prepared on GPU-1, but its devices gpu-1 are now no GPU"),
        "{error}"
    );
    // Allocated again meanwhile (its unprepare lost, a new share of gpu-0): that allocation
    // was made on the node's GPUs as they are now, and is prepared.
    let mut reallocated = claim("llm", "uid-1", &[("gpu-0", "4Gi")]);
    if let Some(results) = reallocated
        .status
        .as_mut()
        .and_then(|s| s.allocation.as_mut())
        .and_then(|a| a.devices.as_mut())
        .and_then(|d| d.results.as_mut())
    {
        results[0].share_id = Some("share-after-the-reboot".into());
    }
    node.claims.put(reallocated);
    let again = node.prepare(prepare_llm()).await;
    assert_eq!(
        again.claims["uid-1"].error, "",
        "a new allocation is prepared"
    );
    let limit = std::fs::read_to_string(node.path("accounting/claim-uid-1.limit")).unwrap();
    assert!(limit.contains("GPU-1"), "{limit}");
}

#[tokio::test]
async fn a_checkpoint_without_the_files_text_prepares_a_claim_whose_spec_is_gone_from_the_api() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    let spec_path = node.path("cdi/vramslice.io-claim-uid-1.json");
    let (stop, task) = node.start().await;
    let first = node.prepare(prepare_llm()).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    // A checkpoint written by an earlier version holds no file text.
    let checkpoint_path = node.path("state/checkpoint.json");
    let mut checkpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&checkpoint_path).unwrap()).unwrap();
    let entry = checkpoint["claims"]["uid-1"].as_object_mut().unwrap();
    assert!(entry.remove("cdiSpecText").is_some() && entry.remove("limitFileText").is_some());
    std::fs::write(&checkpoint_path, checkpoint.to_string()).unwrap();
    std::fs::remove_file(&spec_path).unwrap();

    let (_stop, _task) = node.start().await;
    let again = node.prepare(prepare_llm()).await;
    assert_eq!(again.claims["uid-1"], first.claims["uid-1"]);
    assert!(spec_path.exists(), "prepared again from the API");
    assert_eq!(node.claims.gets.load(Ordering::SeqCst), 2);
    let saved = Checkpoint::load(&checkpoint_path).unwrap();
    assert!(
        saved.claims["uid-1"].cdi_spec_text.is_some(),
        "and checkpointed with its text"
    );
}

#[tokio::test]
async fn a_first_available_alternative_is_prepared_under_the_request_containers_name() {
    let node = Node::new();
    let mut c = claim("llm", "uid-1", &[("gpu-0", "4Gi")]);
    let results = c
        .status
        .as_mut()
        .and_then(|s| s.allocation.as_mut())
        .and_then(|a| a.devices.as_mut())
        .and_then(|d| d.results.as_mut())
        .unwrap();
    results[0].request = "vram/large".into();
    node.claims.put(c);
    let (_stop, _task) = node.start().await;
    let answer = node.prepare(prepare_llm()).await;
    let prepared = &answer.claims["uid-1"];
    assert_eq!(prepared.error, "");
    // Containers name `vram` (resources.claims[].request); the kubelet matches by it.
    assert_eq!(prepared.devices[0].request_names, ["vram"]);
}

#[tokio::test]
async fn a_two_gpu_claim_gets_two_devices_and_one_limit_per_gpu() {
    let node = Node::new();
    node.claims.put(claim(
        "tp2",
        "uid-2",
        &[("gpu-0", "20Gi"), ("gpu-1", "20Gi")],
    ));
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![kubelet_claim("tp2", "uid-2")],
        })
        .await;
    let devices: Vec<&str> = answer.claims["uid-2"]
        .devices
        .iter()
        .map(|d| d.device_name.as_str())
        .collect();
    assert_eq!(devices, ["gpu-0", "gpu-1"]);
    // What the kubelet gives a container naming the request (every device of it, its CDI IDs
    // concatenated): the claim's IDs once, not once per device.
    let handed: Vec<&str> = answer.claims["uid-2"]
        .devices
        .iter()
        .filter(|d| d.request_names.iter().any(|r| r == "vram"))
        .flat_map(|d| d.cdi_device_ids.iter().map(String::as_str))
        .collect();
    assert_eq!(handed, ["vramslice.io/claim=uid-2"]);
    let limits = format!("GPU-0:{0},GPU-1:{0}", 20 * GIB);
    assert_eq!(
        std::fs::read_to_string(node.path("accounting/claim-uid-2.limit")).unwrap(),
        format!("limits={limits}\n")
    );
    let spec = std::fs::read_to_string(node.path("cdi/vramslice.io-claim-uid-2.json")).unwrap();
    assert!(
        spec.contains(&format!("VRAMSLICE_VRAM_LIMITS={limits}")),
        "{spec}"
    );
    assert!(
        spec.contains("NVIDIA_VISIBLE_DEVICES=GPU-0,GPU-1"),
        "{spec}"
    );

    // The GpuNode report shows the claim on both GPUs, as its pod, from the checkpoint alone.
    let reopened = Driver::open(node.config(), node.claims.clone()).unwrap();
    let holdings = reopened.holdings().await;
    let shown: Vec<(&str, &str, u64)> = holdings
        .iter()
        .map(|h| (h.gpu_uuid.as_str(), h.pods[0].0.as_str(), h.bytes))
        .collect();
    assert_eq!(
        shown,
        [
            ("GPU-0", "tp2-pod", 20 * GIB),
            ("GPU-1", "tp2-pod", 20 * GIB)
        ]
    );
}

#[tokio::test]
async fn the_pods_sharing_a_prepared_claim_are_read_again_and_kept_across_restarts() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-1", "6Gi")]));
    node.claims
        .put(claim("other", "uid-2", &[("gpu-0", "2Gi")]));
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![
                kubelet_claim("llm", "uid-1"),
                kubelet_claim("other", "uid-2"),
            ],
        })
        .await;
    assert!(answer.claims.values().all(|c| c.error.is_empty()));
    let driver = Driver::open(node.config(), node.claims.clone()).unwrap();
    let pods_of = |holdings: Vec<vramslice_core::node::publish::ClaimHolding>, claim: &str| {
        holdings
            .into_iter()
            .find(|h| h.claim == claim)
            .map(|h| h.pods.into_iter().map(|(name, _)| name).collect::<Vec<_>>())
    };
    assert_eq!(
        pods_of(driver.holdings().await, "llm").unwrap(),
        ["llm-pod"]
    );
    assert_eq!(
        driver.reconcile_prepared_claims().await,
        Reconciled::default(),
        "nothing changed"
    );

    // The Deployment rolled: the first pod is gone, two others share the claim. The kubelet
    // never prepares it again for them.
    let mut rolled = claim("llm", "uid-1", &[("gpu-1", "6Gi")]);
    rolled.status.as_mut().unwrap().reserved_for = Some(
        ["llm-b", "llm-c"]
            .map(|name| ResourceClaimConsumerReference {
                resource: "pods".into(),
                name: name.into(),
                uid: format!("pod-{name}"),
                api_group: None,
            })
            .to_vec(),
    );
    node.claims.put(rolled);
    // A claim made again under the same name (another UID) is not this prepared one.
    node.claims
        .put(claim("other", "uid-remade", &[("gpu-0", "2Gi")]));
    let reconciled = driver.reconcile_prepared_claims().await;
    assert_eq!(reconciled.pods_changed, 1);
    assert!(
        reconciled.released.is_empty(),
        "a claim just seen gone waits for its unprepare"
    );
    assert_eq!(
        pods_of(driver.holdings().await, "llm").unwrap(),
        ["llm-b", "llm-c"]
    );
    assert_eq!(
        pods_of(driver.holdings().await, "other").unwrap(),
        ["other-pod"]
    );
    // Checkpointed: a restarted agent knows them.
    let reopened = Driver::open(node.config(), node.claims.clone()).unwrap();
    assert_eq!(
        pods_of(reopened.holdings().await, "llm").unwrap(),
        ["llm-b", "llm-c"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_prepared_claim_gone_from_the_api_whose_unprepare_never_comes_is_released_after_the_grace()
 {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-1", "6Gi")]));
    node.claims.put(claim("kept", "uid-2", &[("gpu-0", "2Gi")]));
    let driver = Driver::open(node.config(), node.claims.clone()).unwrap();
    driver.set_gpus(&samples());
    for (name, uid) in [("llm", "uid-1"), ("kept", "uid-2")] {
        let claim = ClaimRef {
            namespace: "ml".into(),
            name: name.into(),
            uid: uid.into(),
        };
        driver.prepare(&claim).await.unwrap();
    }
    assert!(node.path("cdi/vramslice.io-claim-uid-1.json").exists());
    // The claim is deleted (its pods are gone) and the kubelet, its state lost, never asks.
    node.claims
        .claims
        .lock()
        .unwrap()
        .remove(&("ml".to_string(), "llm".to_string()));
    assert!(driver.reconcile_prepared_claims().await.released.is_empty());
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    assert!(driver.reconcile_prepared_claims().await.released.is_empty());
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    assert_eq!(
        driver.reconcile_prepared_claims().await.released,
        ["ml/llm"]
    );
    assert!(!node.path("cdi/vramslice.io-claim-uid-1.json").exists());
    assert!(!node.path("accounting/claim-uid-1").exists());
    let holdings: Vec<String> = driver
        .holdings()
        .await
        .into_iter()
        .map(|h| h.claim)
        .collect();
    assert_eq!(holdings, ["kept"]);
    let checkpoint = Checkpoint::load(&node.path("state/checkpoint.json")).unwrap();
    assert_eq!(checkpoint.claims.keys().collect::<Vec<_>>(), ["uid-2"]);
    // A claim of its own outlives its pods: deallocated, then allocated on another node, same
    // UID. What was prepared here is held by nobody here, so it is released too, and the pods
    // of the other node are never recorded here.
    node.claims
        .put(claim("moved", "uid-3", &[("gpu-0", "1Gi")]));
    let moved = ClaimRef {
        namespace: "ml".into(),
        name: "moved".into(),
        uid: "uid-3".into(),
    };
    driver.prepare(&moved).await.unwrap();
    let mut elsewhere = claim("moved", "uid-3", &[("gpu-0", "1Gi")]);
    for result in elsewhere
        .status
        .as_mut()
        .unwrap()
        .allocation
        .as_mut()
        .unwrap()
        .devices
        .as_mut()
        .unwrap()
        .results
        .as_mut()
        .unwrap()
    {
        result.pool = "node-b".into();
    }
    elsewhere
        .status
        .as_mut()
        .unwrap()
        .reserved_for
        .as_mut()
        .unwrap()[0]
        .name = "on-b".into();
    node.claims.put(elsewhere);
    let first = driver.reconcile_prepared_claims().await;
    assert_eq!(
        first.pods_changed, 0,
        "the other node's pods are not this claim's here"
    );
    // A read that fails meanwhile does not restart its time.
    node.claims.failing.store(true, Ordering::SeqCst);
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    assert!(driver.reconcile_prepared_claims().await.released.is_empty());
    node.claims.failing.store(false, Ordering::SeqCst);
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    assert_eq!(
        driver.reconcile_prepared_claims().await.released,
        ["ml/moved"]
    );

    // A claim back within the grace is not released: its gone time starts again.
    node.claims
        .claims
        .lock()
        .unwrap()
        .remove(&("ml".to_string(), "kept".to_string()));
    driver.reconcile_prepared_claims().await;
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    node.claims.put(claim("kept", "uid-2", &[("gpu-0", "2Gi")]));
    driver.reconcile_prepared_claims().await;
    node.claims
        .claims
        .lock()
        .unwrap()
        .remove(&("ml".to_string(), "kept".to_string()));
    tokio::time::advance(GONE_CLAIM_GRACE / 2).await;
    assert!(driver.reconcile_prepared_claims().await.released.is_empty());
}

#[tokio::test]
async fn an_admin_access_claim_is_prepared_but_its_grant_is_not_added_back() {
    // kube-scheduler counts no consumed capacity for admin-access results, so the capacity the
    // slice publishes must not include their grants (what they may still take is held back).
    let node = Node::new();
    node.claims
        .put(claim("plain", "uid-p", &[("gpu-0", "6Gi")]));
    let mut admin = claim("debug", "uid-a", &[("gpu-0", "8Gi")]);
    for result in admin
        .status
        .as_mut()
        .and_then(|s| s.allocation.as_mut())
        .and_then(|a| a.devices.as_mut())
        .and_then(|d| d.results.as_mut())
        .unwrap()
    {
        result.admin_access = Some(true);
    }
    node.claims.put(admin);
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![
                kubelet_claim("plain", "uid-p"),
                kubelet_claim("debug", "uid-a"),
            ],
        })
        .await;
    assert!(answer.claims["uid-a"].error.is_empty(), "{answer:?}");
    // Restarted from its checkpoint alone, the driver still knows which claim is admin.
    let reopened = Driver::open(node.config(), node.claims.clone()).unwrap();
    reopened.set_gpus(&samples());
    let grants = reopened.grants_by_gpu(&samples()).await;
    assert_eq!(grants["GPU-0"].granted, 6 * GIB);
    assert_eq!(grants["GPU-0"].unobserved, 14 * GIB);

    // A checkpoint of an earlier version does not say: the claim is read again to learn it.
    let path = node.path("state/checkpoint.json");
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut removed = 0;
    for claim in saved["claims"].as_object_mut().unwrap().values_mut() {
        removed += usize::from(
            claim
                .as_object_mut()
                .unwrap()
                .remove("adminAccess")
                .is_some(),
        );
    }
    assert_eq!(removed, 2, "both claims record it: {saved}");
    std::fs::write(&path, saved.to_string()).unwrap();
    let upgraded = Driver::open(node.config(), node.claims.clone()).unwrap();
    assert_eq!(
        upgraded.grants_by_gpu(&samples()).await["GPU-0"].granted,
        14 * GIB
    );
    upgraded.learn_admin_access().await;
    assert_eq!(
        upgraded.grants_by_gpu(&samples()).await["GPU-0"].granted,
        6 * GIB
    );
    let again = Driver::open(node.config(), node.claims.clone()).unwrap();
    assert_eq!(
        again.grants_by_gpu(&samples()).await["GPU-0"].granted,
        6 * GIB,
        "what was learned is checkpointed"
    );
}

#[tokio::test]
async fn each_claim_of_a_call_fails_or_succeeds_on_its_own_with_a_reason() {
    let node = Node::new();
    node.claims.put(claim("llm", "uid-1", &[("gpu-0", "4Gi")]));
    node.claims
        .put(claim("ghost", "uid-new", &[("gpu-7", "4Gi")]));
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![
                kubelet_claim("llm", "uid-1"),
                kubelet_claim("missing", "uid-3"),
                kubelet_claim("llm", "uid-old"),
                kubelet_claim("ghost", "uid-new"),
                Claim::default(),
            ],
        })
        .await;
    assert_eq!(answer.claims["uid-1"].error, "");
    assert_eq!(answer.claims["uid-3"].error, "claim ml/missing not found");
    assert_eq!(
        answer.claims["uid-old"].error,
        "claim ml/llm has UID uid-1, the kubelet asked for uid-old"
    );
    assert!(
        answer.claims["uid-new"]
            .error
            .contains("device gpu-7 of pool node-a"),
        "{}",
        answer.claims["uid-new"].error
    );
    assert!(
        answer.claims[""]
            .error
            .contains("lacks a namespace, name or UID")
    );
    let checkpoint = Checkpoint::load(&node.path("state/checkpoint.json")).unwrap();
    assert_eq!(checkpoint.claims.keys().collect::<Vec<_>>(), ["uid-1"]);
}

#[tokio::test]
async fn no_claim_is_prepared_while_the_guard_library_is_not_a_file_on_the_node() {
    let node = Node::new();
    let library = node.path("lib/libvramslice_guard.so");
    // A mistyped host path: the runtime would mount an empty directory the loader skips.
    std::fs::remove_file(&library).unwrap();
    std::fs::create_dir(&library).unwrap();
    node.claims.put(claim("llm", "uid-1", &[("gpu-1", "6Gi")]));
    let (_stop, _task) = node.start().await;
    let refused = node.prepare(prepare_llm()).await;
    let error = &refused.claims["uid-1"].error;
    assert!(
        error.contains(&library.display().to_string()) && error.contains("is not a file"),
        "{error}"
    );
    assert!(refused.claims["uid-1"].devices.is_empty());
    assert!(!node.path("cdi/vramslice.io-claim-uid-1.json").exists());
    assert!(!node.path("accounting/claim-uid-1").exists());

    // Installed: the kubelet's retry prepares it.
    std::fs::remove_dir(&library).unwrap();
    std::fs::write(&library, b"").unwrap();
    let prepared = node.prepare(prepare_llm()).await;
    assert_eq!(prepared.claims["uid-1"].error, "");
    assert!(node.path("cdi/vramslice.io-claim-uid-1.json").exists());

    // A reboot empties the CDI directory and the library is gone (its install step not run
    // yet): the checkpointed claim's spec is not written again either.
    std::fs::remove_file(node.path("cdi/vramslice.io-claim-uid-1.json")).unwrap();
    std::fs::remove_file(&library).unwrap();
    let refused = node.prepare(prepare_llm()).await;
    assert!(
        refused.claims["uid-1"].error.contains("is not a file")
            || refused.claims["uid-1"].error.contains("cannot be read"),
        "{}",
        refused.claims["uid-1"].error
    );
    assert!(!node.path("cdi/vramslice.io-claim-uid-1.json").exists());
}

/// A pod in ml whose containers use the given pod claims (entry name = claim name).
fn pod_using(name: &str, uid: &str, containers: &[(&str, &[&str])]) -> Pod {
    let entries: std::collections::BTreeSet<&str> = containers
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": "ml", "uid": uid },
        "spec": {
            "resourceClaims": entries.iter().map(|e| serde_json::json!({ "name": e, "resourceClaimName": e })).collect::<Vec<_>>(),
            "containers": containers.iter().map(|(c, claims)| serde_json::json!({
                "name": c,
                "resources": { "claims": claims.iter().map(|n| serde_json::json!({ "name": n })).collect::<Vec<_>>() }
            })).collect::<Vec<_>>()
        }
    }))
    .unwrap()
}

/// A claim reserved for the pod `pod` (UID `pod-uid`).
fn claim_of_pod(name: &str, uid: &str, device: &str, memory: &str, pod: &str) -> ResourceClaim {
    let mut c = claim(name, uid, &[(device, memory)]);
    c.status.as_mut().unwrap().reserved_for = Some(vec![ResourceClaimConsumerReference {
        resource: "pods".into(),
        name: pod.into(),
        uid: "pod-uid".into(),
        api_group: None,
    }]);
    c
}

#[tokio::test]
async fn a_container_using_two_vramslice_claims_is_refused_with_the_reason() {
    // The CDI edits of two claims set the same limit file and environment: in one container
    // the one applied last would hold alone, and a GPU could be filled past its grant.
    let node = Node::new();
    node.claims
        .put(claim_of_pod("a", "uid-a", "gpu-0", "6Gi", "server"));
    node.claims
        .put(claim_of_pod("b", "uid-b", "gpu-1", "10Gi", "server"));
    node.claims
        .put_pod(pod_using("server", "pod-uid", &[("main", &["a", "b"])]));
    let (_stop, _task) = node.start().await;
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![kubelet_claim("a", "uid-a"), kubelet_claim("b", "uid-b")],
        })
        .await;
    for uid in ["uid-a", "uid-b"] {
        let error = &answer.claims[uid].error;
        assert!(
            error.contains("container main of pod ml/server uses claims")
                && error.contains("ml/a")
                && error.contains("ml/b")
                && error.contains("in one claim"),
            "{error}"
        );
    }
    assert!(
        Checkpoint::load(&node.path("state/checkpoint.json"))
            .unwrap()
            .claims
            .is_empty()
    );

    // One claim per container, in one pod: each container has its own limit files.
    node.claims.put_pod(pod_using(
        "server",
        "pod-uid",
        &[("main", &["a"]), ("side", &["b"])],
    ));
    let answer = node
        .prepare(NodePrepareResourcesRequest {
            claims: vec![kubelet_claim("a", "uid-a"), kubelet_claim("b", "uid-b")],
        })
        .await;
    assert_eq!(answer.claims["uid-a"].error, "");
    assert_eq!(answer.claims["uid-b"].error, "");
}

#[tokio::test]
async fn each_verdict_of_the_kubelet_is_recorded_confirmations_counted_refusals_kept() {
    let node = Node::new();
    let driver = Arc::new(Driver::open(node.config(), node.claims.clone()).unwrap());
    let (stop, rx) = watch::channel(false);
    let (registrations, mut registered) = watch::channel(KubeletRegistration::default());
    let sockets = node.sockets();
    let task = tokio::spawn(async move {
        serve_with_registrations(driver, &sockets, registrations, rx)
            .await
            .unwrap()
    });
    for _ in 0..100 {
        if node.sockets().registration().exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut reg = RegistrationClient::new(connect(&node.sockets().registration()).await);
    for (ok, confirmed, refused) in [
        (true, 1, None),
        (false, 1, Some("refused")),
        (true, 2, None),
    ] {
        reg.notify_registration_status(RegistrationStatus {
            plugin_registered: ok,
            error: if ok { String::new() } else { "refused".into() },
        })
        .await
        .unwrap();
        let state = registered.borrow_and_update().clone();
        assert_eq!(state.confirmed, confirmed, "after registered={ok}");
        assert_eq!(state.refused.as_deref(), refused, "after registered={ok}");
        assert_eq!(state.registered(), ok);
    }
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// What a raw HTTP/2 client got for one request.
#[derive(Debug, PartialEq)]
enum Raw {
    /// The stream was reset with this error code.
    Reset(u32),
    /// The connection went away with this error code.
    GoAway(u32),
    /// A gRPC answer: its message bytes and `grpc-status`.
    Answer(Vec<u8>, String),
}

fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// Call GetInfo on the socket at `path` twice on one connection (streams 1 and 3, the second
/// header block referring to the HPACK dynamic table the first filled) the way the kubelet's
/// plugin watcher does, with `:authority` set to `authority`: raw frames, since neither tonic
/// nor the h2 client lets a request carry an authority that is no URI authority.
async fn raw_get_info(path: &Path, authority: &str) -> Vec<Raw> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::UnixStream::connect(path).await.unwrap();
    let mut encoder = loona_hpack::Encoder::new();
    let headers: [(&[u8], &[u8]); 6] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pluginregistration.Registration/GetInfo"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(raw_frame(4, 0, 0, &[]));
    for stream in [1, 3] {
        out.extend(raw_frame(1, 0x4, stream, &encoder.encode(headers)));
        // One gRPC message: uncompressed, an empty InfoRequest.
        out.extend(raw_frame(0, 0x1, stream, &[0, 0, 0, 0, 0]));
    }
    conn.write_all(&out).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut data: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut done: BTreeMap<u32, Raw> = BTreeMap::new();
    let read = async {
        while done.len() < 2 {
            let mut head = [0u8; 9];
            conn.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            conn.read_exact(&mut payload).await.unwrap();
            match kind {
                // SETTINGS: acknowledge.
                4 if flags & 0x1 == 0 => conn.write_all(&raw_frame(4, 0x1, 0, &[])).await.unwrap(),
                // DATA
                0 => data.entry(stream).or_default().extend(payload),
                // HEADERS (the server sends END_HEADERS blocks): trailers end the answer.
                1 => {
                    assert_ne!(flags & 0x4, 0);
                    let fields = decoder.decode(&payload).unwrap();
                    if flags & 0x1 != 0 {
                        let status = fields
                            .iter()
                            .find(|(n, _)| n == b"grpc-status")
                            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default();
                        let body = data.remove(&stream).unwrap_or_default();
                        done.insert(stream, Raw::Answer(body, status));
                    }
                }
                // RST_STREAM
                3 => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    done.insert(stream, Raw::Reset(code));
                }
                // GOAWAY
                7 => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    return vec![Raw::GoAway(code)];
                }
                _ => {}
            }
        }
        done.into_values().collect()
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

/// The kubelet's plugin watcher dials the registration socket with grpc-go's passthrough
/// resolver, which sends the socket path as `:authority`; the socket answers it all the same.
#[tokio::test]
async fn the_registration_socket_answers_a_kubelet_that_sends_the_socket_path_as_authority() {
    use prost::Message;
    let node = Node::new();
    let (stop, task) = node.start().await;
    let registration = node.sockets().registration();
    let answers = raw_get_info(&registration, &registration.display().to_string()).await;
    assert_eq!(answers.len(), 2);
    for answer in answers {
        let Raw::Answer(body, status) = answer else {
            panic!("expected an answer, got {answer:?}");
        };
        assert_eq!(status, "0");
        assert_eq!(body[0], 0, "uncompressed");
        assert_eq!(
            usize::try_from(u32::from_be_bytes(body[1..5].try_into().unwrap())).unwrap(),
            body.len() - 5
        );
        let info = vramslice_dra::proto::registration::PluginInfo::decode(&body[5..]).unwrap();
        assert_eq!(info.r#type, "DRAPlugin");
        assert_eq!(info.name, "vramslice.io");
        assert_eq!(
            info.endpoint,
            node.sockets().endpoint().display().to_string()
        );
    }
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// The control: the same requests to the same service served by tonic directly, without the
/// shim, are reset with PROTOCOL_ERROR (h2 refuses the authority), which is the bug on a real
/// node. A valid authority is answered by both.
#[tokio::test]
async fn without_the_shim_tonic_resets_a_request_whose_authority_is_a_socket_path() {
    use tokio_stream::wrappers::UnixListenerStream;
    use vramslice_dra::proto::registration::registration_server::RegistrationServer;
    use vramslice_dra::registration::RegistrationService;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain-reg.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(RegistrationService::new(
                "vramslice.io",
                "/plugins/vramslice.io/dra.sock",
            )))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = rx.await;
            }),
    );
    const PROTOCOL_ERROR: u32 = 1;
    assert_eq!(
        raw_get_info(&path, &path.display().to_string()).await,
        [Raw::Reset(PROTOCOL_ERROR), Raw::Reset(PROTOCOL_ERROR)]
    );
    let answers = raw_get_info(&path, "localhost").await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Raw::Answer(_, status) if status == "0")),
        "{answers:?}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn opening_deletes_temporaries_an_interrupted_write_left_and_nothing_else() {
    let node = Node::new();
    let files = [
        // Left by an earlier process that stopped between write and rename.
        ("state/checkpoint.json.tmp.1.0", false),
        ("cdi/vramslice.io-claim-uid-1.json.tmp.1.4", false),
        ("accounting/claim-uid-1.limit.tmp.1.5", false),
        // Not ours, or not a temporary.
        ("state/other.json.tmp.1.0", true),
        ("cdi/nvidia.com-gpu.json.tmp.1.0", true),
        ("cdi/vramslice.io-claim-uid-1.json", true),
        ("accounting/claim-uid-1.limit", true),
        ("accounting/claim-uid-1/0.acct.tmp.1.0", true),
    ];
    for (rel, _) in files {
        let path = node.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{}").unwrap();
    }
    Driver::open(node.config(), node.claims.clone()).unwrap();
    for (rel, kept) in files {
        assert_eq!(node.path(rel).exists(), kept, "{rel}");
    }
}
