//! Load test of the example server (loopback only, bounded in requests and time): N requests of
//! mixed batch sizes from C concurrent keep-alive clients against a server whose device memory
//! fits only a few requests at once. Runs the server in-process on 127.0.0.1:0, once with the
//! vramslice runtime and (with `--mode both`) once without it, and prints throughput, latency
//! percentiles, out-of-memory errors surfaced to clients and retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rust_inference_server::app::{DeviceChoice, Settings, build, spawn_noise};
use rust_inference_server::model::ModelSpec;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use vramslice_sidecar::Config;
use vramslice_sidecar::policy::human;

#[derive(Debug, Parser)]
struct Args {
    /// Requests per run.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Device memory limit (simulated on the CPU).
    #[arg(long, default_value = "1Gi")]
    limit: String,
    /// Device memory per batch item.
    #[arg(long, default_value = "16Mi")]
    workspace_per_item: String,
    /// Batch sizes to mix (uniformly).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batches: Vec<u32>,
    /// A neighbour outside admission grabbing this many MiB now and then (0 = none).
    #[arg(long, default_value_t = 0)]
    noise_mib: u64,
    /// sidecar, naive or both.
    #[arg(long, default_value = "both", value_parser = ["sidecar", "naive", "both"])]
    mode: String,
    /// Device: auto, cpu, cuda.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    /// High-water mark of the runtime (fraction of the limit admitted at once).
    #[arg(long, default_value_t = 0.85)]
    high_water: f64,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
}

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    oom: AtomicU64,
    timeout: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    attempts: AtomicU64,
}

/// One keep-alive HTTP/1.1 connection.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut buf = vec![0u8; len];
        self.reader.read_exact(&mut buf).await?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}

fn batch_for(i: usize, batches: &[u32]) -> u32 {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    batches[((z ^ (z >> 31)) % batches.len() as u64) as usize]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn run(args: &Args, admission: bool) -> anyhow::Result<()> {
    let limit = vramslice_core::parse_bytes(&args.limit)?;
    let runtime = Config {
        limit: Some(limit),
        queue_max: 4096,
        queue_timeout: Duration::from_secs(60),
        policy: vramslice_sidecar::policy::Policy {
            high_water: args.high_water,
            ..Default::default()
        },
        ..Config::default()
    };
    let settings = Settings {
        device: args.device,
        model: ModelSpec::default(),
        cpu_limit: limit,
        workspace_per_item: vramslice_core::parse_bytes(&args.workspace_per_item)?,
        max_batch: 64,
        admission,
        runtime,
    };
    let (router, state) = tokio::task::spawn_blocking(move || build(settings)).await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    if let Some(vram) = state.vram.clone() {
        if args.noise_mib > 0 {
            spawn_noise(
                vram.clone(),
                args.noise_mib << 20,
                Duration::from_millis(50),
                Duration::from_millis(20),
                stop_rx,
            );
        }
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(vram.used(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(args.requests)));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (next, tally, latencies, batches, n) = (
            Arc::clone(&next),
            Arc::clone(&tally),
            Arc::clone(&latencies),
            args.batches.clone(),
            args.requests,
        );
        clients.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return anyhow::Ok(());
                }
                let body = format!("{{\"batch\":{},\"seed\":{i}}}", batch_for(i, &batches));
                let t = Instant::now();
                let (status, text) = client.request("POST", "/v1/infer", &body).await?;
                latencies
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(t.elapsed());
                let counter = match status {
                    200 => {
                        let v: serde_json::Value = serde_json::from_str(&text)?;
                        tally
                            .attempts
                            .fetch_add(v["attempts"].as_u64().unwrap_or(1), Ordering::SeqCst);
                        &tally.ok
                    }
                    507 => &tally.oom,
                    503 if text.contains("queue-timeout") => &tally.timeout,
                    503 => &tally.refused,
                    _ => &tally.other,
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let deadline = Duration::from_secs(args.max_seconds);
    for c in clients {
        match tokio::time::timeout(deadline.saturating_sub(started.elapsed()), c).await {
            Ok(joined) => joined??,
            Err(_) => bail!("run exceeded {} s", args.max_seconds),
        }
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let metrics = Client::connect(addr)
        .await?
        .request("GET", "/metrics", "")
        .await?
        .1;
    server.abort();

    let mut lat = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let ok = tally.ok.load(Ordering::SeqCst);
    println!(
        "mode={} device={} limit={} high_water={} requests={} clients={} batches={:?} noise={} MiB",
        if admission { "sidecar" } else { "naive" },
        if state.vram.is_some() {
            "cpu (simulated device memory)"
        } else {
            "cuda"
        },
        human(limit),
        args.high_water,
        args.requests,
        args.clients,
        args.batches,
        args.noise_mib
    );
    println!(
        "  ok={ok} out_of_memory_to_clients={} queue_timeouts={} refused={} other_errors={}",
        tally.oom.load(Ordering::SeqCst),
        tally.timeout.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.other.load(Ordering::SeqCst)
    );
    println!(
        "  throughput={:.1} req/s elapsed={:.2}s latency p50={:.1}ms p99={:.1}ms max={:.1}ms",
        args.requests as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    println!(
        "  retries={} (client-seen extra attempts {}), oom_errors_inside_server={}, profile hits={} misses={}, peak device usage={}",
        metric(&metrics, "vramslice_sidecar_retries_total"),
        tally.attempts.load(Ordering::SeqCst).saturating_sub(ok),
        metric(&metrics, "vramslice_sidecar_oom_errors_total"),
        metric(&metrics, "vramslice_sidecar_profile_hits_total"),
        metric(&metrics, "vramslice_sidecar_profile_misses_total"),
        human(peak.load(Ordering::SeqCst))
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batches.is_empty() || args.batches.contains(&0) {
        bail!("--batches needs sizes of at least 1");
    }
    if args.mode != "naive" {
        run(&args, true).await?;
    }
    if args.mode != "sidecar" {
        run(&args, false).await?;
    }
    Ok(())
}
