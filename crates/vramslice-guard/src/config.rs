//! The guard's settings, read once from the environment through a lookup function so that the
//! parsing is testable without touching the process environment.
//!
//! Malformed values never stop the program: each produces a message (printed once to stderr by
//! the caller) and a safe fallback — a malformed limit turns the guard into pass-through.
//!
//! The limit has two kinds of source, combined by [`vramslice_core::container::limit::resolve_limits`] (the
//! rule the sidecar runtime uses too): the device plugin's read-only limit file (always
//! [`FIXED_LIMIT_FILE`], plus the file `VRAMSLICE_LIMIT_FILE` names) and the environment
//! (`VRAMSLICE_VRAM_LIMIT_BYTES`, `VRAMSLICE_VRAM_LIMITS`). The result is one limit for the
//! container or a limit per GPU UUID ([`Limits`]). When a limit file exists, the environment can
//! only lower each limit, never raise it; an unreadable or malformed limit file fails closed
//! (limit 0).

use std::path::{Path, PathBuf};

pub use vramslice_core::container::limit::{FileRead, Limits};
use vramslice_core::container::limit::{LimitEnv, account_dir, limit_file_paths, resolve_limits};
use vramslice_core::names::env;
use vramslice_core::node::allocation::LIMIT_FILE_CONTAINER_PATH;

/// The limit file's in-container path, read whatever the environment says (a process that
/// renames or clears `VRAMSLICE_LIMIT_FILE` cannot escape the file the plugin mounted there).
pub const FIXED_LIMIT_FILE: &str = LIMIT_FILE_CONTAINER_PATH;

/// Default real driver soname.
pub const DEFAULT_REAL_LIBCUDA: &str = "libcuda.so.1";
/// Default real NVML soname.
pub const DEFAULT_REAL_LIBNVML: &str = "libnvidia-ml.so.1";
/// Default context charge when it cannot be measured (no context current before creation), at
/// least: [`Config::context_charge`] raises it by the device's multiprocessors.
pub const DEFAULT_CONTEXT_ESTIMATE: u64 = 256 << 20;

/// What a context takes per multiprocessor: measured bare contexts (lazy module loading) take
/// about 3 MiB per SM (107 MiB with 34 SMs, 426 MiB with 142, 555 MiB with 188), most of it the
/// local-memory reserve the driver sizes by the SM count; 3.25 MiB errs a little high. An H100
/// or H200 (132 SMs) is charged 429 MiB. Too low a charge lets a container's processes go past
/// its limit as NVML counts them; far too high a one costs every process room, and either way
/// past the watchdog's tolerance the pod's self-report reads as untrusted. The GPU check
/// measures the real size (`cuda_context`).
pub const CONTEXT_BYTES_PER_SM: u64 = (13 << 20) / 4;

/// What the guard does, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The limits; [`Limits::Unlimited`] means pass everything through.
    pub limits: Limits,
    /// Where the shared accounting file lives; `None` means per-process accounting.
    pub accounting_dir: Option<PathBuf>,
    /// The device plugin's limit file ([`FIXED_LIMIT_FILE`]) exists, so the container's processes
    /// must share one account: without it the guard fails closed rather than give each process
    /// the whole limit.
    pub shared_account_required: bool,
    /// The real driver to load.
    pub real_libcuda: String,
    /// The real NVML to load.
    pub real_libnvml: String,
    /// GPU UUID to record in the accounting file under one limit for the container (per-GPU
    /// accounting files record their own GPU's).
    pub gpu_uuid: String,
    /// Count `cuMemAllocManaged`.
    pub count_managed: bool,
    /// Virtualise NVML memory info.
    pub virtualize_nvml: bool,
    /// Context charge when it cannot be measured.
    pub context_estimate: u64,
    /// `context_estimate` came from `VRAMSLICE_CONTEXT_ESTIMATE_BYTES` (else it is the default).
    pub context_estimate_given: bool,
}

