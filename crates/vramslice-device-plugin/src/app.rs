//! Wires the plugin together: backend, poller, plugin logic, runner, publisher and metrics,
//! all stopped by one shutdown signal.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use vramslice_core::node::allocation::{InjectionMode, preload_file_content};

use crate::config::{ConfigError, Mode, Settings};
use crate::logic::VramPlugin;
use crate::metrics::Metrics;
use crate::pods::NodePods;
use crate::poller::NodeState;
use crate::publisher::Publisher;
use crate::runner::{RunnerConfig, RunnerError};

/// Exit status for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Flags that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Explicit kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Never write GpuNode objects.
    pub no_publish: bool,
}

/// Why the plugin stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The GPU backend cannot be opened.
    #[error("cannot open the GPU backend: {0}")]
    Backend(#[from] vramslice_gpu::BackendError),
    /// The API client cannot be built.
    #[error("cannot build the Kubernetes client: {0}")]
    Kube(String),
    /// The plugin socket cannot be served.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// DRA mode failed.
    #[error(transparent)]
    Dra(#[from] crate::dra_mode::DraModeError),
    /// The metrics endpoint cannot listen.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

impl AppError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) => EXIT_CONFIG,
            _ => 1,
        }
    }
}

async fn kube_client(options: &Options) -> Result<Option<kube::Client>, AppError> {
    let config = if let Some(path) = &options.kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| AppError::Kube(format!("kubeconfig {}: {e}", path.display())))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| AppError::Kube(format!("kubeconfig {}: {e}", path.display())))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(|e| AppError::Kube(format!("in-cluster config: {e}")))?
    } else {
        return Ok(None);
    };
    kube::Client::try_from(config)
        .map(Some)
        .map_err(|e| AppError::Kube(e.to_string()))
}

fn write_preload_file(settings: &Settings) {
    if settings.allocation.injection != InjectionMode::LdSoPreloadFile {
        return;
    }
    let path = &settings.allocation.preload_file_host_path;
    let want = preload_file_content();
    if std::fs::read_to_string(path).is_ok_and(|have| have == want) {
        return;
    }
    // Written beside and renamed over, so a container starting meanwhile never bind-mounts a
    // half-written /etc/ld.so.preload (running containers keep the inode they mounted).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, &want))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the ld.so.preload file");
    }
}

