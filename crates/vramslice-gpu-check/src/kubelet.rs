//! A test kubelet for the real plugin binary: the device manager's side of registration,
//! ListAndWatch and Allocate, recorded as a JSON [`Report`].
//!
//! [`summarise`] reads an answer (pure, tested); which units a container gets is the plugin's
//! decision (GetPreferredAllocation), as with the real kubelet. [`run`] is the shell that serves
//! the socket and writes the report after every event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vramslice_core::DeviceId;
use vramslice_device_plugin::proto::deviceplugin::device_plugin_client::DevicePluginClient;
use vramslice_device_plugin::proto::deviceplugin::registration_server::{
    Registration, RegistrationServer,
};
use vramslice_device_plugin::proto::deviceplugin::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Device, Empty,
    PreferredAllocationRequest, RegisterRequest,
};
use vramslice_device_plugin::proto::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vramslice_device_plugin::proto::podresources::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, GetPodResourcesRequest,
    GetPodResourcesResponse, ListPodResourcesRequest, ListPodResourcesResponse,
};
use vramslice_device_plugin::uds;

/// The kubelet's health string for a usable device.
const HEALTHY: &str = "Healthy";
/// How long a dial-back or a unary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the test kubelet saw.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Register requests, in order.
    pub registrations: Vec<RegistrationSeen>,
    /// ListAndWatch answers received.
    pub lists: u64,
    /// Milliseconds from the kubelet's start to the first ListAndWatch answer.
    pub first_list_ms: Option<f64>,
    /// Per GPU UUID, from the latest ListAndWatch answer.
    pub gpus: BTreeMap<String, UnitsSeen>,
    /// Device IDs in the latest answer that are not `<GPU-uuid>-vram-<n>`-style vramslice IDs.
    pub unparsed_ids: Vec<String>,
    /// The Allocate call, when one was asked for.
    pub allocate: Option<AllocateSeen>,
}

/// One registration.
#[derive(Debug, Serialize)]
pub struct RegistrationSeen {
    /// Extended resource name the plugin registered.
    pub resource_name: String,
    /// Its socket, relative to the device-plugin directory.
    pub endpoint: String,
    /// API version.
    pub version: String,
    /// Options returned on dial-back.
    pub options: Option<OptionsSeen>,
    /// Why dialling back failed, when it did.
    pub dial_back_error: Option<String>,
}

/// A plugin's options.
#[derive(Debug, Default, Serialize)]
pub struct OptionsSeen {
    /// PreStartContainer wanted.
    pub pre_start_required: bool,
    /// GetPreferredAllocation offered.
    pub get_preferred_allocation_available: bool,
}

/// Units one GPU advertises.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct UnitsSeen {
    /// Advertised devices (units).
    pub units: u64,
    /// Of which healthy.
    pub healthy: u64,
}

/// The Allocate call and what it returned.
#[derive(Debug, Default, Serialize)]
pub struct AllocateSeen {
    /// Units allocated: what GetPreferredAllocation proposed.
    pub device_ids: Vec<String>,
    /// Environment for the container.
    pub envs: BTreeMap<String, String>,
    /// Mounts for the container.
    pub mounts: Vec<MountSeen>,
    /// Why Allocate failed, when it did.
    pub error: Option<String>,
}

/// One mount.
#[derive(Debug, Serialize)]
pub struct MountSeen {
    /// Path in the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Read-only.
    pub read_only: bool,
}

/// Units per GPU in a ListAndWatch answer, and the IDs that are not vramslice device IDs.
pub fn summarise(devices: &[Device]) -> (BTreeMap<String, UnitsSeen>, Vec<String>) {
    let mut gpus: BTreeMap<String, UnitsSeen> = BTreeMap::new();
    let mut unparsed = Vec::new();
    for device in devices {
        match device.id.parse::<DeviceId>() {
            Ok(id) => {
                let seen = gpus.entry(id.gpu_uuid).or_default();
                seen.units += 1;
                if device.health == HEALTHY {
                    seen.healthy += 1;
                }
            }
            Err(_) => unparsed.push(device.id.clone()),
        }
    }
    (gpus, unparsed)
}