/// Reads one limit file (at most a few KiB are ever needed; longer files fail to parse).
pub fn read_limit_file(path: &Path) -> FileRead {
    FileRead::from_io(std::fs::read_to_string(path))
}

fn parse_bool(name: &str, value: Option<String>, default: bool, msgs: &mut Vec<String>) -> bool {
    let Some(v) = value else { return default };
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => true,
        "0" | "false" | "no" | "off" => false,
        _ => {
            msgs.push(format!(
                "{name}={v:?} is not a boolean (use 1 or 0); using {}",
                u8::from(default)
            ));
            default
        }
    }
}

fn parse_amount(name: &str, value: &str) -> Result<u64, String> {
    vramslice_core::parse_bytes(value.trim())
        .map_err(|e| format!("{name}={value:?} is malformed: {e}"))
}

impl Config {
    /// Reads the settings through `get` (normally `std::env::var`) and the limit files through
    /// `read` (normally [`read_limit_file`]), returning the messages to print.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
        read: impl Fn(&Path) -> FileRead,
    ) -> (Config, Vec<String>) {
        let mut msgs = Vec::new();
        let files: Vec<(String, FileRead)> = limit_file_paths(get(env::LIMIT_FILE).as_deref())
            .into_iter()
            .map(|p| {
                let r = read(Path::new(&p));
                (p, r)
            })
            .collect();
        let env_limit = get(env::VRAM_LIMIT_BYTES);
        let env_limits = get(env::VRAM_LIMITS);
        let resolved = resolve_limits(
            LimitEnv {
                limit_bytes: env_limit.as_deref(),
                limits: env_limits.as_deref(),
            },
            &files,
            &mut msgs,
        );
        let account = account_dir(&files, get(env::ACCOUNTING_DIR).as_deref());
        msgs.extend(account.note);
        let given = get(env::CONTEXT_ESTIMATE_BYTES)
            .map(|v| parse_amount(env::CONTEXT_ESTIMATE_BYTES, &v))
            .and_then(|parsed| {
                parsed
                    .map_err(|e| msgs.push(format!("{e}; using the default")))
                    .ok()
            });
        let context_estimate_given = given.is_some();
        let mut context_estimate = given.unwrap_or(DEFAULT_CONTEXT_ESTIMATE);
        let mut count_managed =
            parse_bool(env::COUNT_MANAGED, get(env::COUNT_MANAGED), true, &mut msgs);
        // Under the device plugin's limit file the pod spec may only make the guard stricter,
        // as with the limit itself: a smaller context charge or uncounted managed memory would
        // let the container take more than its limit.
        if account.required {
            if context_estimate < DEFAULT_CONTEXT_ESTIMATE {
                msgs.push(format!(
                    "{} below {DEFAULT_CONTEXT_ESTIMATE} is ignored under the device plugin's limit file",
                    env::CONTEXT_ESTIMATE_BYTES
                ));
                context_estimate = DEFAULT_CONTEXT_ESTIMATE;
            }
            if !count_managed {
                msgs.push(format!(
                    "{}=0 is ignored under the device plugin's limit file: managed memory counts",
                    env::COUNT_MANAGED
                ));
                count_managed = true;
            }
        }
        let config = Config {
            limits: resolved.limits,
            accounting_dir: account.dir,
            shared_account_required: account.required,
            real_libcuda: get(env::REAL_LIBCUDA)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_REAL_LIBCUDA.to_owned()),
            real_libnvml: get(env::REAL_LIBNVML)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_REAL_LIBNVML.to_owned()),
            gpu_uuid: if resolved.file_gpu_uuid.is_empty() {
                get(env::GPU_UUID).unwrap_or_default()
            } else {
                resolved.file_gpu_uuid
            },
            count_managed,
            virtualize_nvml: parse_bool(
                env::VIRTUALIZE_NVML,
                get(env::VIRTUALIZE_NVML),
                true,
                &mut msgs,
            ),
            context_estimate,
            context_estimate_given,
        };
        (config, msgs)
    }

    /// The charge for a context that cannot be measured, on a device with `multiprocessors`
    /// SMs (`None` when the driver does not say): [`CONTEXT_BYTES_PER_SM`] per SM, at least
    /// [`DEFAULT_CONTEXT_ESTIMATE`]. `VRAMSLICE_CONTEXT_ESTIMATE_BYTES` replaces it when the
    /// limit comes from the environment alone, and may only raise it under the device plugin's
    /// limit file.
    pub fn context_charge(&self, multiprocessors: Option<u32>) -> u64 {
        let by_device = multiprocessors
            .map_or(0, |n| u64::from(n).saturating_mul(CONTEXT_BYTES_PER_SM))
            .max(DEFAULT_CONTEXT_ESTIMATE);
        match (self.context_estimate_given, self.shared_account_required) {
            (false, _) => by_device,
            (true, false) => self.context_estimate,
            (true, true) => self.context_estimate.max(by_device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> (Config, Vec<String>) {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), |_| FileRead::Missing)
    }

    #[test]
    fn empty_environment_is_pass_through_with_defaults() {
        let (c, msgs) = cfg(&[]);
        assert!(msgs.is_empty());
        assert_eq!(c.limits, Limits::Unlimited);
        assert_eq!(c.accounting_dir, None);
        assert_eq!(c.real_libcuda, "libcuda.so.1");
        assert!(c.count_managed && c.virtualize_nvml);
        assert_eq!(c.context_estimate, DEFAULT_CONTEXT_ESTIMATE);
    }

    #[test]
    fn limit_accepts_bytes_and_quantities() {
        assert_eq!(
            cfg(&[(env::VRAM_LIMIT_BYTES, "2147483648")]).0.limits,
            Limits::Single(2 << 30)
        );
        assert_eq!(
            cfg(&[(env::VRAM_LIMIT_BYTES, " 2Gi ")]).0.limits,
            Limits::Single(2 << 30)
        );
        assert_eq!(
            cfg(&[(env::VRAM_LIMIT_BYTES, "0")]).0.limits,
            Limits::Single(0)
        );
    }

    #[test]
    fn malformed_limit_is_reported_and_passes_through() {
        for bad in ["lots", "-5", "1.5.5Gi", "99999999999999999999999"] {
            let (c, msgs) = cfg(&[(env::VRAM_LIMIT_BYTES, bad)]);
            assert_eq!(c.limits, Limits::Unlimited, "{bad}");
            assert_eq!(msgs.len(), 1);
            assert!(
                msgs[0].contains(env::VRAM_LIMIT_BYTES) && msgs[0].contains("NOT enforced"),
                "{}",
                msgs[0]
            );
        }
    }

    #[test]
    fn booleans_and_estimate() {
        let (c, msgs) = cfg(&[
            (env::COUNT_MANAGED, "0"),
            (env::VIRTUALIZE_NVML, "maybe"),
            (env::CONTEXT_ESTIMATE_BYTES, "1Mi"),
            (env::ACCOUNTING_DIR, "/run/vs"),
            (env::REAL_LIBCUDA, "/x/libcuda.so"),
        ]);
        assert!(!c.count_managed);
        assert!(c.virtualize_nvml);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].contains(env::VIRTUALIZE_NVML));
        assert_eq!(c.context_estimate, 1 << 20);
        assert_eq!(c.accounting_dir, Some(PathBuf::from("/run/vs")));
        assert_eq!(c.real_libcuda, "/x/libcuda.so");
    }

    const MIB: u64 = 1 << 20;

    fn file(limit: u64) -> FileRead {
        FileRead::Text(vramslice_core::container::limit::limit_file_content(
            limit, "GPU-f",
        ))
    }

    #[test]
    fn the_fixed_limit_file_is_always_read_and_wins_over_a_raised_environment() {
        let env: HashMap<&str, &str> = HashMap::from([
            (env::VRAM_LIMIT_BYTES, "1000Gi"),
            (env::LIMIT_FILE, "/tmp/somewhere-else"),
            (env::GPU_UUID, "GPU-env"),
        ]);
        let read = |p: &Path| {
            if p == Path::new(FIXED_LIMIT_FILE) {
                FileRead::Text("limit=1048576\ngpu=GPU-file\n".into())
            } else {
                FileRead::Missing
            }
        };
        let (c, msgs) = Config::from_lookup(|k| env.get(k).map(|v| (*v).to_owned()), read);
        assert_eq!(c.limits, Limits::Single(MIB));
        assert_eq!(c.gpu_uuid, "GPU-file");
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("can only lower"), "{msgs:?}");
        assert_eq!(FIXED_LIMIT_FILE, "/var/run/vramslice/limit");
    }

    #[test]
    fn under_the_limit_file_the_environment_cannot_loosen_the_charges() {
        let loose: HashMap<&str, &str> = HashMap::from([
            (env::CONTEXT_ESTIMATE_BYTES, "0"),
            (env::COUNT_MANAGED, "0"),
        ]);
        let lookup = |k: &str| loose.get(k).map(|v| (*v).to_owned());
        let fixed = |p: &Path| {
            if p == Path::new(FIXED_LIMIT_FILE) {
                file(MIB)
            } else {
                FileRead::Missing
            }
        };
        let (c, msgs) = Config::from_lookup(lookup, fixed);
        assert_eq!(c.context_estimate, DEFAULT_CONTEXT_ESTIMATE);
        assert!(c.count_managed);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs.iter()
                .all(|m| m.contains("ignored under the device plugin's limit file"))
        );
        // A larger context charge is stricter: kept.
        let strict: HashMap<&str, &str> = HashMap::from([(env::CONTEXT_ESTIMATE_BYTES, "1Gi")]);
        let (c, _) = Config::from_lookup(|k| strict.get(k).map(|v| (*v).to_owned()), fixed);
        assert_eq!(c.context_estimate, 1 << 30);
        // Without the limit file (a limit from the environment alone) the knobs are the user's.
        let (c, msgs) = Config::from_lookup(lookup, |_| FileRead::Missing);
        assert_eq!(c.context_estimate, 0);
        assert!(!c.count_managed && msgs.is_empty());
    }

    #[test]
    fn a_context_is_charged_by_its_devices_multiprocessors_unless_the_user_says_otherwise() {
        const H100_SMS: u32 = 132;
        let hopper = u64::from(H100_SMS) * CONTEXT_BYTES_PER_SM;
        let fixed = |p: &Path| {
            if p == Path::new(FIXED_LIMIT_FILE) {
                file(8 << 30)
            } else {
                FileRead::Missing
            }
        };
        let with = |pairs: &[(&str, &str)], read: &dyn Fn(&Path) -> FileRead| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            Config::from_lookup(|k| map.get(k).cloned(), read).0
        };
        // Nothing said: by the device (429 MiB for an H100), never below the default.
        let plain = with(&[], &fixed);
        assert_eq!(plain.context_charge(Some(H100_SMS)), hopper);
        assert_eq!(plain.context_charge(Some(20)), DEFAULT_CONTEXT_ESTIMATE);
        assert_eq!(plain.context_charge(None), DEFAULT_CONTEXT_ESTIMATE);
        // Under the limit file the pod spec may only raise it.
        let lower = with(&[(env::CONTEXT_ESTIMATE_BYTES, "300Mi")], &fixed);
        assert_eq!(lower.context_charge(Some(H100_SMS)), hopper);
        let higher = with(&[(env::CONTEXT_ESTIMATE_BYTES, "1Gi")], &fixed);
        assert_eq!(higher.context_charge(Some(H100_SMS)), 1 << 30);
        // A limit from the environment alone: the user's figure, as given.
        let own = with(&[(env::CONTEXT_ESTIMATE_BYTES, "16Mi")], &|_| {
            FileRead::Missing
        });
        assert_eq!(own.context_charge(Some(H100_SMS)), 16 << 20);
        // An unreadable figure is the default rule.
        let bad = with(&[(env::CONTEXT_ESTIMATE_BYTES, "lots")], &fixed);
        assert_eq!(bad.context_charge(Some(H100_SMS)), hopper);
    }

    /// The rule is core's `account_dir` (tested there case by case); here, that the guard
    /// takes its directory, its requirement and its note.
    #[test]
    fn the_account_directory_is_cores_rule() {
        use vramslice_core::node::allocation::ACCOUNTING_CONTAINER_DIR;
        let env: HashMap<&str, &str> = HashMap::from([(env::ACCOUNTING_DIR, "/tmp/mine")]);
        let read_fixed = |p: &Path| {
            if p == Path::new(FIXED_LIMIT_FILE) {
                file(MIB)
            } else {
                FileRead::Missing
            }
        };
        let (c, msgs) = Config::from_lookup(|k| env.get(k).map(|v| (*v).to_owned()), read_fixed);
        assert_eq!(
            c.accounting_dir.as_deref(),
            Some(Path::new(ACCOUNTING_CONTAINER_DIR))
        );
        assert!(c.shared_account_required);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            msgs[0].contains("is ignored under the limit file"),
            "{msgs:?}"
        );
        let (c, msgs) = Config::from_lookup(
            |k| env.get(k).map(|v| (*v).to_owned()),
            |_| FileRead::Missing,
        );
        assert_eq!(c.accounting_dir.as_deref(), Some(Path::new("/tmp/mine")));
        assert!(!c.shared_account_required && msgs.is_empty());
    }

    #[test]
    fn the_named_limit_file_is_read_too_and_the_smaller_wins() {
        let env: HashMap<&str, &str> = HashMap::from([(env::LIMIT_FILE, "/named")]);
        let read = |p: &Path| match p.to_str() {
            Some("/named") => file(5 * MIB),
            Some(FIXED_LIMIT_FILE) => file(9 * MIB),
            _ => FileRead::Error("unexpected path".into()),
        };
        let (c, msgs) = Config::from_lookup(|k| env.get(k).map(|v| (*v).to_owned()), read);
        assert_eq!(c.limits, Limits::Single(5 * MIB));
        assert!(msgs.is_empty(), "{msgs:?}");
    }

    #[test]
    fn per_gpu_limits_come_from_the_file_and_the_environment_lowers_one_gpu() {
        let env: HashMap<&str, &str> = HashMap::from([
            (env::VRAM_LIMITS, "GPU-b:512Mi,GPU-a:8Gi"),
            (env::GPU_UUID, "GPU-env"),
        ]);
        let read = |p: &Path| {
            if p == Path::new(FIXED_LIMIT_FILE) {
                FileRead::Text("limits=GPU-a:1073741824,GPU-b:2147483648\n".into())
            } else {
                FileRead::Missing
            }
        };
        let (c, msgs) = Config::from_lookup(|k| env.get(k).map(|v| (*v).to_owned()), read);
        let Limits::PerGpu(gpus) = &c.limits else {
            panic!("{:?}", c.limits)
        };
        assert_eq!(
            gpus.iter().collect::<Vec<_>>(),
            vec![("GPU-a", 1 << 30), ("GPU-b", 512 * MIB)]
        );
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(
            msgs[0].contains("GPU-a") && msgs[0].contains("can only lower"),
            "{msgs:?}"
        );
    }

    #[test]
    fn per_gpu_limits_from_the_environment_alone() {
        let (c, msgs) = cfg(&[(env::VRAM_LIMITS, "GPU-a:1Gi,GPU-b:2Gi")]);
        assert!(msgs.is_empty(), "{msgs:?}");
        assert_eq!(c.limits.for_gpu("GPU-b"), Some(2 << 30));
        assert_eq!(c.limits.for_gpu("GPU-z"), Some(0));
        let (c, msgs) = cfg(&[(env::VRAM_LIMITS, "GPU-a:1Gi,GPU-a:2Gi")]);
        assert_eq!(c.limits, Limits::Unlimited);
        assert!(
            msgs[0].contains(env::VRAM_LIMITS) && msgs[0].contains("listed twice"),
            "{msgs:?}"
        );
    }
}
