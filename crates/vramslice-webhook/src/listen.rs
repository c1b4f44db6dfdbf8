//! The connection loop shared by the webhook and the extender's listeners: HTTP/1.1, over TLS
//! when given an acceptor, with limits a listener reachable from every pod needs.
//!
//! Without them one pod opening connections and sending nothing (or a header a byte a minute,
//! or a body) held a task and a file descriptor each, for ever, until the process ran out of
//! either; and the process also places and admits every VRAM pod. Here a connection has
//! [`ConnectionLimits::handshake`] to finish its TLS handshake, each request head
//! [`ConnectionLimits::header_read`] (which also closes a keep-alive connection left idle that
//! long), and each request [`ConnectionLimits::request`] from head to answer (a body sent
//! slowly included). One address holds at most [`ConnectionLimits::per_peer`] connections (more
//! are closed at once), so one pod cannot take the [`ConnectionLimits::max_connections`] all
//! clients share; past that the next waits in the kernel's backlog until one ends. On
//! shutdown no connection is accepted, requests in flight finish, and connections still open
//! after [`ConnectionLimits::drain`] are dropped.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a whole request head, counted from when the server waits for one (so also
    /// the longest a keep-alive connection may sit idle).
    pub header_read: Duration,
    /// Time from a request's head to its answer, reading its body included; past it the
    /// client gets 503.
    pub request: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections one address may hold at once; more are closed as they come.
    pub per_peer: usize,
    /// How long, after shutdown, connections get to finish their requests.
    pub drain: Duration,
    /// Pause after a failed accept (out of file descriptors): the loop would spin otherwise.
    pub accept_error_pause: Duration,
}

impl Default for ConnectionLimits {
    /// 10 s handshakes; 120 s for a request head or an idle keep-alive (longer than the 90 s
    /// client-go's transports keep an idle connection, so the client closes first and never
    /// sends on a connection the server is closing); 30 s a request (the API server waits for
    /// a webhook 30 s at most, kube-scheduler for an extender less); 1024 connections, half of
    /// them from one address at most (an API server sends a burst of pod creations over as many
    /// HTTP/1.1 connections as it has calls in flight, and all API servers may come through one
    /// proxy's address; one pod flooding the port still leaves the other half to everyone else,
    /// the kubelet's probes included).
    fn default() -> Self {
        ConnectionLimits {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(120),
            request: Duration::from_secs(30),
            max_connections: 1024,
            per_peer: 512,
            drain: Duration::from_secs(10),
            accept_error_pause: Duration::from_millis(100),
        }
    }
}

/// Connections held per address.
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its address until dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl PeerCounts {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.entry(ip).or_default();
        if *held >= cap {
            return None;
        }
        *held += 1;
        Some(PeerSlot {
            counts: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.ip) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.remove(&self.ip);
            }
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
    let peers = Arc::new(PeerCounts::default());
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
        let Some(slot) = peers.take(peer.ip(), limits.per_peer.max(1)) else {
            tracing::debug!(%peer, per_peer = limits.per_peer, "too many connections from this address; closed");
            continue;
        };
        let watcher = graceful.watcher();
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            match tls {
                None => serve_connection(tcp, peer, router, limits, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, limits, watcher).await;
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
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        async move {
            match tokio::time::timeout(limits.request, router.oneshot(request)).await {
                Ok(answered) => answered,
                Err(_) => Ok(too_slow(limits.request)),
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(err) = watcher.watch(conn).await {
        tracing::debug!(%peer, %err, "connection ended with an error");
    }
}

/// The answer to a request not finished in time (its body still coming, or its handler slow).
fn too_slow(limit: Duration) -> Response<Body> {
    let mut answer = Response::new(Body::from(format!(
        "request not finished within {}s",
        limit.as_secs()
    )));
    *answer.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    answer
        .headers_mut()
        .insert("connection", axum::http::HeaderValue::from_static("close"));
    answer
}
