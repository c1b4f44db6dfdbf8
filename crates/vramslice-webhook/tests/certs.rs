//! The self-signed CA and serving certificate: they chain, rotate without breaking trust, and
//! survive the trip through the Secret's data.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use vramslice_webhook::certs::{
    CA_PROPAGATION_SECS, CertSettings, Plan, StoredCerts, keys, plan, renew,
};

const DAY: i64 = 86_400;
const NOW: i64 = 1_800_000_000;

fn settings() -> CertSettings {
    CertSettings {
        cert_validity: Duration::from_secs(90 * DAY as u64),
        ca_validity: Duration::from_secs(3650 * DAY as u64),
        dns_names: vec![
            "vramslice-webhook".into(),
            "vramslice-webhook.vramslice-system.svc".into(),
        ],
    }
}

/// Whether `leaf_pem` verifies for `host` at `at` against the CA bundle `bundle_pem`.
fn verifies(bundle_pem: &str, leaf_pem: &str, host: &str, at: i64) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| e.to_string())?;
    let leaf = CertificateDer::from_pem_slice(leaf_pem.as_bytes()).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(at as u64));
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], time)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn fresh_certificates_chain_to_the_bundle_for_the_service_names() {
    let s = settings();
    assert_eq!(plan(None, NOW, &s), Plan::NewCa);
    let certs = renew(None, Plan::NewCa, NOW, &s).unwrap();
    assert_eq!(certs.tls_not_after, NOW + 90 * DAY);
    assert_eq!(certs.ca_not_after, NOW + 3650 * DAY);
    assert!(certs.previous_ca.is_none());
    verifies(
        &certs.ca_bundle(),
        &certs.tls_cert,
        "vramslice-webhook.vramslice-system.svc",
        NOW,
    )
    .unwrap();
    verifies(
        &certs.ca_bundle(),
        &certs.tls_cert,
        "vramslice-webhook",
        NOW,
    )
    .unwrap();
    let wrong = verifies(&certs.ca_bundle(), &certs.tls_cert, "other.example", NOW);
    assert!(
        wrong.is_err(),
        "a name outside the certificate must not verify"
    );
    let expired = verifies(
        &certs.ca_bundle(),
        &certs.tls_cert,
        "vramslice-webhook",
        NOW + 91 * DAY,
    );
    assert!(expired.is_err(), "the serving certificate must expire");
}

#[test]
fn plan_renews_with_a_third_of_validity_left() {
    let s = settings();
    let certs = renew(None, Plan::NewCa, NOW, &s).unwrap();
    assert_eq!(plan(Some(&certs), NOW, &s), Plan::Keep);
    assert_eq!(plan(Some(&certs), NOW + 59 * DAY, &s), Plan::Keep);
    assert_eq!(plan(Some(&certs), NOW + 60 * DAY, &s), Plan::NewServing);
    assert_eq!(plan(Some(&certs), NOW + 200 * DAY, &s), Plan::NewServing);
    assert_eq!(plan(Some(&certs), NOW + 2434 * DAY, &s), Plan::NewCa);
    let mut renamed = s.clone();
    renamed.dns_names.push("extra.svc".into());
    assert_eq!(
        plan(Some(&certs), NOW, &renamed),
        Plan::NewServing,
        "new DNS names need a new certificate"
    );
}

#[test]
fn serving_renewal_keeps_the_ca_bundle() {
    let s = settings();
    let first = renew(None, Plan::NewCa, NOW, &s).unwrap();
    let later = NOW + 61 * DAY;
    let second = renew(Some(&first), Plan::NewServing, later, &s).unwrap();
    assert_eq!(
        second.ca_bundle(),
        first.ca_bundle(),
        "CA bundle must not change"
    );
    assert_ne!(second.tls_cert, first.tls_cert);
    assert_eq!(second.tls_not_after, later + 90 * DAY);
    verifies(
        &first.ca_bundle(),
        &second.tls_cert,
        "vramslice-webhook",
        later,
    )
    .unwrap();
}

