//! `vramslice._native`: the sidecar runtime as a Python extension module.
//!
//! Python calls come in as `Runtime(...)`, `Runtime.admit(key, need, params)` and the `Permit`
//! methods; they leave as `Permit` objects, Python exceptions (`Refused`, `QueueTimeout`,
//! `UsageError`, `ConfigError`, all subclasses of `VramsliceError`) and metrics text. Blocking
//! calls release the GIL. The pure-Python `vramslice` package wraps this into context managers
//! and a decorator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};
use vramslice_sidecar::policy::{Backoff, ReserveSource};
use vramslice_sidecar::usage::AccountingFile;
use vramslice_sidecar::{Config, ManualUsage, Runtime};

mod convert;
mod permit;

use convert::{
    ConfigError, QueueTimeout, Refused, UsageError, VramsliceError, admit_err, bytes_of, job_of,
    params_of, runtime_err,
};
use permit::NativePermit;

/// The sidecar runtime. Keyword arguments override the `VRAMSLICE_*` environment.
/// A cancellation flag for `Runtime.admit`: `set()` makes a waiting admission give up.
#[pyclass(module = "vramslice._native", frozen, name = "Cancel")]
struct NativeCancel {
    flag: Arc<AtomicBool>,
}

#[pymethods]
impl NativeCancel {
    #[new]
    fn new() -> Self {
        NativeCancel {
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Ask the admission waiting with this flag to give up.
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Whether `set()` was called.
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

thread_local! {
    /// A `BaseException` that is not an `Exception` (KeyboardInterrupt, SystemExit) the reclaim
    /// hook raised on this thread: the admission waiting on this thread (which ran the hook)
    /// ends with it.
    static HOOK_INTERRUPT: std::cell::RefCell<Option<PyErr>> = const { std::cell::RefCell::new(None) };
}

/// The runtime each `VRAMSLICE_METRICS_ADDR` endpoint renders, by the process that serves it
/// and the address: the one made last there (as `vramslice.configure` replaces the
/// process-wide runtime). Keyed by process too, so a forked child never takes over (or waits
/// on) an endpoint whose serving thread lives in its parent.
type Endpoints = Mutex<BTreeMap<(u32, String), Arc<Mutex<Runtime>>>>;
static METRICS_ENDPOINTS: std::sync::OnceLock<Endpoints> = std::sync::OnceLock::new();

/// Serve `rt`'s metrics on `addr`: the first runtime of this process with that address opens
/// it, a later one takes it over. An address another process holds already (worker processes
/// inherit the variable: torchrun ranks, gunicorn workers) is not served here, with a
/// `RuntimeWarning`: the runtime works without it.
fn serve_metrics_of(py: Python<'_>, rt: &Runtime, addr: &str) -> PyResult<()> {
    let endpoints = METRICS_ENDPOINTS.get_or_init(Default::default);
    let mut served = endpoints.lock().unwrap_or_else(|e| e.into_inner());
    let key = (std::process::id(), addr.to_string());
    if let Some(current) = served.get(&key) {
        *current.lock().unwrap_or_else(|e| e.into_inner()) = rt.clone();
        return Ok(());
    }
    let current = Arc::new(Mutex::new(rt.clone()));
    let render = Arc::clone(&current);
    let opened = vramslice_sidecar::serve::serve_metrics(
        move || {
            let rt = render.lock().unwrap_or_else(|e| e.into_inner()).clone();
            rt.render_metrics()
        },
        addr,
    );
    match opened {
        Ok(_) => {
            served.insert(key, current);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => runtime_warning(
            py,
            format!(
                "vramslice: VRAMSLICE_METRICS_ADDR={addr:?} is in use (another process of \
                     this server serves it?): this runtime's metrics are not served there"
            ),
        ),
        Err(e) => Err(ConfigError::new_err(format!(
            "VRAMSLICE_METRICS_ADDR={addr:?}: {e}"
        ))),
    }
}

/// Warn the caller with a `RuntimeWarning` (a message with a NUL in it is a `ValueError`).
fn runtime_warning(py: Python<'_>, message: String) -> PyResult<()> {
    let message =
        std::ffi::CString::new(message).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
    PyErr::warn(py, &category, &message, 1)
}

/// The reclaim hook `Runtime(reclaim=...)` asks for: None → `vramslice.default_cleanup`,
/// False → none, a callable → it.
fn reclaim_hook(py: Python<'_>, reclaim: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Py<PyAny>>> {
    match reclaim {
        None => Ok(Some(
            py.import("vramslice")?.getattr("default_cleanup")?.unbind(),
        )),
        Some(obj) if obj.is_none() => reclaim_hook(py, None),
        Some(obj) if obj.is_instance_of::<PyBool>() && !obj.is_truthy()? => Ok(None),
        Some(obj) if obj.is_callable() => Ok(Some(obj.clone().unbind())),
        Some(obj) => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "reclaim must be a callable taking no argument, None (the default) or False, not {}",
            obj.get_type().name()?
        ))),
    }
}

#[pyclass(module = "vramslice._native", frozen)]
struct NativeRuntime {
    rt: Runtime,
    manual: Option<ManualUsage>,
    usage_kind: &'static str,
}

#[pymethods]
impl NativeRuntime {
    /// `limit` can only lower the container's own limit (its limit file and
    /// `VRAMSLICE_VRAM_LIMIT_BYTES`, which the guard enforces); outside a vramslice container it
    /// is the limit.
    /// `usage`: "auto" (accounting file when `VRAMSLICE_ACCOUNTING_DIR` is set, else the CUDA
    /// driver, else manual, with a `RuntimeWarning` naming why the driver could not be used),
    /// "accounting", "cuda" or "manual" (the caller reports usage with `set_usage`).
    /// `reclaim`: called (with no argument) when the job at the head of the line does not fit
    /// although none of this runtime's jobs runs, to give back cached memory; None (the
    /// default) uses `vramslice.default_cleanup` (`gc.collect()` and
    /// `torch.cuda.empty_cache()`), False sets none.
    /// `peak_scope`: "process" (default: a job's peak is this process's growth, from the
    /// accounting file) or "container" (for a front end whose jobs run in another process).
    #[new]
    #[pyo3(signature = (*, limit=None, profile_dir=None, accounting_dir=None, usage="auto",
        high_water=None, first_run_fraction=None, peak_margin=None, queue_max=None,
        queue_timeout=None, oom_retries=None, backoff=None, sample_interval=None, reclaim=None,
        peak_scope=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        limit: Option<&Bound<'_, PyAny>>,
        profile_dir: Option<PathBuf>,
        accounting_dir: Option<PathBuf>,
        usage: &str,
        high_water: Option<f64>,
        first_run_fraction: Option<f64>,
        peak_margin: Option<f64>,
        queue_max: Option<usize>,
        queue_timeout: Option<f64>,
        oom_retries: Option<u32>,
        backoff: Option<f64>,
        sample_interval: Option<f64>,
        reclaim: Option<&Bound<'_, PyAny>>,
        peak_scope: Option<&str>,
    ) -> PyResult<Self> {
        let reclaim = reclaim_hook(py, reclaim)?;
        let mut c = Config::from_env().map_err(|e| ConfigError::new_err(e.to_string()))?;
        if let Some(l) = limit.filter(|l| !l.is_none()) {
            // Like the environment, an explicit limit can only lower the container's limit
            // (its limit file and VRAMSLICE_VRAM_LIMIT_BYTES, which the guard enforces).
            let explicit = bytes_of(l)?;
            if explicit == 0 {
                return Err(PyValueError::new_err(
                    "limit=0: expected more than 0 bytes (no job could ever be admitted)",
                ));
            }
            c.limit = Some(
                c.limit
                    .map_or(explicit, |container| container.min(explicit)),
            );
        }
        c.profile_dir = profile_dir.or(c.profile_dir);
        c.accounting_dir = accounting_dir.or(c.accounting_dir);
        let secs = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s).map_err(|_| {
                PyValueError::new_err(format!("{what} must be a non-negative number of seconds"))
            })
        };
        if let Some(v) = high_water {
            c.policy.high_water = v;
        }
        if let Some(v) = first_run_fraction {
            c.policy.first_run_fraction = v;
        }
        if let Some(v) = peak_margin {
            c.policy.peak_margin = v;
        }
        if let Some(v) = queue_max {
            c.queue_max = v;
        }
        if let Some(v) = queue_timeout {
            c.queue_timeout = secs(v, "queue_timeout")?;
        }
        if let Some(v) = oom_retries {
            c.oom_retries = v;
        }
        if let Some(v) = backoff {
            c.backoff = Backoff::from_base(secs(v, "backoff")?);
        }
        if let Some(v) = sample_interval {
            c.sample_interval = secs(v, "sample_interval")?;
        }
        if let Some(v) = peak_scope {
            c.peak_scope = v
                .parse()
                .map_err(|e| PyValueError::new_err(format!("peak_scope={v:?}: {e}")))?;
        }
        enum Source {
            Accounting(PathBuf),
            Cuda(vramslice_sidecar::ffi::cuda::CudaMemInfo),
            Manual,
        }
        let cuda = || {
            vramslice_sidecar::ffi::cuda::CudaMemInfo::load()
                .map_err(|e| UsageError::new_err(format!("CUDA driver: {e}")))
        };
        let source = match (usage, c.accounting_dir.clone()) {
            ("auto" | "accounting", Some(dir)) => Source::Accounting(dir),
            ("accounting", None) => {
                return Err(ConfigError::new_err(
                    "usage='accounting' needs accounting_dir or VRAMSLICE_ACCOUNTING_DIR",
                ));
            }
            ("auto", None) => match cuda() {
                Ok(info) => Source::Cuda(info),
                Err(why) => {
                    runtime_warning(
                        py,
                        format!(
                            "vramslice: {why}; usage='auto' falls back to usage reported with \
                             set_usage(), which is 0 until then (admission does not see memory \
                             in use)"
                        ),
                    )?;
                    Source::Manual
                }
            },
            ("cuda", _) => Source::Cuda(cuda()?),
            ("manual", _) => Source::Manual,
            (other, _) => {
                return Err(PyValueError::new_err(format!(
                    "usage={other:?}: expected 'auto', 'accounting', 'cuda' or 'manual'"
                )));
            }
        };
        let built: PyResult<Self> = py.detach(|| match source {
            Source::Accounting(dir) => Ok(Self {
                rt: {
                    let file = AccountingFile::in_dir_for(&dir, c.gpu_uuid.as_deref());
                    Runtime::new(c, file).map_err(runtime_err)?
                },
                manual: None,
                usage_kind: "accounting",
            }),
            Source::Cuda(info) => Ok(Self {
                rt: Runtime::new(c, info).map_err(runtime_err)?,
                manual: None,
                usage_kind: "cuda",
            }),
            Source::Manual => {
                let m = ManualUsage::new(0, 0);
                Ok(Self {
                    rt: Runtime::new(c, m.clone()).map_err(runtime_err)?,
                    manual: Some(m),
                    usage_kind: "manual",
                })
            }
        });
        let built = built?;
        if let Some(addr) = built.rt.config().metrics_addr.clone() {
            serve_metrics_of(py, &built.rt, &addr)?;
        }
        if let Some(hook) = reclaim {
            built.rt.set_reclaim(move || {
                Python::attach(|py| {
                    let Err(e) = hook.call0(py) else { return };
                    if e.is_instance_of::<PyException>(py) {
                        // A hook that fails must not stop admission: the job keeps waiting.
                        e.write_unraisable(py, None);
                    } else {
                        // KeyboardInterrupt (Ctrl-C while the hook ran), SystemExit (a SIGTERM
                        // handler): the wait on this thread, which called the hook, ends with it.
                        HOOK_INTERRUPT.with(|slot| *slot.borrow_mut() = Some(e));
                    }
                })
            });
        }
        Ok(built)
    }

    /// Admit a job, blocking (without the GIL) while memory is short. Returns a `Permit`.
    /// `timeout` (seconds) overrides the runtime's queue timeout for this job. With `cancel`
    /// (a `Cancel`), the wait gives up its place in line soon after `cancel.set()` and raises
    /// `asyncio.CancelledError`: for a wait run in a thread on behalf of an asyncio task.
    #[pyo3(signature = (key, need=None, params=None, timeout=None, cancel=None))]
    fn admit(
        &self,
        py: Python<'_>,
        key: &str,
        need: Option<&Bound<'_, PyAny>>,
        params: Option<&Bound<'_, PyDict>>,
        timeout: Option<f64>,
        cancel: Option<PyRef<'_, NativeCancel>>,
    ) -> PyResult<NativePermit> {
        let mut job = job_of(key, need, params)?;
        if let Some(t) = timeout {
            job = job.timeout(Duration::try_from_secs_f64(t).map_err(|_| {
                PyValueError::new_err("timeout must be a non-negative number of seconds")
            })?);
        }
        let rt = self.rt.clone();
        let cancel = cancel.map(|c| c.flag.clone());
        // On the main thread a signal (Ctrl-C, a SIGTERM handler) must end the wait as it ends
        // any blocking call: its handler runs, and what it raises is raised here.
        let threading = py.import("threading")?;
        let main_thread = threading
            .call_method0("main_thread")?
            .is(&threading.call_method0("current_thread")?);
        let interrupted: Mutex<Option<PyErr>> = Mutex::new(None);
        let signalled = || {
            if let Some(e) = HOOK_INTERRUPT.with(|slot| slot.borrow_mut().take()) {
                *interrupted.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return true;
            }
            if !main_thread {
                return false;
            }
            match Python::attach(|py| py.check_signals()) {
                Ok(()) => false,
                Err(e) => {
                    *interrupted.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    true
                }
            }
        };
        let outcome = py.detach(|| match &cancel {
            Some(flag) => {
                rt.admit_blocking_unless(&job, &|| flag.load(Ordering::Acquire) || signalled())
            }
            None => rt.admit_blocking_unless(&job, &signalled),
        });
        // The hook may have raised in the very look that then admitted the job (it freed the
        // memory): the interrupt still ends this call, and the permit goes back with it.
        let late = HOOK_INTERRUPT.with(|slot| slot.borrow_mut().take());
        if let Some(e) = interrupted
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .or(late)
        {
            drop(outcome);
            return Err(e);
        }
        let permit = outcome.map_err(admit_err)?;
        Ok(NativePermit {
            reserved: permit.reserved(),
            source: match permit.source() {
                ReserveSource::Declared => "declared",
                ReserveSource::Profile => "profile",
                ReserveSource::FirstRun => "first-run",
            },
            permit: Mutex::new(Some(permit)),
        })
    }

    /// Report live usage in bytes (only for `usage="manual"`).
    fn set_usage(&self, used: &Bound<'_, PyAny>) -> PyResult<()> {
        let m = self.manual.as_ref().ok_or_else(|| {
            PyRuntimeError::new_err(format!(
                "set_usage needs usage='manual', this runtime reads {}",
                self.usage_kind
            ))
        })?;
        m.set(bytes_of(used)?);
        Ok(())
    }

    /// Where live usage comes from: "accounting", "cuda" or "manual".
    #[getter]
    fn usage_kind(&self) -> &'static str {
        self.usage_kind
    }

    /// The metrics as OpenMetrics text (ending in `# EOF`): serve them with the content type
    /// `vramslice.METRICS_CONTENT_TYPE`.
    fn render_metrics(&self, py: Python<'_>) -> String {
        let rt = self.rt.clone();
        py.detach(move || rt.render_metrics())
    }

    /// Seconds to wait before retry `attempt` (0-based).
    fn backoff(&self, attempt: u32) -> f64 {
        self.rt.config().backoff.delay(attempt).as_secs_f64()
    }

    /// Retries allowed after out-of-memory.
    #[getter]
    fn oom_retries(&self) -> u32 {
        self.rt.config().oom_retries
    }

    /// Count a retry in the metrics.
    fn note_retry(&self) {
        self.rt.note_retry();
    }

    /// The learned peak in bytes of `key` + `params`, or None.
    #[pyo3(signature = (key, params=None))]
    fn learned_peak(&self, key: &str, params: Option<&Bound<'_, PyDict>>) -> PyResult<Option<u64>> {
        Ok(self.rt.learned_peak(&job_of(key, None, params)?))
    }

    /// Admission state: limit, capacity, live, reserved, free, running, queued.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.rt.stats();
        let d = PyDict::new(py);
        d.set_item("limit", s.limit)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("live", s.live)?;
        d.set_item("reserved", s.reserved)?;
        d.set_item("free", s.free)?;
        d.set_item("running", s.running)?;
        d.set_item("queued", s.queued)?;
        Ok(d)
    }
}

