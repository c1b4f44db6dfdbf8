//! The webhook's certificates: a self-signed CA and a serving certificate it signs, stored as
//! plain strings (the Secret's data keys), with a pure rotation plan.
//!
//! Rotation keeps the API server's trust unbroken: a new serving certificate is signed by the
//! current CA (the CA bundle does not change); a new CA is added in front of the old one in
//! the bundle, and the old one stays there until it expires, so replicas still serving a
//! certificate from the old CA keep working until they reload. A new CA signs no serving
//! certificate at once: every kube-apiserver learns the new bundle through its informer, and
//! until it has, it would refuse a certificate from the new CA. The certificate from the old CA
//! stays in use for [`CA_PROPAGATION_SECS`] (`ca.staged-at`), then a check replaces it.

use std::collections::BTreeMap;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Data keys of the Secret.
pub mod keys {
    /// PEM bundle the API server trusts: current CA first, then the previous one while valid.
    pub const CA_BUNDLE: &str = "ca.crt";
    /// PEM private key of the current CA.
    pub const CA_KEY: &str = "ca.key";
    /// Common name of the current CA (its issuer name in signed certificates).
    pub const CA_NAME: &str = "ca.name";
    /// Unix seconds when the current CA expires.
    pub const CA_NOT_AFTER: &str = "ca.not-after";
    /// PEM of the current CA alone.
    pub const CA_CERT: &str = "ca.current.crt";
    /// PEM of the previous CA, kept in the bundle until it expires.
    pub const PREV_CA_CERT: &str = "ca.previous.crt";
    /// Unix seconds when the previous CA expires.
    pub const PREV_CA_NOT_AFTER: &str = "ca.previous.not-after";
    /// PEM serving certificate.
    pub const TLS_CERT: &str = "tls.crt";
    /// PEM serving key.
    pub const TLS_KEY: &str = "tls.key";
    /// Unix seconds when the serving certificate expires.
    pub const TLS_NOT_AFTER: &str = "tls.not-after";
    /// Comma-separated DNS names of the serving certificate.
    pub const TLS_DNS_NAMES: &str = "tls.dns-names";
    /// Unix seconds when the current CA was made while the serving certificate is still the
    /// previous CA's (absent once a certificate from the current CA is served).
    pub const CA_STAGED_AT: &str = "ca.staged-at";
}

/// How long a new CA is only in the bundle before it signs the served certificate: time for
/// every kube-apiserver's informer to see the patched `caBundle`.
pub const CA_PROPAGATION_SECS: i64 = 60;

/// Clock skew tolerated at the start of a certificate's validity.
const BACKDATE_SECS: i64 = 3600;

/// A certificate operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not build or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A time outside what X.509 can carry.
    #[error("certificate validity out of range")]
    Time,
    /// The stored CA key cannot be read.
    #[error("stored CA is unusable: {0}")]
    StoredCa(String),
}

/// What the Secret holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCerts {
    /// Current CA PEM.
    pub ca_cert: String,
    /// Current CA key PEM.
    pub ca_key: String,
    /// Current CA common name.
    pub ca_name: String,
    /// Current CA expiry, Unix seconds.
    pub ca_not_after: i64,
    /// Previous CA PEM and expiry, while it may still be in use.
    pub previous_ca: Option<(String, i64)>,
    /// Serving certificate PEM.
    pub tls_cert: String,
    /// Serving key PEM.
    pub tls_key: String,
    /// Serving certificate expiry, Unix seconds.
    pub tls_not_after: i64,
    /// DNS names of the serving certificate.
    pub dns_names: Vec<String>,
    /// When the current CA was made, while the serving certificate is still the previous
    /// CA's ([`CA_PROPAGATION_SECS`]); `None` once the current CA signed it.
    pub ca_staged_at: Option<i64>,
}

