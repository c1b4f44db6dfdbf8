//! Owns the plugin's socket and its registration: serve first, then Register with the kubelet;
//! watch the socket directory and, when `kubelet.sock` is re-created (a kubelet restart) or our
//! own socket disappears, stop, re-serve and re-register. On shutdown, remove our socket.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::grpc::{GrpcAdapter, plugin_options};
use crate::logic::DevicePluginLogic;
use crate::metrics::Metrics;
use crate::proto::deviceplugin::RegisterRequest;
use crate::proto::deviceplugin::device_plugin_server::DevicePluginServer;
use crate::proto::deviceplugin::registration_client::RegistrationClient;

/// API version the plugin registers with.
pub const API_VERSION: &str = "v1beta1";
/// The kubelet's registration socket's file name.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// Where and as what the runner serves.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The device-plugin directory.
    pub socket_dir: PathBuf,
    /// Our socket's file name (the registration endpoint).
    pub socket_name: String,
    /// How often the directory is checked.
    pub watch_interval: Duration,
    /// Pause between failed registration attempts.
    pub retry_interval: Duration,
}

impl RunnerConfig {
    /// Defaults: check every 100 ms, retry registration every 250 ms.
    pub fn new(socket_dir: PathBuf, socket_name: String) -> Self {
        RunnerConfig {
            socket_dir,
            socket_name,
            watch_interval: Duration::from_millis(100),
            retry_interval: Duration::from_millis(250),
        }
    }

    fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(&self.socket_name)
    }

    fn kubelet_path(&self) -> PathBuf {
        self.socket_dir.join(KUBELET_SOCKET)
    }
}

/// The runner could not serve at all.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The socket cannot be created.
    #[error("cannot serve on {path}: {source}")]
    Bind {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Identity of a file: a re-created file differs even under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
    })
}

enum Outcome {
    Shutdown,
    Restart(&'static str),
}

/// Why one registration attempt failed (the runner retries).
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    /// The kubelet's socket did not answer.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The kubelet answered and refused.
    #[error("kubelet refused: {0}")]
    Refused(String),
}

/// How long the kubelet may take to answer `Register`. It answers only after dialling the
/// plugin back (up to 10 s) and reading its options; a plugin that gave up sooner would
/// register again while the first registration completes, and the kubelet, replacing its
/// client, may then drop the endpoint the second one made.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

async fn register(config: &RunnerConfig, resource: &str) -> Result<(), RegisterError> {
    let channel = crate::uds::connect_with_call_timeout(
        &config.kubelet_path(),
        Duration::from_secs(3),
        REGISTER_TIMEOUT,
    )
    .await
    .map_err(|e| RegisterError::Connect(crate::uds::error_chain(&e)))?;
    RegistrationClient::new(channel)
        .register(RegisterRequest {
            version: API_VERSION.to_string(),
            endpoint: config.socket_name.clone(),
            resource_name: resource.to_string(),
            options: Some(plugin_options()),
        })
        .await
        .map(|_| ())
        .map_err(|status| RegisterError::Refused(status.message().to_string()))
}

fn bind(path: &Path) -> Result<UnixListener, RunnerError> {
    let err = |source| RunnerError::Bind {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

/// How long the plugin waits for the kubelet's registration socket before it says so.
const KUBELET_SOCKET_PATIENCE: Duration = Duration::from_secs(30);

/// Serve and stay registered until `shutdown` fires.
pub async fn run<L: DevicePluginLogic>(
    logic: Arc<L>,
    config: RunnerConfig,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    let socket = config.socket_path();
    let kubelet = config.kubelet_path();
    let resource = logic.resource_name();
    loop {
        let listener = bind(&socket)?;
        let own = file_id(&socket);
        let (stop_tx, stop_rx) = watch::channel(false);
        let adapter = GrpcAdapter::new(Arc::clone(&logic), stop_rx.clone());
        let mut server_stop = stop_rx;
        let server = tokio::spawn(
            Server::builder()
                .add_service(DevicePluginServer::new(adapter))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = server_stop.changed().await;
                }),
        );
        tracing::info!(socket = %socket.display(), resource, "serving device plugin");

        let mut registered: Option<FileId> = None;
        let mut next_attempt = Instant::now();
        let mut warned = false;
        let serving_since = Instant::now();
        let mut warned_no_kubelet = false;
        let mut ticker = tokio::time::interval(config.watch_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break Outcome::Shutdown,
            }
            if *shutdown.borrow() {
                break Outcome::Shutdown;
            }
            if server.is_finished() {
                break Outcome::Restart("plugin server stopped");
            }
            if file_id(&socket) != own {
                break Outcome::Restart("plugin socket removed or replaced");
            }
            let kubelet_now = file_id(&kubelet);
            match (registered, kubelet_now) {
                (Some(seen), now) if Some(seen) != now => {
                    break Outcome::Restart("kubelet.sock re-created (kubelet restart)");
                }
                (None, Some(now)) if Instant::now() >= next_attempt => {
                    let attempt = tokio::select! {
                        r = register(&config, resource) => r,
                        _ = shutdown.changed() => break Outcome::Shutdown,
                    };
                    match attempt {
                        Ok(()) => {
                            tracing::info!(endpoint = %config.socket_name, resource, "registered with the kubelet");
                            registered = Some(now);
                            metrics.set_registered(true);
                            metrics.count_registrations(1);
                        }
                        Err(e) => {
                            if !warned {
                                tracing::warn!(kubelet = %kubelet.display(), error = %e, "registration failed; retrying");
                                warned = true;
                            }
                            next_attempt = Instant::now() + config.retry_interval;
                        }
                    }
                }
                (None, None)
                    if !warned_no_kubelet && serving_since.elapsed() >= KUBELET_SOCKET_PATIENCE =>
                {
                    // Without this the plugin waits in silence: a wrong socketDir, or a kubelet
                    // that is not running, shows only as a node that never gets the resource.
                    tracing::warn!(kubelet = %kubelet.display(), waited = ?KUBELET_SOCKET_PATIENCE, "no kubelet registration socket yet; still waiting (is the kubelet running, and is socketDir its device-plugins directory?)");
                    warned_no_kubelet = true;
                }
                _ => {}
            }
        };

        metrics.set_registered(false);
        let _ = stop_tx.send(true);
        let abort = server.abort_handle();
        match tokio::time::timeout(Duration::from_secs(1), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "plugin server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "plugin server task failed"),
            Err(_) => abort.abort(),
        }
        match outcome {
            Outcome::Shutdown => {
                if file_id(&socket) == own
                    && let Err(e) = std::fs::remove_file(&socket)
                {
                    tracing::warn!(socket = %socket.display(), error = %e, "cannot remove socket");
                }
                tracing::info!("device plugin stopped; socket removed");
                return Ok(());
            }
            Outcome::Restart(reason) => {
                metrics.kubelet_restart();
                tracing::info!(reason, "re-serving and re-registering");
            }
        }
    }
}
