//! `vramslice-extender --config <file.yaml> [--kubeconfig <path>] [--log-format json|text]`:
//! reads the config (exit 64 when invalid), starts the pod and GpuNode watches, serves the
//! extender until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use vramslice_extender::cluster::KubeCluster;
use vramslice_extender::{Config, Extender, http, serve, watch};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// Scheduler extender: places pods by live free VRAM per GPU.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (YAML).
    #[arg(long)]
    config: PathBuf,
    /// Kubeconfig to use instead of the in-cluster / default configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    // No client-side retries: a Binding's answer must be its own attempt's. A retry of a
    // Binding that took answers 409, and one that ends in 429 hides an earlier 5xx whose write
    // may still land; bind reads the pod back instead (extender::bind). Watches restart by
    // themselves.
    let mut config = config;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vramslice-extender: {e}");
            std::process::exit(64);
        }
    };
    if let Some(webhook) = &config.webhook {
        let pod_namespace = std::env::var("POD_NAMESPACE").ok();
        if let Err(e) = webhook.validate(pod_namespace.as_deref()) {
            eprintln!("vramslice-extender: config key webhook is invalid: {e}");
            std::process::exit(64);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config, args.kubeconfig))
}

async fn run(config: Config, kubeconfig: Option<PathBuf>) -> anyhow::Result<()> {
    let client = client(kubeconfig.as_ref())
        .await
        .context("connecting to the API server")?;
    let (addr, metrics_addr, tls, webhook) = (
        config.listen_addr,
        config.metrics_addr,
        config.tls.clone(),
        config.webhook.clone(),
    );
    let ext = Extender::new(
        config,
        Arc::new(KubeCluster::new(client.clone())),
        Arc::new(SystemTime::now),
    );
    // The chart gives the pod's name (downward API): /drain then hands over only a pod that is
    // terminating.
    let ext = Arc::new(
        match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
            (Ok(namespace), Ok(name)) if !namespace.is_empty() && !name.is_empty() => {
                ext.with_own_pod(namespace, name)
            }
            _ => ext,
        },
    );
    tokio::spawn(watch::drive_pods(
        ext.clone(),
        watch::pod_events(client.clone()),
    ));
    tokio::spawn(watch::drive_gpunodes(
        ext.clone(),
        watch::gpunode_events(client.clone()),
    ));
    tokio::spawn(watch::expire_reservations(
        ext.clone(),
        Duration::from_secs(30),
        watch::RESERVATION_TTL,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let webhook_task = webhook.map(|cfg| {
        let metrics = ext.metrics().webhook();
        let client = client.clone();
        tokio::spawn(vramslice_webhook::serve(
            cfg,
            client,
            metrics,
            stopped(stop_rx.clone()),
        ))
    });
    let on_signal = stop_tx.clone();
    let draining = ext.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        // Binds in flight and unsettled reservations settle first: a Binding that lands after
        // this process is gone would be booked by nobody until the next leader's watch shows it.
        if let Err(why) = draining
            .drain(vramslice_extender::extender::handover::DRAIN_LIMIT)
            .await
        {
            tracing::warn!(%why, "stopping before the handover settled");
        }
        let _ = on_signal.send(true);
    });
    let serving = async {
        match metrics_addr {
            None => serve::serve(
                http::router(ext),
                addr,
                tls.as_ref(),
                stopped(stop_rx.clone()),
            )
            .await
            .map(|_| ()),
            Some(metrics_addr) => tokio::try_join!(
                serve::serve(
                    http::verb_router(ext.clone()),
                    addr,
                    tls.as_ref(),
                    stopped(stop_rx.clone())
                ),
                serve::serve(
                    http::probe_router(ext),
                    metrics_addr,
                    None,
                    stopped(stop_rx.clone())
                ),
            )
            .map(|_| ()),
        }
    };
    let Some(mut webhook_task) = webhook_task else {
        serving.await?;
        return Ok(());
    };
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => {
            served?;
            webhook_task.await.context("webhook task panicked")??;
        }
        webhook_ended = &mut webhook_task => {
            if !*stop_rx.borrow() {
                // With failurePolicy Fail no new VRAM pod is admitted without the webhook: exit,
                // so that the pod restarts (and shows it) instead of placing on, looking ready.
                let _ = stop_tx.send(true);
                let why = match webhook_ended {
                    Ok(Ok(())) => anyhow::anyhow!("it returned"),
                    Ok(Err(e)) => anyhow::Error::new(e),
                    Err(e) => anyhow::Error::new(e),
                };
                let _ = serving.await;
                return Err(why.context("the admission webhook stopped; exiting"));
            }
            webhook_ended.context("webhook task panicked")??;
            serving.await?;
        }
    }
    Ok(())
}
