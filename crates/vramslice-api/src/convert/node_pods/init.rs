//! A node's plain init containers, which the kubelet's PodResources record never lists: what
//! their allocations hold for the accounting sweeper ([`plain_init_holds`]) and the pods one of
//! them may still run in, for those pods' limits ([`init_phase_pods`]).

use std::borrow::Borrow;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Container, ContainerStateTerminated, Pod};
use vramslice_core::cluster::placement::{InitUnits, gpu_uuids};
use vramslice_core::node::init_limit::InitPhasePod;
use vramslice_core::node::sweep::InitHold;

use super::bound_and_unfinished;
use crate::convert::{container_units, container_vram};
use crate::names::ANNOTATION_GPU_UUID;

/// What the plain init containers asking for `resource` may hold, one entry per container:
/// every such container of a bound pod whose phase is neither Succeeded nor Failed, completed or
/// not. The kubelet re-runs a pod's init containers when it recreates the pod's sandbox (a node
/// reboot, a dead pause container) with the devices it checkpointed, without a new Allocate; so
/// their accounting directories and limit files must outlive the run, for as long as the pod can
/// be restarted. A pod being deleted is never restarted: of its init containers only those that
/// have not completed (one may still run until it is stopped) still hold.
pub fn plain_init_holds<P: Borrow<Pod>>(pods: &[P], resource: &str) -> Vec<InitHold> {
    let mut holds = Vec::new();
    for pod in pods.iter().map(Borrow::borrow) {
        let deleting = pod.metadata.deletion_timestamp.is_some();
        for c in plain_init(pod) {
            let Some(units) = container_units(c, resource).filter(|u| *u > 0) else {
                continue;
            };
            let completed = completed(pod, &c.name);
            if !(deleting && completed) {
                holds.push(InitHold {
                    gpus: annotated_gpus(pod),
                    units,
                    completed_between: if completed {
                        completed_between(pod, &c.name)
                    } else {
                        None
                    },
                });
            }
        }
    }
    holds
}

/// The bound pods whose phase is neither Succeeded nor Failed and that have a plain init
/// container asking for `resource` that has not completed (waiting, running, restarting, or no
/// status yet: the kubelet's status may lag behind a container it already runs), as
/// `vramslice_core::node::init_limit` reads them: their app containers' units, their sidecars
/// and their plain init containers not yet completed. (A pod not admitted yet is listed on its
/// annotated GPU with no units, marked initialising, which the extender's books skip.)
pub fn init_phase_pods<P: Borrow<Pod>>(pods: &[P], resource: &str) -> Vec<InitPhasePod> {
    let mut out = Vec::new();
    for pod in pods.iter().map(Borrow::borrow) {
        let Some(spec) = pod.spec.as_ref().filter(|_| bound_and_unfinished(pod)) else {
            continue;
        };
        let units = |c: &Container| container_units(c, resource).unwrap_or(0);
        let init: Vec<InitUnits> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| container_vram(c).sidecar || !completed(pod, &c.name))
            .map(|c| InitUnits {
                units: units(c),
                sidecar: container_vram(c).sidecar,
            })
            .collect();
        let phase = InitPhasePod {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
            annotated_gpus: annotated_gpus(pod),
            app: spec.containers.iter().map(units).collect(),
            init,
        };
        if phase.initialising() {
            out.push(phase);
        }
    }
    out
}

/// The plain (not sidecar) init containers of a bound pod whose phase is neither Succeeded nor
/// Failed; none for any other pod.
fn plain_init(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec
        .as_ref()
        .filter(|_| bound_and_unfinished(pod))
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !container_vram(c).sidecar)
}

/// The GPUs the pod's `vramslice.io/gpu-uuid` annotation names (none when not annotated).
fn annotated_gpus(pod: &Pod) -> Vec<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_GPU_UUID))
        .map(|list| gpu_uuids(list).into_iter().map(str::to_string).collect())
        .unwrap_or_default()
}

/// How init container `name` last ended, when its status says it did.
fn terminated<'p>(pod: &'p Pod, name: &str) -> Option<&'p ContainerStateTerminated> {
    pod.status
        .as_ref()?
        .init_container_statuses
        .as_deref()?
        .iter()
        .find(|cs| cs.name == name)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

/// Whether the pod's status shows init container `name` exited with code 0.
fn completed(pod: &Pod, name: &str) -> bool {
    terminated(pod, name).is_some_and(|t| t.exit_code == 0)
}

