//! Deletes the accounting directories and limit files of allocations the kubelet no longer
//! holds: the I/O around `vramslice_core::node::sweep` (which decides, and documents the rule).
//!
//! Called by the publisher after each poll whose PodResources answer was fresh; never with a
//! stale or failed answer, so a kubelet that cannot be reached deletes nothing. With the node's
//! pods (a kube client), also never before their cache is synced: keys a plain init container of
//! a pod that may still run holds count as live, and PodResources alone cannot tell them; and
//! never while the kubelet's record misses a pod the API server shows running with VRAM (a
//! kubelet restarted without the API server lists no pods while their containers run on).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use vramslice_core::node::allocation::{LIMIT_FILE_HOST_SUFFIX, allocation_key_for_ids};
use vramslice_core::node::publish::ContainerAllocationRecord;
use vramslice_core::node::sweep::{InitHold, SweepState, entry_key, init_held_keys, sweep};

/// The sweeper's settings and memory.
#[derive(Debug)]
pub struct Sweeper {
    root: PathBuf,
    after: Duration,
    state: SweepState,
    epoch: Instant,
    /// Whether the last sweep was held back ([`Sweeper::hold`]), so that it is logged once.
    held: bool,
}

impl Sweeper {
    /// Sweep `root`, deleting what has been gone from the kubelet's record for `after`.
    pub fn new(root: PathBuf, after: Duration) -> Self {
        Sweeper {
            root,
            after,
            state: SweepState::default(),
            epoch: Instant::now(),
            held: false,
        }
    }

    /// No sweep this time: the kubelet's record misses running pods (`unlisted`, namespace and
    /// name), so what it lacks may be in use. Logged when it starts.
    pub fn hold(&mut self, unlisted: &[&(String, String)]) {
        if !self.held {
            let pods: Vec<String> = unlisted
                .iter()
                .take(5)
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect();
            tracing::warn!(unlisted = unlisted.len(), pods = ?pods, "the kubelet's PodResources record misses running VRAM pods (a kubelet restarted without the API server?); accounting sweep held back");
        }
        self.held = true;
    }

    /// One sweep against the kubelet's live allocations and what plain init containers may hold
    /// (`init`, `vramslice_api::convert::node_pods::plain_init_holds`). Returns the keys deleted.
    pub async fn run(
        &mut self,
        live: &[ContainerAllocationRecord],
        init: &[InitHold],
    ) -> Vec<String> {
        if std::mem::take(&mut self.held) {
            tracing::info!(
                "the kubelet's PodResources record lists the running VRAM pods again; accounting sweep resumed"
            );
        }
        let root = self.root.clone();
        let listed = tokio::task::spawn_blocking(move || list_root(&root)).await;
        let present = match listed {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(root = %self.root.display(), error = %e, "cannot list the accounting root; nothing swept");
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(error = %e, "accounting sweep task failed");
                return Vec::new();
            }
        };
        let mut live: BTreeSet<String> = live
            .iter()
            .filter_map(|r| allocation_key_for_ids(&r.device_ids).ok())
            .collect();
        live.extend(init_held_keys(&present, init, std::time::SystemTime::now()));
        let verdict = sweep(
            &self.state,
            &present,
            &live,
            self.epoch.elapsed(),
            self.after,
        );
        self.state = verdict.state;
        let mut removed = Vec::new();
        // Allocate writes these files under the same lock; under it, a key written again since
        // it was listed (the next pod got the same units) is no longer ended.
        let _files = crate::logic::ACCOUNTING_FILES.lock().await;
        for key in verdict.remove {
            if changed_within(&self.root, &key, self.after) {
                tracing::debug!(key = %key, "allocated again since it was listed; kept");
                continue;
            }
            match remove_allocation(&self.root, &key).await {
                Ok(()) => {
                    tracing::info!(key = %key, after = ?self.after, "deleted the accounting directory and limit file of an ended allocation");
                    removed.push(key);
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "cannot delete an ended allocation's accounting files")
                }
            }
        }
        removed
    }
}

/// The allocation keys under `root`, each with the age of its most recently changed entry (an
/// entry whose time cannot be read counts as just changed).
fn list_root(root: &Path) -> std::io::Result<BTreeMap<String, Duration>> {
    let now = SystemTime::now();
    let mut present: BTreeMap<String, Duration> = BTreeMap::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(entry_key) else {
            continue;
        };
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default())
            .unwrap_or_default();
        present
            .entry(key.to_string())
            .and_modify(|a| *a = (*a).min(age))
            .or_insert(age);
    }
    Ok(present)
}

/// Whether an entry of allocation `key` (its directory, limit file or temporary limit file)
/// was changed within `within`; an entry whose time cannot be read counts as changed.
fn changed_within(root: &Path, key: &str, within: Duration) -> bool {
    let now = SystemTime::now();
    [
        root.join(key),
        root.join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}")),
        root.join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}.tmp")),
    ]
    .iter()
    .any(|path| match std::fs::symlink_metadata(path) {
        Ok(meta) => meta
            .modified()
            .map_or(true, |t| now.duration_since(t).unwrap_or_default() < within),
        Err(_) => false,
    })
}

