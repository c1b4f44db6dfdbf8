//! Runtime configuration and how it is read from the environment (pure: the caller passes a
//! lookup function, so tests need no process environment).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `VRAMSLICE_VRAM_LIMIT_BYTES` | the container's limit (set by the device plugin); with a limit file it can only lower it | the GPU's total |
//! | `VRAMSLICE_VRAM_LIMITS` | per-GPU limits, `<uuid>:<bytes>,...`; with a limit file each only lowers its GPU's limit | none |
//! | `VRAMSLICE_GPU_UUID` | under per-GPU limits: the GPU this runtime admits for, when it is listed | the first GPU listed |
//! | `VRAMSLICE_LIMIT_FILE` | the device plugin's read-only limit file, read besides `/var/run/vramslice/limit` (the guard's rule: `vramslice_core::container::limit::resolve_limits`) | none |
//! | `VRAMSLICE_ACCOUNTING_DIR` | the guard's accounting directory (usage source) | `cuMemGetInfo` |
//! | `VRAMSLICE_PROFILE_DIR` | where learned peaks persist | in memory only |
//! | `VRAMSLICE_HIGH_WATER` | fraction of the limit admitted at once | `0.85` |
//! | `VRAMSLICE_FIRST_RUN_FRACTION` | reservation of a job with no known peak | `0.8` |
//! | `VRAMSLICE_PEAK_MARGIN` | reservation = learned peak × this | `1.2` |
//! | `VRAMSLICE_QUEUE_MAX` | most jobs waiting at once | `64` |
//! | `VRAMSLICE_QUEUE_TIMEOUT` | longest wait for admission (`30s`, `500ms`) | `30s` |
//! | `VRAMSLICE_OOM_RETRIES` | retries after out-of-memory | `3` |
//! | `VRAMSLICE_OOM_BACKOFF` | first backoff wait; doubles, capped at 4× | `500ms` |
//! | `VRAMSLICE_PEAK_SCOPE` | whose growth a job's peak is: `process` (this process's, from the guard's accounting file; other workers' allocations do not count) or `container` (for the one admitting process of a container whose jobs run in another process, an engine) | `process` |
//! | `VRAMSLICE_METRICS_ADDR` | `host:port` to serve `/metrics` on | not served |
//!
//! One runtime admits against one GPU's limit. Under one limit for the container (the limit
//! file's `limit=`, `VRAMSLICE_VRAM_LIMIT_BYTES`) that is the limit. Under per-GPU limits (the
//! limit file's `limits=`, `VRAMSLICE_VRAM_LIMITS`) it is the limit of the GPU
//! `VRAMSLICE_GPU_UUID` names when that GPU is listed, otherwise of the first GPU listed; the
//! accounting-file usage source then reads that GPU's accounting file. A server spanning several
//! GPUs (tensor parallelism) admits by that one GPU's slice: give every GPU of such a server the
//! same limit, or run one runtime per GPU with `VRAMSLICE_GPU_UUID` set for each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vramslice_core::container::limit::{
    FileRead, GpuLimits, LimitEnv, Limits, account_dir, limit_file_paths, resolve_limits,
};
use vramslice_core::names::env;
use vramslice_core::{parse_bytes, parse_duration};

use crate::policy::{Backoff, Policy};

/// Everything a [`Runtime`](crate::Runtime) needs besides its usage source.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The limit in bytes (the GPU's under per-GPU limits); `None` means the usage source's
    /// total (the GPU's size).
    pub limit: Option<u64>,
    /// Under per-GPU limits, the GPU whose limit [`Config::limit`] is (see the module doc);
    /// `None` under one limit for the container.
    pub gpu_uuid: Option<String>,
    /// Where the guard writes accounting; `None` means ask the CUDA driver.
    pub accounting_dir: Option<PathBuf>,
    /// Where learned peaks persist; `None` keeps them in memory.
    pub profile_dir: Option<PathBuf>,
    /// Sizing rules.
    pub policy: Policy,
    /// Most jobs waiting at once.
    pub queue_max: usize,
    /// Longest wait for admission.
    pub queue_timeout: Duration,
    /// Retries after an out-of-memory error.
    pub oom_retries: u32,
    /// Waits between retries.
    pub backoff: Backoff,
    /// How often live usage is sampled while jobs run (peaks) or wait (frees elsewhere).
    pub sample_interval: Duration,
    /// Whose growth a job's peak is.
    pub peak_scope: PeakScope,
    /// Address to serve `/metrics` on.
    pub metrics_addr: Option<String>,
}