impl StoredCerts {
    /// Read from Secret data; `None` when any key is missing or malformed (then a new CA is made).
    pub fn from_data(data: &BTreeMap<String, String>) -> Option<StoredCerts> {
        let get = |k: &str| data.get(k).filter(|v| !v.trim().is_empty()).cloned();
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<i64>().ok());
        let previous_ca = match (get(keys::PREV_CA_CERT), num(keys::PREV_CA_NOT_AFTER)) {
            (Some(c), Some(t)) => Some((c, t)),
            _ => None,
        };
        Some(StoredCerts {
            ca_cert: get(keys::CA_CERT)?,
            ca_key: get(keys::CA_KEY)?,
            ca_name: get(keys::CA_NAME)?,
            ca_not_after: num(keys::CA_NOT_AFTER)?,
            previous_ca,
            tls_cert: get(keys::TLS_CERT)?,
            tls_key: get(keys::TLS_KEY)?,
            tls_not_after: num(keys::TLS_NOT_AFTER)?,
            dns_names: get(keys::TLS_DNS_NAMES)?
                .split(',')
                .map(str::to_string)
                .collect(),
            ca_staged_at: num(keys::CA_STAGED_AT),
        })
    }

    /// The Secret data.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        d.insert(keys::CA_BUNDLE.into(), self.ca_bundle());
        d.insert(keys::CA_CERT.into(), self.ca_cert.clone());
        d.insert(keys::CA_KEY.into(), self.ca_key.clone());
        d.insert(keys::CA_NAME.into(), self.ca_name.clone());
        d.insert(keys::CA_NOT_AFTER.into(), self.ca_not_after.to_string());
        if let Some((cert, not_after)) = &self.previous_ca {
            d.insert(keys::PREV_CA_CERT.into(), cert.clone());
            d.insert(keys::PREV_CA_NOT_AFTER.into(), not_after.to_string());
        }
        d.insert(keys::TLS_CERT.into(), self.tls_cert.clone());
        d.insert(keys::TLS_KEY.into(), self.tls_key.clone());
        d.insert(keys::TLS_NOT_AFTER.into(), self.tls_not_after.to_string());
        d.insert(keys::TLS_DNS_NAMES.into(), self.dns_names.join(","));
        if let Some(at) = self.ca_staged_at {
            d.insert(keys::CA_STAGED_AT.into(), at.to_string());
        }
        d
    }

    /// The PEM bundle for `caBundle`: current CA, then the previous one if present.
    pub fn ca_bundle(&self) -> String {
        let mut b = self.ca_cert.clone();
        if let Some((prev, _)) = &self.previous_ca {
            if !b.ends_with('\n') {
                b.push('\n');
            }
            b.push_str(prev);
        }
        b
    }
}

/// Lifetimes and names the certificates must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSettings {
    /// Serving-certificate validity.
    pub cert_validity: Duration,
    /// CA validity.
    pub ca_validity: Duration,
    /// DNS names of the serving certificate.
    pub dns_names: Vec<String>,
}

/// What to do with the stored certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// They are fine.
    Keep,
    /// Issue a new serving certificate from the current CA.
    NewServing,
    /// Make a new CA (the old one stays in the bundle) and a serving certificate from it.
    NewCa,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Decide, at Unix time `now`, whether the stored certificates need renewing. Anything with a
/// third or less of its validity left is renewed.
pub fn plan(stored: Option<&StoredCerts>, now: i64, settings: &CertSettings) -> Plan {
    let Some(s) = stored else { return Plan::NewCa };
    if s.ca_not_after.saturating_sub(now) <= secs(settings.ca_validity) / 3 {
        return Plan::NewCa;
    }
    if let Some(staged) = s.ca_staged_at {
        // The new CA has had time to reach every API server: it signs the next certificate.
        // Until then the old CA's certificate stays, even in the last third of its validity,
        // unless it would expire during the wait or names other hosts.
        let waiting = now < staged.saturating_add(CA_PROPAGATION_SECS);
        let usable = s.tls_not_after > now.saturating_add(CA_PROPAGATION_SECS)
            && s.dns_names == settings.dns_names;
        return if waiting && usable {
            Plan::Keep
        } else {
            Plan::NewServing
        };
    }
    let serving_left = s.tls_not_after.saturating_sub(now);
    if serving_left <= secs(settings.cert_validity) / 3 || s.dns_names != settings.dns_names {
        return Plan::NewServing;
    }
    Plan::Keep
}

