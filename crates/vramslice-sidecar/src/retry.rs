//! Running a job to completion: admit, run, and on out-of-memory clean up, back off, raise the
//! peak and try again.

use std::future::Future;

use crate::job::Job;
use crate::runtime::{AdmitError, Permit, Runtime};

/// The CUDA driver's `CUDA_ERROR_OUT_OF_MEMORY` result code.
pub const CUDA_ERROR_OUT_OF_MEMORY: i32 = 2;

/// Errors that know whether they are an out-of-memory condition.
pub trait OutOfMemory {
    /// Whether this error means the GPU ran out of memory.
    fn is_out_of_memory(&self) -> bool;
}

/// Whether an error message reads as a GPU out-of-memory error: `CUDA_ERROR_OUT_OF_MEMORY`,
/// PyTorch's `CUDA out of memory`, a CUDA library's failed allocation (cuBLAS, cuDNN, cuSOLVER,
/// cuSPARSE `*_STATUS_ALLOC_FAILED`, cuFFT `CUFFT_ALLOC_FAILED`), and the handle cuBLAS could
/// not create for want of memory (`CUBLAS_STATUS_NOT_INITIALIZED when calling cublasCreate`,
/// as PyTorch reports it on a thread's first matmul at a full limit).
pub fn message_is_out_of_memory(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("cuda_error_out_of_memory")
        || lower.contains("out of memory")
        || lower.contains("_status_alloc_failed")
        || lower.contains("cufft_alloc_failed")
        || (lower.contains("cublas_status_not_initialized") && lower.contains("cublascreate"))
}

/// A CUDA driver result code as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaError(pub i32);

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CUDA driver error {}", self.0)?;
        if self.0 == CUDA_ERROR_OUT_OF_MEMORY {
            write!(f, " (CUDA_ERROR_OUT_OF_MEMORY)")?;
        }
        Ok(())
    }
}

impl std::error::Error for CudaError {}

impl OutOfMemory for CudaError {
    fn is_out_of_memory(&self) -> bool {
        self.0 == CUDA_ERROR_OUT_OF_MEMORY
    }
}

/// How a job's errors are classified and what runs between attempts.
pub struct Hooks<'a, E> {
    classify: Box<dyn Fn(&E) -> bool + Send + Sync + 'a>,
    cleanup: Option<Box<dyn Fn() + Send + Sync + 'a>>,
}

impl<E: OutOfMemory> Default for Hooks<'_, E> {
    fn default() -> Self {
        Self::classify(|e: &E| e.is_out_of_memory())
    }
}

impl<'a, E> Hooks<'a, E> {
    /// Classify errors with `f` (true = out-of-memory, retry).
    pub fn classify(f: impl Fn(&E) -> bool + Send + Sync + 'a) -> Self {
        Self {
            classify: Box::new(f),
            cleanup: None,
        }
    }

    /// Run `f` after an out-of-memory error, before backing off (release caches, free buffers).
    pub fn cleanup(mut self, f: impl Fn() + Send + Sync + 'a) -> Self {
        self.cleanup = Some(Box::new(f));
        self
    }

    fn is_oom(&self, e: &E) -> bool {
        (self.classify)(e)
    }

    fn run_cleanup(&self) {
        if let Some(c) = &self.cleanup {
            c();
        }
    }
}

/// Why [`Runtime::run`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The job was not admitted.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// Every attempt ran out of memory.
    #[error("out of memory after {attempts} attempts: {last}")]
    OutOfMemory {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: E,
    },
    /// The job failed with an error that is not out-of-memory (not retried).
    #[error("{0}")]
    Job(E),
}

impl<E> RunError<E> {
    /// Whether the job ultimately failed for lack of memory.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, RunError::OutOfMemory { .. })
    }
}

/// What [`Runtime::settle`] decided after one attempt.
enum Next<T, E> {
    /// The run is over, with this result.
    Finish(Result<T, RunError<E>>),
    /// Out of memory with retries left: try again after this long.
    RetryAfter(std::time::Duration),
}