/// Remove an allocation's limit file (and its temporary), and its accounting directory, whatever
/// each has become (a runtime makes a directory where a missing mount source was).
async fn remove_allocation(root: &Path, key: &str) -> std::io::Result<()> {
    let limit = root.join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}"));
    let tmp = root.join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}.tmp"));
    for path in [tmp, limit, root.join(key)] {
        crate::logic::remove_whatever_is_at(&path).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramslice_core::node::allocation::allocation_key;

    fn record(ids: &[&str]) -> ContainerAllocationRecord {
        ContainerAllocationRecord {
            namespace: "default".into(),
            pod: "p".into(),
            pod_uid: None,
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// What an Allocate leaves under the accounting root: the key's directory and limit file.
    fn allocation_files(root: &std::path::Path, key: &str) {
        std::fs::create_dir(root.join(key)).unwrap();
        std::fs::write(root.join(format!("{key}.limit")), b"limit=1\n").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn ended_allocations_go_after_the_grace_period_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let live = allocation_key("GPU-a", &[0, 1]);
        let ended = allocation_key("GPU-a", &[2]);
        for key in [&live, &ended] {
            allocation_files(root, key);
            std::fs::write(root.join(key).join("vramslice-accounting.v1"), b"x").unwrap();
        }
        std::fs::write(root.join("README"), b"not ours").unwrap();
        std::fs::create_dir(root.join("lost+found")).unwrap();
        let records = vec![record(&["GPU-a::1", "GPU-a::0"])];

        // Written just now: recent, so kept however long the kubelet does not list `ended`
        // (an Allocate it has not recorded yet looks the same).
        let mut sweeper = Sweeper::new(root.to_path_buf(), Duration::from_secs(60));
        assert!(sweeper.run(&records, &[]).await.is_empty());
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(sweeper.run(&records, &[]).await.is_empty());
        assert!(
            sweeper.run(&[], &[]).await.is_empty(),
            "an empty answer deleted fresh files"
        );
        assert!(root.join(&ended).exists() && root.join(&live).exists());

        // Files older than the grace period: `ended` goes once it has been dead for the whole
        // period, and only it.
        let mut sweeper = Sweeper::new(root.to_path_buf(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(sweeper.run(&records, &[]).await.is_empty());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(sweeper.run(&records, &[]).await, vec![ended.clone()]);
        assert!(!root.join(&ended).exists());
        assert!(!root.join(format!("{ended}.limit")).exists());
        assert!(root.join(&live).join("vramslice-accounting.v1").exists());
        assert!(root.join(format!("{live}.limit")).exists());
        assert!(root.join("README").exists() && root.join("lost+found").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_init_containers_allocation_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let init = allocation_key("GPU-a", &[0, 1]);
        let other = allocation_key("GPU-a", &[2]);
        for key in [&init, &other] {
            allocation_files(root, key);
        }
        let holds = [InitHold {
            gpus: vec!["GPU-a".into()],
            units: 2,
            completed_between: None,
        }];
        let mut sweeper = Sweeper::new(root.to_path_buf(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        // PodResources lists neither (it never lists plain init containers).
        assert!(sweeper.run(&[], &holds).await.is_empty());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(sweeper.run(&[], &holds).await, vec![other.clone()]);
        assert!(root.join(&init).exists());
        // No longer held (its pod finished or was deleted): its key goes after its own grace
        // period.
        assert!(sweeper.run(&[], &[]).await.is_empty());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(sweeper.run(&[], &[]).await, vec![init.clone()]);
    }

    /// What a container runtime may have made of a limit file (a directory where a missing
    /// mount source was) goes like the file would.
    #[tokio::test]
    async fn an_allocation_goes_whatever_its_files_have_become() {
        let root = tempfile::tempdir().unwrap();
        let key = "k";
        std::fs::create_dir_all(root.path().join("k.limit/inner")).unwrap();
        std::fs::write(root.path().join("k.limit.tmp"), "x").unwrap();
        std::fs::create_dir_all(root.path().join("k/sub")).unwrap();
        remove_allocation(root.path(), key).await.unwrap();
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        // Nothing there: nothing to do.
        remove_allocation(root.path(), key).await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_root_is_not_an_error() {
        let mut sweeper = Sweeper::new("/nonexistent/vramslice-accounting".into(), Duration::ZERO);
        assert!(sweeper.run(&[], &[]).await.is_empty());
    }

    #[test]
    fn a_key_written_again_since_it_was_listed_is_not_ended() {
        let root = tempfile::tempdir().unwrap();
        let key = "GPU-a.u0.n1.0123456789abcdef";
        let day = Duration::from_secs(86_400);
        assert!(!changed_within(root.path(), key, day), "nothing there");
        std::fs::create_dir(root.path().join(key)).unwrap();
        assert!(changed_within(root.path(), key, day), "just made");
        let old = SystemTime::now() - 2 * day;
        std::fs::File::open(root.path().join(key))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(!changed_within(root.path(), key, day));
        // Its limit file written again (Allocate of the same units) makes it live.
        std::fs::write(
            root.path().join(format!("{key}{LIMIT_FILE_HOST_SUFFIX}")),
            "limit=1\n",
        )
        .unwrap();
        assert!(changed_within(root.path(), key, day));
    }
}
