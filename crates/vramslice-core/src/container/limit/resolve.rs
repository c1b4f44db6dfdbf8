//! The one rule deciding the limits from the limit files and the environment.

use super::{FileRead, GpuLimits, LimitFile, parse_limit_file};
use crate::names::env;

/// The limits in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limits {
    /// No limit: pass-through.
    Unlimited,
    /// One limit for the whole container (the single-GPU form): one account that memory on
    /// every device counts toward, as before per-GPU limits existed.
    Single(u64),
    /// A limit per GPU UUID, each GPU with its own account. A device whose UUID is not listed
    /// gets nothing: its allocations are refused (fail closed).
    PerGpu(GpuLimits),
}

impl Limits {
    /// The most GPU `uuid` may hold: `None` = no limit; under [`Limits::Single`] the one limit
    /// (shared with the container's other devices); under [`Limits::PerGpu`] its entry, or 0
    /// when it has none.
    pub fn for_gpu(&self, uuid: &str) -> Option<u64> {
        match self {
            Limits::Unlimited => None,
            Limits::Single(limit) => Some(*limit),
            Limits::PerGpu(gpus) => Some(gpus.get(uuid).unwrap_or(0)),
        }
    }

    /// Whether a limit is in force.
    pub fn is_limited(&self) -> bool {
        !matches!(self, Limits::Unlimited)
    }
}

/// The environment's limit variables, as read (`None` = unset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitEnv<'a> {
    /// `VRAMSLICE_VRAM_LIMIT_BYTES`: one limit (bytes or a quantity).
    pub limit_bytes: Option<&'a str>,
    /// `VRAMSLICE_VRAM_LIMITS`: `<uuid>:<bytes>,...` (bytes or quantities).
    pub limits: Option<&'a str>,
}

impl<'a> LimitEnv<'a> {
    /// Only `VRAMSLICE_VRAM_LIMIT_BYTES`.
    pub fn single(limit_bytes: Option<&'a str>) -> LimitEnv<'a> {
        LimitEnv {
            limit_bytes,
            limits: None,
        }
    }
}

/// The outcome of [`resolve_limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLimits {
    /// The limits in force.
    pub limits: Limits,
    /// GPU UUID a valid single-form limit file named in its `gpu=` line (empty when none did).
    pub file_gpu_uuid: String,
}

/// What the limit files grant, before the environment.
enum Grant {
    Single(u64),
    PerGpu(GpuLimits),
}

const FAIL_CLOSED: &str = "failing closed: every allocation is refused";

/// The one rule deciding the limits, from the environment ([`LimitEnv`]) and each limit file
/// read (path, outcome). Messages for the caller to print go to `msgs`.
///
/// Files:
/// - Each limit file that exists must parse; one that cannot be read or parsed fails closed
///   (everything refused: `Single(0)`, with a message). Missing files do not count.
/// - Several files of the single form: the smallest limit. Several of the per-GPU form: the
///   GPUs every file lists, each with its smallest limit (a GPU missing from one file is refused,
///   with a message). Files of both forms at once fail closed.
///
/// The environment, with a file, only lowers:
/// - `VRAMSLICE_VRAM_LIMIT_BYTES` lowers the single limit, or under per-GPU limits every GPU's
///   limit (a single limit applies to every device).
/// - `VRAMSLICE_VRAM_LIMITS` lowers each listed GPU's limit; a GPU the file does not list gets
///   nothing from it. Against a single-form file it lowers the limit by the entry of the file's
///   `gpu=` GPU, and is otherwise ignored.
/// - A value above the file's is ignored for that GPU, malformed values are ignored; each with a
///   message.
///
/// With no file, the environment alone decides: nothing set = no limit;
/// `VRAMSLICE_VRAM_LIMIT_BYTES` alone = one limit for the container; `VRAMSLICE_VRAM_LIMITS` =
/// per-GPU limits (each capped by `VRAMSLICE_VRAM_LIMIT_BYTES` when both are set). A malformed
/// value is ignored with a message; with nothing valid left the limit is not enforced.
pub fn resolve_limits(
    environment: LimitEnv<'_>,
    files: &[(String, FileRead)],
    msgs: &mut Vec<String>,
) -> ResolvedLimits {
    let (grant, file_gpu_uuid) = file_grant(files, msgs);
    let single = env_value(environment.limit_bytes, env::VRAM_LIMIT_BYTES, |v| {
        crate::parse_bytes(v).map_err(|e| e.to_string())
    });
    let per = env_value(environment.limits, env::VRAM_LIMITS, |v| {
        GpuLimits::parse_env(v).map_err(|e| e.to_string())
    });
    let limits = match grant {
        None => env_alone(single, per, msgs),
        Some(Grant::Single(limit)) => {
            Limits::Single(lower_single(limit, &file_gpu_uuid, single, per, msgs))
        }
        Some(Grant::PerGpu(gpus)) => Limits::PerGpu(lower_per_gpu(&gpus, single, per, msgs)),
    };
    ResolvedLimits {
        limits,
        file_gpu_uuid,
    }
}

