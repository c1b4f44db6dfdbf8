//! The extender's ledger settings (`headroom`, `staleness`) as `nodes`, `pods` and `explain`
//! use them, so that their verdicts are the extender's: the flags when given, otherwise the
//! extender's own configuration (the `extender.yaml` key of the scheduler ConfigMap the chart
//! installs), otherwise the extender's defaults, with a warning that says why.
//!
//! Finding the ConfigMap is I/O (in the crate root); choosing and parsing here is not.

use serde::Deserialize;
use vramslice_core::cluster::ledger::LedgerConfig;

use crate::PluginError;

pub use vramslice_core::cluster::ledger::{DEFAULT_HEADROOM, DEFAULT_STALENESS};
use vramslice_core::cluster::ledger::{
    DEFAULT_HEADROOM_BYTES, DEFAULT_STALENESS_DURATION, parse_staleness,
};
/// The ConfigMap key holding the extender's configuration.
pub const EXTENDER_CONFIG_KEY: &str = "extender.yaml";
/// The label selector of the ConfigMaps that may hold it (the chart's scheduler component).
pub const SCHEDULER_CONFIG_SELECTOR: &str = "app.kubernetes.io/component=scheduler";

/// The two settings of an extender configuration, as written there (absent: the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExtenderSettings {
    /// `headroom`.
    #[serde(default)]
    pub headroom: Option<String>,
    /// `staleness`.
    #[serde(default)]
    pub staleness: Option<String>,
}

/// An extender configuration found in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where: `namespace/name` of its ConfigMap.
    pub source: String,
    /// What it says.
    pub settings: ExtenderSettings,
}