/// Whose growth during a job is the job's peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeakScope {
    /// This process's, when the usage source tells it (the guard's accounting file): other
    /// worker processes of the container allocating meanwhile do not count, and a job that
    /// reuses memory the process holds learns nothing. A process that holds nothing during a
    /// job falls back to the container's, as do sources that see only the container.
    #[default]
    Process,
    /// The container's: for a front end whose jobs run in another process of the container (an
    /// engine process), whatever this process holds (a CUDA context counts). Only this
    /// runtime's jobs count as overlapping, so with several admitting processes in the
    /// container their growth meanwhile is recorded as the job's: use it with one admitting
    /// process per container, or report each job's own peak (`Permit::report_peak`).
    Container,
}

impl std::str::FromStr for PeakScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "process" => Ok(PeakScope::Process),
            "container" => Ok(PeakScope::Container),
            _ => Err("expected process or container".into()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limit: None,
            gpu_uuid: None,
            accounting_dir: None,
            profile_dir: None,
            policy: Policy::default(),
            queue_max: 64,
            queue_timeout: Duration::from_secs(30),
            oom_retries: 3,
            backoff: Backoff::default(),
            sample_interval: Duration::from_millis(10),
            peak_scope: PeakScope::Process,
            metrics_addr: None,
        }
    }
}

/// The longest admission wait, retry backoff or sampling interval a runtime accepts: a day.
/// Longer is a mistaken unit, and deadlines far past it would overflow the clock.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest sampling interval other than 0 (no sampling thread).
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(1);

