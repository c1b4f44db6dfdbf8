//! Keeping the serving certificate current: self-signed mode (the Secret, the CA bundle in the
//! MutatingWebhookConfiguration, rotation) and directory mode (files written by cert-manager).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::certs::{CertError, CertSettings, Plan, StoredCerts, plan, renew};
use crate::config::SelfSigned;
use crate::router::WebhookMetrics;
use crate::tls::{CertSlot, TlsError};

/// A failed certificate check (logged; the next check tries again).
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The API server refused or failed a request.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// Why it failed.
        source: kube::Error,
    },
    /// Generating certificates failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The certificate could not be installed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What one check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// Certificates current and served.
    Current,
    /// New certificates were written and are served.
    Renewed(Plan),
    /// Another replica wrote the Secret (or the CA bundle) first; check again soon.
    Conflict,
}

/// What [`ensure_ca_bundle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleUpdate {
    /// Every webhook already trusted the bundle.
    Unchanged,
    /// The configuration was patched.
    Updated,
    /// The Secret the bundle came from, or the configuration, changed meanwhile (another
    /// replica renewed): nothing was patched; check again.
    Conflict,
}

/// The Secret a CA bundle was made from, at the version read or written.
#[derive(Clone, Copy)]
pub struct BundleSource<'a> {
    /// The Secrets of its namespace.
    pub secrets: &'a Api<Secret>,
    /// Its name.
    pub name: &'a str,
    /// Its `resourceVersion` when the bundle was made.
    pub resource_version: Option<&'a str>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> RotationError {
    let action = action.into();
    move |source| RotationError::Kube { action, source }
}

fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|s| (k.clone(), s)))
        .collect()
}

/// One self-signed check at Unix time `now`: read the Secret, renew what needs it, keep the CA
/// bundle in the webhook configuration, serve the certificate.
pub async fn check_self_signed(
    client: &Client,
    cfg: &SelfSigned,
    slot: &CertSlot,
    metrics: &WebhookMetrics,
    now: i64,
) -> Result<CheckResult, RotationError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = &cfg.secret_name;
    let mut secret = secrets
        .get(name)
        .await
        .map_err(kube_err(format!("get Secret {}/{name}", cfg.namespace)))?;
    let settings = CertSettings {
        cert_validity: cfg.cert_validity,
        ca_validity: cfg.ca_validity,
        dns_names: cfg.dns_names(),
    };
    let stored = StoredCerts::from_data(&secret_strings(&secret));
    let decided = plan(stored.as_ref(), now, &settings);
    let (certs, result) = match (decided, stored) {
        (Plan::Keep, Some(current)) => (current, CheckResult::Current),
        (decided, stored) => {
            let renewed = renew(stored.as_ref(), decided, now, &settings)?;
            secret.data = Some(
                renewed
                    .to_data()
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            );
            // `replace` sends the resourceVersion we read: a replica that lost the race gets
            // 409 Conflict and adopts the winner's certificates on its next check.
            match secrets.replace(name, &PostParams::default(), &secret).await {
                Ok(written) => secret = written,
                Err(kube::Error::Api(resp)) if resp.code == 409 => {
                    return Ok(CheckResult::Conflict);
                }
                Err(e) => return Err(kube_err(format!("update Secret {name}"))(e)),
            }
            tracing::info!(plan = ?decided, not_after = renewed.tls_not_after, "webhook: certificates renewed");
            (renewed, CheckResult::Renewed(decided))
        }
    };
    let source = BundleSource {
        secrets: &secrets,
        name,
        resource_version: secret.metadata.resource_version.as_deref(),
    };
    let bundle = certs.ca_bundle();
    if ensure_ca_bundle(client, &cfg.webhook_config_name, &bundle, Some(source)).await?
        == BundleUpdate::Conflict
    {
        return Ok(CheckResult::Conflict);
    }
    slot.set(&certs.tls_cert, &certs.tls_key)?;
    metrics.cert_expiry.set(certs.tls_not_after);
    Ok(result)
}

/// Make every webhook in the configuration trust `bundle`. Patches only when it differs, and
/// only while `source` (the Secret the bundle was made from) is unchanged and the configuration
/// is the one read: a replica holding a bundle from before another replica renewed the CA must
/// not write the old bundle back over the new one (the API server would then refuse the new
/// serving certificate).
pub async fn ensure_ca_bundle(
    client: &Client,
    config_name: &str,
    bundle: &str,
    source: Option<BundleSource<'_>>,
) -> Result<BundleUpdate, RotationError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(config_name).await.map_err(kube_err(format!(
        "get MutatingWebhookConfiguration {config_name}"
    )))?;
    let stale: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .filter(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes())
        })
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "clientConfig": { "caBundle": ByteString(bundle.as_bytes().to_vec()) },
            })
        })
        .collect();
    if stale.is_empty() {
        return Ok(BundleUpdate::Unchanged);
    }
    if let Some(src) = source {
        let now = src
            .secrets
            .get(src.name)
            .await
            .map_err(kube_err(format!("get Secret {}", src.name)))?;
        if now.metadata.resource_version.as_deref() != src.resource_version {
            tracing::info!(
                secret = src.name,
                "webhook: Secret changed since the CA bundle was made; checking again"
            );
            return Ok(BundleUpdate::Conflict);
        }
    }
    // Strategic merge: webhooks merge by name, so only caBundle changes; the resourceVersion
    // read makes the patch fail (409) if the configuration changed since.
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": current.metadata.resource_version },
        "webhooks": stale,
    });
    match api
        .patch(
            config_name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(resp)) if resp.code == 409 => return Ok(BundleUpdate::Conflict),
        Err(e) => return Err(kube_err(format!("patch caBundle of {config_name}"))(e)),
    }
    tracing::info!(config = config_name, "webhook: CA bundle updated");
    Ok(BundleUpdate::Updated)
}

/// One directory-mode check: serve `tls.crt`/`tls.key` from `dir` when they changed.
pub async fn check_dir(dir: &Path, slot: &CertSlot) -> Result<bool, RotationError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| RotationError::File {
            path: path.display().to_string(),
            source,
        })
    };
    let (cert, key) = (read("tls.crt")?, read("tls.key")?);
    Ok(slot.set(&cert, &key)?)
}

/// Run checks forever: every `interval`, or after one second when a check failed or lost a race.
pub async fn run_checks(
    client: Option<Client>,
    source: crate::config::CertSource,
    interval: Duration,
    slot: Arc<CertSlot>,
    metrics: WebhookMetrics,
) {
    let retry = Duration::from_secs(1).min(interval);
    loop {
        let outcome = match (&source, &client) {
            (crate::config::CertSource::Dir(dir), _) => check_dir(Path::new(dir), &slot)
                .await
                .map(|_| CheckResult::Current),
            (crate::config::CertSource::SelfSigned(cfg), Some(client)) => {
                check_self_signed(client, cfg, &slot, &metrics, now_unix()).await
            }
            (crate::config::CertSource::SelfSigned(_), None) => {
                tracing::error!("webhook: self-signed certificates need a Kubernetes client");
                return;
            }
        };
        metrics
            .serving
            .store(slot.has_certificate(), std::sync::atomic::Ordering::SeqCst);
        let wait = match outcome {
            Ok(CheckResult::Conflict) => retry,
            Ok(_) => interval,
            Err(err) => {
                tracing::warn!(%err, "webhook: certificate check failed; retrying");
                retry.max(Duration::from_secs(5)).min(interval)
            }
        };
        tokio::time::sleep(wait).await;
    }
}
