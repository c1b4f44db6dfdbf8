//! Mapping host PIDs (as NVML reports them) to pods, by reading `/proc/<pid>/cgroup` under a
//! configurable proc root and parsing it with [`vramslice_core::node::cgroup`].
//!
//! The device plugin usually sees the host's processes through a hostPath mount (for example
//! `/host/proc`) or `hostPID`; tests point the root at a temporary directory holding fake
//! `<pid>/cgroup` files.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use vramslice_core::node::cgroup::{PodCgroup, parse_proc_cgroup};

use crate::GpuSample;

/// The default proc root.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// A `/proc`-shaped directory to look processes up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcRoot {
    root: PathBuf,
}

impl Default for ProcRoot {
    fn default() -> Self {
        ProcRoot::new(DEFAULT_PROC_ROOT)
    }
}

impl ProcRoot {
    /// A proc root at `root` (`/proc`, `/host/proc`, or a test's temporary directory).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcRoot { root: root.into() }
    }

    /// The directory this root reads.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The pod (and container) the process `pid` belongs to. `None` when the process is not in
    /// a pod, has exited, or its cgroup file cannot be read (the last is logged at debug level;
    /// a vanished PID is a normal race with the reading, not an error).
    pub fn pod_of(&self, pid: u32) -> Option<PodCgroup> {
        let file = self.root.join(pid.to_string()).join("cgroup");
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_proc_cgroup(&text),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                tracing::debug!(pid, file = %file.display(), error = %e, "cannot read process cgroup");
                None
            }
        }
    }

    /// The start time of process `pid` (clock ticks since boot, `<root>/<pid>/stat` field 22),
    /// when its stat file can be read.
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        let text = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        vramslice_core::container::accounting::parse_proc_stat(&text).map(|(start, _)| start)
    }

    /// Whether a signal this process sends to `pid` reaches the process `<root>/<pid>` describes.
    /// A signal goes to the PID in this process's own PID namespace; a root that is another
    /// namespace's proc (`/host/proc` without `hostPID`) names another process by the same
    /// number. The root `/proc` is this namespace's; any other must show the same start time
    /// for `pid` as `/proc` does (when either cannot be read, it cannot be told: no).
    pub fn signals_reach(&self, pid: u32) -> bool {
        if self.root == Path::new(DEFAULT_PROC_ROOT) {
            return true;
        }
        match (self.start_time(pid), ProcRoot::default().start_time(pid)) {
            (Some(there), Some(here)) => there == here,
            _ => false,
        }
    }

    /// Fill [`crate::ProcessSample::pod_uid`] of every process the backend left unattributed, by
    /// its cgroup. Processes that already name a pod are left alone. Returns how many processes
    /// were newly attributed.
    pub fn fill_pod_uids(&self, readings: &mut [GpuSample]) -> usize {
        let mut filled = 0;
        for process in readings
            .iter_mut()
            .flat_map(|r| r.processes.iter_mut().flatten())
            .filter(|p| p.pod_uid.is_none())
        {
            if let Some(pod) = self.pod_of(process.pid) {
                process.pod_uid = Some(pod.pod_uid);
                filled += 1;
            }
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Health, ProcessSample};

    const UID: &str = "0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0";
    const CID: &str = "4b1f8c2e9d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

    fn write_cgroup(root: &Path, pid: u32, text: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup"), text).unwrap();
    }

    #[test]
    fn a_signal_reaches_a_process_only_when_the_root_is_this_pid_namespace() {
        let me = std::process::id();
        let tmp = tempfile::tempdir().unwrap();
        let root = ProcRoot::new(tmp.path());
        assert!(!root.signals_reach(me), "no stat file: it cannot be told");
        let own = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        let dir = tmp.path().join(me.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), &own).unwrap();
        assert!(root.signals_reach(me), "the same process here and there");
        let start = root.start_time(me).unwrap();
        let (name, fields) = own.split_at(own.rfind(')').unwrap() + 1);
        let mut fields: Vec<String> = fields.split_whitespace().map(String::from).collect();
        fields[19] = (start + 1).to_string(); // field 22: fields[0] is field 3
        let other = format!("{name} {}\n", fields.join(" "));
        std::fs::write(dir.join("stat"), other).unwrap();
        assert_eq!(root.start_time(me), Some(start + 1));
        assert!(!root.signals_reach(me), "another process by that number");
        assert!(ProcRoot::default().signals_reach(me));
    }

    fn reading(processes: Vec<ProcessSample>) -> GpuSample {
        GpuSample {
            index: 0,
            uuid: "GPU-a".into(),
            model: "m".into(),
            total_bytes: 100,
            used_bytes: 10,
            free_bytes: 90,
            health: Health::Healthy,
            processes: Some(processes),
        }
    }

    fn process(pid: u32, pod_uid: Option<&str>) -> ProcessSample {
        ProcessSample {
            pid,
            used_bytes: Some(1),
            pod_uid: pod_uid.map(str::to_string),
        }
    }

    #[test]
    fn pod_of_reads_the_cgroup_file() {
        let dir = tempfile::tempdir().unwrap();
        write_cgroup(
            dir.path(),
            4242,
            &format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
                UID.replace('-', "_")
            ),
        );
        let root = ProcRoot::new(dir.path());
        assert_eq!(
            root.pod_of(4242),
            Some(PodCgroup {
                pod_uid: UID.into(),
                container_id: Some(CID.into())
            })
        );
    }

    #[test]
    fn vanished_and_host_processes_are_none() {
        let dir = tempfile::tempdir().unwrap();
        write_cgroup(dir.path(), 1, "0::/init.scope\n");
        let root = ProcRoot::new(dir.path());
        assert_eq!(root.pod_of(1), None);
        assert_eq!(root.pod_of(999_999), None);
    }

    #[test]
    fn unreadable_cgroup_is_none() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails with something other than NotFound.
        std::fs::create_dir_all(dir.path().join("7").join("cgroup")).unwrap();
        assert_eq!(ProcRoot::new(dir.path()).pod_of(7), None);
    }

    #[test]
    fn fill_pod_uids_only_fills_unattributed_processes() {
        let dir = tempfile::tempdir().unwrap();
        write_cgroup(dir.path(), 10, &format!("0::/kubepods/pod{UID}/{CID}\n"));
        write_cgroup(dir.path(), 11, &format!("0::/kubepods/pod{UID}/{CID}\n"));
        write_cgroup(dir.path(), 12, "0::/system.slice/foo.service\n");
        let mut readings = vec![
            reading(vec![process(10, None), process(11, Some("kept"))]),
            reading(vec![process(12, None), process(13, None)]),
        ];
        let filled = ProcRoot::new(dir.path()).fill_pod_uids(&mut readings);
        assert_eq!(filled, 1);
        assert_eq!(
            readings[0].listed_processes()[0].pod_uid.as_deref(),
            Some(UID)
        );
        assert_eq!(
            readings[0].listed_processes()[1].pod_uid.as_deref(),
            Some("kept")
        );
        assert_eq!(readings[1].listed_processes()[0].pod_uid, None);
        assert_eq!(readings[1].listed_processes()[1].pod_uid, None);
    }

    #[test]
    fn real_proc_root_maps_our_own_process_without_error() {
        // This test process is (in CI) not in a pod, or (in a cluster) in one; either way the
        // real /proc is readable and the answer is consistent with parsing the file ourselves.
        let pid = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert_eq!(ProcRoot::default().pod_of(pid), parse_proc_cgroup(&text));
    }
}
