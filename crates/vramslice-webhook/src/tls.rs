//! The webhook's TLS: a rustls acceptor whose certificate can be swapped at run time, and the
//! listener it serves on ([`crate::listen`] runs the connections).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A serving certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM holds no certificate or no key, or cannot be read.
    #[error("cannot read the serving certificate: {0}")]
    Pem(String),
    /// rustls refuses the key or configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// The private key is not the certificate's (a pair caught half-written, or mismatched).
    #[error("the private key does not match the serving certificate: {0}")]
    Mismatch(rustls::Error),
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Holds the certificate handed to each new TLS handshake. Until one is set, handshakes fail
/// (the API server then applies the webhook's `failurePolicy`).
#[derive(Debug, Default)]
pub struct CertSlot {
    /// The certificate and key PEM served, and what rustls made of them.
    current: RwLock<Option<(String, String, Arc<CertifiedKey>)>>,
}

impl CertSlot {
    /// An empty slot.
    pub fn new() -> Arc<CertSlot> {
        Arc::new(CertSlot::default())
    }

    /// Whether a certificate is installed (handshakes can succeed).
    pub fn has_certificate(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Install `cert_pem` (leaf first, optionally its chain) and `key_pem`. Returns whether
    /// either changed. A key that is not the certificate's is refused and the pair served
    /// before is kept: a writer that replaces `tls.crt` and `tls.key` one after the other can be
    /// caught between the two, and the next check installs the finished pair.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<bool, TlsError> {
        {
            let slot = self.current.read().unwrap_or_else(|p| p.into_inner());
            if slot
                .as_ref()
                .is_some_and(|(c, k, _)| c == cert_pem && k == key_pem)
            {
                return Ok(false);
            }
        }
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::Pem("no certificate in PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
        let signer = ring::sign::any_supported_type(&key)?;
        let certified = Arc::new(CertifiedKey::new(certs, signer));
        certified.keys_match().map_err(TlsError::Mismatch)?;
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        *slot = Some((cert_pem.to_string(), key_pem.to_string(), certified));
        Ok(true)
    }

    /// PEM of the certificate being served, if any.
    pub fn current_pem(&self) -> Option<String> {
        let slot = self.current.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|(pem, _, _)| pem.clone())
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertSlot>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let slot = self.0.current.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|(_, _, key)| key.clone())
    }
}

/// The rustls acceptor serving whatever certificate `slot` holds.
pub fn acceptor(slot: Arc<CertSlot>) -> Result<TlsAcceptor, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(slot)));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Bind `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, TlsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TlsError::Bind { addr, source })
}
