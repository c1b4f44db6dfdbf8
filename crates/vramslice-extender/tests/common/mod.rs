//! Shared fixtures: an extender over a fake cluster with a fixed clock, GpuNode readings, and
//! pod / node JSON shaped exactly as kube-scheduler (Go's encoding/json) writes them.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tower::ServiceExt;
use vramslice_core::VramUnit;
use vramslice_core::cluster::ledger::{ListedPod, NodeReading, PublishedGpu};
use vramslice_extender::fake::FakeCluster;
use vramslice_extender::{Config, Extender};

pub const GIB: u64 = 1 << 30;

/// The fixed "now" of every test.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000)
}

pub fn secs_ago(s: u64) -> SystemTime {
    now() - Duration::from_secs(s)
}

pub fn config(headroom: u64) -> Config {
    Config {
        headroom_bytes: headroom,
        ..Config::default()
    }
}

/// An extender over `cluster`, synced (ready), with no headroom unless `config` says otherwise.
pub fn extender_with(config: Config, cluster: Arc<FakeCluster>) -> Arc<Extender> {
    let ext = Arc::new(Extender::new(config, cluster, Arc::new(now)));
    ext.mark_pods_synced();
    ext.mark_gpunodes_synced();
    ext
}

pub fn gpu(index: u32, units: u64, free_gib: u64) -> PublishedGpu {
    PublishedGpu {
        index,
        uuid: format!("GPU-{index}"),
        free_bytes: free_gib * GIB,
        units,
        healthy: true,
        health_reason: None,
        pods: Vec::new(),
    }
}

pub fn listed(uid: &str, limit_gib: u64, used_gib: u64) -> ListedPod {
    ListedPod {
        uid: Some(uid.into()),
        namespace: "default".into(),
        name: uid.into(),
        limit_bytes: limit_gib * GIB,
        used_bytes: Some(used_gib * GIB),
    }
}

pub fn reading(age_secs: u64, gpus: Vec<PublishedGpu>) -> NodeReading {
    NodeReading {
        observed_at: secs_ago(age_secs),
        unit: VramUnit::Gib1,
        gpus,
    }
}

/// A v1.Pod as kube-scheduler marshals it: Go field names from json tags, empty structs kept,
/// nil maps and slices omitted, quantities as strings.
pub fn pod_json(name: &str, uid: &str, vram: Option<&str>, annotations: Value) -> Value {
    let resources = match vram {
        Some(q) => json!({
            "limits": { "cpu": "1", "memory": "2Gi", "vramslice.io/vram-gib": q },
            "requests": { "cpu": "1", "memory": "2Gi", "vramslice.io/vram-gib": q }
        }),
        None => json!({ "limits": { "cpu": "500m" }, "requests": { "cpu": "500m" } }),
    };
    json!({
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": uid,
            "resourceVersion": "4711",
            "creationTimestamp": "2026-11-22T09:00:00Z",
            "labels": { "app": "llm" },
            "annotations": annotations,
            "managedFields": [{ "manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-22T09:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {} }]
        },
        "spec": {
            "volumes": [{ "name": "kube-api-access", "projected": { "sources": [], "defaultMode": 420 } }],
            "containers": [{
                "name": "server",
                "image": "example/llm:1",
                "resources": resources,
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "vramslice-scheduler",
            "tolerations": [{ "key": "node.kubernetes.io/not-ready", "operator": "Exists",
                "effect": "NoExecute", "tolerationSeconds": 300 }],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": { "phase": "Pending", "qosClass": "Guaranteed" }
    })
}

/// The same pod as the API server returns it (for the fake cluster).
pub fn pod_object(name: &str, uid: &str, vram: Option<&str>, annotations: Value) -> Pod {
    serde_json::from_value(pod_json(name, uid, vram, annotations)).unwrap()
}

/// A v1.Node as kube-scheduler marshals it.
pub fn node_json(name: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "uid": format!("uid-{name}"),
            "resourceVersion": "99",
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "labels": { "kubernetes.io/hostname": name }
        },
        "spec": { "podCIDR": "10.0.0.0/24" },
        "status": {
            "capacity": { "cpu": "16", "memory": "128Gi", "vramslice.io/vram-gib": "16" },
            "allocatable": { "cpu": "16", "memory": "128Gi", "vramslice.io/vram-gib": "16" },
            "conditions": [{ "type": "Ready", "status": "True",
                "lastHeartbeatTime": "2026-11-22T09:00:00Z", "lastTransitionTime": "2026-11-01T00:00:00Z",
                "reason": "KubeletReady", "message": "kubelet is posting ready status" }],
            "nodeInfo": { "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.8",
                "osImage": "", "containerRuntimeVersion": "containerd://2.0", "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64" }
        }
    })
}

/// ExtenderArgs for a nodeCacheCapable extender (Go writes the nil Nodes as null).
pub fn args_names(pod: Value, names: &[&str]) -> Value {
    json!({ "Pod": pod, "Nodes": null, "NodeNames": names })
}

/// ExtenderArgs for a non-nodeCacheCapable extender.
pub fn args_nodes(pod: Value, names: &[&str]) -> Value {
    let items: Vec<Value> = names.iter().map(|n| node_json(n)).collect();
    json!({ "Pod": pod, "Nodes": { "metadata": {}, "items": items }, "NodeNames": null })
}

/// POST `body` to `path` in-process; the status and the body (JSON when it parses, else a string).
pub async fn post(ext: &Arc<Extender>, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let router = vramslice_extender::http::router(ext.clone());
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

pub async fn post_json(ext: &Arc<Extender>, path: &str, body: &Value) -> (StatusCode, Value) {
    post(ext, path, body.to_string()).await
}

pub async fn get(ext: &Arc<Extender>, path: &str) -> (StatusCode, String) {
    let router = vramslice_extender::http::router(ext.clone());
    let resp = router
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub fn binding_args(name: &str, uid: &str, node: &str) -> Value {
    json!({ "PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": node })
}
