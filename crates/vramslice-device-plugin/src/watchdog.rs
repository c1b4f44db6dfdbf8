//! The watchdog's I/O around `vramslice_core::node::watchdog::evaluate`: reads each allocation's
//! accounting file (self-reported usage), and carries out the decisions — a Kubernetes Event on
//! the pod with the numbers, `vramslice_watchdog_breaches_total{action}` and per-pod gauges,
//! SIGKILL of exactly the offending PIDs (each re-checked through the proc root's cgroup file
//! just before the signal, so a reused PID is never hit), or an eviction through the Eviction API.
//!
//! Called by the publisher once per poll with the report it just built.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use vramslice_core::GpuSelection;
use vramslice_core::container::accounting::{self, ACCOUNTING_FILE_NAME};
use vramslice_core::format_bytes;
use vramslice_core::node::allocation::allocation_key_for_ids;
use vramslice_core::node::publish::{ContainerAllocationRecord, GpuSample, NodeReport};
use vramslice_core::node::watchdog::{
    Breach, PodOnGpu, SelfReport, WatchdogAction, WatchdogEvent, WatchdogPolicy, WatchdogState,
    evaluate, reading_too_old,
};
use vramslice_gpu::procfs::ProcRoot;

use crate::metrics::{Metrics, PodGpuLabels};
use crate::pods::NodePods;

/// Component name on the Events the watchdog writes.
pub const EVENT_COMPONENT: &str = "vramslice-device-plugin";

/// The watchdog's state and what it acts through.
#[derive(Debug)]
pub struct Watchdog {
    policy: WatchdogPolicy,
    state: WatchdogState,
    epoch: Instant,
    proc_root: ProcRoot,
    accounting_root: PathBuf,
    metrics: Metrics,
    kube: Option<NodePods>,
    /// Accounting files already reported unreadable (logged once each).
    bad_files: BTreeSet<PathBuf>,
    /// Pods already reported untrusted (logged once per episode).
    untrusted: BTreeSet<PodOnGpu>,
    /// Whether the last reading was too old to judge by (logged once per episode).
    stale: bool,
}

impl Watchdog {
    /// A watchdog with no history.
    pub fn new(
        policy: WatchdogPolicy,
        proc_root: ProcRoot,
        accounting_root: PathBuf,
        metrics: Metrics,
        kube: Option<NodePods>,
    ) -> Self {
        Watchdog {
            policy,
            state: WatchdogState::default(),
            epoch: Instant::now(),
            proc_root,
            accounting_root,
            metrics,
            kube,
            bad_files: BTreeSet::new(),
            untrusted: BTreeSet::new(),
            stale: false,
        }
    }

    /// Reads what each pod's accounting files say it uses, per GPU. A one-GPU allocation has one
    /// accounting file; one holding equal shares of several GPUs has the guard's per-GPU files
    /// (`gpu_accounting_file_name`), each read for its GPU. Unreadable or damaged files are
    /// logged (once) and left out; they never stop the plugin.
    fn self_reported(&mut self, records: &[ContainerAllocationRecord]) -> BTreeMap<PodOnGpu, u64> {
        let mut out: BTreeMap<PodOnGpu, u64> = BTreeMap::new();
        for record in records {
            let Some(uid) = &record.pod_uid else { continue };
            let (Ok(key), Ok(selections)) = (
                allocation_key_for_ids(&record.device_ids),
                GpuSelection::spanning(&record.device_ids),
            ) else {
                continue;
            };
            let dir = self.accounting_root.join(key);
            let files: Vec<(String, std::path::PathBuf)> = match selections.as_slice() {
                [one] => vec![(one.gpu_uuid.clone(), dir.join(ACCOUNTING_FILE_NAME))],
                several => several
                    .iter()
                    .map(|s| {
                        let name = accounting::gpu_accounting_file_name(&s.gpu_uuid);
                        (s.gpu_uuid.clone(), dir.join(name))
                    })
                    .collect(),
            };
            for (gpu_uuid, path) in files {
                let Some(used) = self.read_accounting(&path, record) else {
                    continue;
                };
                let entry = out
                    .entry(PodOnGpu {
                        gpu_uuid,
                        pod_uid: uid.clone(),
                    })
                    .or_default();
                *entry = entry.saturating_add(used);
            }
        }
        out
    }

