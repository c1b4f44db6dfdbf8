//! The connection loop shared by the webhook and the extender's listeners: HTTP/1.1, over TLS
//! when given an acceptor, with limits a listener reachable from every pod needs.
//!
//! Without them one pod opening connections and sending nothing (or a header a byte a minute)
//! held a task and a file descriptor each, forever, until the process ran out of either; and
//! the process also places and admits every VRAM pod. Here a connection has
//! [`ConnectionLimits::handshake`] to finish its TLS handshake and
//! [`ConnectionLimits::header_read`] for each request head (which also closes a keep-alive
//! connection left idle that long; clients reconnect), and at most
//! [`ConnectionLimits::max_connections`] are served at once: the next waits in the kernel's
//! backlog until one ends. On shutdown no connection is accepted, requests in flight finish,
//! and connections still open after [`ConnectionLimits::drain`] are dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a whole request head, counted from when the server waits for one (so also
    /// the longest a keep-alive connection may sit idle).
    pub header_read: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long, after shutdown, connections get to finish their requests.
    pub drain: Duration,
    /// Pause after a failed accept (out of file descriptors): the loop would spin otherwise.
    pub accept_error_pause: Duration,
}

impl Default for ConnectionLimits {
    /// 10 s handshakes; 60 s for a request head or an idle keep-alive (client-go's transport
    /// keeps idle connections 90 s and reconnects when the server closed one first); 512
    /// connections (the API server and kube-scheduler open a handful each).
    fn default() -> Self {
        ConnectionLimits {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(60),
            max_connections: 512,
            drain: Duration::from_secs(10),
            accept_error_pause: Duration::from_millis(100),
        }
    }
}

/// Serve `router` on `listener` until `shutdown` completes, over TLS when `tls` is given.
/// Connection errors (failed or slow handshakes, resets, slow heads) are logged at debug and
/// never end the loop; failed accepts are logged and retried after a pause.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(limits.accept_error_pause) => continue,
                    }
                }
            },
        };
        let watcher = graceful.watcher();
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(tcp, peer, router, limits, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, limits, watcher).await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, %err, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not finished in time; closed");
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(
            drain_s = limits.drain.as_secs_f64(),
            "connections still open after the drain period are dropped"
        );
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    if let Err(err) = watcher.watch(conn).await {
        tracing::debug!(%peer, %err, "connection ended with an error");
    }
}