fn at(unix: i64) -> Result<OffsetDateTime, CertError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|_| CertError::Time)
}

fn ca_params(name: &str, now: i64, not_after: i64) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = at(now - BACKDATE_SECS)?;
    params.not_after = at(not_after)?;
    Ok(params)
}

/// Carry out `plan` (anything but [`Plan::Keep`]) at Unix time `now`.
pub fn renew(
    stored: Option<&StoredCerts>,
    plan: Plan,
    now: i64,
    settings: &CertSettings,
) -> Result<StoredCerts, CertError> {
    let (ca_cert, ca_key_pem, ca_name, ca_not_after, previous_ca, issuer) = match (plan, stored) {
        (Plan::NewServing | Plan::Keep, Some(s)) => {
            let key =
                KeyPair::from_pem(&s.ca_key).map_err(|e| CertError::StoredCa(e.to_string()))?;
            let issuer = Issuer::new(ca_params(&s.ca_name, now, s.ca_not_after)?, key);
            let previous = s.previous_ca.clone().filter(|(_, t)| *t > now);
            (
                s.ca_cert.clone(),
                s.ca_key.clone(),
                s.ca_name.clone(),
                s.ca_not_after,
                previous,
                issuer,
            )
        }
        _ => {
            let name = format!("vramslice-webhook-ca-{now}");
            let not_after = now.saturating_add(secs(settings.ca_validity));
            let params = ca_params(&name, now, not_after)?;
            let key = KeyPair::generate()?;
            let cert = params.self_signed(&key)?;
            let previous = stored
                .map(|s| (s.ca_cert.clone(), s.ca_not_after))
                .filter(|(_, t)| *t > now);
            (
                cert.pem(),
                key.serialize_pem(),
                name,
                not_after,
                previous,
                Issuer::new(params, key),
            )
        }
    };
    // A new CA replacing one still valid keeps the served certificate (from the old CA, now
    // the previous one in the bundle) while the bundle reaches the API servers, if that
    // certificate outlives the wait and names the right hosts.
    if let (Plan::NewCa, Some(s)) = (plan, stored)
        && previous_ca.is_some()
        && s.ca_staged_at.is_none()
        && s.tls_not_after > now.saturating_add(CA_PROPAGATION_SECS)
        && s.dns_names == settings.dns_names
    {
        return Ok(StoredCerts {
            ca_cert,
            ca_key: ca_key_pem,
            ca_name,
            ca_not_after,
            previous_ca,
            tls_cert: s.tls_cert.clone(),
            tls_key: s.tls_key.clone(),
            tls_not_after: s.tls_not_after,
            dns_names: s.dns_names.clone(),
            ca_staged_at: Some(now),
        });
    }
    let mut leaf = CertificateParams::new(settings.dns_names.clone())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        settings.dns_names.first().cloned().unwrap_or_default(),
    );
    leaf.distinguished_name = dn;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let tls_not_after = now
        .saturating_add(secs(settings.cert_validity))
        .min(ca_not_after);
    leaf.not_before = at(now - BACKDATE_SECS)?;
    leaf.not_after = at(tls_not_after)?;
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(StoredCerts {
        ca_cert,
        ca_key: ca_key_pem,
        ca_name,
        ca_not_after,
        previous_ca,
        tls_cert: leaf_cert.pem(),
        tls_key: leaf_key.serialize_pem(),
        tls_not_after,
        dns_names: settings.dns_names.clone(),
        ca_staged_at: None,
    })
}
