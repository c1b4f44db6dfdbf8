//! The kubelet-facing gRPC adapter: translates the DevicePlugin service to and from
//! [`DevicePluginLogic`]. No decisions are made here.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use vramslice_core::AdvertisedDevice;
use vramslice_core::node::allocation::ContainerAllocation;

use crate::logic::{DevicePluginLogic, PluginError, PreferredRequest};
use crate::proto::deviceplugin::device_plugin_server::DevicePlugin;
use crate::proto::deviceplugin::{
    AllocateRequest, AllocateResponse, CdiDevice, ContainerAllocateResponse,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse,
    Mount, PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};

/// Health strings of the device-plugin API.
pub const HEALTHY: &str = "Healthy";
/// See [`HEALTHY`].
pub const UNHEALTHY: &str = "Unhealthy";

/// The options this plugin registers with.
pub fn plugin_options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// The DevicePlugin service over `L`. Streams end when `stop` fires (the runner re-serving).
pub struct GrpcAdapter<L> {
    logic: Arc<L>,
    stop: watch::Receiver<bool>,
}

impl<L> GrpcAdapter<L> {
    /// An adapter over `logic` whose streams end when `stop` changes.
    pub fn new(logic: Arc<L>, stop: watch::Receiver<bool>) -> Self {
        GrpcAdapter { logic, stop }
    }
}

/// The wire form of a device list.
pub fn list_response(devices: &[AdvertisedDevice]) -> ListAndWatchResponse {
    ListAndWatchResponse {
        devices: devices
            .iter()
            .map(|d| Device {
                id: d.id.to_string(),
                health: if d.healthy { HEALTHY } else { UNHEALTHY }.to_string(),
                topology: None,
            })
            .collect(),
    }
}

/// The wire form of one container's allocation.
pub fn allocate_response(plan: ContainerAllocation) -> ContainerAllocateResponse {
    ContainerAllocateResponse {
        envs: plan.envs.into_iter().collect(),
        mounts: plan
            .mounts
            .into_iter()
            .map(|m| Mount {
                container_path: m.container_path,
                host_path: m.host_path,
                read_only: m.read_only,
            })
            .collect(),
        devices: Vec::new(),
        annotations: Default::default(),
        cdi_devices: plan
            .cdi_devices
            .into_iter()
            .map(|name| CdiDevice { name })
            .collect(),
    }
}

fn status_of(e: PluginError) -> Status {
    match e {
        PluginError::InvalidArgument(m) => Status::invalid_argument(m),
        PluginError::Internal(m) => Status::internal(m),
    }
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<L: DevicePluginLogic> DevicePlugin for GrpcAdapter<L> {
    async fn get_device_plugin_options(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(plugin_options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut stop = self.stop.clone();
        let stream = WatchStream::new(self.logic.devices())
            .map(|devices| {
                tracing::debug!(devices = devices.len(), "ListAndWatch send");
                Ok(list_response(&devices))
            })
            .take_until(async move {
                let _ = stop.changed().await;
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let requests = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|r| PreferredRequest {
                available: r.available_device_i_ds,
                must_include: r.must_include_device_i_ds,
                size: usize::try_from(r.allocation_size).unwrap_or(0),
            })
            .collect();
        let answers = self.logic.preferred_allocation(requests).await;
        Ok(Response::new(PreferredAllocationResponse {
            container_responses: answers
                .into_iter()
                .map(|device_i_ds| ContainerPreferredAllocationResponse { device_i_ds })
                .collect(),
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let containers = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| c.devices_ids)
            .collect();
        let plans = self.logic.allocate(containers).await.map_err(status_of)?;
        Ok(Response::new(AllocateResponse {
            container_responses: plans.into_iter().map(allocate_response).collect(),
        }))
    }

    async fn pre_start_container(
        &self,
        _request: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}