/// The healthy device IDs of an answer: what the kubelet offers GetPreferredAllocation.
pub fn healthy_ids(devices: &[Device]) -> Vec<String> {
    devices
        .iter()
        .filter(|d| d.health == HEALTHY)
        .map(|d| d.id.clone())
        .collect()
}

/// The report and where it is written.
struct Shared {
    report: Mutex<Report>,
    path: PathBuf,
    started: Instant,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut Report)) {
        let mut report = self.report.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut report);
        if let Err(e) = write_report(&self.path, &report) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the report");
        }
    }
}

fn write_report(path: &Path, report: &Report) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

struct Kubelet {
    dir: PathBuf,
    shared: Arc<Shared>,
    allocate: Option<usize>,
}

#[tonic::async_trait]
impl Registration for Kubelet {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let req = request.into_inner();
        tracing::info!(resource = %req.resource_name, endpoint = %req.endpoint, "plugin registering");
        // Like the kubelet: dial the endpoint back and ask for the options before answering.
        let dialled = dial_back(&self.dir.join(&req.endpoint)).await;
        let (options, dial_back_error) = match &dialled {
            Ok((_, o)) => (Some(*o), None),
            Err(e) => (None, Some(e.clone())),
        };
        let index = {
            let mut index = 0;
            self.shared.update(|r| {
                index = r.registrations.len();
                r.registrations.push(RegistrationSeen {
                    resource_name: req.resource_name.clone(),
                    endpoint: req.endpoint.clone(),
                    version: req.version.clone(),
                    options: options.map(|o| OptionsSeen {
                        pre_start_required: o.pre_start_required,
                        get_preferred_allocation_available: o.get_preferred_allocation_available,
                    }),
                    dial_back_error,
                });
            });
            index
        };
        let (client, _) = dialled.map_err(Status::unavailable)?;
        tokio::spawn(follow(client, Arc::clone(&self.shared), self.allocate));
        tracing::info!(registration = index, "plugin registered");
        Ok(Response::new(Empty {}))
    }
}

type Client = DevicePluginClient<tonic::transport::Channel>;

async fn dial_back(
    socket: &Path,
) -> Result<
    (
        Client,
        vramslice_device_plugin::proto::deviceplugin::DevicePluginOptions,
    ),
    String,
> {
    let channel = uds::connect(socket, CALL_TIMEOUT)
        .await
        .map_err(|e| format!("dial back {}: {}", socket.display(), uds::error_chain(&e)))?;
    let mut client = DevicePluginClient::new(channel);
    let options = client
        .get_device_plugin_options(Empty {})
        .await
        .map_err(|e| format!("GetDevicePluginOptions: {e}"))?
        .into_inner();
    Ok((client, options))
}

/// Follow ListAndWatch; Allocate once when asked, after the first answer that has the units.
async fn follow(mut client: Client, shared: Arc<Shared>, mut allocate: Option<usize>) {
    let mut stream = match client.list_and_watch(Empty {}).await {
        Ok(r) => r.into_inner(),
        Err(e) => {
            tracing::error!(error = %e, "ListAndWatch refused");
            return;
        }
    };
    while let Some(message) = stream.next().await {
        let devices = match message {
            Ok(m) => m.devices,
            Err(e) => {
                tracing::warn!(error = %e, "ListAndWatch stream ended");
                return;
            }
        };
        let (gpus, unparsed) = summarise(&devices);
        let elapsed_ms = shared.started.elapsed().as_secs_f64() * 1e3;
        shared.update(|r| {
            r.lists += 1;
            r.first_list_ms.get_or_insert(elapsed_ms);
            r.gpus = gpus;
            r.unparsed_ids = unparsed;
        });
        let available = healthy_ids(&devices);
        if let Some(count) = allocate.filter(|&n| n > 0 && available.len() >= n) {
            allocate = None;
            let seen = allocate_units(&mut client, available, count).await;
            shared.update(|r| r.allocate = Some(seen));
        }
    }
}

