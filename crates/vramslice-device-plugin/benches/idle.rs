//! Idle cost and reaction time of the real plugin binary on 8 fake GPUs of 80 GiB (640 devices),
//! registered with a test kubelet and reading an (empty) PodResources server:
//!
//! - resident memory and CPU time used over ~10 s of idling at the default poll interval;
//! - time from an (atomic) fake-file change to the ListAndWatch update the kubelet receives,
//!   median of several, at the default 500 ms poll interval and at 100 ms.
//!
//! Run: `cargo bench -p vramslice-device-plugin --bench idle`. Prints figures; asserts nothing
//! about timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Node, Plugin, TestKubelet, fake_gpus, start_pod_resources, wait_for, write_atomic};
use vramslice_device_plugin::proto::podresources::ListPodResourcesResponse;

const IDLE: Duration = Duration::from_secs(10);
const SAMPLES: usize = 9;

fn gpus(unhealthy: Option<usize>) -> String {
    let names: Vec<String> = (0..8)
        .map(|i| format!("GPU-{i:08x}-0000-4000-8000-000000000000"))
        .collect();
    let list: Vec<(&str, &str, bool)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), "80Gi", unhealthy != Some(i)))
        .collect();
    fake_gpus(&list)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (utime + stime) in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime 11, stime 12.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn start(poll: &str) -> (Node, TestKubelet, Plugin, tokio::task::JoinHandle<()>) {
    let node = Node::new(&[], "");
    write_atomic(&node.fake_file, &gpus(None));
    let config = std::fs::read_to_string(&node.config)
        .unwrap()
        .replace("pollInterval: 100ms", &format!("pollInterval: {poll}"));
    std::fs::write(&node.config, config).unwrap();
    let pr = start_pod_resources(
        &node.pod_resources_socket(),
        ListPodResourcesResponse::default(),
    )
    .await;
    let kubelet = TestKubelet::start(&node.socket_dir).await;
    let plugin = Plugin::start(&node, &[]);
    wait_for("640 devices", Duration::from_secs(20), || {
        kubelet.last_list().filter(|l| l.len() == 640)
    })
    .await;
    (node, kubelet, plugin, pr)
}

async fn reaction_times(node: &Node, kubelet: &TestKubelet) -> Vec<Duration> {
    let mut times = Vec::new();
    for i in 0..SAMPLES {
        let unhealthy = i % 2 == 0;
        let before = kubelet.seen.lock().unwrap().lists.len();
        // Land the change at a random-ish point of the poll cycle.
        tokio::time::sleep(Duration::from_millis(137 * (i as u64 % 5) + 50)).await;
        let t0 = Instant::now();
        write_atomic(&node.fake_file, &gpus(unhealthy.then_some(7)));
        let arrived = wait_for("the ListAndWatch update", Duration::from_secs(5), || {
            let seen = kubelet.seen.lock().unwrap();
            seen.lists.get(before).map(|(at, _)| *at)
        })
        .await;
        times.push(arrived.duration_since(t0));
    }
    times.sort();
    times
}

fn fmt_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "vramslice-device-plugin idle benchmark: 8 fake GPUs x 80 GiB = 640 devices (unit 1Gi)"
    );

    let (node, kubelet, plugin, _pr) = start("500ms").await;
    let pid = plugin.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await; // settle after start-up
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(IDLE).await;
    let cpu = cpu_seconds(pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "idle (pollInterval 500ms, {wall:.1} s): RSS {} KiB (peak {} KiB), CPU {:.3} s = {:.2}% of one core",
        status_kib(pid, "VmRSS:"),
        status_kib(pid, "VmHWM:"),
        cpu,
        100.0 * cpu / wall
    );
    let times = reaction_times(&node, &kubelet).await;
    println!(
        "file change -> ListAndWatch update (pollInterval 500ms, n={SAMPLES}): median {}, min {}, max {}",
        fmt_ms(times[SAMPLES / 2]),
        fmt_ms(times[0]),
        fmt_ms(times[SAMPLES - 1])
    );
    drop(plugin);

    let (node, kubelet, plugin, _pr) = start("100ms").await;
    let pid = plugin.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu = cpu_seconds(pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "idle (pollInterval 100ms, {wall:.1} s): RSS {} KiB, CPU {:.3} s = {:.2}% of one core",
        status_kib(pid, "VmRSS:"),
        cpu,
        100.0 * cpu / wall
    );
    let times = reaction_times(&node, &kubelet).await;
    println!(
        "file change -> ListAndWatch update (pollInterval 100ms, n={SAMPLES}): median {}, min {}, max {}",
        fmt_ms(times[SAMPLES / 2]),
        fmt_ms(times[0]),
        fmt_ms(times[SAMPLES - 1])
    );
    drop(plugin);
}
