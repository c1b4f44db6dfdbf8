//! The real plugin binary against a test kubelet: registration, ListAndWatch, health updates,
//! kubelet restarts and socket loss, shutdown and configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, Plugin, TestKubelet, fake_gpus, wait_for, write_atomic};

const TWO_GPUS: &[(&str, &str, bool)] = &[("GPU-aaaa", "80Gi", true), ("GPU-bbbb", "24Gi", true)];

fn ids_of(devices: &[vramslice_device_plugin::proto::deviceplugin::Device]) -> Vec<String> {
    devices.iter().map(|d| d.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_then_streams_one_device_per_unit_and_health_changes() {
    let node = Node::new(TWO_GPUS, "");
    let kubelet = TestKubelet::start(&node.socket_dir).await;
    let plugin = Plugin::start(&node, &[]);

    wait_for("a registration", Duration::from_secs(15), || {
        (!kubelet.registrations().is_empty()).then_some(())
    })
    .await;
    let reg = &kubelet.registrations()[0];
    assert_eq!(reg.version, "v1beta1");
    assert_eq!(reg.endpoint, "vramslice-vram-gib.sock");
    assert_eq!(reg.resource_name, "vramslice.io/vram-gib");
    let options = reg.options.expect("options sent");
    assert!(options.get_preferred_allocation_available);
    assert!(!options.pre_start_required);
    // The registration is answered only after the dial-back GetDevicePluginOptions succeeded.
    wait_for(
        "the dial-back GetDevicePluginOptions",
        Duration::from_secs(2),
        || (kubelet.seen.lock().unwrap().options_ok == 1).then_some(()),
    )
    .await;

    let devices = wait_for("the first device list", Duration::from_secs(5), || {
        kubelet.last_list()
    })
    .await;
    assert_eq!(devices.len(), 80 + 24);
    let mut want: Vec<String> = (0..80).map(|k| format!("GPU-aaaa::{k}")).collect();
    want.extend((0..24).map(|k| format!("GPU-bbbb::{k}")));
    assert_eq!(ids_of(&devices), want);
    assert!(devices.iter().all(|d| d.health == "Healthy"));

    // Usage alone is not a device change: no new list.
    let lists_before = kubelet.seen.lock().unwrap().lists.len();
    write_atomic(
        &node.fake_file,
        &fake_gpus(TWO_GPUS).replace("total: 24Gi\n", "total: 24Gi\n    used: 3Gi\n"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kubelet.seen.lock().unwrap().lists.len(),
        lists_before,
        "usage change re-sent the list"
    );

    // GPU-bbbb goes unhealthy: its units turn Unhealthy within 2 s.
    let changed_at = Instant::now();
    write_atomic(
        &node.fake_file,
        &fake_gpus(&[("GPU-aaaa", "80Gi", true), ("GPU-bbbb", "24Gi", false)]),
    );
    let devices = wait_for("Unhealthy units", Duration::from_secs(2), || {
        kubelet
            .last_list()
            .filter(|l| l.iter().any(|d| d.health == "Unhealthy"))
    })
    .await;
    println!(
        "health update arrived {:?} after the file change",
        changed_at.elapsed()
    );
    assert_eq!(devices.len(), 104);
    for d in &devices {
        let want = if d.id.starts_with("GPU-bbbb::") {
            "Unhealthy"
        } else {
            "Healthy"
        };
        assert_eq!(d.health, want, "{}", d.id);
    }

    // The GPU disappears: its units leave the list.
    write_atomic(&node.fake_file, &fake_gpus(&[("GPU-aaaa", "80Gi", true)]));
    let devices = wait_for("GPU-bbbb gone", Duration::from_secs(2), || {
        kubelet.last_list().filter(|l| l.len() == 80)
    })
    .await;
    assert!(devices.iter().all(|d| d.id.starts_with("GPU-aaaa::")));
    drop(plugin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_restart_and_socket_loss_lead_to_re_registration() {
    let node = Node::new(TWO_GPUS, "");
    let mut kubelet = TestKubelet::start(&node.socket_dir).await;
    let plugin = Plugin::start(&node, &[]);
    wait_for("a registration", Duration::from_secs(15), || {
        (!kubelet.registrations().is_empty()).then_some(())
    })
    .await;

    // Kubelet restart: kubelet.sock deleted and re-created by a fresh Registration server.
    kubelet.stop().await;
    let restarted_at = Instant::now();
    let fresh = TestKubelet::start(&node.socket_dir).await;
    let reg = wait_for(
        "re-registration after a kubelet restart",
        Duration::from_secs(1),
        || fresh.registrations().first().cloned(),
    )
    .await;
    println!(
        "re-registered {:?} after the kubelet restart",
        restarted_at.elapsed()
    );
    assert_eq!(reg.endpoint, "vramslice-vram-gib.sock");
    assert_eq!(reg.resource_name, "vramslice.io/vram-gib");
    let devices = wait_for(
        "a device list for the new kubelet",
        Duration::from_secs(2),
        || fresh.last_list(),
    )
    .await;
    assert_eq!(devices.len(), 104);

    // Our own socket deleted (the kubelet cleans the directory): re-served and re-registered.
    let lists_before = fresh.seen.lock().unwrap().lists.len();
    std::fs::remove_file(node.plugin_socket()).unwrap();
    let removed_at = Instant::now();
    wait_for(
        "a second registration after the socket was removed",
        Duration::from_secs(1),
        || (fresh.registrations().len() >= 2).then_some(()),
    )
    .await;
    println!(
        "re-registered {:?} after the socket was removed",
        removed_at.elapsed()
    );
    assert!(node.plugin_socket().exists(), "socket re-created");
    wait_for(
        "a device list on the new connection",
        Duration::from_secs(2),
        || (fresh.seen.lock().unwrap().lists.len() > lists_before).then_some(()),
    )
    .await;
    assert!(
        plugin.log_text().contains("re-serving and re-registering"),
        "{}",
        plugin.log_text()
    );
}

/// A kubelet that takes 5 s to answer Register (it dials the plugin back first; upstream allows
/// that dial 10 s) gets one registration, not a second one sent while the first completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_kubelet_is_waited_for_not_registered_with_twice() {
    let node = Node::new(TWO_GPUS, "");
    let kubelet =
        TestKubelet::start_answering_after(&node.socket_dir, Duration::from_secs(5)).await;
    let plugin = Plugin::start(&node, &[]);
    wait_for("the registration logged", Duration::from_secs(20), || {
        plugin
            .log_text()
            .contains("registered with the kubelet")
            .then_some(())
    })
    .await;
    assert_eq!(kubelet.registrations().len(), 1, "{}", plugin.log_text());
    assert!(
        !plugin.log_text().contains("registration failed"),
        "{}",
        plugin.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_once_the_kubelet_appears_and_exits_cleanly_on_sigterm() {
    let node = Node::new(TWO_GPUS, "");
    let mut plugin = Plugin::start(&node, &["--log-format", "json"]);
    // Serve first: the socket exists before any kubelet does.
    let socket = node.plugin_socket();
    wait_for("the plugin socket", Duration::from_secs(10), || {
        socket.exists().then_some(())
    })
    .await;
    let kubelet = TestKubelet::start(&node.socket_dir).await;
    wait_for("a registration", Duration::from_secs(2), || {
        (!kubelet.registrations().is_empty()).then_some(())
    })
    .await;
    // The plugin logs once the kubelet's answer is back, which may be after the kubelet saw
    // the request.
    wait_for("the registration logged", Duration::from_secs(5), || {
        plugin
            .log_text()
            .contains("registered with the kubelet")
            .then_some(())
    })
    .await;

    let status = plugin.terminate();
    assert_eq!(status.code(), Some(0), "{}", plugin.log_text());
    assert!(!socket.exists(), "socket removed on SIGTERM");
    let log = plugin.log_text();
    assert!(
        log.lines()
            .any(|l| l.starts_with('{') && l.contains("registered with the kubelet")),
        "JSON log lines expected:\n{log}"
    );
}

#[test]
fn configuration_errors_exit_64_naming_the_field() {
    let node = Node::new(TWO_GPUS, "unit: 3Gi");
    let out = Command::new(env!("CARGO_BIN_EXE_vramslice-device-plugin"))
        .arg("--config")
        .arg(&node.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config field `unit`: unknown VRAM unit \"3Gi\""),
        "{stderr}"
    );

    std::fs::write(&node.config, "backend: fake\nsocketDri: /tmp\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vramslice-device-plugin"))
        .arg("--config")
        .arg(&node.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("socketDri"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_cannot_be_bound_ends_the_plugin_with_the_error() {
    let node = Node::new(TWO_GPUS, "");
    // The socket directory would have to be made inside a plain file.
    let unbindable = node.fake_file.join("device-plugins");
    let config = std::fs::read_to_string(&node.config).unwrap().replace(
        &format!("socketDir: {}", node.socket_dir.display()),
        &format!("socketDir: {}", unbindable.display()),
    );
    std::fs::write(&node.config, config).unwrap();
    let mut plugin = Plugin::start(&node, &[]);
    let status = wait_for("the plugin to exit", Duration::from_secs(15), || {
        plugin.child.try_wait().ok().flatten()
    })
    .await;
    let log = plugin.log_text();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("serving /metrics"),
        "it got as far as serving:\n{log}"
    );
    assert!(
        log.contains(&unbindable.display().to_string()),
        "the error names the socket path:\n{log}"
    );
}
