//! The plugin-registration service the kubelet's plugin watcher calls on the socket the plugin
//! puts in `plugins_registry`: who we are (a `DRAPlugin` named after the driver), where the
//! DRA service listens, and which service version it speaks.

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::proto::registration::registration_server::Registration;
use crate::proto::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};

/// The plugin type of a DRA driver.
pub const PLUGIN_TYPE: &str = "DRAPlugin";
/// The DRA service version served.
pub const DRA_SERVICE_VERSION: &str = "v1.DRAPlugin";

/// What the kubelet has said of this plugin's registrations so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeletRegistration {
    /// Registrations the kubelet confirmed.
    pub confirmed: u64,
    /// The kubelet's error when it refused the latest registration; cleared by a confirmed one.
    pub refused: Option<String>,
}

impl KubeletRegistration {
    /// Registered now: confirmed at least once, and not refused since.
    pub fn registered(&self) -> bool {
        self.confirmed > 0 && self.refused.is_none()
    }
}

/// Answers the kubelet's plugin watcher.
#[derive(Clone)]
pub struct RegistrationService {
    driver_name: String,
    endpoint: String,
    registrations: Option<watch::Sender<KubeletRegistration>>,
}

impl RegistrationService {
    /// Register `driver_name` with its DRA service at the socket path `endpoint`.
    pub fn new(driver_name: &str, endpoint: &str) -> Self {
        RegistrationService {
            driver_name: driver_name.to_string(),
            endpoint: endpoint.to_string(),
            registrations: None,
        }
    }

    /// Record what the kubelet says in `registrations`: each confirmed registration counted (a
    /// (re)starting kubelet deletes the node's ResourceSlices before its plugins register again,
    /// so the agent publishes its slice anew on each), a refusal with the kubelet's error (the
    /// agent reports itself unhealthy, so that it is restarted and registers again).
    pub fn with_registrations(mut self, registrations: watch::Sender<KubeletRegistration>) -> Self {
        self.registrations = Some(registrations);
        self
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: PLUGIN_TYPE.to_string(),
            name: self.driver_name.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec![DRA_SERVICE_VERSION.to_string()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver_name, "registered with the kubelet");
        } else {
            tracing::error!(driver = %self.driver_name, error = %status.error, "the kubelet refused the registration");
        }
        if let Some(tx) = &self.registrations {
            tx.send_modify(|state| {
                if status.plugin_registered {
                    state.confirmed += 1;
                    state.refused = None;
                } else if status.error.is_empty() {
                    state.refused = Some("no reason given".to_string());
                } else {
                    state.refused = Some(status.error.clone());
                }
            });
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
