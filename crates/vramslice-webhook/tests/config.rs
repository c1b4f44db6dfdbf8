//! The `webhook:` block: defaults, exactly one certificate source, clear errors.
#![allow(clippy::unwrap_used)]

use vramslice_webhook::WebhookConfig;
use vramslice_webhook::config::{CertSource, ConfigError};

fn parse(yaml: &str) -> Result<WebhookConfig, String> {
    serde_saphyr::from_str::<WebhookConfig>(yaml).map_err(|e| e.to_string())
}

#[test]
fn chart_rendering_parses_with_defaults() {
    // Exactly what charts/vramslice renders under `webhook:`.
    let cfg = parse(
        "listenAddr: 0.0.0.0:8443\noverrideDefaultScheduler: true\nselfSigned:\n  caValidity: 87600h\n  certValidity: 2160h\n  namespace: vramslice-system\n  secretName: vramslice-webhook-tls\n  serviceName: vramslice-webhook\n  webhookConfigName: vramslice-webhook\n",
    )
    .unwrap();
    let valid = cfg.validate(None).unwrap();
    assert_eq!(valid.listen_addr.port(), 8443);
    assert!(valid.policy.override_default_scheduler);
    assert_eq!(valid.check_interval.as_secs(), 60);
    let CertSource::SelfSigned(s) = valid.source else {
        panic!("self-signed expected")
    };
    assert_eq!(s.cert_validity.as_secs(), 2160 * 3600);
    assert!(
        s.dns_names()
            .contains(&"vramslice-webhook.vramslice-system.svc".to_string())
    );
}

#[test]
fn cert_dir_mode_and_namespace_from_the_pod() {
    let cfg =
        parse("certDir: /etc/vramslice/webhook-tls\noverrideDefaultScheduler: false\n").unwrap();
    let valid = cfg.validate(None).unwrap();
    assert_eq!(
        valid.source,
        CertSource::Dir("/etc/vramslice/webhook-tls".into())
    );
    assert!(!valid.policy.override_default_scheduler);
    let cfg = parse("selfSigned:\n  secretName: s\n  serviceName: svc\n  webhookConfigName: w\n")
        .unwrap();
    assert_eq!(cfg.validate(None), Err(ConfigError::NoNamespace));
    let CertSource::SelfSigned(s) = cfg.validate(Some("ns1")).unwrap().source else {
        panic!()
    };
    assert_eq!(s.namespace, "ns1");
}

#[test]
fn bad_settings_are_named() {
    let both = parse("certDir: /x\nselfSigned:\n  namespace: n\n  secretName: s\n  serviceName: svc\n  webhookConfigName: w\n").unwrap();
    assert_eq!(both.validate(None), Err(ConfigError::CertSource));
    let neither = parse("listenAddr: 127.0.0.1:9443\n").unwrap();
    assert_eq!(neither.validate(None), Err(ConfigError::CertSource));
    let zero = parse("certDir: /x\ncheckInterval: 0s\n").unwrap();
    assert!(
        zero.validate(None)
            .unwrap_err()
            .to_string()
            .contains("checkInterval")
    );
    let bad = parse("certDir: /x\ncheckInterval: soon\n").unwrap();
    assert!(bad.validate(None).unwrap_err().to_string().contains("soon"));
    let typo = parse("certDir: /x\nlistenAdress: 0.0.0.0:1\n").unwrap_err();
    assert!(typo.contains("listenAdress"), "{typo}");
    let addr = parse("certDir: /x\nlistenAddr: everywhere\n").unwrap_err();
    assert!(!addr.is_empty());
    // A serving certificate cannot outlive its CA: a longer validity would renew it at every
    // check for most of each CA's life.
    let longer = parse("selfSigned:\n  namespace: n\n  secretName: s\n  serviceName: svc\n  webhookConfigName: w\n  caValidity: 720h\n  certValidity: 2160h\n").unwrap();
    let err = longer.validate(None).unwrap_err().to_string();
    assert!(
        err.contains("selfSigned.certValidity") && err.contains("2160h") && err.contains("720h"),
        "{err}"
    );
    // Too short to be renewed in time: 500ms truncated to 0 s made every served certificate
    // expired; checked every minute, a third of it must span three checks and the CA's wait.
    let short = |validity: &str| {
        parse(&format!("selfSigned:\n  namespace: n\n  secretName: s\n  serviceName: svc\n  webhookConfigName: w\n  caValidity: 87600h\n  certValidity: {validity}\n")).unwrap().validate(None)
    };
    let err = short("500ms").unwrap_err().to_string();
    assert!(
        err.contains("selfSigned.certValidity") && err.contains("at least 720s"),
        "{err}"
    );
    assert!(short("11m").is_err());
    assert!(short("12m").is_ok());
}