/// The most out-of-memory retries a runtime accepts: a job that fails this often is not going
/// to fit, and retrying it for ever holds its caller.
pub(crate) const MAX_OOM_RETRIES: u32 = 100;

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The variable.
    pub var: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A number from the environment (its range is [`Config::validate`]'s to check).
fn number(var: &str, value: &str) -> Result<f64, ConfigError> {
    value.trim().parse::<f64>().map_err(|_| ConfigError {
        var: var.to_string(),
        value: value.to_string(),
        reason: "expected a number".into(),
    })
}

impl Config {
    /// Read the variables in the module table through `lookup` (normally `std::env::var`) and
    /// the device plugin's limit files through `read_file` (normally [`read_limit_file`]),
    /// starting from the defaults.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&Path) -> FileRead,
    ) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        let get = |var: &str| lookup(var).filter(|v| !v.trim().is_empty());
        let bad = |var: &str, value: &str, reason: String| ConfigError {
            var: var.to_string(),
            value: value.to_string(),
            reason,
        };
        let env_limit = get(env::VRAM_LIMIT_BYTES);
        if let Some(v) = &env_limit {
            let bytes = parse_bytes(v).map_err(|e| bad(env::VRAM_LIMIT_BYTES, v, e.to_string()))?;
            if bytes == 0 {
                return Err(bad(
                    env::VRAM_LIMIT_BYTES,
                    v,
                    "the limit must be above 0".into(),
                ));
            }
        }
        // The guard's own rule over the same inputs: the plugin's limit files, which the
        // environment can only lower, so admission and enforcement use one limit.
        let files: Vec<(String, FileRead)> = limit_file_paths(get(env::LIMIT_FILE).as_deref())
            .into_iter()
            .map(|path| {
                let outcome = read_file(Path::new(&path));
                (path, outcome)
            })
            .collect();
        let env_limits = get(env::VRAM_LIMITS);
        if let Some(v) = &env_limits {
            GpuLimits::parse_env(v).map_err(|e| bad(env::VRAM_LIMITS, v, e.to_string()))?;
        }
        let mut notes = Vec::new();
        let resolved = resolve_limits(
            LimitEnv {
                limit_bytes: env_limit.as_deref(),
                limits: env_limits.as_deref(),
            },
            &files,
            &mut notes,
        );
        (c.limit, c.gpu_uuid) = limit_of_one_gpu(&resolved.limits, get(env::GPU_UUID).as_deref());
        if c.limit == Some(0) {
            // Failing closed (an unreadable limit file, a GPU given 0): nothing could ever be
            // admitted. Said here, with the reason, rather than as jobs that wait and time out.
            let (var, value) = match files.iter().find(|(_, r)| *r != FileRead::Missing) {
                Some((path, _)) => (env::LIMIT_FILE, path.clone()),
                None => (env::VRAM_LIMITS, env_limits.clone().unwrap_or_default()),
            };
            let why = if notes.is_empty() {
                String::new()
            } else {
                format!(": {}", notes.join("; "))
            };
            return Err(bad(
                var,
                &value,
                format!(
                    "the container's limit resolves to 0 bytes, so no job could ever be admitted{why}"
                ),
            ));
        }
        for note in notes {
            tracing::warn!(note = %note, "vramslice sidecar limit");
        }
        // The guard's account, by the guard's rule (under the plugin's limit file, the mounted
        // directory whatever the variable says).
        let account = account_dir(&files, get(env::ACCOUNTING_DIR).as_deref());
        if let Some(note) = &account.note {
            tracing::warn!(note = %note, "vramslice sidecar accounting directory");
        }
        c.accounting_dir = account.dir;
        c.profile_dir = get(env::PROFILE_DIR).map(PathBuf::from);
        if let Some(v) = get(env::HIGH_WATER) {
            c.policy.high_water = number(env::HIGH_WATER, &v)?;
        }
        if let Some(v) = get(env::FIRST_RUN_FRACTION) {
            c.policy.first_run_fraction = number(env::FIRST_RUN_FRACTION, &v)?;
        }
        if let Some(v) = get(env::PEAK_MARGIN) {
            c.policy.peak_margin = number(env::PEAK_MARGIN, &v)?;
        }
        if let Some(v) = get(env::QUEUE_MAX) {
            c.queue_max = v
                .trim()
                .parse()
                .map_err(|_| bad(env::QUEUE_MAX, &v, "expected a whole number of jobs".into()))?;
        }
        if let Some(v) = get(env::QUEUE_TIMEOUT) {
            c.queue_timeout =
                parse_duration(&v).map_err(|e| bad(env::QUEUE_TIMEOUT, &v, e.to_string()))?;
        }
        if let Some(v) = get(env::OOM_RETRIES) {
            c.oom_retries = v.trim().parse().map_err(|_| {
                bad(
                    env::OOM_RETRIES,
                    &v,
                    "expected a whole number of retries".into(),
                )
            })?;
        }
        if let Some(v) = get(env::OOM_BACKOFF) {
            let base = parse_duration(&v).map_err(|e| bad(env::OOM_BACKOFF, &v, e.to_string()))?;
            c.backoff = Backoff::from_base(base);
        }
        if let Some(v) = get(env::PEAK_SCOPE) {
            c.peak_scope = v.parse().map_err(|e| bad(env::PEAK_SCOPE, &v, e))?;
        }
        c.metrics_addr = get(env::METRICS_ADDR);
        c.validate()?;
        Ok(c)
    }

    /// Checks the settings however they were made (environment, Python keywords, the C ABI's
    /// manual runtime; [`Runtime::new`](crate::Runtime::new) runs it), the one place their
    /// ranges are written: fractions above 0 and at most 1, a peak margin from 1 to 10, waits
    /// (queue timeout, backoff, sampling interval) at most [`MAX_WAIT`]. The error names the
    /// setting by its variable, and its Python keyword in the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |var: &str, keyword: &str, value: String, expected: &str| ConfigError {
            var: var.to_string(),
            value,
            reason: if var == keyword {
                expected.to_string()
            } else {
                format!("{expected} (Python keyword {keyword})")
            },
        };
        let p = &self.policy;
        let fractions = [
            (env::HIGH_WATER, "high_water", p.high_water),
            (
                env::FIRST_RUN_FRACTION,
                "first_run_fraction",
                p.first_run_fraction,
            ),
        ];
        for (var, keyword, v) in fractions {
            if !(v > 0.0 && v <= 1.0) {
                let expected = "expected a number above 0 and at most 1";
                return Err(bad(var, keyword, v.to_string(), expected));
            }
        }
        if !(p.peak_margin >= 1.0 && p.peak_margin <= 10.0) {
            let expected = "expected a number from 1 to 10 (below 1 reserves less than the peak)";
            return Err(bad(
                env::PEAK_MARGIN,
                "peak_margin",
                p.peak_margin.to_string(),
                expected,
            ));
        }
        let waits = [
            (env::QUEUE_TIMEOUT, "queue_timeout", self.queue_timeout),
            (env::OOM_BACKOFF, "backoff", self.backoff.base),
            ("sample_interval", "sample_interval", self.sample_interval),
        ];
        for (var, keyword, d) in waits {
            if d > MAX_WAIT {
                return Err(bad(var, keyword, format!("{d:?}"), "longer than a day"));
            }
        }
        if !self.sample_interval.is_zero() && self.sample_interval < MIN_SAMPLE_INTERVAL {
            let expected =
                "expected 0 (no sampling thread) or at least 1 ms: shorter keeps a CPU busy";
            return Err(bad(
                "sample_interval",
                "sample_interval",
                format!("{:?}", self.sample_interval),
                expected,
            ));
        }
        if self.limit == Some(0) {
            return Err(bad(
                "limit",
                "limit",
                "0".into(),
                "expected a limit above 0 bytes (none: the container's)",
            ));
        }
        if self.oom_retries > MAX_OOM_RETRIES {
            let expected = format!("expected at most {MAX_OOM_RETRIES} retries");
            return Err(bad(
                env::OOM_RETRIES,
                "oom_retries",
                self.oom_retries.to_string(),
                &expected,
            ));
        }
        Ok(())
    }

    /// Read the process environment and the limit files.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok(), read_limit_file)
    }
}