impl Runtime {
    /// Run `f` under admission, retrying on out-of-memory: after each out-of-memory failure the
    /// permit is returned with the peak raised, `cleanup` runs, the runtime backs off
    /// (`config.backoff`) and the job is admitted again, at most `config.oom_retries` times.
    /// `f` receives the attempt number (0 first).
    ///
    /// The permit lives as long as this future: dropped early (a client gone, a timeout), it
    /// returns the memory at once, so work `f` handed to another thread must not outlive it —
    /// run the whole call on a task of its own (`tokio::spawn`) when the caller may be
    /// dropped. A job admitted while another permit of this runtime is held on its behalf
    /// waits for memory only that permit returns: run nested work under the outer permit.
    /// Admission and the end of each attempt do their small I/O in place (the usage source,
    /// the profile file with its lock and fsyncs, the cleanup hook): with a shared profile
    /// directory under heavy load, run the call on a blocking-capable thread.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use vramslice_sidecar::{Config, CudaError, Hooks, Job, ManualUsage, Runtime};
    /// use vramslice_sidecar::policy::Backoff;
    /// use std::time::Duration;
    /// let config = Config {
    ///     limit: Some(8 << 30),
    ///     backoff: Backoff { base: Duration::from_millis(1), factor: 2.0, max: Duration::from_millis(4) },
    ///     ..Config::default()
    /// };
    /// let rt = Runtime::new(config, ManualUsage::default()).unwrap();
    /// let cleanups = AtomicU32::new(0);
    /// let hooks = Hooks::default().cleanup(|| { cleanups.fetch_add(1, Ordering::SeqCst); });
    /// let out = rt.run(&Job::new("llm").need(1 << 30), &hooks, |attempt| async move {
    ///     if attempt == 0 { Err(CudaError(2)) } else { Ok("tokens") }
    /// }).await;
    /// assert_eq!(out.unwrap(), "tokens");
    /// assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    /// # }
    /// ```
    pub async fn run<T, E, F, Fut>(
        &self,
        job: &Job,
        hooks: &Hooks<'_, E>,
        mut f: F,
    ) -> Result<T, RunError<E>>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0u32;
        loop {
            let permit = self.admit(job).await?;
            let outcome = f(attempt).await;
            match self.settle(job, hooks, permit, attempt, outcome) {
                Next::Finish(result) => return result,
                Next::RetryAfter(wait) => tokio::time::sleep(wait).await,
            }
            attempt += 1;
        }
    }

    /// Blocking form of [`Runtime::run`].
    ///
    /// ```
    /// use vramslice_sidecar::{Config, Hooks, Job, ManualUsage, RunError, Runtime};
    /// let rt = Runtime::new(Config { limit: Some(4 << 30), ..Config::default() }, ManualUsage::default()).unwrap();
    /// let hooks = Hooks::classify(|e: &String| vramslice_sidecar::message_is_out_of_memory(e));
    /// let r: Result<(), _> = rt.run_blocking(&Job::new("m").need(1 << 30), &hooks, |_| Err("bad input".to_string()));
    /// assert!(matches!(r, Err(RunError::Job(_))));
    /// ```
    pub fn run_blocking<T, E, F>(
        &self,
        job: &Job,
        hooks: &Hooks<'_, E>,
        mut f: F,
    ) -> Result<T, RunError<E>>
    where
        F: FnMut(u32) -> Result<T, E>,
    {
        let mut attempt = 0u32;
        loop {
            let permit = self.admit_blocking(job)?;
            let outcome = f(attempt);
            match self.settle(job, hooks, permit, attempt, outcome) {
                Next::Finish(result) => return result,
                Next::RetryAfter(wait) => std::thread::sleep(wait),
            }
            attempt += 1;
        }
    }

    /// What follows one attempt, shared by [`Runtime::run`] and [`Runtime::run_blocking`]:
    /// success completes the permit; out-of-memory runs the cleanup, raises the learned peak and
    /// either gives up (retries spent) or asks for a retry after the backoff; any other error
    /// ends the run.
    fn settle<T, E>(
        &self,
        job: &Job,
        hooks: &Hooks<'_, E>,
        permit: Permit,
        attempt: u32,
        outcome: Result<T, E>,
    ) -> Next<T, E> {
        match outcome {
            Ok(v) => {
                permit.complete();
                Next::Finish(Ok(v))
            }
            Err(e) if hooks.is_oom(&e) => {
                hooks.run_cleanup();
                let raised = permit.out_of_memory();
                if attempt >= self.config().oom_retries {
                    return Next::Finish(Err(RunError::OutOfMemory {
                        attempts: attempt + 1,
                        last: e,
                    }));
                }
                let wait = self.config().backoff.delay(attempt);
                tracing::info!(
                    key = job.key(),
                    attempt,
                    raised,
                    ?wait,
                    "out of memory, retrying"
                );
                self.inner.metrics.retries.inc();
                Next::RetryAfter(wait)
            }
            Err(e) => Next::Finish(Err(RunError::Job(e))),
        }
    }

    /// Count a retry made by a caller that drives its own loop (the C ABI, Python).
    pub fn note_retry(&self) {
        self.inner.metrics.retries.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert!(message_is_out_of_memory(
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory"
        ));
        assert!(message_is_out_of_memory(
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        ));
        assert!(!message_is_out_of_memory("CUDA_ERROR_INVALID_VALUE"));
        for library in [
            "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul( ... )`",
            "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
            "cuFFT error: CUFFT_ALLOC_FAILED",
            "cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`",
            "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`",
        ] {
            assert!(message_is_out_of_memory(library), "{library}");
        }
        // Not initialised for another reason (a bad handle later on) is not a lack of memory.
        assert!(!message_is_out_of_memory(
            "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasSgemm( ... )`"
        ));
        assert!(!message_is_out_of_memory("CUBLAS_STATUS_EXECUTION_FAILED"));
        assert!(CudaError(2).is_out_of_memory());
        assert!(!CudaError(1).is_out_of_memory());
        assert!(
            CudaError(2)
                .to_string()
                .contains("CUDA_ERROR_OUT_OF_MEMORY")
        );
    }
}
