//! Python values and errors to and from the runtime's: byte amounts, job parameters, jobs, and
//! the module's exceptions for admission and configuration errors.

use std::collections::BTreeMap;

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat};
use vramslice_sidecar::{AdmitError, Job, RuntimeError};

pyo3::create_exception!(
    _native,
    VramsliceError,
    PyException,
    "Base of vramslice's errors."
);
pyo3::create_exception!(
    _native,
    Refused,
    VramsliceError,
    "The job can never fit, or the admission queue is full."
);
pyo3::create_exception!(
    _native,
    QueueTimeout,
    VramsliceError,
    "The job waited the queue timeout without memory freeing."
);
pyo3::create_exception!(
    _native,
    UsageError,
    VramsliceError,
    "Live GPU memory usage could not be read."
);
pyo3::create_exception!(
    _native,
    ConfigError,
    VramsliceError,
    "The runtime configuration is invalid."
);

pub(crate) fn admit_err(e: AdmitError) -> PyErr {
    match e {
        AdmitError::Refused { .. } => Refused::new_err(e.to_string()),
        AdmitError::Timeout { .. } => QueueTimeout::new_err(e.to_string()),
        AdmitError::Usage { .. } => UsageError::new_err(e.to_string()),
        AdmitError::Cancelled { .. } => {
            pyo3::exceptions::asyncio::CancelledError::new_err(e.to_string())
        }
    }
}

pub(crate) fn runtime_err(e: RuntimeError) -> PyErr {
    ConfigError::new_err(e.to_string())
}

/// A byte amount from Python: an int, or a quantity string such as "6Gi".
pub(crate) fn bytes_of(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(n) = value.extract::<u64>() {
        return Ok(n);
    }
    let text: String = value.extract().map_err(|_| {
        PyValueError::new_err("expected bytes as an int or a quantity string like '6Gi'")
    })?;
    vramslice_core::parse_bytes(&text).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A parameter value as text, the way Rust's `to_string` writes it, so that a profile learned
/// from Python and one learned from Rust (or C) have the same key: `True` is `true`, `8.0` is
/// `8`; anything else as Python's `str()`.
fn param_text(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if v.is_instance_of::<PyBool>() {
        return Ok(v.extract::<bool>()?.to_string());
    }
    if v.is_instance_of::<PyFloat>() {
        return Ok(v.extract::<f64>()?.to_string());
    }
    Ok(v.str()?.to_string())
}

pub(crate) fn params_of(params: Option<&Bound<'_, PyDict>>) -> PyResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if let Some(d) = params {
        for (k, v) in d.iter() {
            out.insert(k.str()?.to_string(), param_text(&v)?);
        }
    }
    Ok(out)
}

pub(crate) fn job_of(
    key: &str,
    need: Option<&Bound<'_, PyAny>>,
    params: Option<&Bound<'_, PyDict>>,
) -> PyResult<Job> {
    let mut job = Job::new(key);
    for (k, v) in params_of(params)? {
        job = job.param(k, v);
    }
    if let Some(need) = need.filter(|n| !n.is_none()) {
        job = job.need(bytes_of(need)?);
    }
    Ok(job)
}