/// Read the settings from the text of an `extender.yaml`.
///
/// # Errors
/// The YAML error, as text.
pub fn parse_extender_yaml(text: &str) -> Result<ExtenderSettings, String> {
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// The one extender configuration among `candidates` (`namespace/name`, `extender.yaml` text),
/// or why there is none to use.
///
/// # Errors
/// None found, several found, or the one found does not parse.
pub fn pick(candidates: &[(String, String)]) -> Result<Found, String> {
    match candidates {
        [] => Err(format!(
            "no ConfigMap labelled {SCHEDULER_CONFIG_SELECTOR} holds {EXTENDER_CONFIG_KEY}"
        )),
        [(source, text)] => parse_extender_yaml(text)
            .map(|settings| Found {
                source: source.clone(),
                settings,
            })
            .map_err(|e| format!("{source} {EXTENDER_CONFIG_KEY}: {e}")),
        several => Err(format!(
            "{} extender configurations found ({})",
            several.len(),
            several
                .iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The settings to use: each flag given wins; otherwise the extender's configuration when it
/// was `found`; otherwise the defaults, with a warning naming why (`None` when nothing was
/// missing or the configuration was found).
///
/// # Errors
/// [`PluginError::Usage`] for a flag that is not a byte count or duration; a malformed value
/// in the extender's configuration falls back to the default with a warning.
pub fn resolve(
    headroom_flag: Option<&str>,
    staleness_flag: Option<&str>,
    found: Option<Result<Found, String>>,
) -> Result<(LedgerConfig, Option<String>), PluginError> {
    let mut warnings = Vec::new();
    let (from_extender, source) = match found {
        Some(Ok(f)) => (f.settings, Some(f.source)),
        Some(Err(why)) => {
            warnings.push(format!("the extender's configuration was not read ({why})"));
            (ExtenderSettings::default(), None)
        }
        None => (ExtenderSettings::default(), None),
    };
    let headroom_bytes = match headroom_flag {
        Some(flag) => vramslice_core::parse_bytes(flag)
            .map_err(|e| PluginError::Usage(format!("--headroom: {e}")))?,
        None => from_config(
            "headroom",
            from_extender.headroom.as_deref(),
            source.as_deref(),
            DEFAULT_HEADROOM_BYTES,
            vramslice_core::parse_bytes,
            &mut warnings,
        ),
    };
    let staleness = match staleness_flag {
        Some(flag) => {
            parse_staleness(flag).map_err(|e| PluginError::Usage(format!("--staleness: {e}")))?
        }
        None => from_config(
            "staleness",
            from_extender.staleness.as_deref(),
            source.as_deref(),
            DEFAULT_STALENESS_DURATION,
            parse_staleness,
            &mut warnings,
        ),
    };
    let warning = (!warnings.is_empty()).then(|| {
        format!(
            "{}; using the extender's defaults (headroom {DEFAULT_HEADROOM}, staleness {DEFAULT_STALENESS}) where no flag was given: pass --headroom and --staleness if your install sets others",
            warnings.join("; ")
        )
    });
    Ok((
        LedgerConfig {
            headroom_bytes,
            staleness,
        },
        warning,
    ))
}

/// One setting from the extender's configuration (or its default when the configuration
/// leaves it out); a malformed value is the default, with a warning.
fn from_config<T, E: std::fmt::Display>(
    name: &str,
    written: Option<&str>,
    source: Option<&str>,
    default: T,
    parse: impl Fn(&str) -> Result<T, E>,
    warnings: &mut Vec<String>,
) -> T {
    let (Some(text), Some(source)) = (written, source) else {
        return default;
    };
    parse(text).unwrap_or_else(|e| {
        warnings.push(format!("{source}: {name} {text:?}: {e}"));
        default
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn found(yaml: &str) -> Option<Result<Found, String>> {
        Some(pick(&[(
            "vramslice-system/vramslice-scheduler".into(),
            yaml.into(),
        )]))
    }

    #[test]
    fn the_default_texts_are_the_default_values() {
        assert_eq!(
            vramslice_core::parse_bytes(DEFAULT_HEADROOM).unwrap(),
            DEFAULT_HEADROOM_BYTES
        );
        assert_eq!(
            vramslice_core::parse_duration(DEFAULT_STALENESS).unwrap(),
            DEFAULT_STALENESS_DURATION
        );
    }

    #[test]
    fn flags_win_then_the_extenders_configuration_then_the_defaults() {
        let yaml = "listenAddr: 0.0.0.0:8888\nheadroom: 1Gi\nstaleness: 30s\npolicy: spread\n";
        let (c, warning) = resolve(None, None, found(yaml)).unwrap();
        assert_eq!(c.headroom_bytes, 1 << 30);
        assert_eq!(c.staleness, Duration::from_secs(30));
        assert_eq!(warning, None);
        let (c, _) = resolve(Some("2Gi"), None, found(yaml)).unwrap();
        assert_eq!(c.headroom_bytes, 2 << 30);
        assert_eq!(c.staleness, Duration::from_secs(30));
        // A configuration that leaves a setting out means the extender's default, silently.
        let (c, warning) = resolve(None, None, found("policy: binpack\n")).unwrap();
        assert_eq!(c.headroom_bytes, 512 << 20);
        assert_eq!(c.staleness, Duration::from_secs(90));
        assert_eq!(warning, None);
        // Both flags given: nothing is looked up and nothing is said.
        let (c, warning) = resolve(Some("0"), Some("5m"), None).unwrap();
        assert_eq!(
            (c.headroom_bytes, c.staleness),
            (0, Duration::from_secs(300))
        );
        assert_eq!(warning, None);
    }

    #[test]
    fn a_configuration_not_found_or_not_readable_is_said_and_the_defaults_used() {
        let (c, warning) = resolve(None, None, Some(pick(&[]))).unwrap();
        assert_eq!(c.headroom_bytes, 512 << 20);
        let warning = warning.unwrap();
        assert!(
            warning.contains("no ConfigMap labelled app.kubernetes.io/component=scheduler")
                && warning.contains("pass --headroom and --staleness"),
            "{warning}"
        );
        let two = pick(&[("a/x".into(), String::new()), ("b/y".into(), String::new())]);
        assert_eq!(
            two.unwrap_err(),
            "2 extender configurations found (a/x, b/y)"
        );
        let (c, warning) = resolve(None, None, found("headroom: lots\n")).unwrap();
        assert_eq!(c.headroom_bytes, 512 << 20);
        assert!(
            warning
                .unwrap()
                .contains("vramslice-system/vramslice-scheduler: headroom \"lots\"")
        );
        // A zero staleness, which the extender refuses, is not used either.
        let (c, warning) = resolve(None, None, found("staleness: 0s\n")).unwrap();
        assert_eq!(c.staleness, Duration::from_secs(90));
        assert!(
            warning
                .unwrap()
                .contains("staleness \"0s\": must be more than zero")
        );
        let err = resolve(None, Some("0s"), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("--staleness: must be more than zero"),
            "{err}"
        );
        let (_, warning) = resolve(None, None, found("headroom: [1\n")).unwrap();
        assert!(warning.unwrap().contains("extender.yaml"));
        assert!(matches!(
            resolve(Some("lots"), None, None),
            Err(PluginError::Usage(m)) if m.contains("--headroom")
        ));
    }
}
