//! The two sockets of a DRA kubelet plugin: the DRA service at its endpoint (in the kubelet's
//! `plugins/<driver>/` directory) and the registration service in `plugins_registry/`, which
//! the kubelet's plugin watcher discovers. Both are served until shutdown; a stale socket left
//! by a previous run is replaced.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use vramslice_core::names::DRA_DRIVER;

use crate::authority;
use crate::driver::Driver;
use crate::grpc::DraService;
use crate::proto::dra::dra_plugin_server::DraPluginServer;
use crate::proto::registration::registration_server::RegistrationServer;
use crate::registration::{KubeletRegistration, RegistrationService};

/// Where the plugin's sockets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sockets {
    /// The kubelet's plugin registry directory (`/var/lib/kubelet/plugins_registry`).
    pub registry_dir: PathBuf,
    /// The plugin's own directory (`/var/lib/kubelet/plugins/vramslice.io`).
    pub plugin_dir: PathBuf,
}

impl Sockets {
    /// The DRA service socket.
    pub fn endpoint(&self) -> PathBuf {
        self.plugin_dir.join("dra.sock")
    }

    /// The registration socket.
    pub fn registration(&self) -> PathBuf {
        self.registry_dir.join(format!("{DRA_DRIVER}-reg.sock"))
    }
}

/// Why the plugin could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket could not be created.
    #[error("binding {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A server stopped with an error.
    #[error("serving {path}: {source}")]
    Serve {
        /// The socket path.
        path: String,
        /// The cause.
        source: tonic::transport::Error,
    },
}

fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Bind {
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

/// `server`'s outcome, once it has told the other server to stop too.
async fn ends_both<T>(server: impl Future<Output = T>, stop: watch::Sender<bool>) -> T {
    let result = server.await;
    let _ = stop.send(true);
    result
}

/// Serve the DRA service and then the registration socket (so that the kubelet, once it sees
/// the registration, can reach the endpoint) until `shutdown` turns true. The registration
/// socket is removed on the way out, so the kubelet deregisters the driver.
///
/// # Errors
/// [`ServeError`] when a socket cannot be bound or a server fails.
pub async fn serve(
    driver: Arc<Driver>,
    sockets: &Sockets,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let (registrations, _) = watch::channel(KubeletRegistration::default());
    serve_with_registrations(driver, sockets, registrations, shutdown).await
}

/// [`serve`], recording in `registrations` what the kubelet says of each registration (the
/// ResourceSlice is published again on a confirmed one: a starting kubelet deletes the node's
/// slices; a refusal makes the agent unhealthy).
///
/// # Errors
/// [`ServeError`] when a socket cannot be bound or a server fails.
pub async fn serve_with_registrations(
    driver: Arc<Driver>,
    sockets: &Sockets,
    registrations: watch::Sender<KubeletRegistration>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let endpoint = sockets.endpoint();
    let registration = sockets.registration();
    let dra_listener = bind(&endpoint)?;
    let reg_listener = bind(&registration)?;
    let stop = |mut rx: watch::Receiver<bool>| async move {
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    };
    // Both servers stop when `shutdown` fires or when either of them ends (a server that
    // failed must not leave the other serving a driver that cannot be reached, nor hide its
    // error until a shutdown nobody sends).
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |ended: watch::Receiver<bool>| {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                () = stop(shutdown) => {}
                () = stop(ended) => {}
            }
        }
    };
    let dra = Server::builder()
        .add_service(DraPluginServer::new(DraService::new(driver)))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(dra_listener),
            stopped(stop_rx.clone()),
        );
    let reg = Server::builder()
        .add_service(RegistrationServer::new(
            RegistrationService::new(DRA_DRIVER, &endpoint.display().to_string())
                .with_registrations(registrations),
        ))
        // Through the shim: the kubelet's plugin watcher sends the socket path as `:authority`.
        .serve_with_incoming_shutdown(authority::incoming(reg_listener), stopped(stop_rx));
    tracing::info!(endpoint = %endpoint.display(), registration = %registration.display(), "serving the DRA plugin");
    let (dra, reg) = tokio::join!(ends_both(dra, stop_tx.clone()), ends_both(reg, stop_tx));
    let _ = shutdown.borrow_and_update();
    let _ = std::fs::remove_file(&registration);
    dra.map_err(|source| ServeError::Serve {
        path: endpoint.display().to_string(),
        source,
    })?;
    reg.map_err(|source| ServeError::Serve {
        path: registration.display().to_string(),
        source,
    })
}