    /// The bytes one accounting file says are used; `None` (logged once) when it is missing,
    /// unreadable or damaged.
    fn read_accounting(
        &mut self,
        path: &std::path::Path,
        record: &ContainerAllocationRecord,
    ) -> Option<u64> {
        let limit = accounting::file_len(accounting::MAX_SLOT_COUNT) as u64;
        let mut bytes = Vec::new();
        // The directory is writable from the container: a link or a FIFO planted in place of
        // the file must not make this (root, on the host) follow it or block on it.
        use std::os::unix::fs::OpenOptionsExt;
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
            .and_then(|f| f.take(limit).read_to_end(&mut bytes).map(|_| ()));
        match read {
            Ok(()) => match accounting::parse(&bytes) {
                Ok(snapshot) => {
                    self.bad_files.remove(path);
                    Some(snapshot.used_bytes)
                }
                Err(e) => {
                    if self.bad_files.insert(path.to_path_buf()) {
                        tracing::warn!(file = %path.display(), pod = %record.pod, namespace = %record.namespace, error = %e, "accounting file is damaged; its self-reported usage is ignored");
                    }
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                if self.bad_files.insert(path.to_path_buf()) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read accounting file");
                }
                None
            }
        }
    }

    /// One evaluation: decide, then act. Returns the self-report comparison per pod and GPU.
    pub async fn observe(
        &mut self,
        report: &NodeReport,
        samples: &[GpuSample],
        records: &[ContainerAllocationRecord],
        reading_age: Duration,
    ) -> BTreeMap<PodOnGpu, SelfReport> {
        let self_reported = self.self_reported(records);
        let now = self.epoch.elapsed();
        let stale = reading_too_old(&self.policy, reading_age);
        if stale != self.stale {
            self.stale = stale;
            if stale {
                tracing::warn!(age = ?reading_age, "the last GPU reading is too old to judge pods by (the backend's reads fail or hang): no watchdog action until a fresh one");
            } else {
                tracing::info!("fresh GPU readings again: the watchdog judges pods");
            }
        }
        // A frozen reading's process lists count as unreadable: no time over, no action.
        let unreadable: Vec<GpuSample>;
        let samples = if stale {
            unreadable = samples
                .iter()
                .map(|s| GpuSample {
                    processes: None,
                    ..s.clone()
                })
                .collect();
            &unreadable[..]
        } else {
            samples
        };
        let verdict = evaluate(
            &self.policy,
            &self.state,
            now,
            report,
            samples,
            &self_reported,
        );
        self.state = verdict.state;
        self.observe_gauges(report, &verdict.self_reports);
        for (key, s) in &verdict.self_reports {
            if !s.trusted && self.untrusted.insert(key.clone()) {
                tracing::warn!(gpu = %key.gpu_uuid, pod_uid = %key.pod_uid, self_reported = s.self_reported_bytes, measured = s.measured_bytes, tolerance = self.policy.tolerance_bytes, "a pod's self-reported GPU memory disagrees with NVML: untrusted (tampered accounting file or a process outside the guard)");
            } else if s.trusted {
                self.untrusted.remove(key);
            }
        }
        for event in verdict.events {
            self.apply(event).await;
        }
        verdict.self_reports
    }

    fn observe_gauges(&self, report: &NodeReport, self_reports: &BTreeMap<PodOnGpu, SelfReport>) {
        let mut series = Vec::new();
        for gpu in &report.gpus {
            for pod in &gpu.pods {
                let labels = PodGpuLabels {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    gpu: gpu.uuid.clone(),
                };
                let trusted = pod.uid.as_ref().and_then(|uid| {
                    self_reports
                        .get(&PodOnGpu {
                            gpu_uuid: gpu.uuid.clone(),
                            pod_uid: uid.clone(),
                        })
                        .map(|s| s.trusted)
                });
                series.push((labels, pod.used_bytes, pod.limit_bytes, trusted));
            }
        }
        self.metrics.observe_pods(&series);
    }

