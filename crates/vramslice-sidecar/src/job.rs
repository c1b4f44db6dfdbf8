//! What a caller asks the runtime to run: a key, the parameters that change its memory, and
//! optionally a declared need.

use std::collections::BTreeMap;
use std::time::Duration;

use vramslice_core::{QuantityError, parse_bytes};

/// A job: a model load or a request, identified for profiling by its key and parameters.
///
/// ```
/// use vramslice_sidecar::Job;
/// let job = Job::new("whisper-large").param("batch", 8).need_str("6Gi").unwrap();
/// assert_eq!(job.declared_need(), Some(6 << 30));
/// assert_eq!(job.params()["batch"], "8");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    key: String,
    params: BTreeMap<String, String>,
    need: Option<u64>,
    timeout: Option<Duration>,
}

impl Job {
    /// A job with this key (usually the model name), no parameters and no declared need.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            params: BTreeMap::new(),
            need: None,
            timeout: None,
        }
    }

    /// Add a parameter that changes the job's memory (batch size, sequence length, dtype…).
    pub fn param(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.params.insert(name.into(), value.to_string());
        self
    }

    /// Declare the need in bytes. Without it the need is learned from the job's profile.
    pub fn need(mut self, bytes: u64) -> Self {
        self.need = Some(bytes);
        self
    }

    /// Declare the need as a Kubernetes quantity (`6Gi`, `512Mi`).
    pub fn need_str(self, quantity: &str) -> Result<Self, QuantityError> {
        Ok(self.need(parse_bytes(quantity)?))
    }

    /// Wait at most `timeout` for admission instead of the runtime's queue timeout (a model
    /// load that should give up quickly, a request with its own deadline). Longer than a day
    /// ([`MAX_WAIT`](crate::config::MAX_WAIT)) is cut to a day.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The parameters, sorted by name.
    pub fn params(&self) -> &BTreeMap<String, String> {
        &self.params
    }

    /// The admission timeout of this job, if it overrides the runtime's.
    pub fn admission_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The declared need, if any.
    pub fn declared_need(&self) -> Option<u64> {
        self.need
    }
}