/// As the kubelet's device manager: GetPreferredAllocation over the available units, then
/// Allocate what the plugin preferred (an answer of the wrong size is recorded as the error).
async fn allocate_units(client: &mut Client, available: Vec<String>, count: usize) -> AllocateSeen {
    let mut seen = AllocateSeen::default();
    let preferred = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: available,
                must_include_device_i_ds: vec![],
                allocation_size: i32::try_from(count).unwrap_or(i32::MAX),
            }],
        })
        .await;
    let ids: Vec<String> = match preferred {
        Ok(r) => r
            .into_inner()
            .container_responses
            .into_iter()
            .flat_map(|c| c.device_i_ds)
            .collect(),
        Err(e) => {
            seen.error = Some(format!("GetPreferredAllocation: {e}"));
            return seen;
        }
    };
    seen.device_ids = ids.clone();
    if ids.len() != count {
        seen.error = Some(format!(
            "GetPreferredAllocation answered {} units, {count} asked",
            ids.len()
        ));
        return seen;
    }
    let answer = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest { devices_ids: ids }],
        })
        .await;
    match answer {
        Ok(r) => {
            for container in r.into_inner().container_responses {
                seen.envs.extend(container.envs);
                seen.mounts
                    .extend(container.mounts.into_iter().map(|m| MountSeen {
                        container_path: m.container_path,
                        host_path: m.host_path,
                        read_only: m.read_only,
                    }));
            }
        }
        Err(e) => seen.error = Some(format!("Allocate: {e}")),
    }
    seen
}

/// The kubelet's PodResources API on a node with no pods: what the plugin reads allocations
/// from (nothing allocated to running pods here: the check's processes run outside pods).
struct NoPods;

#[tonic::async_trait]
impl PodResourcesLister for NoPods {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        Ok(Response::new(ListPodResourcesResponse::default()))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        request: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        let r = request.into_inner();
        Err(Status::not_found(format!(
            "pod {}/{} not found",
            r.pod_namespace, r.pod_name
        )))
    }
}

fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot remove stale {}: {e}", socket.display()),
    }
    tokio::net::UnixListener::bind(socket)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))
}

/// Serve `<socket_dir>/kubelet.sock` (and an empty PodResources API on `pod_resources`, when
/// given) until SIGTERM or SIGINT, keeping `report` up to date.
pub async fn run(
    socket_dir: &Path,
    pod_resources: Option<&Path>,
    report: &Path,
    allocate: Option<usize>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(socket_dir)?;
    let socket = socket_dir.join("kubelet.sock");
    let listener = bind(&socket)?;
    if let Some(path) = pod_resources {
        let listener = bind(path)?;
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(NoPods))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "PodResources server stopped");
            }
        });
    }
    let shared = Arc::new(Shared {
        report: Mutex::new(Report::default()),
        path: report.to_path_buf(),
        started: Instant::now(),
    });
    shared.update(|_| {});
    let service = Kubelet {
        dir: socket_dir.to_path_buf(),
        shared,
        allocate,
    };
    tracing::info!(socket = %socket.display(), "test kubelet serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    let _ = std::fs::remove_file(&socket);
    if let Some(path) = pod_resources {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, healthy: bool) -> Device {
        Device {
            id: id.to_string(),
            health: if healthy { HEALTHY } else { "Unhealthy" }.to_string(),
            ..Device::default()
        }
    }

    fn gpu(uuid: &str, units: u64, healthy: bool) -> Vec<Device> {
        (0..units)
            .map(|k| device(&DeviceId::new(uuid, k).to_string(), healthy))
            .collect()
    }

    const A: &str = "GPU-00000000-0000-4000-8000-00000000000a";
    const B: &str = "GPU-00000000-0000-4000-8000-00000000000b";

    #[test]
    fn counts_units_per_gpu_and_keeps_foreign_ids() {
        let mut devices = gpu(A, 3, true);
        devices.extend(gpu(B, 2, false));
        devices.push(device("not-a-vramslice-id", true));
        let (gpus, unparsed) = summarise(&devices);
        assert_eq!(
            gpus[A],
            UnitsSeen {
                units: 3,
                healthy: 3
            }
        );
        assert_eq!(
            gpus[B],
            UnitsSeen {
                units: 2,
                healthy: 0
            }
        );
        assert_eq!(unparsed, vec!["not-a-vramslice-id".to_string()]);
    }

    #[test]
    fn offers_only_healthy_units() {
        let mut devices = gpu(A, 2, true);
        devices.extend(gpu(B, 3, false));
        assert_eq!(
            healthy_ids(&devices),
            (0..2)
                .map(|k| DeviceId::new(A, k).to_string())
                .collect::<Vec<_>>()
        );
    }
}