    async fn apply(&self, event: WatchdogEvent) {
        match event {
            WatchdogEvent::BreachStarted(b) => {
                tracing::warn!(namespace = %b.target.namespace, pod = %b.target.name, gpu = %b.target.key.gpu_uuid, used = b.used_bytes, limit = b.limit_bytes, tolerance = b.tolerance_bytes, pids = ?pids(&b), action = %self.policy.action, grace = ?self.policy.grace, "pod over its GPU memory limit");
                let message = format!(
                    "{} (action {} after {})",
                    numbers(&b),
                    self.policy.action,
                    vramslice_core::format_duration(self.policy.grace)
                );
                self.event(&b, "VramLimitExceeded", message).await;
            }
            WatchdogEvent::Act { action, breach } => {
                self.metrics.watchdog_breach(action.as_str());
                match action {
                    WatchdogAction::Report => {
                        let message = format!(
                            "{}; still over after {} (action: report only)",
                            numbers(&breach),
                            vramslice_core::format_duration(breach.over_for)
                        );
                        tracing::warn!(namespace = %breach.target.namespace, pod = %breach.target.name, used = breach.used_bytes, limit = breach.limit_bytes, "pod still over its GPU memory limit after the grace period");
                        self.event(&breach, "VramLimitStillExceeded", message).await;
                    }
                    WatchdogAction::KillProcess => self.kill(&breach).await,
                    WatchdogAction::EvictPod => self.evict(&breach).await,
                }
            }
            WatchdogEvent::BreachEnded { key, used_bytes } => {
                tracing::info!(gpu = %key.gpu_uuid, pod_uid = %key.pod_uid, used = used_bytes, "pod back within its GPU memory limit");
            }
            WatchdogEvent::ProcessWithoutPod {
                gpu_uuid,
                pid,
                used_bytes,
            } => {
                tracing::warn!(gpu = %gpu_uuid, pid, used = used_bytes, "GPU process belongs to no pod holding units of this GPU (counted against live free memory)");
            }
        }
    }

    async fn kill(&self, breach: &Breach) {
        let mut killed = Vec::new();
        for &(pid, bytes) in &breach.processes {
            // Re-check right before the signal: the PID must still be in the offending pod (or
            // one sharing its limit).
            let owner = self.proc_root.pod_of(pid);
            if !owner
                .as_ref()
                .is_some_and(|o| breach.target.judges(&o.pod_uid))
            {
                tracing::warn!(pid, pod = %breach.target.name, "not killing: the PID is no longer in the offending pod");
                continue;
            }
            if !self.proc_root.signals_reach(pid) {
                tracing::error!(pid, pod = %breach.target.name, proc_root = %self.proc_root.path().display(), "not killing: procRoot is not this plugin's PID namespace, so the signal would reach another process by that number (kill-process needs the host's PIDs here: hostPID with procRoot /proc)");
                continue;
            }
            let result = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .ok_or_else(|| std::io::Error::other("not a valid PID"))
                .and_then(|p| {
                    rustix::process::kill_process(p, rustix::process::Signal::KILL)
                        .map_err(std::io::Error::from)
                });
            match result {
                Ok(()) => {
                    tracing::warn!(pid, bytes, namespace = %breach.target.namespace, pod = %breach.target.name, "killed GPU process over its pod's limit (SIGKILL)");
                    killed.push(pid);
                }
                Err(e) => {
                    tracing::error!(pid, error = %e, pod = %breach.target.name, "cannot kill GPU process");
                }
            }
        }
        let message = format!(
            "{}; killed PIDs {:?} (SIGKILL) after {}",
            numbers(breach),
            killed,
            vramslice_core::format_duration(breach.over_for)
        );
        self.event(breach, "VramWatchdogKilledProcess", message)
            .await;
    }

