//! Many simultaneous binds racing for few GPUs: no GPU is ever promised more than it
//! advertises, and every loser gets a clear error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use vramslice_extender::fake::FakeCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_binds_never_overcommit() {
    let fake = Arc::new(FakeCluster::new());
    // Slow API calls keep many binds in flight at once.
    fake.set_latency(Duration::from_millis(5));
    let ext = extender_with(config(0), fake.clone());
    for node in ["n0", "n1"] {
        ext.ledger_mut()
            .set_reading(node, reading(1, vec![gpu(0, 8, 8), gpu(1, 8, 8)]));
    }
    const PODS: usize = 48;
    // Mixed sizes: 3 and 2 GiB.
    let size = |i: usize| if i.is_multiple_of(3) { 2 } else { 3 };
    for i in 0..PODS {
        let q = size(i).to_string();
        fake.put_pod(pod_object(
            &format!("p{i}"),
            &format!("uid-{i}"),
            Some(&q),
            json!({}),
        ));
    }
    let mut tasks = Vec::new();
    for i in 0..PODS {
        let ext = ext.clone();
        tasks.push(tokio::spawn(async move {
            let node = format!("n{}", i % 2);
            let args = binding_args(&format!("p{i}"), &format!("uid-{i}"), &node);
            let (status, body) = post_json(&ext, "/bind", &args).await;
            (i, node, status, body["Error"].as_str().unwrap().to_string())
        }));
    }
    let mut winners = 0;
    let mut per_gpu: BTreeMap<(String, String), u64> = BTreeMap::new();
    for task in tasks {
        let (i, node, status, error) = task.await.unwrap();
        assert_eq!(status, axum::http::StatusCode::OK);
        let pod = fake.pod("default", &format!("p{i}")).unwrap();
        if error.is_empty() {
            winners += 1;
            assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(node.as_str()));
            let gpu = pod.metadata.annotations.unwrap()["vramslice.io/gpu-uuid"].clone();
            *per_gpu.entry((node, gpu)).or_default() += size(i);
        } else {
            assert!(
                error.starts_with(&format!(
                    "cannot bind pod default/p{i} to node {node}: GPU "
                )) && error.contains(&format!("need {} GiB", size(i))),
                "unclear loser error: {error}"
            );
            assert!(pod.spec.unwrap().node_name.is_none(), "a loser was bound");
        }
    }
    for ((node, gpu), units) in &per_gpu {
        assert!(*units <= 8, "{node}/{gpu} promised {units} of 8 units");
    }
    // Four GPUs of 8 units: at least 2 pods each, and never more than fits.
    assert!(winners >= 8, "only {winners} binds won");
    assert!(per_gpu.values().sum::<u64>() <= 32);
    {
        let ledger = ext.ledger();
        assert_eq!(ledger.pod_count(), winners, "every winner booked");
        assert_eq!(ledger.reservation_count(), 0, "confirmed bound");
        for node in ["n0", "n1"] {
            for view in ledger.gpu_views(node).unwrap() {
                assert!(view.assigned_bytes <= view.advertised_bytes, "{view:?}");
            }
        }
    }
    let losers = PODS - winners;
    let (_, metrics) = get(&ext, "/metrics").await;
    assert!(
        metrics.contains(&format!("vramslice_extender_bind_conflicts_total {losers}")),
        "{metrics}"
    );
}
