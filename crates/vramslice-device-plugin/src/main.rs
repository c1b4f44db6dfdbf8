//! `vramslice-device-plugin`: parse flags, load config (exit 64 when invalid), start logging,
//! run the plugin until SIGTERM or SIGINT, then remove the socket and exit 0.

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use vramslice_device_plugin::app::{self, AppError, Options};
use vramslice_device_plugin::cli::Args;
use vramslice_device_plugin::config::{NODE_NAME_ENV, Settings};
use vramslice_device_plugin::telemetry;

fn main() {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let env_node = std::env::var(NODE_NAME_ENV).ok();
    let settings = match &args.config {
        Some(path) => Settings::load(path, env_node),
        None => Settings::defaults(env_node),
    };
    let code = match settings {
        Ok(settings) => run(settings, args),
        Err(e) => {
            let e = AppError::from(e);
            eprintln!("vramslice-device-plugin: {e}");
            e.exit_code()
        }
    };
    std::process::exit(code);
}

fn run(settings: Settings, args: Args) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vramslice-device-plugin: cannot start the runtime: {e}");
            return 1;
        }
    };
    let options = Options {
        kubeconfig: args.kubeconfig,
        no_publish: args.no_publish,
    };
    let code = runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signals = tokio::spawn(async move {
            match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the plugin");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            let _ = stop_tx.send(true);
        });
        let result = app::run(settings, options, stop_rx).await;
        signals.abort();
        match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "device plugin failed");
                eprintln!("vramslice-device-plugin: {e}");
                e.exit_code()
            }
        }
    });
    // A GPU read hung in the driver sits on a blocking thread that nothing can cancel: do not
    // wait for it (dropping the runtime would, for ever).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