    async fn evict(&self, breach: &Breach) {
        let Some(lister) = &self.kube else {
            tracing::error!(pod = %breach.target.name, "cannot evict: no API access");
            return;
        };
        let api: Api<Pod> = Api::namespaced(lister.client().clone(), &breach.target.namespace);
        // policy/v1 Eviction, written out: kube's `evict` sends no apiVersion/kind. The UID
        // precondition makes the API server refuse it (409) when the name now belongs to
        // another pod (a StatefulSet's replacement), which has breached nothing.
        let body = serde_json::json!({
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": breach.target.name, "namespace": breach.target.namespace},
            "deleteOptions": {"preconditions": {"uid": breach.target.key.pod_uid}},
        });
        let result = tokio::time::timeout(
            crate::publisher::API_CALL_TIMEOUT,
            api.create_subresource::<_, serde_json::Value>(
                "eviction",
                &breach.target.name,
                &PostParams::default(),
                &body,
            ),
        )
        .await
        .map_err(|_| "no answer in time".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match result {
            Ok(_) => {
                tracing::warn!(namespace = %breach.target.namespace, pod = %breach.target.name, "evicted pod over its GPU memory limit");
                let message = format!("{}; evicted", numbers(breach));
                self.event(breach, "VramWatchdogEvictedPod", message).await;
            }
            Err(e) => {
                tracing::error!(namespace = %breach.target.namespace, pod = %breach.target.name, error = %e, "eviction failed (a PodDisruptionBudget may forbid it, or the name now belongs to another pod); retried after the grace period");
            }
        }
    }

    /// A Warning Event on the pod (core v1, as `kubectl describe pod` shows them).
    async fn event(&self, breach: &Breach, reason: &str, message: String) {
        let Some(lister) = &self.kube else { return };
        let now = k8s_openapi::jiff::Timestamp::now();
        let t = &breach.target;
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    t.name,
                    now.as_nanosecond().unsigned_abs()
                )),
                namespace: Some(t.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(t.name.clone()),
                namespace: Some(t.namespace.clone()),
                uid: Some(t.key.pod_uid.clone()),
                ..Default::default()
            },
            reason: Some(reason.to_string()),
            message: Some(message),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            source: Some(EventSource {
                component: Some(EVENT_COMPONENT.into()),
                host: Some(lister.node().to_string()),
            }),
            reporting_component: Some(EVENT_COMPONENT.into()),
            reporting_instance: Some(lister.node().to_string()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(lister.client().clone(), &t.namespace);
        if let Err(e) = tokio::time::timeout(
            Duration::from_secs(5),
            api.create(&PostParams::default(), &event),
        )
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(error = %e, reason, pod = %t.name, "cannot write the watchdog's Event");
        }
    }
}

fn pids(b: &Breach) -> Vec<u32> {
    b.processes.iter().map(|(p, _)| *p).collect()
}

