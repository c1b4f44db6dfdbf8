//! `Permit`: memory reserved for one admitted job, as Python holds it.

use std::sync::Mutex;

use pyo3::prelude::*;
use vramslice_sidecar::Permit;

/// Memory reserved for one admitted job; end it with exactly one of `complete`,
/// `out_of_memory` or `release` (later calls do nothing).
#[pyclass(module = "vramslice._native", frozen)]
pub(crate) struct NativePermit {
    pub(crate) permit: Mutex<Option<Permit>>,
    #[pyo3(get)]
    pub(crate) reserved: u64,
    #[pyo3(get)]
    pub(crate) source: &'static str,
}

impl NativePermit {
    fn take(&self) -> Option<Permit> {
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[pymethods]
impl NativePermit {
    /// Take the job's final reading now (its peak is fixed; the memory stays reserved until
    /// the permit ends): release a cache after this, before ending the permit, so the next job
    /// starts from what really stays in use. Returns whether another job of the runtime is
    /// still being measured.
    fn end_measurement(&self, py: Python<'_>) -> bool {
        // The lock is taken without the GIL and let go before it is taken back: a thread that
        // holds the GIL and waits for this lock (`report_peak`, `active`) must not deadlock.
        py.detach(|| {
            self.permit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(|p| p.end_measurement())
        })
    }

    /// The job succeeded: give the memory back, record the peak (returned, or None).
    fn complete(&self, py: Python<'_>) -> Option<u64> {
        let p = self.take()?;
        py.detach(move || p.complete())
    }

    /// The job ran out of memory: give the memory back and raise its peak (returned).
    fn out_of_memory(&self, py: Python<'_>) -> Option<u64> {
        let p = self.take()?;
        Some(py.detach(move || p.out_of_memory()))
    }

    /// Give the memory back without recording anything.
    fn release(&self, py: Python<'_>) {
        if let Some(p) = self.take() {
            py.detach(move || drop(p));
        }
    }

    /// Report the job's own measured peak in bytes: its growth above its start, not an absolute
    /// figure (with one job at a time, `torch.cuda.max_memory_allocated()` after
    /// `torch.cuda.reset_peak_memory_stats()`, minus `torch.cuda.memory_allocated()` at the
    /// start); recorded instead of the sampled one, even beside other jobs, so it must be this
    /// job's alone.
    fn report_peak(&self, bytes: u64) {
        if let Some(p) = self
            .permit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            p.report_peak(bytes);
        }
    }

    /// Whether the permit still holds memory.
    #[getter]
    fn active(&self) -> bool {
        self.permit.lock().map(|p| p.is_some()).unwrap_or(false)
    }
}
