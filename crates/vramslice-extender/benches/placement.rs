//! Placement benchmark: 5,000 nodes × 8 GPUs (80 GiB each) and 40,000 placed pods; prints
//! p50/p99 latency of filter and prioritize through the in-process router (JSON in and out,
//! as kube-scheduler sends it) — also for a pod of a new size each call and while binds run
//! concurrently — the ledger rebuild time, and bind throughput against an in-memory API. Run: `cargo bench -p vramslice-extender --bench placement`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::Request;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tower::ServiceExt;
use vramslice_core::VramUnit;
use vramslice_core::cluster::ledger::{ListedPod, NodeReading, PodRecord, PublishedGpu};
use vramslice_core::cluster::placement::PodRequest;
use vramslice_extender::fake::FakeCluster;
use vramslice_extender::{Config, Extender, http};

const GPUS: u32 = 8;
const FULL_NODES: usize = 5_000;
const GIB: u64 = 1 << 30;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

/// xorshift64*: a fixed-seed generator, so every run places the same pods.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

static NODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(FULL_NODES);

fn nodes() -> usize {
    NODES.load(std::sync::atomic::Ordering::Relaxed)
}

fn node_name(i: usize) -> String {
    format!("gpu-node-{i:05}")
}

fn pod_json(name: &str, gib: u64) -> Value {
    json!({
        "metadata": { "name": name, "namespace": "inference", "uid": format!("uid-{name}"),
            "resourceVersion": "1", "creationTimestamp": "2026-11-22T09:00:00Z",
            "labels": { "app": "llm" }, "annotations": { "team": "ml" } },
        "spec": {
            "containers": [{ "name": "server", "image": "example/llm:1",
                "resources": { "limits": { "cpu": "4", "memory": "32Gi", "vramslice.io/vram-gib": gib.to_string() },
                               "requests": { "cpu": "4", "memory": "32Gi", "vramslice.io/vram-gib": gib.to_string() } },
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent" }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "securityContext": {}, "schedulerName": "vramslice-scheduler",
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": { "phase": "Pending", "qosClass": "Guaranteed" }
    })
}

fn node_json(name: &str) -> Value {
    json!({ "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "kubernetes.io/hostname": name } },
            "status": { "allocatable": { "cpu": "64", "vramslice.io/vram-gib": "640" } } })
}

/// Readings and pods: each GPU holds one pod of a random size; 10% of nodes are nearly full
/// (so failure reasons are built), 1% have stale readings.
fn populate(ext: &Extender) -> Duration {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut readings = Vec::with_capacity(nodes());
    let mut records = Vec::with_capacity(nodes() * GPUS as usize);
    for n in 0..nodes() {
        let name = node_name(n);
        let full = n % 10 == 3;
        let age = if n % 100 == 7 { 200 } else { 10 };
        let mut gpus = Vec::new();
        for g in 0..GPUS {
            let p = n * GPUS as usize + g as usize;
            let gib = if full { 77 } else { 1 + rng.below(40) };
            let used = gib * GIB / 100 * (50 + rng.below(50));
            let uid = format!("uid-placed-{p}");
            let uuid = format!("GPU-{n}-{g}");
            records.push(PodRecord {
                uid: uid.clone(),
                namespace: "inference".into(),
                name: format!("placed-{p}"),
                node: name.clone(),
                gpu_uuid: Some(uuid.clone()),
                assigned_at: Some(now() - Duration::from_secs(3600)),
                request: PodRequest::new(VramUnit::Gib1, gib),
            });
            gpus.push(PublishedGpu {
                index: g,
                uuid,
                free_bytes: 80 * GIB - used - GIB / 2,
                units: 80,
                healthy: !(n % 500 == 11 && g == 0),
                health_reason: Some("XID 79".into()).filter(|_| n % 500 == 11 && g == 0),
                pods: vec![ListedPod {
                    uid: Some(uid),
                    namespace: "inference".into(),
                    name: format!("placed-{p}"),
                    limit_bytes: gib * GIB,
                    used_bytes: Some(used),
                }],
            });
        }
        readings.push((
            name,
            Ok(NodeReading {
                observed_at: now() - Duration::from_secs(age),
                unit: VramUnit::Gib1,
                gpus,
            }),
        ));
    }
    let started = Instant::now();
    {
        let mut ledger = ext.ledger_mut();
        ledger.replace_readings(readings);
        ledger.replace_pods(records);
    }
    started.elapsed()
}

async fn call(router: &axum::Router, path: &str, body: &Bytes) -> usize {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.clone()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert!(resp.status().is_success());
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn measure(router: &axum::Router, label: &str, path: &str, body: Value, iters: usize) {
    measure_many(router, label, path, vec![body], iters).await;
}

/// Like [`measure`], cycling through `bodies` (different pods defeat the reason cache).
async fn measure_many(
    router: &axum::Router,
    label: &str,
    path: &str,
    bodies: Vec<Value>,
    iters: usize,
) {
    let bodies: Vec<Bytes> = bodies.iter().map(|b| Bytes::from(b.to_string())).collect();
    for i in 0..iters / 10 {
        call(router, path, &bodies[i % bodies.len()]).await;
    }
    let body = &bodies[0];
    let mut times = Vec::with_capacity(iters);
    let mut out = 0;
    for i in 0..iters {
        let t = Instant::now();
        out = call(router, path, &bodies[i % bodies.len()]).await;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "{label:<52} p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  (req {} KiB, resp {} KiB, n={iters})",
        pct(&times, 0.50).as_secs_f64() * 1e3,
        pct(&times, 0.99).as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        body.len() / 1024,
        out / 1024,
    );
}

async fn bind_throughput(
    ext: &Arc<Extender>,
    fake: &Arc<FakeCluster>,
    binds: usize,
    parallel: usize,
) {
    let router = http::router(ext.clone());
    let mut rng = Rng(42 + parallel as u64);
    let mut bodies = Vec::with_capacity(binds);
    for i in 0..binds {
        let name = format!("bind-{parallel}-{i}");
        let pod: Pod = serde_json::from_value(pod_json(&name, 1)).unwrap();
        fake.put_pod(pod);
        let node = node_name(rng.below(nodes() as u64) as usize);
        let args = json!({ "PodName": name, "PodNamespace": "inference", "PodUID": format!("uid-{name}"), "Node": node });
        bodies.push(Bytes::from(args.to_string()));
    }
    let started = Instant::now();
    let mut ok = 0usize;
    for chunk in bodies.chunks(parallel) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|b| {
                let (router, b) = (router.clone(), b.clone());
                tokio::spawn(async move {
                    let req = Request::post("/bind").body(Body::from(b)).unwrap();
                    let resp = router.oneshot(req).await.unwrap();
                    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                    bytes.as_ref() == br#"{"Error":""}"#
                })
            })
            .collect();
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
    }
    let elapsed = started.elapsed();
    println!(
        "bind, {parallel:>3} in flight, in-memory API              {:>8.0} binds/s  ({binds} binds, {ok} bound, {:.3} s)",
        binds as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
}

/// Filter latency (new size each call) while `parallel` binds run the whole time: a bind
/// re-checks and reserves under the ledger's write lock, which filters wait for.
async fn filter_during_binds(
    ext: &Arc<Extender>,
    fake: &Arc<FakeCluster>,
    bodies: Vec<Value>,
    iters: usize,
    parallel: usize,
) {
    let router = http::router(ext.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bound = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..parallel {
        let (router, fake, stop, bound) =
            (router.clone(), fake.clone(), stop.clone(), bound.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(1000 + w as u64);
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("busy-{w}-{i}");
                i += 1;
                let pod: Pod = serde_json::from_value(pod_json(&name, 1)).unwrap();
                fake.put_pod(pod);
                let node = node_name(rng.below(nodes() as u64) as usize);
                let args = json!({ "PodName": name, "PodNamespace": "inference", "PodUID": format!("uid-{name}"), "Node": node });
                let req = Request::post("/bind").body(Body::from(args.to_string())).unwrap();
                let resp = router.clone().oneshot(req).await.unwrap();
                resp.into_body().collect().await.unwrap();
                bound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    measure_many(
        &router,
        &format!("filter     NodeNames x all, new size, {parallel} binds running"),
        "/filter",
        bodies,
        iters,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let n = bound.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "  (binds completed meanwhile: {n}, {:.0} binds/s)",
        n as f64 / started.elapsed().as_secs_f64()
    );
}

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and gets a short smoke run
/// (50 nodes, few iterations) that only proves the benchmark still works.
fn scale() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (FULL_NODES, 1)
    } else {
        (50, 100)
    }
}

fn main() {
    let (node_count, divisor) = scale();
    NODES.store(node_count, std::sync::atomic::Ordering::Relaxed);
    let iters = |n: usize| (n / divisor).max(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let fake = Arc::new(FakeCluster::new());
        let config = Config { headroom_bytes: 512 << 20, ..Config::default() };
        let ext = Arc::new(Extender::new(config, fake.clone(), Arc::new(now)));
        let rebuild = populate(&ext);
        ext.mark_pods_synced();
        ext.mark_gpunodes_synced();
        println!("machine: {} CPUs, load average {}", cpus(), load());
        println!(
            "cluster: {} nodes x {GPUS} GPUs x 80 GiB, {} pods in the ledger; ledger rebuild {:.1} ms",
            nodes(),
            ext.ledger().pod_count(),
            rebuild.as_secs_f64() * 1e3
        );
        let router = http::router(ext.clone());
        if std::env::var_os("PHASES").is_some() {
            phases(&ext);
            if std::env::var_os("PHASES_ONLY").is_some() {
                return;
            }
        }
        let all: Vec<String> = (0..nodes()).map(node_name).collect();
        let mut rng = Rng(7);
        // kube-scheduler's adaptive percentageOfNodesToScore for 5,000 nodes is 10%: it stops
        // after 500 feasible nodes and sends those to the extender.
        let sampled: Vec<String> = (0..500).map(|_| node_name(rng.below(nodes() as u64) as usize)).collect();
        let pod = pod_json("llm-7b", 6);
        let names = |n: &[String]| json!({ "Pod": pod, "Nodes": null, "NodeNames": n });
        measure(&router, "filter     NodeNames x all", "/filter", names(&all), iters(400)).await;
        measure(&router, "filter     NodeNames x 500 (sampled)", "/filter", names(&sampled), iters(2000)).await;
        measure(&router, "prioritize NodeNames x all", "/prioritize", names(&all), iters(400)).await;
        measure(&router, "prioritize NodeNames x 500 (sampled)", "/prioritize", names(&sampled), iters(2000)).await;
        let items: Vec<Value> = sampled.iter().map(|n| node_json(n)).collect();
        let full = json!({ "Pod": pod, "Nodes": { "metadata": {}, "items": items }, "NodeNames": null });
        measure(&router, "filter     Nodes x 500 (nodeCacheCapable=false)", "/filter", full, iters(1000)).await;
        // Every call a pod of a new size: no node's refusal is remembered.
        let cold: Vec<Value> = (1..=79)
            .map(|gib| json!({ "Pod": pod_json(&format!("llm-{gib}"), gib), "Nodes": null, "NodeNames": all }))
            .collect();
        measure_many(&router, "filter     NodeNames x all, new size each call", "/filter", cold.clone(), iters(400)).await;
        filter_during_binds(&ext, &fake, cold, iters(400), 16).await;
        // 79 GiB: every GPU holds a pod, so every node refuses and needs a reason in the answer.
        measure(&router, "filter     NodeNames x all, 79 GiB (all refuse)", "/filter",
            json!({ "Pod": pod_json("llm-79", 79), "Nodes": null, "NodeNames": all }), iters(200)).await;
        let big = pod_json("llm-70b", 60);
        measure(&router, "filter     NodeNames x all, 60 GiB", "/filter",
            json!({ "Pod": big, "Nodes": null, "NodeNames": all }), iters(200)).await;
        bind_throughput(&ext, &fake, iters(5_000), 1).await;
        bind_throughput(&ext, &fake, iters(20_000), 64).await;
        println!("load average after: {}", load());
    });
}

/// Where the time of one 5,000-name filter goes (set PHASES=1).
fn phases(ext: &Extender) {
    let all: Vec<String> = (0..nodes()).map(node_name).collect();
    let body = json!({ "Pod": pod_json("llm-7b", 6), "Nodes": null, "NodeNames": all }).to_string();
    let time = |label: &str, f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..100 {
            f();
        }
        println!(
            "  phase {label:<40} {:>8.3} ms",
            t.elapsed().as_secs_f64() * 10.0
        );
    };
    time("parse ExtenderArgs", &|| {
        let _: vramslice_extender::wire::ExtenderArgs = serde_json::from_str(&body).unwrap();
    });
    time("Extender::filter (parse+check+encode)", &|| {
        ext.filter(body.as_bytes()).unwrap();
    });
    let request = PodRequest::new(VramUnit::Gib1, 6);
    time("ledger.check x 5000", &|| {
        let ledger = ext.ledger();
        for n in &all {
            let _ = ledger.check(n, request, now());
        }
    });
    time("probe.refusal x 5000 (as the filter asks)", &|| {
        let ledger = ext.ledger();
        let probe = ledger.probe(request, now());
        for n in &all {
            let _ = probe.refusal(n);
        }
    });
    time("ledger.check x 5000 + reasons (uncached)", &|| {
        let ledger = ext.ledger();
        for n in &all {
            if let Err(r) = ledger.check(n, request, now()) {
                let _ = r.to_string();
            }
        }
    });
    time("probe.check_rendered x 5000 (cached)", &|| {
        let ledger = ext.ledger();
        let probe = ledger.probe(request, now());
        for n in &all {
            let _ = probe.check_rendered(n);
        }
    });
    // A pod of 60 GiB: nearly every node refuses it, so each needs a reason in the answer.
    let big =
        json!({ "Pod": pod_json("llm-70b", 60), "Nodes": null, "NodeNames": all }).to_string();
    let big_request = PodRequest::new(VramUnit::Gib1, 60);
    time("60 GiB: Extender::filter", &|| {
        ext.filter(big.as_bytes()).unwrap();
    });
    time("60 GiB: probe.refusal x 5000", &|| {
        let ledger = ext.ledger();
        let probe = ledger.probe(big_request, now());
        for n in &all {
            let _ = probe.refusal(n);
        }
    });
    let sizes: Vec<String> = (40..80)
        .map(|gib| {
            json!({ "Pod": pod_json(&format!("llm-{gib}"), gib), "Nodes": null, "NodeNames": all })
                .to_string()
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    time("40-79 GiB, new size each call: filter", &|| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ext.filter(sizes[i % sizes.len()].as_bytes()).unwrap();
    });
    let (answer, _) = ext.filter(big.as_bytes()).unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    time("60 GiB: encode the answer (as Value)", &|| {
        let _ = serde_json::to_string(&answer).unwrap();
    });
}

/// The 1/5/15-minute load averages (p99 figures mean little on a busy machine).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