#[test]
fn ca_rotation_trusts_old_and_new_until_the_old_expires() {
    let mut s = settings();
    s.ca_validity = Duration::from_secs(300 * DAY as u64);
    let first = renew(None, Plan::NewCa, NOW, &s).unwrap();
    let t = NOW + 250 * DAY;
    assert_eq!(plan(Some(&first), t, &s), Plan::NewCa);
    let second = renew(Some(&first), Plan::NewCa, t, &s).unwrap();
    assert_ne!(second.ca_cert, first.ca_cert);
    let bundle = second.ca_bundle();
    verifies(&bundle, &second.tls_cert, "vramslice-webhook", t).unwrap();
    verifies(
        &bundle,
        &first.tls_cert,
        "vramslice-webhook",
        NOW + 80 * DAY,
    )
    .unwrap();
    assert!(second.ca_bundle().starts_with(&second.ca_cert));
    // Once the old CA has expired, the next renewal drops it.
    let third = renew(Some(&second), Plan::NewServing, NOW + 301 * DAY, &s).unwrap();
    assert!(third.previous_ca.is_none());
    assert_eq!(third.ca_bundle(), second.ca_cert);
    // A serving certificate never outlives its CA.
    let late = renew(Some(&first), Plan::NewServing, NOW + 280 * DAY, &s).unwrap();
    assert_eq!(late.tls_not_after, first.ca_not_after);
}

#[test]
fn secret_data_round_trips_and_partial_data_means_start_over() {
    let s = settings();
    let first = renew(None, Plan::NewCa, NOW, &s).unwrap();
    let rotated = renew(Some(&first), Plan::NewCa, NOW + DAY, &s).unwrap();
    let data = rotated.to_data();
    assert_eq!(data[keys::CA_BUNDLE], rotated.ca_bundle());
    assert_eq!(StoredCerts::from_data(&data), Some(rotated.clone()));
    for key in [
        keys::CA_KEY,
        keys::TLS_CERT,
        keys::TLS_NOT_AFTER,
        keys::CA_NAME,
    ] {
        let mut partial = data.clone();
        partial.remove(key);
        assert_eq!(StoredCerts::from_data(&partial), None, "without {key}");
    }
    let mut garbled = data.clone();
    garbled.insert(keys::TLS_NOT_AFTER.into(), "soon".into());
    assert_eq!(StoredCerts::from_data(&garbled), None);
    assert_eq!(StoredCerts::from_data(&Default::default()), None);
}

#[test]
fn a_corrupt_stored_ca_key_is_an_error_not_a_panic() {
    let s = settings();
    let mut certs = renew(None, Plan::NewCa, NOW, &s).unwrap();
    certs.ca_key = "-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n".into();
    let err = renew(Some(&certs), Plan::NewServing, NOW, &s).unwrap_err();
    assert!(err.to_string().contains("stored CA is unusable"), "{err}");
}

#[test]
fn a_pair_caught_half_replaced_is_refused_and_the_finished_pair_is_served() {
    use vramslice_webhook::tls::{CertSlot, TlsError};
    let s = settings();
    let a = renew(None, Plan::NewCa, NOW, &s).unwrap();
    let b = renew(Some(&a), Plan::NewServing, NOW + DAY, &s).unwrap();
    let slot = CertSlot::new();
    assert!(slot.set(&a.tls_cert, &a.tls_key).unwrap());
    assert!(!slot.set(&a.tls_cert, &a.tls_key).unwrap(), "unchanged");
    // tls.crt replaced, tls.key not yet: refused, the old pair is still served.
    let err = slot.set(&b.tls_cert, &a.tls_key).unwrap_err();
    assert!(matches!(err, TlsError::Mismatch(_)), "{err}");
    assert_eq!(slot.current_pem().as_deref(), Some(a.tls_cert.as_str()));
    // The next check sees both replaced: installed.
    assert!(slot.set(&b.tls_cert, &b.tls_key).unwrap());
    assert_eq!(slot.current_pem().as_deref(), Some(b.tls_cert.as_str()));
}

