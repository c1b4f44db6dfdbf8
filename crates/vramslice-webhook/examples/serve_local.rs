//! Serve the webhook on this machine against a real API server, for manual end-to-end checks
//! (the e2e cluster's kube-apiserver, with a MutatingWebhookConfiguration whose
//! `clientConfig.url` is `https://localhost:<port>/mutate-pods`):
//!
//! ```sh
//! cargo run -p vramslice-webhook --example serve_local -- <kubeconfig> <port> <namespace> <secret> <webhook-config>
//! ```
//!
//! Certificates are self-signed for the DNS name `localhost` and kept in `<secret>`; the CA
//! bundle is written into `<webhook-config>`. Stops on Ctrl-C.
#![allow(clippy::unwrap_used)]

use std::process::ExitCode;

use vramslice_webhook::{WebhookConfig, WebhookMetrics};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kubeconfig, port, namespace, secret, webhook_config] = args.as_slice() else {
        eprintln!("usage: serve_local <kubeconfig> <port> <namespace> <secret> <webhook-config>");
        return ExitCode::from(2);
    };
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let yaml = format!(
        "listenAddr: 127.0.0.1:{port}\ncheckInterval: 2s\nselfSigned:\n  namespace: {namespace}\n  secretName: {secret}\n  \
         webhookConfigName: {webhook_config}\n  serviceName: localhost\n"
    );
    let cfg: WebhookConfig = serde_saphyr::from_str(&yaml).unwrap();
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    eprintln!("serving the webhook on https://localhost:{port}/mutate-pods");
    match vramslice_webhook::serve(cfg, client, WebhookMetrics::default(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve_local: {e}");
            ExitCode::FAILURE
        }
    }
}
