//! The extender's configuration file (YAML, camelCase keys, every key optional, unknown keys
//! rejected) and its validation into typed settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vramslice_core::cluster::ledger::{
    DEFAULT_HEADROOM, DEFAULT_STALENESS, LedgerConfig, parse_staleness,
};
use vramslice_core::cluster::placement::Policy;
use vramslice_core::{VramUnit, parse_bytes};
use vramslice_webhook::WebhookConfig;

/// A configuration that cannot be used; the message names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML does not parse or has unknown keys or wrong types.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A key has a value that cannot be used.
    #[error("config key {key} is invalid: {message}")]
    Invalid {
        /// The key, as written in YAML.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// TLS files, both or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsFile {
    /// PEM certificate chain.
    pub cert_file: String,
    /// PEM private key.
    pub key_file: String,
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RawConfig {
    listen_addr: String,
    metrics_addr: String,
    tls: TlsFile,
    policy: String,
    headroom: String,
    staleness: String,
    resources: Vec<String>,
    webhook: Option<WebhookConfig>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen_addr: "0.0.0.0:8888".into(),
            metrics_addr: String::new(),
            tls: TlsFile::default(),
            policy: "binpack".into(),
            headroom: DEFAULT_HEADROOM.into(),
            staleness: DEFAULT_STALENESS.into(),
            resources: vec![VramUnit::Gib1.resource_name().into()],
            webhook: None,
        }
    }
}

/// TLS settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to listen: kube-scheduler's verbs, and the probes and metrics unless
    /// `metrics_addr` is set.
    pub listen_addr: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served apart from the verbs (plain HTTP),
    /// so the verbs' listener can stay on loopback.
    pub metrics_addr: Option<SocketAddr>,
    /// Serve HTTPS with these files, or plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Default placement policy (a pod's `vramslice.io/policy` annotation overrides it).
    pub policy: Policy,
    /// Bytes kept free on every GPU.
    pub headroom_bytes: u64,
    /// Readings older than this take no new pods.
    pub staleness: Duration,
    /// VRAM resources accepted (their names carry the unit).
    pub resources: Vec<VramUnit>,
    /// The mutating admission webhook served beside the extender, when configured
    /// (validated again at start with `$POD_NAMESPACE`, see `vramslice_webhook`).
    pub webhook: Option<WebhookConfig>,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are valid by construction; fall back field by field if they were not.
        validate(RawConfig::default()).unwrap_or(Config {
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 8888)),
            metrics_addr: None,
            tls: None,
            policy: Policy::Binpack,
            headroom_bytes: 512 << 20,
            staleness: Duration::from_secs(90),
            resources: vec![VramUnit::Gib1],
            webhook: None,
        })
    }
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parse and validate YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?
        };
        validate(raw)
    }

    /// The ledger's share of the settings.
    pub fn ledger(&self) -> LedgerConfig {
        LedgerConfig {
            headroom_bytes: self.headroom_bytes,
            staleness: self.staleness,
        }
    }
}