type EnvValue<T> = Option<Result<T, String>>;

fn env_value<T>(
    value: Option<&str>,
    name: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> EnvValue<T> {
    let v = value?;
    if v.trim().is_empty() {
        return None;
    }
    Some(parse(v.trim()).map_err(|e| format!("{name}={v:?} is malformed: {e}")))
}

fn file_grant(files: &[(String, FileRead)], msgs: &mut Vec<String>) -> (Option<Grant>, String) {
    let mut failed = false;
    let mut gpu_uuid = String::new();
    let mut singles: Vec<(&str, u64)> = Vec::new();
    let mut per_gpu: Vec<(&str, GpuLimits)> = Vec::new();
    for (path, read) in files {
        match read {
            FileRead::Missing => {}
            FileRead::Error(e) => {
                msgs.push(format!(
                    "limit file {path} cannot be read ({e}); {FAIL_CLOSED}"
                ));
                failed = true;
            }
            FileRead::Text(text) => match parse_limit_file(text) {
                Ok(LimitFile::Single {
                    limit_bytes,
                    gpu_uuid: gpu,
                }) => {
                    if gpu_uuid.is_empty() {
                        gpu_uuid = gpu;
                    }
                    singles.push((path, limit_bytes));
                }
                Ok(LimitFile::PerGpu(gpus)) => per_gpu.push((path, gpus)),
                Err(e) => {
                    msgs.push(format!("limit file {path}: {e}; {FAIL_CLOSED}"));
                    failed = true;
                }
            },
        }
    }
    if failed {
        return (Some(Grant::Single(0)), gpu_uuid);
    }
    let grant = match (singles.first(), per_gpu.first()) {
        (None, None) => None,
        (Some((single_path, _)), Some((per_path, _))) => {
            msgs.push(format!(
                "limit files {single_path} (limit=) and {per_path} (limits=) give the limit in different forms; {FAIL_CLOSED}"
            ));
            Some(Grant::Single(0))
        }
        (Some(_), None) => singles.iter().map(|(_, l)| *l).min().map(Grant::Single),
        (None, Some(_)) => Some(intersect(&per_gpu, msgs)),
    };
    (grant, gpu_uuid)
}

/// The GPUs every per-GPU file lists, each with its smallest limit.
fn intersect(files: &[(&str, GpuLimits)], msgs: &mut Vec<String>) -> Grant {
    let (first_path, first) = &files[0];
    let mut acc = first.clone();
    for (path, gpus) in &files[1..] {
        for (uuid, _) in acc.iter().filter(|(u, _)| !gpus.contains(u)) {
            msgs.push(format!(
                "GPU {uuid} has a limit in limit file {first_path} but none in {path}; its allocations are refused"
            ));
        }
        for (uuid, _) in gpus.iter().filter(|(u, _)| !acc.contains(u)) {
            msgs.push(format!(
                "GPU {uuid} has a limit in limit file {path} but none in {first_path}; its allocations are refused"
            ));
        }
        match acc.filter(|u, _| gpus.contains(u)) {
            Some(kept) => acc = kept.map(|u, b| b.min(gpus.get(u).unwrap_or(0))),
            None => return Grant::Single(0),
        }
    }
    Grant::PerGpu(acc)
}

fn env_alone(single: EnvValue<u64>, per: EnvValue<GpuLimits>, msgs: &mut Vec<String>) -> Limits {
    let not_enforced = |e: String| format!("{e}; the limit is NOT enforced (pass-through)");
    match (single, per) {
        (None, None) => Limits::Unlimited,
        (Some(Ok(s)), None) => Limits::Single(s),
        (None, Some(Ok(p))) => Limits::PerGpu(p),
        (Some(Ok(s)), Some(Ok(p))) => Limits::PerGpu(p.map(|_, b| b.min(s))),
        (Some(Err(e)), None) | (None, Some(Err(e))) => {
            msgs.push(not_enforced(e));
            Limits::Unlimited
        }
        (Some(Err(a)), Some(Err(b))) => {
            msgs.push(not_enforced(a));
            msgs.push(not_enforced(b));
            Limits::Unlimited
        }
        (Some(Ok(s)), Some(Err(e))) => {
            msgs.push(format!(
                "{e}; ignored ({} alone gives the limit)",
                env::VRAM_LIMIT_BYTES
            ));
            Limits::Single(s)
        }
        (Some(Err(e)), Some(Ok(p))) => {
            msgs.push(format!(
                "{e}; ignored ({} alone gives the limits)",
                env::VRAM_LIMITS
            ));
            Limits::PerGpu(p)
        }
    }
}

fn lower_single(
    file: u64,
    file_gpu: &str,
    single: EnvValue<u64>,
    per: EnvValue<GpuLimits>,
    msgs: &mut Vec<String>,
) -> u64 {
    let mut limit = file;
    match single {
        None => {}
        Some(Ok(bytes)) => {
            if bytes > file {
                msgs.push(format!(
                    "{}={bytes} is above the limit file's {file} bytes and is ignored (the environment can only lower the limit)",
                    env::VRAM_LIMIT_BYTES
                ));
            }
            limit = limit.min(bytes);
        }
        Some(Err(e)) => msgs.push(format!("{e}; using the limit file's {file} bytes")),
    }
    match per {
        None => {}
        Some(Ok(gpus)) => match gpus.get(file_gpu).filter(|_| !file_gpu.is_empty()) {
            Some(bytes) => {
                if bytes > file {
                    msgs.push(format!(
                        "{} gives GPU {file_gpu} {bytes} bytes, above the limit file's {file} bytes; ignored (the environment can only lower the limit)",
                        env::VRAM_LIMITS
                    ));
                }
                limit = limit.min(bytes);
            }
            None if file_gpu.is_empty() => msgs.push(format!(
                "{} is ignored: the limit file gives one limit and names no GPU (no gpu= line) to match its entries to",
                env::VRAM_LIMITS
            )),
            None => msgs.push(format!(
                "{} has no entry for the limit file's GPU {file_gpu}; the limit file's {file} bytes stand",
                env::VRAM_LIMITS
            )),
        },
        Some(Err(e)) => msgs.push(format!("{e}; using the limit file's {file} bytes")),
    }
    limit
}

fn lower_per_gpu(
    file: &GpuLimits,
    single: EnvValue<u64>,
    per: EnvValue<GpuLimits>,
    msgs: &mut Vec<String>,
) -> GpuLimits {
    let mut out = file.clone();
    let total = file.iter().fold(0u64, |sum, (_, b)| sum.saturating_add(b));
    match single {
        None => {}
        // What the plugin gives a container spanning GPUs: the sum of its GPUs' limits, for
        // readers of the one variable. It lowers nothing.
        Some(Ok(bytes)) if file.len() > 1 && bytes == total => {}
        Some(Ok(bytes)) => {
            for (uuid, limit) in file.iter().filter(|(_, l)| bytes > *l) {
                msgs.push(format!(
                    "{}={bytes} is above the limit file's {limit} bytes for GPU {uuid} and is ignored there (the environment can only lower the limit)",
                    env::VRAM_LIMIT_BYTES
                ));
            }
            out = out.map(|_, b| b.min(bytes));
        }
        Some(Err(e)) => msgs.push(format!("{e}; using the limit file's per-GPU limits")),
    }
    match per {
        None => {}
        Some(Ok(gpus)) => {
            for (uuid, bytes) in gpus.iter() {
                match file.get(uuid) {
                    None => msgs.push(format!(
                        "{} names GPU {uuid}, which the limit file does not list; ignored (the environment cannot give a GPU a limit)",
                        env::VRAM_LIMITS
                    )),
                    Some(limit) if bytes > limit => msgs.push(format!(
                        "{} gives GPU {uuid} {bytes} bytes, above the limit file's {limit} bytes; ignored (the environment can only lower the limit)",
                        env::VRAM_LIMITS
                    )),
                    Some(_) => {}
                }
            }
            out = out.map(|u, b| gpus.get(u).map_or(b, |v| b.min(v)));
        }
        Some(Err(e)) => msgs.push(format!("{e}; using the limit file's per-GPU limits")),
    }
    out
}
