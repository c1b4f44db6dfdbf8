//! Pods spanning several GPUs (`vramslice.io/gpus`) through the HTTP contract: filter,
//! prioritize and bind of a 2-GPU pod, the refusal reasons, and a bad annotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use vramslice_extender::Extender;
use vramslice_extender::fake::{Call, FakeCluster};

/// two: two 40 GiB GPUs with 40 and 30 GiB free; one-roomy: GPU 0 80 GiB free, GPU 1 10 GiB;
/// single: one 80 GiB GPU.
fn cluster() -> (Arc<Extender>, Arc<FakeCluster>) {
    let fake = Arc::new(FakeCluster::new());
    let ext = extender_with(config(0), fake.clone());
    {
        let mut ledger = ext.ledger_mut();
        ledger.set_reading("two", reading(5, vec![gpu(0, 40, 40), gpu(1, 40, 30)]));
        ledger.set_reading(
            "one-roomy",
            reading(5, vec![gpu(0, 80, 80), gpu(1, 80, 10)]),
        );
        ledger.set_reading("single", reading(5, vec![gpu(0, 80, 80)]));
    }
    (ext, fake)
}

const NODES: [&str; 3] = ["two", "one-roomy", "single"];

fn tp_pod(uid: &str, gib: &str) -> serde_json::Value {
    pod_json("tp", uid, Some(gib), json!({ "vramslice.io/gpus": "2" }))
}

#[tokio::test]
async fn filter_needs_two_gpus_with_the_share_each() {
    let (ext, _) = cluster();
    let (status, body) =
        post_json(&ext, "/filter", &args_names(tp_pod("uid-1", "40"), &NODES)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["NodeNames"], json!(["two"]));
    assert_eq!(
        body["FailedNodes"],
        json!({
            "one-roomy": "needs 2 GPUs with 20 GiB effective free each; 1 has; GPU 1: 10 GiB effective free (live 10 GiB, 0 B reserved by pods not yet running), need 20 GiB"
        })
    );
    assert_eq!(
        body["FailedAndUnresolvableNodes"],
        json!({ "single": "pod needs 2 GPUs with 20 GiB each; node single has 1 GPU that large" })
    );
    // The same 40 GiB on one GPU fits wherever one GPU has it.
    let pod = pod_json("one", "uid-2", Some("40"), json!({}));
    let (_, body) = post_json(&ext, "/filter", &args_names(pod, &NODES)).await;
    assert_eq!(body["NodeNames"], json!(["two", "one-roomy", "single"]));
}

#[tokio::test]
async fn prioritize_scores_the_pair_of_gpus() {
    let (ext, _) = cluster();
    let (status, body) = post_json(
        &ext,
        "/prioritize",
        &args_names(tp_pod("uid-1", "40"), &NODES),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Binpack over GPU 0 (20 of 40 left: 6) and GPU 1 (10 of 40 left: 8): mean 7.
    assert_eq!(
        body,
        json!([{ "Host": "two", "Score": 7 }, { "Host": "one-roomy", "Score": 0 },
               { "Host": "single", "Score": 0 }])
    );
}

#[tokio::test]
async fn bind_writes_both_gpus_and_books_the_share_on_each() {
    let (ext, fake) = cluster();
    fake.put_pod(serde_json::from_value(tp_pod("uid-1", "40")).unwrap());
    let (_, body) = post_json(
        &ext,
        "/filter",
        &args_names(tp_pod("uid-1", "40"), &["two"]),
    )
    .await;
    assert_eq!(body["NodeNames"], json!(["two"]));
    let (status, body) = post_json(&ext, "/bind", &binding_args("tp", "uid-1", "two")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "Error": "" })));
    let calls = fake.calls();
    let Some(Call::Bind(_, _, _, node, annotations)) = calls.last() else {
        panic!("no bind: {calls:?}");
    };
    assert_eq!(node, "two");
    assert_eq!(annotations["vramslice.io/gpu-uuid"], "GPU-0,GPU-1");
    let info = ext.ledger().pod("uid-1").unwrap();
    assert_eq!(info.gpu_uuid.as_deref(), Some("GPU-0,GPU-1"));
    let views = ext.ledger().gpu_views("two").unwrap().to_vec();
    assert_eq!(views[0].effective_free, 20 << 30);
    assert_eq!(views[1].effective_free, 10 << 30);
    // The reservation counts on both GPUs at once: another 2 × 20 GiB no longer fits.
    let (_, body) = post_json(
        &ext,
        "/filter",
        &args_names(tp_pod("uid-2", "40"), &["two"]),
    )
    .await;
    assert_eq!(
        body["FailedNodes"]["two"],
        "needs 2 GPUs with 20 GiB effective free each; 1 has; GPU 1: 10 GiB effective free (live 30 GiB, 20 GiB reserved by pods not yet running), need 20 GiB"
    );
    fake.put_pod(serde_json::from_value(tp_pod("uid-2", "40")).unwrap());
    let (_, body) = post_json(&ext, "/bind", &binding_args("tp", "uid-2", "two")).await;
    assert!(
        body["Error"]
            .as_str()
            .unwrap()
            .starts_with("cannot bind pod default/tp to node two: needs 2 GPUs with 20 GiB effective free each; 1 has"),
        "{body}"
    );
}

