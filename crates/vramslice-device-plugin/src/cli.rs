//! Command-line flags.

use std::path::PathBuf;

use crate::telemetry::LogFormat;

/// `vramslice-device-plugin --config <file.yaml> [--kubeconfig <path>] [--no-publish] [--log-format json|text]`
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vramslice-device-plugin",
    version,
    about = "Advertises GPU memory to the kubelet in fixed units and publishes live GPU readings."
)]
pub struct Args {
    /// Configuration file (YAML). Without it, every setting takes its default.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kubeconfig for API access. Without it, the in-cluster config is used when present;
    /// otherwise the plugin runs without API access (no publishing, binpacking preferences).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Do not write GpuNode objects (pending-pod lookups still use the API when available).
    #[arg(long)]
    pub no_publish: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
