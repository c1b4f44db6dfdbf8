//! Serving over a real loopback socket, graceful shutdown, and TLS file errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vramslice_extender::config::TlsConfig;
use vramslice_extender::fake::FakeCluster;
use vramslice_extender::{http, serve};

async fn request(addr: std::net::SocketAddr, raw: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_http_on_loopback_and_stops_on_shutdown() {
    let ext = extender_with(config(0), Arc::new(FakeCluster::new()));
    ext.ledger_mut()
        .set_reading("n1", reading(1, vec![gpu(0, 16, 16)]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve_on(listener, http::router(ext), None, async {
        let _ = stopped.await;
    }));
    let health = request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = args_names(
        pod_json("llm", "uid-1", Some("6"), serde_json::json!({})),
        &["n1"],
    )
    .to_string();
    let raw = format!(
        "POST /filter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = request(addr, &raw).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""NodeNames":["n1"]"#), "{answer}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops after shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_verbs_and_the_probes_can_be_served_apart() {
    let ext = extender_with(config(0), Arc::new(FakeCluster::new()));
    let verbs = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probes = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (verbs_addr, probes_addr) = (verbs.local_addr().unwrap(), probes.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let servers = [
        tokio::spawn(serve::serve_on(
            verbs,
            http::verb_router(ext.clone()),
            None,
            until_stopped(stopped.clone()),
        )),
        tokio::spawn(serve::serve_on(
            probes,
            http::probe_router(ext),
            None,
            until_stopped(stopped),
        )),
    ];
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let bind = "POST /bind HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    for path in ["/healthz", "/readyz", "/metrics"] {
        let on_verbs = request(verbs_addr, &get(path)).await;
        assert!(on_verbs.starts_with("HTTP/1.1 404"), "{path}: {on_verbs}");
        let on_probes = request(probes_addr, &get(path)).await;
        assert!(
            !on_probes.starts_with("HTTP/1.1 404"),
            "{path}: {on_probes}"
        );
    }
    let on_probes = request(probes_addr, bind).await;
    assert!(on_probes.starts_with("HTTP/1.1 404"), "{on_probes}");
    let on_verbs = request(verbs_addr, bind).await;
    assert!(
        on_verbs.starts_with("HTTP/1.1 400") && on_verbs.contains("PodName"),
        "the verb is served, and names the missing field: {on_verbs}"
    );
    stop.send(true).unwrap();
    for server in servers {
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .unwrap();
    }
}

#[test]
fn tls_file_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TlsConfig {
        cert_file: dir.path().join("nope.pem"),
        key_file: dir.path().join("nope.key"),
    };
    let err = serve::tls_config(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with("TLS certificate ") && err.contains("nope.pem"),
        "{err}"
    );
    let junk = dir.path().join("junk.pem");
    std::fs::File::create(&junk)
        .unwrap()
        .write_all(b"not a certificate\n")
        .unwrap();
    let err = serve::tls_config(&TlsConfig {
        cert_file: junk.clone(),
        key_file: junk,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tls = TlsConfig {
        cert_file: fixtures.join("tls.crt"),
        key_file: fixtures.join("tls.key"),
    };
    let server_config = serve::tls_config(&tls).unwrap();
    let ext = extender_with(config(0), Arc::new(FakeCluster::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve_on(
        listener,
        http::router(ext),
        Some(server_config),
        async {
            let _ = stopped.await;
        },
    ));

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&tls.cert_file).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // The server may close without a TLS close_notify; what was read before counts.
    let _ = stream.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("ready"),
        "{out}"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops after shutdown")
        .unwrap()
        .unwrap();
}
