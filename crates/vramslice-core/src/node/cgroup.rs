//! Which pod (and container) a process belongs to, read from the text of its `/proc/<pid>/cgroup`.
//!
//! Data enters as the file's text and leaves as an optional [`PodCgroup`]; reading the file is the
//! caller's job (`vramslice-gpu`'s `procfs` module). Both cgroup v1 (`12:memory:/kubepods/...`) and
//! v2 (`0::/kubepods.slice/...`) are understood, with either kubelet cgroup driver:
//!
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<container-id>`, `/kubepods/pod<uid>/<container-id>`
//!   (the container segment may also carry a runtime prefix such as `crio-<id>`);
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//!   (also `docker-<id>.scope`, `crio-<id>.scope`, a `kubelet-kubepods` root as kind uses, and
//!   paths seen through a cgroup namespace such as `/../../kubepods-pod<uid>.slice/...`).
//!
//! A process outside every pod cgroup (a host daemon, a shell in `user.slice`) yields `None`.

/// The pod, and when known the container, a process's cgroup places it in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodCgroup {
    /// The pod's UID as the API server writes it (dashes, never the systemd underscores).
    pub pod_uid: String,
    /// The container runtime's ID of the container (hex, runtime prefix and `.scope` removed),
    /// or `None` when the process sits in the pod-level cgroup itself (or in a runtime monitor
    /// such as CRI-O's `conmon`).
    pub container_id: Option<String>,
}

/// Runtime prefixes of a container's cgroup segment, longest first so that `cri-containerd-`
/// wins over `containerd-`.
const RUNTIME_PREFIXES: [&str; 5] = [
    "cri-containerd-",
    "cri-dockerd-",
    "containerd-",
    "docker-",
    "crio-",
];

/// Parse the whole text of a `/proc/<pid>/cgroup` file.
///
/// Every line is looked at (cgroup v1 has one line per hierarchy, v2 one `0::` line, hybrid
/// setups both); the first line that places the process in a container of a pod wins, otherwise
/// the first line that places it in a pod at all. Lines that are not `id:controllers:path` are
/// ignored.
pub fn parse_proc_cgroup(text: &str) -> Option<PodCgroup> {
    let mut pod_only = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(_controllers), Some(path)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        match parse_cgroup_path(path.trim_end()) {
            Some(found) if found.container_id.is_some() => return Some(found),
            Some(found) if pod_only.is_none() => pod_only = Some(found),
            _ => {}
        }
    }
    pod_only
}

/// Parse one cgroup path (the third field of a `/proc/<pid>/cgroup` line).
pub fn parse_cgroup_path(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, segment) in segments.iter().enumerate() {
        let ancestors = &segments[..i];
        let uid = systemd_pod_uid(segment).or_else(|| cgroupfs_pod_uid(segment, ancestors));
        if let Some(pod_uid) = uid {
            let container_id = segments.get(i + 1).and_then(|s| container_id(s));
            return Some(PodCgroup {
                pod_uid,
                container_id,
            });
        }
    }
    None
}

/// `kubepods-burstable-pod0f0e..._..._.slice` → the UID with dashes.
fn systemd_pod_uid(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".slice")?;
    let (prefix, uid) = stem.rsplit_once("-pod")?;
    if !prefix.contains("kubepods") {
        return None;
    }
    let uid = uid.replace('_', "-");
    valid_pod_uid(&uid).then_some(uid)
}

/// `pod0f0e...` under a `kubepods` ancestor (or under a namespaced `/..` root) → the UID.
fn cgroupfs_pod_uid(segment: &str, ancestors: &[&str]) -> Option<String> {
    let uid = segment.strip_prefix("pod")?;
    let under_kubepods = ancestors.iter().any(|a| a.contains("kubepods"));
    let namespaced = ancestors.first() == Some(&"..");
    if !(under_kubepods || namespaced) || !valid_pod_uid(uid) {
        return None;
    }
    Some(uid.to_string())
}

/// A pod UID: a UUID from the API server, or the 32-hex hash kubelet gives static pods.
fn valid_pod_uid(uid: &str) -> bool {
    (8..=64).contains(&uid.len())
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().any(|b| b.is_ascii_hexdigit())
}

/// The container ID in the segment below the pod's, if the segment names a container.
fn container_id(segment: &str) -> Option<String> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    if stem.starts_with("crio-conmon-") {
        return None;
    }
    let id = RUNTIME_PREFIXES
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .unwrap_or(stem);
    let plausible = (12..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UID: &str = "0f0e1d2c-3b4a-5968-7786-95a4b3c2d1e0";
    const UID_: &str = "0f0e1d2c_3b4a_5968_7786_95a4b3c2d1e0";
    const CID: &str = "4b1f8c2e9d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

    fn pod(container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: UID.to_string(),
            container_id: container.map(str::to_string),
        })
    }

    #[test]
    fn cgroup_v2_systemd_containerd_burstable() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn cgroup_v2_systemd_guaranteed_and_besteffort() {
        let guaranteed =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(parse_proc_cgroup(&guaranteed), pod(Some(CID)));
        let besteffort = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
        );
        assert_eq!(parse_proc_cgroup(&besteffort), pod(Some(CID)));
    }

    #[test]
    fn systemd_docker_scope() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn kind_kubelet_slice_root() {
        let text = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn cgroup_namespace_relative_paths() {
        let systemd =
            format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope");
        assert_eq!(parse_proc_cgroup(&systemd), pod(Some(CID)));
        let cgroupfs = format!("0::/../../pod{UID}/{CID}");
        assert_eq!(parse_proc_cgroup(&cgroupfs), pod(Some(CID)));
    }

    #[test]
    fn cgroup_v1_cgroupfs_full_file() {
        let text = format!(
            "12:hugetlb:/kubepods/burstable/pod{UID}/{CID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{CID}\n\
             10:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n\
             9:devices:/kubepods/burstable/pod{UID}/{CID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n\
             0::/\n"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn cgroup_v1_guaranteed_pod_without_qos_segment() {
        let text = format!("4:memory:/kubepods/pod{UID}/{CID}\n");
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn cgroup_v1_systemd_driver() {
        let text = format!(
            "11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope\n"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn cgroupfs_crio_prefixed_container() {
        let text = format!("0::/kubepods/besteffort/pod{UID}/crio-{CID}");
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn docker_in_docker_prefix() {
        let text = format!("7:memory:/docker/{CID}/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn pod_level_cgroup_has_no_container() {
        assert_eq!(
            parse_proc_cgroup(&format!("0::/kubepods/burstable/pod{UID}\n")),
            pod(None)
        );
        assert_eq!(
            parse_proc_cgroup(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
            )),
            pod(None)
        );
    }

    #[test]
    fn crio_conmon_is_the_pod_not_a_container() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(None));
    }

    #[test]
    fn hybrid_prefers_the_line_naming_a_container() {
        let text = format!(
            "1:name=systemd:/kubepods/burstable/pod{UID}\n0::/kubepods/burstable/pod{UID}/{CID}\n"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn nested_cgroup_below_the_container_keeps_the_container() {
        let text = format!("0::/kubepods/burstable/pod{UID}/{CID}/init.scope");
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn static_pod_hash_uid() {
        let hash = "e3b0c44298fc1c149afbf4c8996fb924";
        let text = format!("0::/kubepods/burstable/pod{hash}/{CID}");
        assert_eq!(
            parse_proc_cgroup(&text),
            Some(PodCgroup {
                pod_uid: hash.to_string(),
                container_id: Some(CID.to_string()),
            })
        );
    }

    #[test]
    fn host_processes_are_not_pods() {
        for text in [
            "0::/init.scope\n",
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "12:memory:/user.slice\n1:name=systemd:/user.slice/user-0.slice/session-1.scope\n",
            "0::/system.slice/docker-4b1f8c2e9d7a.scope\n",
            "0::/kubepods\n",
            "0::/kubepods.slice/kubepods-burstable.slice\n",
            "0::/\n",
            "",
        ] {
            assert_eq!(parse_proc_cgroup(text), None, "{text:?}");
        }
    }

    #[test]
    fn pod_segment_outside_kubepods_is_ignored() {
        let text = format!("0::/system.slice/pod{UID}/{CID}");
        assert_eq!(parse_proc_cgroup(&text), None);
        let text = format!("0::/machine.slice/libpod-pod{UID_}.slice");
        assert_eq!(parse_proc_cgroup(&text), None);
    }

    #[test]
    fn malformed_lines_and_uids_are_ignored() {
        for text in [
            "garbage without colons",
            "0:/kubepods/pod0f0e",
            "0::/kubepods/podnot-a-uid/abc",
            "0::/kubepods/pod/abc",
            "0::/kubepods.slice/kubepods-pod.slice",
            "0::/kubepods.slice/kubepods-pod___.slice",
        ] {
            assert_eq!(parse_proc_cgroup(text), None, "{text:?}");
        }
    }

    #[test]
    fn implausible_container_segment_gives_pod_only() {
        let text = format!("0::/kubepods/burstable/pod{UID}/not-a-container");
        assert_eq!(parse_proc_cgroup(&text), pod(None));
    }

    #[test]
    fn crlf_and_trailing_space_tolerated() {
        let text = format!("0::/kubepods/burstable/pod{UID}/{CID}  \r\n");
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    #[test]
    fn uppercase_container_id_is_lowercased() {
        let text = format!("0::/kubepods/pod{UID}/{}", CID.to_ascii_uppercase());
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    fn uid_strategy() -> impl Strategy<Value = String> {
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    }

    proptest! {
        #[test]
        fn never_panics(text in any::<String>()) {
            let _ = parse_proc_cgroup(&text);
        }

        #[test]
        fn never_panics_on_cgroup_shaped_text(
            text in "([0-9]{1,2}:[a-z=,]{0,12}:(/[a-z0-9_.-]{0,20}){0,6}\n){0,5}"
        ) {
            let _ = parse_proc_cgroup(&text);
        }

        #[test]
        fn systemd_form_round_trips(
            uid in uid_strategy(),
            cid in "[0-9a-f]{64}",
            qos in prop::sample::select(vec!["", "burstable-", "besteffort-"]),
            runtime in prop::sample::select(vec!["cri-containerd-", "docker-", "crio-"]),
        ) {
            let qos_slice = if qos.is_empty() {
                String::new()
            } else {
                format!("/kubepods-{}.slice", qos.trim_end_matches('-'))
            };
            let text = format!(
                "0::/kubepods.slice{qos_slice}/kubepods-{qos}pod{}.slice/{runtime}{cid}.scope\n",
                uid.replace('-', "_")
            );
            prop_assert_eq!(
                parse_proc_cgroup(&text),
                Some(PodCgroup { pod_uid: uid, container_id: Some(cid) })
            );
        }

        #[test]
        fn cgroupfs_form_round_trips(
            uid in uid_strategy(),
            cid in "[0-9a-f]{64}",
            qos in prop::sample::select(vec!["", "burstable/", "besteffort/"]),
            hierarchy in 1u32..14,
        ) {
            let text = format!("{hierarchy}:memory:/kubepods/{qos}pod{uid}/{cid}\n");
            prop_assert_eq!(
                parse_proc_cgroup(&text),
                Some(PodCgroup { pod_uid: uid, container_id: Some(cid) })
            );
        }
    }
}