/// From the pod's start (the kubelet allocates its devices at admission) to when init container
/// `name` finished; `None` when either time is not known, or they are out of order.
fn completed_between(pod: &Pod, name: &str) -> Option<(SystemTime, SystemTime)> {
    let started = SystemTime::from(pod.status.as_ref()?.start_time.as_ref()?.0);
    let finished = SystemTime::from(terminated(pod, name)?.finished_at.as_ref()?.0);
    (started <= finished).then_some((started, finished))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tests::{RES, three_containers};
    use super::*;
    use serde_json::json;

    fn hold(units: u64) -> InitHold {
        InitHold {
            gpus: vec!["GPU-a".to_string()],
            units,
            completed_between: None,
        }
    }

    /// `three_containers` with the pod in `phase` and its init container in `state`.
    fn with_init(phase: &str, state: serde_json::Value) -> Pod {
        let mut p = three_containers(&[]);
        let st = p.status.as_mut().unwrap();
        st.phase = Some(phase.into());
        st.init_container_statuses = serde_json::from_value(json!([
            {"name": "init", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state}
        ]))
        .unwrap();
        p
    }

    fn done() -> serde_json::Value {
        json!({"terminated": {"exitCode": 0}})
    }

    #[test]
    fn plain_init_containers_hold_while_their_pod_is_bound_and_not_terminal() {
        // Waiting for its image, running, or failed and restarting: it holds.
        assert_eq!(plain_init_holds(&[three_containers(&[])], RES), [hold(2)]);
        for state in [
            json!({"running": {}}),
            json!({"terminated": {"exitCode": 1}}),
        ] {
            assert_eq!(
                plain_init_holds(&[with_init("Pending", state)], RES),
                [hold(2)]
            );
        }
        // Completed, its pod running: a new sandbox re-runs it with the same mounts.
        assert_eq!(
            plain_init_holds(&[with_init("Running", done())], RES),
            [hold(2)]
        );
        assert_eq!(
            plain_init_holds(&[three_containers(&["init"])], RES),
            [hold(2)]
        );
        // Its pod finished or deleted: nothing, unless it has not completed yet.
        for phase in ["Succeeded", "Failed"] {
            assert!(plain_init_holds(&[with_init(phase, done())], RES).is_empty());
            let running = with_init(phase, json!({"running": {}}));
            assert!(plain_init_holds(&[running], RES).is_empty());
        }
        // With the pod's start and the container's finish known, only keys changed between
        // them are its own.
        let mut timed = with_init(
            "Running",
            json!({"terminated": {"exitCode": 0, "finishedAt": "2026-01-01T00:10:00Z"}}),
        );
        timed.status.as_mut().unwrap().start_time =
            serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
        let at = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let [held] = plain_init_holds(&[timed], RES).try_into().unwrap();
        assert_eq!(
            held.completed_between,
            Some((at(1_767_225_600), at(1_767_226_200)))
        );
        // Times out of order (a clock step): not known, so every matching key is held.
        let mut stepped = with_init(
            "Running",
            json!({"terminated": {"exitCode": 0, "finishedAt": "2025-12-31T23:00:00Z"}}),
        );
        stepped.status.as_mut().unwrap().start_time =
            serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(plain_init_holds(&[stepped], RES), [hold(2)]);
        let deleting = |state| {
            let mut p = with_init("Running", state);
            p.metadata.deletion_timestamp =
                serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
            p
        };
        assert!(plain_init_holds(&[deleting(done())], RES).is_empty());
        assert_eq!(
            plain_init_holds(&[deleting(json!({"running": {}}))], RES),
            [hold(2)]
        );
        let mut unbound = three_containers(&[]);
        unbound.spec.as_mut().unwrap().node_name = None;
        assert!(plain_init_holds(&[unbound], RES).is_empty());
        // Another resource, a sidecar init container: nothing.
        assert!(plain_init_holds(&[three_containers(&[])], "vramslice.io/vram-512mib").is_empty());
        let mut sidecar = three_containers(&[]);
        let inits = sidecar.spec.as_mut().unwrap().init_containers.as_mut();
        inits.unwrap()[0].restart_policy = Some("Always".into());
        assert!(plain_init_holds(&[sidecar], RES).is_empty());
        // Unannotated: any GPU.
        let mut bare = three_containers(&[]);
        bare.metadata.annotations = None;
        let any = InitHold {
            gpus: vec![],
            units: 2,
            completed_between: None,
        };
        assert_eq!(plain_init_holds(&[bare], RES), [any]);
    }

    /// A pod with app containers of 2 + 2 units, a 1-unit sidecar and an 8-unit init container
    /// after it, on GPU-a.
    fn trt(phase: &str, state: serde_json::Value) -> Pod {
        let mut p = with_init(phase, state);
        let inits = p.spec.as_mut().unwrap().init_containers.as_mut().unwrap();
        let sidecar: Container = serde_json::from_value(json!({"name": "proxy", "image": "x", "restartPolicy": "Always", "resources": {"limits": {RES: "1"}}})).unwrap();
        inits.insert(0, sidecar);
        inits[1].resources = serde_json::from_value(json!({"limits": {RES: "8"}})).unwrap();
        p
    }

    #[test]
    fn pods_whose_plain_init_container_may_run_are_read_for_their_limit() {
        let [got] = init_phase_pods(&[trt("Pending", json!({"running": {}}))], RES)
            .try_into()
            .unwrap();
        assert_eq!(
            got,
            InitPhasePod {
                namespace: "default".into(),
                name: "three".into(),
                uid: Some("uid-three".into()),
                annotated_gpus: vec!["GPU-a".into()],
                app: vec![2, 2],
                init: vec![
                    InitUnits {
                        units: 1,
                        sidecar: true
                    },
                    InitUnits {
                        units: 8,
                        sidecar: false
                    }
                ],
            }
        );
        assert_eq!(got.units(), 9);
        // Not started yet, or restarting after an error: still initialising.
        for state in [
            json!({"waiting": {}}),
            json!({"terminated": {"exitCode": 1}}),
        ] {
            assert_eq!(init_phase_pods(&[trt("Pending", state)], RES).len(), 1);
        }
        // Completed, its pod finished, or another resource: not.
        assert!(init_phase_pods(&[trt("Running", done())], RES).is_empty());
        assert!(init_phase_pods(&[trt("Failed", json!({"running": {}}))], RES).is_empty());
        let other = init_phase_pods(&[trt("Pending", json!({}))], "vramslice.io/vram-512mib");
        assert!(other.is_empty());
        // No status yet (the kubelet's status write lags behind the container): initialising.
        let mut no_status = trt("Pending", json!({"running": {}}));
        no_status.status.as_mut().unwrap().init_container_statuses = None;
        assert_eq!(init_phase_pods(&[no_status], RES).len(), 1);
    }
}