/// Parse a quantity ("6Gi", "512Mi", "1.5Gi") into bytes.
#[pyfunction]
fn parse_bytes(text: &str) -> PyResult<u64> {
    vramslice_core::parse_bytes(text).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Whether a message reads as a GPU out-of-memory error.
#[pyfunction]
fn message_is_out_of_memory(message: &str) -> bool {
    vramslice_sidecar::message_is_out_of_memory(message)
}

/// The profile file name of `key` + `params` (stable across languages).
#[pyfunction]
#[pyo3(signature = (key, params=None))]
fn profile_file_name(key: &str, params: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    Ok(vramslice_sidecar::profile_key::profile_file_name(
        key,
        &params_of(params)?,
    ))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativeRuntime>()?;
    m.add_class::<NativePermit>()?;
    m.add_class::<NativeCancel>()?;
    m.add_function(wrap_pyfunction!(parse_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(message_is_out_of_memory, m)?)?;
    m.add_function(wrap_pyfunction!(profile_file_name, m)?)?;
    m.add(
        "METRICS_CONTENT_TYPE",
        vramslice_sidecar::metrics::METRICS_CONTENT_TYPE,
    )?;
    m.add("VramsliceError", py.get_type::<VramsliceError>())?;
    m.add("Refused", py.get_type::<Refused>())?;
    m.add("QueueTimeout", py.get_type::<QueueTimeout>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    Ok(())
}
