//! The Kubernetes client, from the user's kubeconfig found as kubectl finds it: `--kubeconfig`,
//! else the files of `$KUBECONFIG` (merged, missing ones skipped), else `~/.kube/config`; only
//! when none of them exists, the in-cluster service account.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

use crate::Cli;

/// Why no Kubernetes client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A kubeconfig was found but cannot be used (unreadable, malformed, or without the
    /// context asked for).
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file or files.
        path: String,
        /// Why.
        source: KubeconfigError,
    },
    /// No kubeconfig exists, and the in-cluster configuration cannot be used either.
    #[error("no kubeconfig found (looked at {looked}), and {why}")]
    NoKubeconfig {
        /// Where kubeconfigs were looked for.
        looked: String,
        /// Why the in-cluster configuration was not used.
        why: String,
    },
    /// The configuration did not make a client.
    #[error("cannot build a Kubernetes client: {0}")]
    Build(kube::Error),
    /// A connection flag cannot be used as given.
    #[error("{0}")]
    Flag(String),
}

/// The kubeconfig files to read, as kubectl picks them: `explicit` (`--kubeconfig`) alone;
/// else the non-empty paths of `kubeconfig_env` (`$KUBECONFIG`) when it names any; else
/// `~/.kube/config` under `home`.
fn candidates(
    explicit: Option<&Path>,
    kubeconfig_env: Option<&OsStr>,
    home: Option<&Path>,
) -> Vec<PathBuf> {
    if let Some(path) = explicit {
        return vec![path.to_path_buf()];
    }
    let listed: Vec<PathBuf> = kubeconfig_env
        .map(|v| {
            std::env::split_paths(v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if !listed.is_empty() {
        return listed;
    }
    home.map(|h| h.join(".kube").join("config"))
        .into_iter()
        .collect()
}

fn shown(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    if names.is_empty() {
        "nothing: no --kubeconfig, $KUBECONFIG or home directory".into()
    } else {
        names.join(", ")
    }
}

/// Whether a kubeconfig names nothing at all.
fn is_empty(kc: &Kubeconfig) -> bool {
    kc.clusters.is_empty()
        && kc.contexts.is_empty()
        && kc.auth_infos.is_empty()
        && kc.current_context.as_deref().is_none_or(str::is_empty)
}

/// The user's kubeconfig and the files it came from (for messages), or `Ok(None)` when no
/// kubeconfig file exists. A file given with `--kubeconfig` must exist; of the `$KUBECONFIG`
/// files those that do not exist are skipped, as kubectl skips them, and the others are merged
/// (the first file to set a value wins). A file that exists but cannot be read or parsed is an
/// error naming it.
///
/// # Errors
/// [`ClientError::Kubeconfig`] naming the file.
pub fn user_kubeconfig(
    explicit: Option<&Path>,
    kubeconfig_env: Option<&OsStr>,
    home: Option<&Path>,
) -> Result<Option<(Kubeconfig, String)>, ClientError> {
    let paths = candidates(explicit, kubeconfig_env, home);
    let mut merged: Option<Kubeconfig> = None;
    let mut used = Vec::new();
    for path in &paths {
        if explicit.is_none() && !path.exists() {
            continue;
        }
        let bad = |source| ClientError::Kubeconfig {
            path: path.display().to_string(),
            source,
        };
        let mut next = Kubeconfig::read_from(path).map_err(bad)?;
        // `current-context: ""` (what `kubectl config view` prints with none) names none, as
        // for kubectl: it must not win the merge over a later file's.
        if next.current_context.as_deref() == Some("") {
            next.current_context = None;
        }
        if explicit.is_none() && is_empty(&next) {
            // An empty file (a pod's placeholder ~/.kube/config) is no kubeconfig, as for
            // kubectl: it does not stand in the way of the in-cluster configuration.
            continue;
        }
        merged = Some(match merged {
            None => next,
            Some(first) => first.merge(next).map_err(bad)?,
        });
        used.push(path.clone());
    }
    Ok(merged.map(|kc| (kc, shown(&used))))
}

/// Build a client from the user's kubeconfig like kubectl ([`user_kubeconfig`]), honouring
/// `--context`; in-cluster only when no kubeconfig exists and no context was asked for.
///
/// # Errors
/// [`ClientError`] saying which kubeconfig failed and why.
pub async fn client(cli: &Cli) -> Result<Client, ClientError> {
    let timeout = request_timeout(cli.request_timeout.as_deref())?;
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        cluster: cli.cluster.clone(),
        user: cli.user.clone(),
    };
    let kubeconfig_env = std::env::var_os("KUBECONFIG");
    let home = std::env::home_dir();
    let found = user_kubeconfig(
        cli.kubeconfig.as_deref(),
        kubeconfig_env.as_deref(),
        home.as_deref(),
    )?;
    let mut config = match found {
        Some((kc, path)) => {
            // As kubectl: a user asked for by name must exist (without --user, a context's
            // missing user means no credentials, as for client-go).
            if let Some(user) = &cli.user
                && !kc.auth_infos.iter().any(|a| &a.name == user)
            {
                return Err(ClientError::Flag(format!(
                    "kubeconfig {path}: --user {user}: no such user"
                )));
            }
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|source| ClientError::Kubeconfig { path, source })?
        }
        None => {
            let looked = shown(&candidates(
                None,
                kubeconfig_env.as_deref(),
                home.as_deref(),
            ));
            let named = [
                ("--context", &cli.context),
                ("--cluster", &cli.cluster),
                ("--user", &cli.user),
            ];
            if let Some((flag, Some(name))) = named.iter().find(|(_, v)| v.is_some()) {
                return Err(ClientError::NoKubeconfig {
                    looked,
                    why: format!("{flag} {name} needs one"),
                });
            }
            kube::Config::incluster().map_err(|e| ClientError::NoKubeconfig {
                looked,
                why: format!("not inside a cluster ({e})"),
            })?
        }
    };
    config.read_timeout = timeout;
    config.write_timeout = timeout;
    if let Some(user) = &cli.impersonate {
        config.auth_info.impersonate = Some(user.clone());
    }
    if !cli.impersonate_groups.is_empty() {
        // A user to impersonate, from --as or the kubeconfig's `as:`.
        if config.auth_info.impersonate.is_none() {
            return Err(ClientError::Flag(
                "--as-group needs --as: the API server impersonates groups only with a user".into(),
            ));
        }
        config.auth_info.impersonate_groups = Some(cli.impersonate_groups.clone());
    }
    Client::try_from(config).map_err(ClientError::Build)
}

/// `--request-timeout` as kubectl reads it: a duration (`30s`, `1m`), whole seconds (`30`),
/// or `0` for none; 30 s when not given.
fn request_timeout(flag: Option<&str>) -> Result<Option<Duration>, ClientError> {
    let Some(text) = flag.map(str::trim) else {
        return Ok(Some(Duration::from_secs(30)));
    };
    let bad = |why: String| ClientError::Flag(format!("--request-timeout {text:?}: {why}"));
    let timeout = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| bad("too large".into()))?)
    } else {
        vramslice_core::parse_duration(text).map_err(|e| bad(e.to_string()))?
    };
    Ok((!timeout.is_zero()).then_some(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeouts_read_as_kubectls() {
        let secs = |s: u64| Ok(Some(Duration::from_secs(s)));
        assert_eq!(request_timeout(None).map_err(|e| e.to_string()), secs(30));
        assert_eq!(
            request_timeout(Some("5")).map_err(|e| e.to_string()),
            secs(5)
        );
        assert_eq!(
            request_timeout(Some("1m")).map_err(|e| e.to_string()),
            secs(60)
        );
        assert_eq!(
            request_timeout(Some("0")).map_err(|e| e.to_string()),
            Ok(None)
        );
        let err = request_timeout(Some("soon")).unwrap_err().to_string();
        assert!(err.starts_with("--request-timeout \"soon\": "), "{err}");
    }

    fn write(dir: &Path, name: &str, context: &str) -> PathBuf {
        let path = dir.join(name);
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {context}\nclusters:\n- name: {context}\n  cluster:\n    server: https://{context}.example:6443\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {context}\nusers:\n- name: {context}\n  user:\n    token: t\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn contexts(kc: &Kubeconfig) -> Vec<String> {
        kc.contexts.iter().map(|c| c.name.clone()).collect()
    }

    #[test]
    fn missing_files_of_kubeconfig_env_are_skipped_and_the_rest_merged_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a", "red");
        let b = write(dir.path(), "b", "blue");
        let missing = dir.path().join("missing");
        let env = std::env::join_paths([&missing, &a, &b]).unwrap();
        let (kc, from) = user_kubeconfig(None, Some(&env), None).unwrap().unwrap();
        assert_eq!(contexts(&kc), ["red", "blue"]);
        assert_eq!(kc.current_context.as_deref(), Some("red"));
        assert!(!from.contains("missing"), "{from}");
    }

    #[test]
    fn kubeconfig_env_replaces_the_home_file_and_nothing_found_is_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".kube")).unwrap();
        write(&dir.path().join(".kube"), "config", "home");
        let env = dir.path().join("absent").into_os_string();
        assert!(
            user_kubeconfig(None, Some(&env), Some(dir.path()))
                .unwrap()
                .is_none()
        );
        // An empty $KUBECONFIG names nothing: the home file is used.
        let (kc, _) = user_kubeconfig(None, Some(OsStr::new("")), Some(dir.path()))
            .unwrap()
            .unwrap();
        assert_eq!(contexts(&kc), ["home"]);
        let nowhere = tempfile::tempdir().unwrap();
        assert!(
            user_kubeconfig(None, None, Some(nowhere.path()))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn an_empty_file_is_no_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        let placeholder = dir.path().join("placeholder");
        std::fs::write(
            &placeholder,
            "apiVersion: v1\nkind: Config\nclusters: null\ncontexts: null\nusers: null\ncurrent-context: \"\"\npreferences: {}\n",
        )
        .unwrap();
        let env = placeholder.clone().into_os_string();
        assert!(user_kubeconfig(None, Some(&env), None).unwrap().is_none());
        let env = empty.clone().into_os_string();
        assert!(user_kubeconfig(None, Some(&env), None).unwrap().is_none());
        let named = write(dir.path(), "named", "red");
        let env = std::env::join_paths([&empty, &placeholder, &named]).unwrap();
        let (kc, from) = user_kubeconfig(None, Some(&env), None).unwrap().unwrap();
        assert_eq!(contexts(&kc), ["red"]);
        assert_eq!(kc.current_context.as_deref(), Some("red"));
        assert!(!from.contains("empty"), "{from}");
    }

    #[test]
    fn an_explicit_file_must_exist_and_a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let err = user_kubeconfig(Some(&missing), None, None).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
        let broken = dir.path().join("broken");
        std::fs::write(&broken, "clusters: [").unwrap();
        let env = broken.clone().into_os_string();
        let err = user_kubeconfig(None, Some(&env), None).unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }
}
