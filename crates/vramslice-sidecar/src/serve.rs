//! An optional `/metrics` endpoint for embedders that do not serve metrics themselves: a
//! minimal HTTP/1.1 responder on a background thread (one connection at a time; Prometheus
//! scrapes are rare and small).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vramslice_core::exposition::Exposition;

/// Serve `GET /metrics` on `addr` (`127.0.0.1:9400`, `0.0.0.0:0`) until the process exits,
/// answering with what `render` returns (OpenMetrics text, normally
/// [`Runtime::render_metrics`]) in the format the scraper's `Accept` asks for: OpenMetrics when
/// it prefers it, the Prometheus text format otherwise. Returns the bound address. Other paths
/// answer 404.
///
/// [`Runtime::render_metrics`]: crate::Runtime::render_metrics
pub fn serve_metrics(
    render: impl Fn() -> String + Send + 'static,
    addr: &str,
) -> io::Result<SocketAddr> {
    let server = MetricsServer::start(render, addr)?;
    let bound = server.addr();
    // Served for the life of the process: the handle that would stop it is let go.
    std::mem::forget(server);
    Ok(bound)
}

/// A `/metrics` endpoint that stops when dropped: its thread ends and its port is free again.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The process that started it: a forked child has a copy of the handle, not the thread.
    owner: u32,
}

/// How often the serving thread looks at its stop flag while no client comes.
const STOP_POLL: Duration = Duration::from_millis(100);

impl MetricsServer {
    /// Serve `GET /metrics` on `addr` as [`serve_metrics`] does, until the handle is dropped.
    pub fn start(render: impl Fn() -> String + Send + 'static, addr: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        // Polled, so the thread sees its stop flag without a client to wake it.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("vramslice-metrics".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let served = stream
                                .set_nonblocking(false)
                                .and_then(|()| answer(&render, stream));
                            if let Err(e) = served {
                                tracing::debug!(error = %e, "metrics connection failed");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(STOP_POLL);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "metrics accept failed");
                            std::thread::sleep(STOP_POLL);
                        }
                    }
                }
            })?;
        Ok(MetricsServer {
            addr: bound,
            stop,
            thread: Some(thread),
            owner: std::process::id(),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wait for the port to be free: at most one poll and one request's time. Not in a
        // forked child (the thread is the parent's), nor on the serving thread itself (the
        // runtime's last handle dropped while rendering).
        if std::process::id() != self.owner {
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// The most a request's head may take: its bytes and its time. One connection is served at a
/// time, so a client that sends slowly or without end must not hold the endpoint longer.
const MAX_REQUEST_HEAD: u64 = 16 * 1024;
const MAX_REQUEST_TIME: Duration = Duration::from_secs(5);

/// A connection read against one deadline for the whole request head: each read may wait only
/// for what is left of it, so a client sending a byte now and then cannot stretch it.
struct Deadline {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not finished in 5 s",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn answer(render: &impl Fn() -> String, stream: TcpStream) -> io::Result<()> {
    stream.set_write_timeout(Some(MAX_REQUEST_TIME))?;
    let head = Deadline {
        stream: stream.try_clone()?,
        deadline: Instant::now() + MAX_REQUEST_TIME,
    };
    let mut reader = BufReader::new(head.take(MAX_REQUEST_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Read the headers, within the head's size and time; only `Accept` matters.
    let mut accept = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("accept")
        {
            accept.push(value.trim().to_string());
        }
        line.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let (status, content_type, body) = if request_line.starts_with("GET ") && path == "/metrics" {
        let format = Exposition::negotiate(accept.iter().map(String::as_str));
        ("200 OK", format.content_type(), format.render(render()))
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics is served\n".to_string(),
        )
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}