/// The limit a runtime admits against, and under per-GPU limits the GPU it is for: the GPU
/// `preferred` names when it is listed, otherwise the first listed.
pub fn limit_of_one_gpu(limits: &Limits, preferred: Option<&str>) -> (Option<u64>, Option<String>) {
    match limits {
        Limits::Unlimited => (None, None),
        Limits::Single(limit) => (Some(*limit), None),
        Limits::PerGpu(gpus) => {
            let (uuid, limit) = preferred
                .and_then(|p| gpus.iter().find(|(u, _)| *u == p.trim()))
                .unwrap_or_else(|| gpus.first());
            (Some(limit), Some(uuid.to_owned()))
        }
    }
}

/// Reads one limit file from disk.
pub fn read_limit_file(path: &Path) -> FileRead {
    FileRead::from_io(std::fs::read_to_string(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), |_| FileRead::Missing)
    }

    #[test]
    fn peak_scope_is_read_and_a_wrong_one_named() {
        assert_eq!(read(&[]).unwrap().peak_scope, PeakScope::Process);
        let c = read(&[("VRAMSLICE_PEAK_SCOPE", " container ")]).unwrap();
        assert_eq!(c.peak_scope, PeakScope::Container);
        let err = read(&[("VRAMSLICE_PEAK_SCOPE", "pod")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VRAMSLICE_PEAK_SCOPE=\"pod\": expected process or container"
        );
    }

    /// The limit files the guard reads decide the sidecar's limit too: the fixed path always,
    /// the named one besides; the environment only lowers; a broken file fails closed.
    #[test]
    fn limit_files_decide_the_limit_as_they_do_for_the_guard() {
        let files = |fixed: Option<&'static str>, named: Option<&'static str>| {
            move |p: &Path| {
                let text = match p.to_str() {
                    Some("/var/run/vramslice/limit") => fixed,
                    Some("/named") => named,
                    _ => None,
                };
                text.map_or(FileRead::Missing, |t| FileRead::Text(t.to_string()))
            }
        };
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let limit = |c: Result<Config, ConfigError>| c.map(|c| c.limit).ok().flatten();
        // The environment asks for more than the file grants: the file wins.
        let raised = &[("VRAMSLICE_VRAM_LIMIT_BYTES", "8Gi")];
        let got = Config::from_lookup(env(raised), files(Some("limit=4294967296\n"), None));
        assert_eq!(limit(got), Some(4 << 30));
        // The environment lowers it.
        let lowered = &[("VRAMSLICE_VRAM_LIMIT_BYTES", "1Gi")];
        let got = Config::from_lookup(env(lowered), files(Some("limit=4294967296\n"), None));
        assert_eq!(limit(got), Some(1 << 30));
        // No environment: the file alone; the named file counts too, the smaller wins.
        let named = &[("VRAMSLICE_LIMIT_FILE", "/named")];
        let got = Config::from_lookup(
            env(named),
            files(Some("limit=4294967296\n"), Some("limit=2147483648\n")),
        );
        assert_eq!(limit(got), Some(2 << 30));
        // A malformed file fails closed, as the guard does: nothing could be admitted, which
        // the runtime says at once, naming the file and why, rather than timing jobs out.
        let err = Config::from_lookup(env(&[]), files(Some("limit=lots\n"), None)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("VRAMSLICE_LIMIT_FILE=\"/var/run/vramslice/limit\": the container's limit resolves to 0 bytes"),
            "{text}"
        );
        assert!(text.contains("failing closed"), "{text}");
        // So does a GPU given 0 in the environment.
        let zero = &[("VRAMSLICE_VRAM_LIMITS", "GPU-a:0")];
        let err = Config::from_lookup(env(zero), files(None, None)).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "VRAMSLICE_VRAM_LIMITS=\"GPU-a:0\": the container's limit resolves to 0 bytes"
            ),
            "{err}"
        );
        // And a limit of 0 given in code.
        let zero_in_code = Config {
            limit: Some(0),
            ..Config::default()
        };
        assert!(
            zero_in_code
                .validate()
                .unwrap_err()
                .to_string()
                .contains("limit above 0")
        );
        // No file: the environment alone, as before.
        let got = Config::from_lookup(env(raised), files(None, None));
        assert_eq!(limit(got), Some(8 << 30));
    }

    /// The accounting directory by the guard's rule: under the plugin's limit file, the one it
    /// mounts, whatever the variable says (the guard writes there, so the runtime reads there).
    #[test]
    fn under_the_limit_file_the_account_is_the_guards() {
        let repointed =
            |k: &str| (k == "VRAMSLICE_ACCOUNTING_DIR").then(|| "/tmp/mine".to_string());
        let fixed = |p: &Path| match p.to_str() {
            Some("/var/run/vramslice/limit") => FileRead::Text("limit=4294967296\n".into()),
            _ => FileRead::Missing,
        };
        let got = Config::from_lookup(repointed, fixed).unwrap();
        assert_eq!(
            got.accounting_dir.as_deref(),
            Some(Path::new("/var/run/vramslice/accounting"))
        );
        let got = Config::from_lookup(repointed, |_: &Path| FileRead::Missing).unwrap();
        assert_eq!(got.accounting_dir.as_deref(), Some(Path::new("/tmp/mine")));
    }

    /// Per-GPU limits: the runtime takes one GPU's limit by the same rule as the guard — the
    /// GPU `VRAMSLICE_GPU_UUID` names, else the first listed — and the environment lowers
    /// only the GPU it names.
    #[test]
    fn per_gpu_limits_give_the_limit_of_one_gpu() {
        let file = |p: &Path| match p.to_str() {
            Some("/var/run/vramslice/limit") => {
                FileRead::Text("limits=GPU-a:4294967296,GPU-b:2147483648\n".into())
            }
            _ => FileRead::Missing,
        };
        let with = |pairs: &'static [(&'static str, &'static str)]| {
            Config::from_lookup(
                move |k: &str| {
                    pairs
                        .iter()
                        .find(|(n, _)| *n == k)
                        .map(|(_, v)| v.to_string())
                },
                file,
            )
            .unwrap()
        };
        let c = with(&[]);
        assert_eq!(
            (c.limit, c.gpu_uuid.as_deref()),
            (Some(4 << 30), Some("GPU-a"))
        );
        let c = with(&[("VRAMSLICE_GPU_UUID", "GPU-b")]);
        assert_eq!(
            (c.limit, c.gpu_uuid.as_deref()),
            (Some(2 << 30), Some("GPU-b"))
        );
        let c = with(&[("VRAMSLICE_GPU_UUID", "GPU-elsewhere")]);
        assert_eq!(
            (c.limit, c.gpu_uuid.as_deref()),
            (Some(4 << 30), Some("GPU-a"))
        );
        // The environment lowers the GPU it names, and cannot raise one.
        let c = with(&[("VRAMSLICE_VRAM_LIMITS", "GPU-a:1Gi,GPU-b:8Gi")]);
        assert_eq!(
            (c.limit, c.gpu_uuid.as_deref()),
            (Some(1 << 30), Some("GPU-a"))
        );
        let c = with(&[
            ("VRAMSLICE_VRAM_LIMITS", "GPU-a:1Gi,GPU-b:8Gi"),
            ("VRAMSLICE_GPU_UUID", "GPU-b"),
        ]);
        assert_eq!(c.limit, Some(2 << 30));
        // One limit for the container: no GPU chosen, as before.
        let c = Config::from_lookup(
            |k| (k == "VRAMSLICE_GPU_UUID").then(|| "GPU-a".to_string()),
            |_| FileRead::Text("limit=1073741824\ngpu=GPU-a\n".into()),
        )
        .unwrap();
        assert_eq!((c.limit, c.gpu_uuid), (Some(1 << 30), None));
        // No file: the environment's per-GPU limits alone.
        let c = read(&[("VRAMSLICE_VRAM_LIMITS", "GPU-x:3Gi,GPU-y:1Gi")]).unwrap();
        assert_eq!(
            (c.limit, c.gpu_uuid.as_deref()),
            (Some(3 << 30), Some("GPU-x"))
        );
    }

    #[test]
    fn empty_environment_gives_defaults() {
        assert_eq!(read(&[]).unwrap(), Config::default());
    }

    #[test]
    fn every_variable_is_read() {
        let c = read(&[
            ("VRAMSLICE_VRAM_LIMIT_BYTES", "4294967296"),
            ("VRAMSLICE_ACCOUNTING_DIR", "/run/vramslice"),
            ("VRAMSLICE_PROFILE_DIR", "/profiles"),
            ("VRAMSLICE_HIGH_WATER", "0.9"),
            ("VRAMSLICE_FIRST_RUN_FRACTION", "0.5"),
            ("VRAMSLICE_PEAK_MARGIN", "1.5"),
            ("VRAMSLICE_QUEUE_MAX", "8"),
            ("VRAMSLICE_QUEUE_TIMEOUT", "2s"),
            ("VRAMSLICE_OOM_RETRIES", "5"),
            ("VRAMSLICE_OOM_BACKOFF", "10ms"),
            ("VRAMSLICE_METRICS_ADDR", "127.0.0.1:9400"),
        ])
        .unwrap();
        assert_eq!(c.limit, Some(4 << 30));
        assert_eq!(c.accounting_dir, Some(PathBuf::from("/run/vramslice")));
        assert_eq!(c.profile_dir, Some(PathBuf::from("/profiles")));
        assert_eq!(c.policy.high_water, 0.9);
        assert_eq!(c.policy.first_run_fraction, 0.5);
        assert_eq!(c.policy.peak_margin, 1.5);
        assert_eq!(c.queue_max, 8);
        assert_eq!(c.queue_timeout, Duration::from_secs(2));
        assert_eq!(c.oom_retries, 5);
        assert_eq!(
            c.backoff.schedule(3),
            vec![
                Duration::from_millis(10),
                Duration::from_millis(20),
                Duration::from_millis(40)
            ]
        );
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9400"));
        assert_eq!(
            read(&[("VRAMSLICE_VRAM_LIMIT_BYTES", "6Gi")])
                .unwrap()
                .limit,
            Some(6 << 30)
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("VRAMSLICE_VRAM_LIMIT_BYTES", "lots"),
            ("VRAMSLICE_VRAM_LIMIT_BYTES", "0"),
            ("VRAMSLICE_HIGH_WATER", "1.2"),
            ("VRAMSLICE_HIGH_WATER", "-1"),
            ("VRAMSLICE_PEAK_MARGIN", "0.5"),
            ("VRAMSLICE_QUEUE_MAX", "many"),
            ("VRAMSLICE_QUEUE_TIMEOUT", "soon"),
            ("VRAMSLICE_OOM_RETRIES", "-1"),
            ("VRAMSLICE_OOM_BACKOFF", "x"),
            ("VRAMSLICE_VRAM_LIMITS", "GPU-a:1Gi,GPU-a:2Gi"),
            ("VRAMSLICE_VRAM_LIMITS", "GPU-a"),
        ] {
            let err = read(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(value), "{err}");
        }
    }
}