#[tokio::test]
async fn a_bad_gpu_count_or_an_uneven_split_is_named() {
    let (ext, _) = cluster();
    let pod = pod_json(
        "tp",
        "uid-1",
        Some("40"),
        json!({ "vramslice.io/gpus": "many" }),
    );
    let (status, body) = post_json(&ext, "/filter", &args_names(pod, &NODES)).await;
    assert_eq!(status, StatusCode::OK);
    // The pod's own mistake: every node unresolvable with the reason, no extender error.
    assert_eq!(body["Error"], "");
    let unresolvable = body["FailedAndUnresolvableNodes"].as_object().unwrap();
    assert_eq!(unresolvable.len(), NODES.len());
    for reason in unresolvable.values() {
        assert_eq!(
            reason,
            "pod default/tp: annotation vramslice.io/gpus=\"many\" is invalid: expected a whole number of GPUs from 1 to 8"
        );
    }
    let (_, body) = post_json(&ext, "/filter", &args_names(tp_pod("uid-3", "5"), &NODES)).await;
    assert!(
        body["FailedAndUnresolvableNodes"][NODES[0]]
            .as_str()
            .unwrap()
            .contains("5 units of vramslice.io/vram-gib do not split evenly over 2 GPUs"),
        "{body}"
    );
}

#[tokio::test]
async fn a_pod_beside_a_waiting_one_of_its_size_over_other_gpus_is_retried_not_parked() {
    let (ext, fake) = cluster();
    // A one-GPU 20 GiB pod bound to `two`, not yet allocated by the kubelet.
    let single = pod_json("one", "uid-1", Some("20"), json!({}));
    fake.put_pod(serde_json::from_value(single.clone()).unwrap());
    post_json(&ext, "/filter", &args_names(single, &["two"])).await;
    let (_, body) = post_json(&ext, "/bind", &binding_args("one", "uid-1", "two")).await;
    assert_eq!(body["Error"], "", "{body}");
    // 20 GiB over 2 GPUs where only `two` could take it (`single` has one GPU).
    let (_, body) = post_json(
        &ext,
        "/filter",
        &args_names(tp_pod("uid-2", "20"), &["two", "single"]),
    )
    .await;
    let expected = "pod default/one of the same size (20 GiB) waits for its units on node two over 1 GPU; \
                    the device plugin cannot tell pods of one size apart, so this pod over 2 GPUs waits \
                    until that one has its units";
    assert_eq!(
        body["FailedAndUnresolvableNodes"]["two"], expected,
        "{body}"
    );
    // No node passes, and one would once that pod has its units: a scheduler error, which
    // kube-scheduler retries after a backoff of seconds.
    assert_eq!(
        body["Error"],
        format!("{expected}; retried shortly"),
        "{body}"
    );
    // Where another node passes, it is no error: the pod goes there.
    let (_, body) = post_json(&ext, "/filter", &args_names(tp_pod("uid-3", "20"), &NODES)).await;
    assert_eq!(body["Error"], "", "{body}");
    assert_eq!(body["NodeNames"], json!(["one-roomy"]), "{body}");
}