#[test]
fn a_new_ca_signs_the_served_certificate_only_once_the_api_servers_can_know_it() {
    let s = settings();
    let first = renew(None, Plan::NewCa, NOW, &s).unwrap();
    assert_eq!(
        first.ca_staged_at, None,
        "a first CA has no bundle to wait for"
    );
    let t = NOW + 2500 * DAY;
    let served = renew(Some(&first), Plan::NewServing, t - 10 * DAY, &s).unwrap();
    assert_eq!(plan(Some(&served), t, &s), Plan::NewCa);
    let staged = renew(Some(&served), Plan::NewCa, t, &s).unwrap();
    // The served certificate stays the old CA's: an API server that has not seen the new
    // bundle yet still trusts it, and so does one that has.
    assert_eq!(staged.tls_cert, served.tls_cert);
    assert_eq!(staged.ca_staged_at, Some(t));
    verifies(
        &served.ca_bundle(),
        &staged.tls_cert,
        "vramslice-webhook",
        t,
    )
    .unwrap();
    verifies(
        &staged.ca_bundle(),
        &staged.tls_cert,
        "vramslice-webhook",
        t,
    )
    .unwrap();
    assert_eq!(
        StoredCerts::from_data(&staged.to_data()),
        Some(staged.clone())
    );
    assert_eq!(
        plan(Some(&staged), t + CA_PROPAGATION_SECS - 1, &s),
        Plan::Keep
    );
    assert_eq!(
        plan(Some(&staged), t + CA_PROPAGATION_SECS, &s),
        Plan::NewServing
    );
    let switched = renew(Some(&staged), Plan::NewServing, t + CA_PROPAGATION_SECS, &s).unwrap();
    assert_eq!(switched.ca_staged_at, None);
    assert_eq!(switched.ca_cert, staged.ca_cert);
    verifies(
        &staged.ca_bundle(),
        &switched.tls_cert,
        "vramslice-webhook",
        t + 60,
    )
    .unwrap();
    // Served at once, it would have failed on an API server still holding the old bundle.
    assert!(
        verifies(
            &served.ca_bundle(),
            &switched.tls_cert,
            "vramslice-webhook",
            t + 60
        )
        .is_err()
    );
    assert_eq!(plan(Some(&switched), t + DAY, &s), Plan::Keep);

    // A certificate as long-lived as its CA reaches its last third with it: still kept for
    // the wait (another replica's check, or a retry, must not switch it early).
    let mut equal = settings();
    equal.cert_validity = equal.ca_validity;
    let first = renew(None, Plan::NewCa, NOW, &equal).unwrap();
    let t2 = NOW + 2500 * DAY;
    assert_eq!(plan(Some(&first), t2, &equal), Plan::NewCa);
    let staged_equal = renew(Some(&first), Plan::NewCa, t2, &equal).unwrap();
    assert_eq!(staged_equal.ca_staged_at, Some(t2));
    assert_eq!(plan(Some(&staged_equal), t2 + 1, &equal), Plan::Keep);
    assert_eq!(
        plan(Some(&staged_equal), t2 + CA_PROPAGATION_SECS, &equal),
        Plan::NewServing
    );

    // A served certificate that would expire during the wait is replaced at once.
    let mut ending = served.clone();
    ending.tls_not_after = t + CA_PROPAGATION_SECS / 2;
    let at_once = renew(Some(&ending), Plan::NewCa, t, &s).unwrap();
    assert_eq!(at_once.ca_staged_at, None);
    assert_ne!(at_once.tls_cert, served.tls_cert);
    verifies(
        &at_once.ca_bundle(),
        &at_once.tls_cert,
        "vramslice-webhook",
        t,
    )
    .unwrap();
}

#[tokio::test]
async fn the_checks_say_whether_a_certificate_is_served() {
    use vramslice_webhook::WebhookMetrics;
    use vramslice_webhook::config::CertSource;
    use vramslice_webhook::rotation::run_checks;
    use vramslice_webhook::tls::CertSlot;
    let dir = tempfile::tempdir().unwrap();
    let metrics = WebhookMetrics::default();
    let slot = CertSlot::new();
    assert!(!slot.has_certificate());
    let checks = tokio::spawn(run_checks(
        None,
        CertSource::Dir(dir.path().display().to_string()),
        Duration::from_millis(20),
        slot.clone(),
        metrics.clone(),
    ));
    // No files yet: nothing served, and the checks say so.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!metrics.is_serving());
    let certs = renew(None, Plan::NewCa, NOW, &settings()).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &certs.tls_cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), &certs.tls_key).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics.is_serving() {
        assert!(
            std::time::Instant::now() < deadline,
            "never reported serving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(slot.has_certificate());
    checks.abort();
}