/// The numbers every watchdog Event carries.
fn numbers(b: &Breach) -> String {
    format!(
        "GPU memory {} ({} bytes) is over the limit {} ({} bytes) + tolerance {} on GPU {} (index {}); processes {:?}",
        format_bytes(b.used_bytes),
        b.used_bytes,
        format_bytes(b.limit_bytes),
        b.limit_bytes,
        format_bytes(b.tolerance_bytes),
        b.target.key.gpu_uuid,
        b.target.gpu_index,
        pids(b)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vramslice_core::container::accounting::{gpu_accounting_file_name, header, initial_image};

    const GIB: u64 = 1 << 30;

    /// A report-only watchdog with no tolerance and the `grace` given, over `root` (its
    /// accounting files; `root/proc` its proc root), polled every 500 ms.
    fn reporting(root: &std::path::Path, grace: Duration) -> Watchdog {
        Watchdog::new(
            WatchdogPolicy {
                tolerance_bytes: 0,
                grace,
                action: WatchdogAction::Report,
                poll_interval: Duration::from_millis(500),
            },
            ProcRoot::new(root.join("proc")),
            root.to_path_buf(),
            Metrics::new(),
            None,
        )
    }

    fn image(limit: u64, gpu: &str, used: u64) -> Vec<u8> {
        let mut image = initial_image(limit, gpu, 4);
        let at = header::USED * 8;
        image[at..at + 8].copy_from_slice(&used.to_le_bytes());
        image
    }

    /// A container holding equal shares of two GPUs has the guard's file per GPU: each is read
    /// for its own GPU, and a damaged one loses that GPU's self-report only. A one-GPU
    /// container's single file counts for its GPU.
    #[test]
    fn self_reports_are_read_per_gpu_for_a_spanning_container() {
        let root = tempfile::tempdir().unwrap();
        let mut watchdog = reporting(root.path(), Duration::from_secs(30));
        let record = |pod: &str, uid: &str, ids: &[&str]| ContainerAllocationRecord {
            namespace: "ml".into(),
            pod: pod.into(),
            pod_uid: Some(uid.into()),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        let spanning = record(
            "tp",
            "uid-tp",
            &["GPU-a::0", "GPU-a::1", "GPU-b::0", "GPU-b::1"],
        );
        let single = record("one", "uid-one", &["GPU-a::5"]);
        let dir = |r: &ContainerAllocationRecord| {
            let d = root
                .path()
                .join(allocation_key_for_ids(&r.device_ids).unwrap());
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let tp = dir(&spanning);
        std::fs::write(
            tp.join(gpu_accounting_file_name("GPU-a")),
            image(2 * GIB, "GPU-a", GIB),
        )
        .unwrap();
        std::fs::write(
            tp.join(gpu_accounting_file_name("GPU-b")),
            image(2 * GIB, "GPU-b", GIB / 2),
        )
        .unwrap();
        std::fs::write(
            dir(&single).join(ACCOUNTING_FILE_NAME),
            image(GIB, "GPU-a", GIB / 4),
        )
        .unwrap();
        let key = |gpu: &str, uid: &str| PodOnGpu {
            gpu_uuid: gpu.into(),
            pod_uid: uid.into(),
        };
        let records = [spanning.clone(), single.clone()];
        let read = watchdog.self_reported(&records);
        assert_eq!(
            read,
            BTreeMap::from([
                (key("GPU-a", "uid-one"), GIB / 4),
                (key("GPU-a", "uid-tp"), GIB),
                (key("GPU-b", "uid-tp"), GIB / 2),
            ])
        );
        // GPU-b's file damaged: only GPU-b's self-report of the spanning pod goes.
        std::fs::write(tp.join(gpu_accounting_file_name("GPU-b")), b"garbage").unwrap();
        let read = watchdog.self_reported(&records);
        assert_eq!(
            read.keys().cloned().collect::<Vec<_>>(),
            [key("GPU-a", "uid-one"), key("GPU-a", "uid-tp")]
        );
        assert_eq!(read[&key("GPU-a", "uid-tp")], GIB);
    }

    /// A reading too old to trust (the backend's reads failing or hung) is judged as
    /// unreadable: a pod over its limit in it starts no breach and draws no action.
    #[tokio::test]
    async fn a_reading_too_old_to_trust_is_not_judged() {
        use vramslice_core::VramUnit;
        use vramslice_core::node::publish::build_report;
        use vramslice_core::node::sample::{Health, ProcessSample};
        let root = tempfile::tempdir().unwrap();
        let mut watchdog = reporting(root.path(), Duration::ZERO);
        let samples = [GpuSample {
            index: 0,
            uuid: "GPU-a".into(),
            model: "m".into(),
            total_bytes: 80 * GIB,
            used_bytes: 3 * GIB,
            free_bytes: 77 * GIB,
            health: Health::Healthy,
            processes: Some(vec![ProcessSample {
                pid: 42,
                used_bytes: Some(3 * GIB),
                pod_uid: Some("uid-greedy".into()),
            }]),
        }];
        let records = [ContainerAllocationRecord {
            namespace: "ml".into(),
            pod: "greedy".into(),
            pod_uid: Some("uid-greedy".into()),
            device_ids: vec!["GPU-a::0".into()],
        }];
        let report = build_report(VramUnit::Gib1, &samples, &records);
        watchdog
            .observe(&report, &samples, &records, Duration::from_secs(6))
            .await;
        assert_eq!(watchdog.state.in_breach().count(), 0, "stale: not judged");
        assert!(watchdog.stale);
        watchdog
            .observe(&report, &samples, &records, Duration::from_secs(1))
            .await;
        assert_eq!(
            watchdog.state.in_breach().count(),
            1,
            "fresh: 3 GiB over 1 GiB"
        );
        assert!(!watchdog.stale);
    }
}
