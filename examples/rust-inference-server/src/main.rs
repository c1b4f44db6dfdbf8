//! `rust-inference-server`: parse flags, start logging, build the service, serve until SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use rust_inference_server::app::{DeviceChoice, Settings, build};
use rust_inference_server::model::ModelSpec;
use vramslice_sidecar::Config;

#[derive(Debug, Parser)]
#[command(about = "Example inference server running every model load and request under vramslice")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Device: auto (CUDA if a driver is present), cpu, cuda.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Simulated device memory when on the CPU (default: VRAMSLICE_VRAM_LIMIT_BYTES or 1Gi).
    #[arg(long)]
    cpu_limit: Option<String>,
    /// Device memory a request holds per batch item.
    #[arg(long, default_value = "16Mi")]
    workspace_per_item: String,
    /// Largest batch accepted.
    #[arg(long, default_value_t = 64)]
    max_batch: u32,
    /// Model width.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Model depth.
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Serve without the runtime (for comparison).
    #[arg(long)]
    no_admission: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let runtime = Config::from_env().context("reading VRAMSLICE_* configuration")?;
    let cpu_limit = match &args.cpu_limit {
        Some(q) => vramslice_core::parse_bytes(q).context("--cpu-limit")?,
        None => runtime.limit.unwrap_or(1 << 30),
    };
    let settings = Settings {
        device: args.device,
        model: ModelSpec {
            dim: args.dim,
            layers: args.layers,
            ..ModelSpec::default()
        },
        cpu_limit,
        workspace_per_item: vramslice_core::parse_bytes(&args.workspace_per_item)
            .context("--workspace-per-item")?,
        max_batch: args.max_batch,
        admission: !args.no_admission,
        runtime,
    };
    let (router, _state) = tokio::task::spawn_blocking(move || build(settings)).await??;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
