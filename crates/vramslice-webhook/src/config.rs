//! The `webhook:` block of the extender's configuration file.
//!
//! ```yaml
//! webhook:
//!   listenAddr: 0.0.0.0:8443          # TLS port the API server calls
//!   overrideDefaultScheduler: true    # also redirect pods naming default-scheduler
//!   # exactly one of:
//!   certDir: /etc/vramslice/webhook-tls   # tls.crt + tls.key from cert-manager (re-read on change)
//!   selfSigned:                           # CA + serving cert generated, stored and rotated here
//!     namespace: vramslice-system         # default: $POD_NAMESPACE
//!     secretName: vramslice-webhook-tls
//!     webhookConfigName: vramslice-webhook
//!     serviceName: vramslice-webhook
//!     certValidity: 2160h
//!     caValidity: 87600h
//!   checkInterval: 1m                     # how often certificates and the CA bundle are checked
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use vramslice_core::cluster::admission::AdmissionPolicy;

/// Webhook settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookConfig {
    /// Address of the TLS listener.
    #[serde(default = "default_listen")]
    pub listen_addr: SocketAddr,
    /// Redirect pods that name `default-scheduler` too (see `vramslice_core::cluster::admission`).
    #[serde(default = "default_true")]
    pub override_default_scheduler: bool,
    /// Directory with `tls.crt` and `tls.key` (cert-manager or any other issuer).
    #[serde(default)]
    pub cert_dir: Option<String>,
    /// Self-generated certificates.
    #[serde(default)]
    pub self_signed: Option<SelfSignedConfig>,
    /// How often certificates and the CA bundle are checked (Go-style duration).
    #[serde(default = "default_check_interval")]
    pub check_interval: String,
}

/// Where the self-generated certificates live and whom they are for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelfSignedConfig {
    /// Namespace of the Secret and the Service; default `$POD_NAMESPACE`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Secret holding `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (must exist; the chart creates it empty).
    pub secret_name: String,
    /// MutatingWebhookConfiguration whose `caBundle` is kept equal to `ca.crt`.
    pub webhook_config_name: String,
    /// Service the API server calls; the certificate is issued for its DNS names.
    pub service_name: String,
    /// Validity of the serving certificate; renewed with a third of it left.
    #[serde(default = "default_cert_validity")]
    pub cert_validity: String,
    /// Validity of the CA; a new CA is made with a third of it left (both trusted meanwhile).
    #[serde(default = "default_ca_validity")]
    pub ca_validity: String,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Neither or both certificate sources.
    #[error("webhook: set exactly one of certDir and selfSigned")]
    CertSource,
    /// A duration that does not parse.
    #[error("webhook: {field}: {message}")]
    Duration {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// No namespace configured and none in the environment.
    #[error("webhook: selfSigned.namespace is unset and POD_NAMESPACE is empty")]
    NoNamespace,
}

/// The checked settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConfig {
    /// Address of the TLS listener.
    pub listen_addr: SocketAddr,
    /// Policy of the admission decision.
    pub policy: AdmissionPolicy,
    /// How often certificates are checked.
    pub check_interval: Duration,
    /// Where certificates come from.
    pub source: CertSource,
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// Files written by someone else.
    Dir(String),
    /// Generated and rotated by this process.
    SelfSigned(SelfSigned),
}

/// Checked self-signed settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfSigned {
    /// Namespace of Secret and Service.
    pub namespace: String,
    /// The Secret.
    pub secret_name: String,
    /// The MutatingWebhookConfiguration.
    pub webhook_config_name: String,
    /// The Service.
    pub service_name: String,
    /// Serving-certificate validity.
    pub cert_validity: Duration,
    /// CA validity.
    pub ca_validity: Duration,
}

impl SelfSigned {
    /// DNS names the serving certificate covers.
    pub fn dns_names(&self) -> Vec<String> {
        let (svc, ns) = (&self.service_name, &self.namespace);
        vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ]
    }
}

fn duration(field: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let d = vramslice_core::parse_duration(text).map_err(|e| ConfigError::Duration {
        field,
        message: e.to_string(),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Duration {
            field,
            message: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

impl WebhookConfig {
    /// Check the settings; `pod_namespace` is `$POD_NAMESPACE` (passed in so this stays pure).
    pub fn validate(&self, pod_namespace: Option<&str>) -> Result<ValidConfig, ConfigError> {
        let check_interval = duration("checkInterval", &self.check_interval)?;
        let source = match (&self.cert_dir, &self.self_signed) {
            (Some(dir), None) => CertSource::Dir(dir.clone()),
            (None, Some(s)) => {
                let namespace = s
                    .namespace
                    .clone()
                    .or_else(|| pod_namespace.map(str::to_string))
                    .filter(|n| !n.is_empty())
                    .ok_or(ConfigError::NoNamespace)?;
                let cert_validity = duration("selfSigned.certValidity", &s.cert_validity)?;
                let ca_validity = duration("selfSigned.caValidity", &s.ca_validity)?;
                // A serving certificate ends with its CA at the latest: a longer validity would
                // leave it a third or less of its own for much of each CA's life, renewed at
                // every check.
                if cert_validity > ca_validity {
                    return Err(ConfigError::Duration {
                        field: "selfSigned.certValidity",
                        message: format!(
                            "{} is longer than selfSigned.caValidity ({}); it must not be",
                            s.cert_validity, s.ca_validity
                        ),
                    });
                }
                // Renewed with a third left, found by a check: that third must span at least
                // three checks and the new CA's propagation wait, or the served certificate
                // expires before (or just after) it is replaced.
                let floor = check_interval
                    .saturating_mul(9)
                    .saturating_add(Duration::from_secs(
                        3 * crate::certs::CA_PROPAGATION_SECS.unsigned_abs(),
                    ));
                if cert_validity < floor {
                    return Err(ConfigError::Duration {
                        field: "selfSigned.certValidity",
                        message: format!(
                            "{} is too short for checkInterval {}: it must be at least {}s (a third of it spans three checks and the CA's {}s propagation wait)",
                            s.cert_validity,
                            self.check_interval,
                            floor.as_secs(),
                            crate::certs::CA_PROPAGATION_SECS
                        ),
                    });
                }
                CertSource::SelfSigned(SelfSigned {
                    namespace,
                    secret_name: s.secret_name.clone(),
                    webhook_config_name: s.webhook_config_name.clone(),
                    service_name: s.service_name.clone(),
                    cert_validity,
                    ca_validity,
                })
            }
            _ => return Err(ConfigError::CertSource),
        };
        Ok(ValidConfig {
            listen_addr: self.listen_addr,
            policy: AdmissionPolicy {
                override_default_scheduler: self.override_default_scheduler,
            },
            check_interval,
            source,
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_true() -> bool {
    true
}
fn default_check_interval() -> String {
    "1m".into()
}
fn default_cert_validity() -> String {
    "2160h".into()
}
fn default_ca_validity() -> String {
    "87600h".into()
}