/// Run the plugin until `shutdown` fires.
pub async fn run(
    settings: Settings,
    options: Options,
    shutdown: watch::Receiver<bool>,
) -> Result<(), AppError> {
    let client = kube_client(&options).await?;
    let dra = settings.mode == Mode::Dra;
    if dra && (client.is_none() || settings.node_name.is_none()) {
        return Err(ConfigError::Value {
            field: "mode",
            message: "dra needs API access (in-cluster or --kubeconfig) and a node name (nodeName or NODE_NAME): it reads claims and writes the node's ResourceSlice".into(),
        }
        .into());
    }
    let dra_api = match client.clone().zip(settings.node_name.clone()) {
        Some((client, node_name)) if dra => {
            let driver = crate::dra_mode::open_driver(&settings, client.clone(), &node_name)?;
            Some((driver, client, node_name))
        }
        _ => None,
    };
    let publish = client.is_some() && !options.no_publish;
    if publish && settings.node_name.is_none() {
        return Err(ConfigError::Value {
            field: "nodeName",
            message: "required when publishing: set nodeName or the NODE_NAME environment variable (or pass --no-publish)".into(),
        }
        .into());
    }
    let lister = match (client, &settings.node_name) {
        (Some(client), Some(node)) => {
            Some(NodePods::watched(client, node.clone(), shutdown.clone()))
        }
        (Some(_), None) => {
            tracing::warn!("no node name: pending-pod lookups are off, preferring by binpacking");
            None
        }
        _ => None,
    };
    tracing::info!(
        backend = ?settings.backend,
        resource = settings.resource_name(),
        socket = %settings.socket_path().display(),
        api = lister.is_some(),
        publish,
        mode = ?settings.mode,
        "starting vramslice device plugin"
    );

    let backend: Arc<dyn vramslice_gpu::GpuBackend> =
        Arc::from(vramslice_gpu::open(&settings.backend)?);
    write_preload_file(&settings);
    let metrics = Metrics::new();
    let (metrics_addr, metrics_server) = crate::metrics::bind(
        settings.metrics_addr,
        metrics.clone(),
        settings.poll_interval,
        shutdown.clone(),
    )
    .await
    .map_err(|source| AppError::Metrics {
        addr: settings.metrics_addr.to_string(),
        source,
    })?;
    tracing::info!(addr = %metrics_addr, "serving /metrics and /healthz");
    let metrics_task = tokio::spawn(metrics_server);

    let (state, node) = NodeState::new(settings.unit);
    // Read once before serving, so the first ListAndWatch answer has the devices.
    let mut first_read = shutdown.clone();
    match crate::poller::read_unless_shutdown(&backend, &mut first_read).await {
        None => return Ok(()),
        Some(Ok(readings)) => {
            metrics.observe_readings(&readings);
            state.apply(readings);
        }
        Some(Err(e)) => tracing::warn!(error = %e, "first GPU read failed"),
    }
    // The driver's version does not change while the driver is loaded: read once (a DRA
    // slice attribute, and a line in the log for whoever reads it).
    let driver_version = {
        let backend = Arc::clone(&backend);
        let call = move || backend.driver_version();
        match crate::poller::blocking_unless_shutdown(call, &mut first_read).await {
            None => return Ok(()),
            Some(Ok(Ok(version))) => version,
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "cannot read the GPU driver's version");
                None
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "GPU driver version task failed");
                None
            }
        }
    };
    tracing::info!(
        driver_version = driver_version.as_deref().unwrap_or("unknown"),
        "GPU driver"
    );
    let poller = tokio::spawn(crate::poller::run(
        backend,
        state,
        settings.poll_interval,
        metrics.clone(),
        shutdown.clone(),
    ));
    let publisher = Publisher {
        unit: settings.unit,
        policy: settings.publish,
        pod_resources_socket: settings.pod_resources_socket.clone(),
        proc_root: settings.proc_root.clone(),
        node: node.clone(),
        metrics: metrics.clone(),
        kube: lister.clone(),
        write: publish,
        watchdog: crate::watchdog::Watchdog::new(
            settings.watchdog,
            vramslice_gpu::procfs::ProcRoot::new(settings.proc_root.clone()),
            settings.allocation.accounting_root.clone(),
            metrics.clone(),
            lister.clone(),
        ),
        // In DRA mode a claim's files go at unprepare; the sweeper only knows the kubelet's
        // device-plugin record, in which no claim appears.
        claims: dra_api.as_ref().map(|(driver, _, _)| Arc::clone(driver)),
        sweeper: settings
            .accounting_sweep_after
            .filter(|_| !dra)
            .map(|after| {
                crate::sweeper::Sweeper::new(settings.allocation.accounting_root.clone(), after)
            }),
    };
    let publisher = tokio::spawn(publisher.run(settings.poll_interval, shutdown.clone()));

    if let Some((driver, client, node_name)) = dra_api {
        let result = crate::dra_mode::run(
            &settings,
            driver,
            crate::dra_mode::NodeIdentity {
                client,
                node_name,
                driver_version,
            },
            node,
            metrics,
            shutdown,
        )
        .await;
        finish([poller, publisher], metrics_task, result.is_ok()).await;
        return result.map_err(AppError::from);
    }
    let plugin = Arc::new(VramPlugin::new(
        settings.unit,
        settings.allocation.clone(),
        node,
        lister,
        Some(settings.pod_resources_socket.clone()),
    ));
    let runner_config = RunnerConfig::new(settings.socket_dir.clone(), settings.socket_name());
    let result = crate::runner::run(plugin, runner_config, metrics, shutdown).await;
    finish([poller, publisher], metrics_task, result.is_ok()).await;
    result.map_err(AppError::from)
}

/// Wind down the background tasks once the serving part returned: after a shutdown they are
/// ending too, and are waited for; after a failure (a socket that cannot be bound) they would
/// run until a shutdown that never comes, hiding the failure, so they are stopped.
async fn finish(
    tasks: [tokio::task::JoinHandle<()>; 2],
    metrics_task: tokio::task::JoinHandle<std::io::Result<()>>,
    shut_down: bool,
) {
    if !shut_down {
        for task in &tasks {
            task.abort();
        }
        metrics_task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    match metrics_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics server failed"),
        Err(e) if !e.is_cancelled() => tracing::warn!(error = %e, "metrics task failed"),
        _ => {}
    }
}
