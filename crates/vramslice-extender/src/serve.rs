//! Listening: plain HTTP, or HTTPS with rustls when the config names a certificate and key,
//! through the webhook's connection loop ([`vramslice_webhook::listen`]: handshake and
//! request-head time limits, a cap on connections). Both stop accepting on `shutdown` and let
//! requests in flight finish.

use std::future::Future;
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use vramslice_webhook::listen::{self, ConnectionLimits};

use crate::config::TlsConfig;

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key cannot be used.
    #[error("TLS {what} {path}: {message}")]
    Tls {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The server stopped with an error.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Load a rustls server configuration from PEM files.
pub fn tls_config(tls: &TlsConfig) -> Result<ServerConfig, ServeError> {
    let cert_path = tls.cert_file.display().to_string();
    let key_path = tls.key_file.display().to_string();
    let cert_err = |message: String| ServeError::Tls {
        what: "certificate",
        path: cert_path.clone(),
        message,
    };
    let key_err = |message: String| ServeError::Tls {
        what: "key",
        path: key_path.clone(),
        message,
    };
    let cert_file = std::fs::File::open(&tls.cert_file).map_err(|e| cert_err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_reader_iter(BufReader::new(cert_file))
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key_file = std::fs::File::open(&tls.key_file).map_err(|e| key_err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_reader(BufReader::new(key_file))
        .map_err(|e| key_err(e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| key_err(e.to_string()))
}

/// Serve `router` on `addr` (HTTPS when `tls` is given) until `shutdown` completes.
pub async fn serve(
    router: Router,
    addr: SocketAddr,
    tls: Option<&TlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = tls.map(tls_config).transpose()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_on(listener, router, tls, shutdown).await
}

/// Serve `router` on a bound listener (HTTPS when `tls` is given) until `shutdown` completes.
pub async fn serve_on(
    listener: TcpListener,
    router: Router,
    tls: Option<ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, tls = tls.is_some(), "serving the extender");
    let acceptor = tls.map(|config| TlsAcceptor::from(Arc::new(config)));
    // On loopback the one client is kube-scheduler beside it: no address to single out. A
    // request may take as long as a drain (`/drain`, the preStop hook, waits up to 90 s).
    let defaults = ConnectionLimits::default();
    let limits = ConnectionLimits {
        request: defaults
            .request
            .max(crate::extender::handover::DRAIN_LIMIT + std::time::Duration::from_secs(15)),
        ..defaults
    };
    let limits = if addr.ip().is_loopback() {
        ConnectionLimits {
            per_peer: limits.max_connections,
            ..limits
        }
    } else {
        limits
    };
    listen::serve(listener, router, acceptor, limits, shutdown).await;
    Ok(())
}
