//! The connection loop's limits, against raw TCP clients that misbehave.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vramslice_webhook::listen::{ConnectionLimits, serve};
use vramslice_webhook::tls;

const SHORT: Duration = Duration::from_millis(300);

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        handshake: SHORT,
        header_read: SHORT,
        request: SHORT,
        max_connections: 8,
        per_peer: 8,
        drain: Duration::from_secs(5),
        accept_error_pause: Duration::from_millis(10),
    }
}

/// For tests where only what they do may close a connection (no head deadline in the way).
fn limits_with_long_heads() -> ConnectionLimits {
    ConnectionLimits {
        header_read: Duration::from_secs(30),
        drain: Duration::from_secs(30),
        ..limits()
    }
}

struct Server {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(tls: Option<tokio_rustls::TlsAcceptor>, limits: ConnectionLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/echo", post(|body: String| async move { body }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, router, tls, limits, async move {
        let _ = stopped.await;
    }));
    Server { addr, stop, task }
}

/// Reads until the server closes the connection (or fails the test after `within`); returns
/// what it sent.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .ok();
    got
}

async fn get_root(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8_lossy(&closed_within(stream, Duration::from_secs(5)).await).into_owned()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_tls_handshake_is_closed() {
    let slot = tls::CertSlot::new();
    let server = start(Some(tls::acceptor(slot).unwrap()), limits()).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Without the limit the server waits for the ClientHello forever.
    let sent = closed_within(&mut silent, SHORT * 10).await;
    assert!(sent.is_empty(), "{sent:?}");
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_or_an_idle_connection_is_closed() {
    let server = start(None, limits()).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_within(&mut slow, SHORT * 10).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    closed_within(&mut idle, SHORT * 10).await;
    // Whole requests are still served.
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    let answer = get_root(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_ends() {
    let server = start(
        None,
        ConnectionLimits {
            max_connections: 1,
            per_peer: 4,
            ..limits_with_long_heads()
        },
    )
    .await;
    let holder = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut waiting = TcpStream::connect(server.addr).await.unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1];
    let early = tokio::time::timeout(SHORT, waiting.read(&mut first)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    drop(holder);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut rest))
        .await
        .expect("served once the first connection ended")
        .unwrap();
    assert!(
        rest.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_idle_connections_without_the_drain_period() {
    let server = start(None, limits_with_long_heads()).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("an idle connection does not hold shutdown for the drain period")
        .unwrap();
    closed_within(&mut idle, Duration::from_secs(2)).await;
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn one_address_past_its_own_cap_is_closed_at_once_and_others_are_not_held_up() {
    let server = start(
        None,
        ConnectionLimits {
            per_peer: 2,
            ..limits_with_long_heads()
        },
    )
    .await;
    let _first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .ok();
    // Closed without an answer, long before any timeout (header_read is 30 s).
    let sent = closed_within(&mut third, Duration::from_secs(2)).await;
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
    // Once one of the two ends, the address may connect again.
    drop(_first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(server.addr).await.unwrap();
    let answer = get_root(&mut again).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_answered_503_and_frees_its_connection() {
    let server = start(None, limits_with_long_heads()).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nab")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&closed_within(&mut slow, SHORT * 10).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("request not finished within"), "{answer}");
    // A whole body in time is served.
    let mut quick = TcpStream::connect(server.addr).await.unwrap();
    quick
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
        )
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&closed_within(&mut quick, Duration::from_secs(5)).await)
        .into_owned();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
        "{answer}"
    );
}