fn invalid(key: &'static str, message: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.to_string(),
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let listen_addr: SocketAddr = raw.listen_addr.trim().parse().map_err(|_| {
        invalid(
            "listenAddr",
            format!(
                "{:?} is not an address such as 0.0.0.0:8888",
                raw.listen_addr
            ),
        )
    })?;
    let metrics_addr = match raw.metrics_addr.trim() {
        "" => None,
        text => {
            let addr: SocketAddr = text.parse().map_err(|_| {
                invalid(
                    "metricsAddr",
                    format!(
                        "{:?} is not an address such as 0.0.0.0:8889",
                        raw.metrics_addr
                    ),
                )
            })?;
            if addr.port() != 0 && addr.port() == listen_addr.port() {
                return Err(invalid(
                    "metricsAddr",
                    format!("port {} is listenAddr's port already", addr.port()),
                ));
            }
            Some(addr)
        }
    };
    let tls = match (raw.tls.cert_file.is_empty(), raw.tls.key_file.is_empty()) {
        (true, true) => None,
        (false, false) => Some(TlsConfig {
            cert_file: raw.tls.cert_file.into(),
            key_file: raw.tls.key_file.into(),
        }),
        _ => {
            return Err(invalid(
                "tls",
                "certFile and keyFile must be given together (or neither)",
            ));
        }
    };
    let policy: Policy = raw.policy.parse().map_err(|e| invalid("policy", e))?;
    let headroom_bytes = parse_bytes(&raw.headroom).map_err(|e| invalid("headroom", e))?;
    let staleness = parse_staleness(&raw.staleness).map_err(|e| invalid("staleness", e))?;
    if raw.resources.is_empty() {
        return Err(invalid(
            "resources",
            "must name at least one resource, such as vramslice.io/vram-gib",
        ));
    }
    let mut resources = Vec::new();
    for name in &raw.resources {
        let unit =
            VramUnit::from_resource_name(name.trim()).map_err(|e| invalid("resources", e))?;
        if !resources.contains(&unit) {
            resources.push(unit);
        }
    }
    if let Some(webhook) = &raw.webhook {
        let port = webhook.listen_addr.port();
        let taken = [Some(listen_addr), metrics_addr]
            .into_iter()
            .flatten()
            .any(|addr| addr.port() == port);
        if port != 0 && taken {
            return Err(invalid(
                "webhook",
                format!("listenAddr port {port} is the extender's listenAddr or metricsAddr port"),
            ));
        }
    }
    Ok(Config {
        listen_addr,
        metrics_addr,
        tls,
        policy,
        headroom_bytes,
        staleness,
        resources,
        webhook: raw.webhook,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:8888".parse().unwrap());
        assert_eq!((&c.tls, c.metrics_addr), (&None, None));
        assert_eq!(c.policy, Policy::Binpack);
        assert_eq!(c.headroom_bytes, 512 << 20);
        assert_eq!(c.staleness, Duration::from_secs(90));
        assert_eq!(c.resources, vec![VramUnit::Gib1]);
        assert_eq!(Config::default(), c);
        assert_eq!(Config::parse("{}", "t").unwrap(), c);
    }

    #[test]
    fn the_webhook_block_is_read_and_checked() {
        let c = Config::parse(
            "webhook:\n  listenAddr: 0.0.0.0:8443\n  certDir: /certs\n",
            "test",
        )
        .unwrap();
        let webhook = c.webhook.expect("webhook configured");
        assert_eq!(webhook.listen_addr.port(), 8443);
        assert!(webhook.validate(None).is_ok());
        let err = Config::parse("webhook: { listen: x }", "test").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        assert_eq!(Config::parse("", "test").unwrap().webhook, None);
    }

    #[test]
    fn every_key_is_read() {
        let c = Config::parse(
            "listenAddr: 127.0.0.1:9443\n\
             metricsAddr: 0.0.0.0:8889\n\
             tls: { certFile: /c.pem, keyFile: /k.pem }\n\
             policy: spread\n\
             headroom: 1Gi\n\
             staleness: 2m\n\
             resources: [vramslice.io/vram-gib, vramslice.io/vram-512mib]\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.listen_addr, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(c.metrics_addr, Some("0.0.0.0:8889".parse().unwrap()));
        assert_eq!(
            c.tls,
            Some(TlsConfig {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into()
            })
        );
        assert_eq!(c.policy, Policy::Spread);
        assert_eq!(c.headroom_bytes, 1 << 30);
        assert_eq!(c.staleness, Duration::from_secs(120));
        assert_eq!(c.resources, vec![VramUnit::Gib1, VramUnit::Mib512]);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("listenAddr: nowhere", "config key listenAddr is invalid"),
            ("metricsAddr: 8889", "config key metricsAddr is invalid"),
            (
                "listenAddr: 127.0.0.1:8888\nmetricsAddr: 0.0.0.0:8888",
                "port 8888 is listenAddr's port already",
            ),
            (
                "metricsAddr: 0.0.0.0:8443\nwebhook: { listenAddr: 0.0.0.0:8443, certDir: /c }",
                "listenAddr port 8443 is the extender's listenAddr or metricsAddr port",
            ),
            (
                "tls: { certFile: /c.pem }",
                "certFile and keyFile must be given together",
            ),
            (
                "policy: roundrobin",
                "unknown placement policy \"roundrobin\"",
            ),
            ("headroom: lots", "config key headroom is invalid"),
            ("staleness: 5", "config key staleness is invalid"),
            ("staleness: 0s", "must be more than zero"),
            ("resources: []", "must name at least one resource"),
            ("resources: [nvidia.com/gpu]", "nvidia.com/gpu"),
            ("listen: 0.0.0.0:1", "unknown field"),
            ("tls: { cert: x }", "unknown field"),
            ("policy: [a, b]", "config file test is invalid"),
        ];
        for (yaml, needle) in cases {
            let err = Config::parse(yaml, "test").unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml:?} gave {err:?}");
        }
        let err = Config::load(Path::new("/nonexistent/extender.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/extender.yaml"),
            "{err}"
        );
    }
}
