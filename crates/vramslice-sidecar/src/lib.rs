//! `vramslice-sidecar`: lets an inference server live inside its container's GPU memory limit
//! instead of crashing on it.
//!
//! Data enters as jobs ([`Job`]: a key, the parameters that change its memory, maybe a declared
//! need) and as live usage readings (the guard's accounting file, the CUDA driver's
//! `cuMemGetInfo`, or a value the embedder sets). It leaves as [`Permit`]s (memory reserved for
//! a job), clear refusals ("needs 6.0 GiB, limit 4.0 GiB"), learned peaks written to a profile
//! directory shared by the server's processes, and Prometheus metrics.
//!
//! - **Admission** ([`queue`], pure): a job runs when the memory it needs fits below the
//!   high-water mark (default 0.85 of the limit); otherwise it waits in a bounded FIFO queue
//!   with a timeout. A job that can never fit is refused at once.
//! - **Profiling** ([`policy`], [`profile`]): a job with no known peak reserves a conservative
//!   share of the limit (default 0.8) and its real peak is measured; later runs reserve
//!   peak × 1.2. Peaks persist atomically in `VRAMSLICE_PROFILE_DIR`, keyed by
//!   [`profile_key`]; a higher peak replaces a lower one, never the reverse.
//! - **Retry** ([`Runtime::run`]): out-of-memory errors trigger a cleanup callback, exponential
//!   backoff (0.5 s, 1 s, 2 s) and another attempt with the peak raised (for every worker when
//!   the job ran alone; in this process only, until the job is next measured, when it ran
//!   beside others that may have caused the error).
//! - **Metrics** ([`Runtime::render_metrics`], or `VRAMSLICE_METRICS_ADDR`).
//! - **C ABI** ([`ffi`], header `include/vramslice_sidecar.h`); Python lives in
//!   `vramslice-sidecar-py`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use vramslice_sidecar::{Config, Job, ManualUsage, Runtime};
//! let usage = ManualUsage::new(0, 0);
//! let rt = Runtime::new(Config { limit: Some(4 << 30), ..Config::default() }, usage.clone()).unwrap();
//! // Never fits: refused at once, with the numbers.
//! let err = rt.admit(&Job::new("llama-70b").need(6 << 30)).await.unwrap_err();
//! assert!(err.to_string().contains("needs 6.0 GiB, limit 4.0 GiB"));
//! // Fits: admitted; the memory returns when the permit ends.
//! let permit = rt.admit(&Job::new("whisper").need(2 << 30)).await.unwrap();
//! usage.add(1 << 30);
//! permit.complete();
//! # }
//! ```

#![deny(unsafe_code)]

pub mod config;
#[allow(unsafe_code)]
pub mod ffi;
pub mod job;
pub mod metrics;
pub mod policy;
pub mod profile;
pub mod profile_key;
pub mod queue;
mod retry;
mod runtime;
pub mod serve;
pub mod usage;

pub use config::{Config, ConfigError, PeakScope};
pub use job::Job;
pub use retry::{
    CUDA_ERROR_OUT_OF_MEMORY, CudaError, Hooks, OutOfMemory, RunError, message_is_out_of_memory,
};
pub use runtime::{AdmitError, Permit, Runtime, RuntimeError, Stats};
pub use usage::{ManualUsage, UsageReading, UsageSource};
