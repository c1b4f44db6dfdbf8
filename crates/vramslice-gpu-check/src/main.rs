//! `vramslice-gpu-check`: the Rust half of `scripts/gpu-check.sh`. `kubelet` plays the kubelet's
//! device-manager side for the real plugin binary; `nvml` prints what the NVML backend reads.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the kubelet's Registration socket, dial the registering plugin back, follow its
    /// ListAndWatch stream, optionally Allocate units, and keep a JSON report up to date.
    Kubelet {
        /// The device-plugin directory (`kubelet.sock` is created there).
        #[arg(long)]
        socket_dir: PathBuf,
        /// Also serve the kubelet's PodResources API (no pods) on this socket.
        #[arg(long)]
        pod_resources_socket: Option<PathBuf>,
        /// The JSON report, rewritten atomically after every event.
        #[arg(long)]
        report: PathBuf,
        /// Allocate this many units of the first advertised GPU once its devices are listed.
        #[arg(long)]
        allocate: Option<usize>,
    },
    /// Read every GPU once through the NVML backend and print the reading as JSON.
    Nvml {
        /// The NVML library (default: the loader's `libnvidia-ml.so.1`).
        #[arg(long)]
        library: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Kubelet {
            socket_dir,
            pod_resources_socket,
            report,
            allocate,
        } => {
            if allocate == Some(0) {
                anyhow::bail!("--allocate 0: a container asks for at least 1 unit");
            }
            vramslice_gpu_check::kubelet::run(
                &socket_dir,
                pod_resources_socket.as_deref(),
                &report,
                allocate,
            )
            .await?
        }
        Command::Nvml { library } => {
            let reading = vramslice_gpu_check::nvml::read(library.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&reading)?);
        }
    }
    Ok(())
}
