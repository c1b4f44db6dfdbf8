//! The mutating admission webhook that sends VRAM pods to `vramslice-scheduler`.
//!
//! Data enters as `AdmissionReview` JSON over TLS on `POST /mutate-pods`; the pure decision
//! lives in `vramslice_core::cluster::admission`; the answer leaves as an always-allowed review with an
//! optional JSON Patch setting `spec.schedulerName`. The extender binary hosts it:
//!
//! ```ignore
//! // the extender's registry (prefix vramslice_extender):
//! let metrics = vramslice_webhook::WebhookMetrics::register(&mut registry);
//! tokio::spawn(vramslice_webhook::serve(config.webhook, client.clone(), metrics, shutdown));
//! ```
//!
//! Certificates come from a directory (cert-manager) or are generated here: a self-signed CA
//! and serving certificate (`rcgen`) kept in a Secret shared by all replicas, renewed with a
//! third of their validity left, the CA bundle written into the MutatingWebhookConfiguration.

pub mod certs;
pub mod config;
pub mod listen;
pub mod review;
pub mod rotation;
pub mod router;
pub mod tls;

use std::future::Future;

pub use config::{ConfigError, WebhookConfig};
pub use router::{MUTATE_PATH, WebhookMetrics, router};

/// Why the webhook could not run.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The `webhook:` configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS listener could not start.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Serve the webhook until `shutdown` completes: bind the TLS port, keep certificates current
/// in the background, answer reviews. `POD_NAMESPACE` is the default namespace of the
/// self-signed Secret. Returns an error only for bad configuration or an unusable port.
pub async fn serve(
    config: WebhookConfig,
    client: kube::Client,
    metrics: WebhookMetrics,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    let pod_namespace = std::env::var("POD_NAMESPACE").ok();
    let valid = config.validate(pod_namespace.as_deref())?;
    let slot = tls::CertSlot::new();
    let acceptor = tls::acceptor(slot.clone())?;
    let listener = tls::bind(valid.listen_addr).await?;
    tracing::info!(addr = %valid.listen_addr, "webhook: listening");
    let checks = tokio::spawn(rotation::run_checks(
        Some(client),
        valid.source.clone(),
        valid.check_interval,
        slot,
        metrics.clone(),
    ));
    listen::serve(
        listener,
        router(valid.policy, metrics.clone()),
        Some(acceptor),
        listen::ConnectionLimits::default(),
        shutdown,
    )
    .await;
    checks.abort();
    metrics
        .serving
        .store(false, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}
