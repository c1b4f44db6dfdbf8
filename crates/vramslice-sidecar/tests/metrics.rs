//! Metrics content and the optional `/metrics` port.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;

use vramslice_sidecar::{Config, Job, ManualUsage, Runtime};

const GIB: u64 = 1 << 30;

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    get_accepting(addr, path, "")
}

/// GET `path` with `headers` (each ending in CRLF) besides `Host`.
fn get_accepting(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A 1 GiB runtime's metrics served on a loopback port.
fn served() -> std::net::SocketAddr {
    let rt = Runtime::new(
        Config {
            limit: Some(GIB),
            ..Config::default()
        },
        ManualUsage::default(),
    )
    .unwrap();
    vramslice_sidecar::serve::serve_metrics(move || rt.render_metrics(), "127.0.0.1:0").unwrap()
}

#[test]
fn metrics_report_usage_jobs_and_profiles() {
    let usage = ManualUsage::new(GIB, 0);
    let rt = Runtime::new(
        Config {
            limit: Some(8 * GIB),
            ..Config::default()
        },
        usage.clone(),
    )
    .unwrap();
    let p = rt.admit_blocking(&Job::new("m").need(2 * GIB)).unwrap();
    let text = rt.render_metrics();
    for needle in [
        "vramslice_sidecar_limit_bytes 8589934592",
        "vramslice_sidecar_used_bytes 3221225472", // 1 GiB live + 2 GiB reserved
        "vramslice_sidecar_available_bytes 4080218932", // 6.8 GiB - 3 GiB, rounded up
        "vramslice_sidecar_jobs_running 1",
        "vramslice_sidecar_jobs_queued 0",
        "vramslice_sidecar_admission_wait_seconds_count 1",
        "vramslice_sidecar_profile_misses_total 1",
        "# TYPE vramslice_sidecar_job_duration_seconds histogram",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    drop(p);
    assert!(
        rt.render_metrics()
            .contains("vramslice_sidecar_job_duration_seconds_count 1")
    );
}

#[test]
fn metrics_port_serves_prometheus_text_or_openmetrics_as_asked() {
    let addr = served();
    let plain = get(addr, "/metrics");
    assert!(plain.starts_with("HTTP/1.1 200 OK"), "{plain}");
    assert!(
        plain.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{plain}"
    );
    assert!(
        plain.contains("vramslice_sidecar_limit_bytes 1073741824"),
        "{plain}"
    );
    // Counters are named by their sample in the classic format; no OpenMetrics trailer.
    assert!(
        plain.contains("# TYPE vramslice_sidecar_profile_misses_total counter\n"),
        "{plain}"
    );
    assert!(!plain.contains("# EOF"), "{plain}");

    let open = get_accepting(
        addr,
        "/metrics?x=1",
        "accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    );
    assert!(
        open.contains(
            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{open}"
    );
    assert!(
        open.contains("# TYPE vramslice_sidecar_profile_misses counter\n"),
        "{open}"
    );
    assert!(open.trim_end().ends_with("# EOF"));
    assert!(get(addr, "/").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_client_that_never_ends_its_request_does_not_hold_the_port() {
    let addr = served();
    // A request line without end, sent as fast as the server reads it.
    let mut endless = TcpStream::connect(addr).unwrap();
    let flood = std::thread::spawn(move || {
        let chunk = [b'a'; 4096];
        let mut sent = 0usize;
        while sent < 64 << 20 && endless.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let started = std::time::Instant::now();
    let ok = get(addr, "/metrics");
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let sent = flood.join().unwrap();
    assert!(
        sent < 64 << 20,
        "the server read the whole flood ({sent} bytes)"
    );
}

#[test]
fn a_client_that_sends_a_byte_now_and_then_does_not_hold_the_port() {
    let addr = served();
    // One byte every 2 s: each read finishes well within a per-read timeout of 5 s.
    let mut slow = TcpStream::connect(addr).unwrap();
    let trickle = std::thread::spawn(move || {
        for b in b"GET /metrics HTTP/1.1\r\n".iter().take(6) {
            if slow.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    let started = std::time::Instant::now();
    let ok = get(addr, "/metrics");
    assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "waited {:?} behind the slow client",
        started.elapsed()
    );
    trickle.join().unwrap();
}

#[test]
fn a_runtimes_configured_endpoint_ends_with_the_runtime_and_frees_its_port() {
    let rt = Runtime::new(
        Config {
            limit: Some(GIB),
            metrics_addr: Some("127.0.0.1:0".into()),
            ..Config::default()
        },
        ManualUsage::default(),
    )
    .unwrap();
    let addr = rt.serve_configured_metrics().unwrap().unwrap();
    assert!(get(addr, "/metrics").contains("vramslice_sidecar_limit_bytes 1073741824"));
    // A clone keeps it served; the last one ends it.
    let clone = rt.clone();
    drop(rt);
    assert!(get(addr, "/metrics").contains("vramslice_sidecar_limit_bytes"));
    drop(clone);
    // The port is free again at once (a C embedder's free, then a new runtime on it).
    std::net::TcpListener::bind(addr).expect("the port was released");
}
