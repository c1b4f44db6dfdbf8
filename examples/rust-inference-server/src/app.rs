//! The HTTP service: `POST /v1/infer`, `GET /metrics`, `GET /healthz`. The model load and every
//! request run through the vramslice runtime (admission by memory, learned peaks per batch size,
//! out-of-memory retry).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vramslice_sidecar::{AdmitError, Config, Hooks, Job, RunError, Runtime};

use crate::device::{Cuda, DeviceError, Loaded, SimVram, load};
use crate::model::{ModelSpec, Weights, checksum, input};

/// Which device to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when a driver is present, else the CPU.
    Auto,
    /// The CPU with simulated device memory.
    Cpu,
    /// CUDA or fail.
    Cuda,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Device choice.
    pub device: DeviceChoice,
    /// Model shape.
    pub model: ModelSpec,
    /// Simulated device memory on the CPU (the limit the guard would enforce).
    pub cpu_limit: u64,
    /// Extra device memory a request holds per batch item (activations, caches).
    pub workspace_per_item: u64,
    /// Largest batch accepted.
    pub max_batch: u32,
    /// Bypass the runtime (to compare against a naive server).
    pub admission: bool,
    /// Runtime configuration (limit, profile dir, timeouts, retries...).
    pub runtime: Config,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The sidecar runtime.
    pub rt: Runtime,
    model: Arc<Loaded>,
    settings: Arc<Settings>,
    /// The simulated device, when on the CPU.
    pub vram: Option<SimVram>,
}

/// Building the service failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The runtime could not start.
    #[error("sidecar runtime: {0}")]
    Runtime(#[from] vramslice_sidecar::RuntimeError),
    /// The device could not be opened.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// Loading the model failed.
    #[error("loading the model: {0}")]
    Load(String),
}

/// Open the device, start the runtime and load the model through it.
pub fn build(settings: Settings) -> Result<(Router, AppState), BuildError> {
    let cuda = match settings.device {
        DeviceChoice::Cpu => None,
        DeviceChoice::Auto => Cuda::open()?,
        DeviceChoice::Cuda => {
            Some(Cuda::open()?.ok_or_else(|| DeviceError::Driver("no CUDA driver found".into()))?)
        }
    }
    .map(Arc::new);
    let (rt, vram) = match &cuda {
        Some(_) => {
            let rt = match &settings.runtime.accounting_dir {
                Some(dir) => Runtime::new(
                    settings.runtime.clone(),
                    // Under per-GPU limits the guard keeps one file per GPU: this GPU's.
                    vramslice_sidecar::usage::AccountingFile::in_dir_for(
                        dir,
                        settings.runtime.gpu_uuid.as_deref(),
                    ),
                )?,
                None => Runtime::new(
                    settings.runtime.clone(),
                    vramslice_sidecar::ffi::cuda::CudaMemInfo::load()
                        .map_err(|e| vramslice_sidecar::RuntimeError::Usage(e.into()))?,
                )?,
            };
            (rt, None)
        }
        None => {
            let vram = SimVram::new(settings.cpu_limit);
            let config = Config {
                limit: Some(settings.runtime.limit.unwrap_or(settings.cpu_limit)),
                ..settings.runtime.clone()
            };
            (Runtime::new(config, vram.usage())?, Some(vram))
        }
    };
    let weights = Weights::generate(settings.model);
    let job = Job::new("mlp-load")
        .param("dim", settings.model.dim)
        .param("layers", settings.model.layers)
        .need(weights.bytes());
    let model = rt
        .run_blocking(&job, &Hooks::default(), |_| {
            load(weights.clone(), vram.as_ref(), cuda.as_ref())
        })
        .map_err(|e| BuildError::Load(e.to_string()))?;
    tracing::info!(
        device = model.device(),
        bytes = weights.bytes(),
        "model loaded"
    );
    let state = AppState {
        rt,
        model: Arc::new(model),
        settings: Arc::new(settings),
        vram,
    };
    let router = Router::new()
        .route("/v1/infer", post(infer))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state.clone());
    Ok((router, state))
}

/// Body of `POST /v1/infer`.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferRequest {
    /// Batch size, 1 ..= max batch.
    pub batch: u32,
    /// Input seed (the input is generated deterministically from it).
    #[serde(default)]
    pub seed: u64,
}

/// Successful answer.
#[derive(Debug, Deserialize, Serialize)]
pub struct InferResponse {
    /// Digest of the outputs.
    pub checksum: f64,
    /// "cpu" or "cuda".
    pub device: String,
    /// Attempts it took (1 = no retry).
    pub attempts: u32,
}

/// Error body.
#[derive(Debug, Deserialize, Serialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// "bad-request", "refused", "queue-timeout", "out-of-memory", "device".
    pub kind: String,
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            kind: kind.to_string(),
        }),
    )
        .into_response()
}

async fn infer(
    State(state): State<AppState>,
    body: Result<Json<InferRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad-request", e.body_text()),
    };
    let max = state.settings.max_batch;
    if req.batch == 0 || req.batch > max {
        return error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("batch must be between 1 and {max}, got {}", req.batch),
        );
    }
    let x = Arc::new(input(&state.settings.model, req.batch as usize, req.seed));
    let workspace = u64::from(req.batch) * state.settings.workspace_per_item;
    let attempts = Arc::new(AtomicU32::new(0));
    let run_once = {
        let (model, attempts) = (Arc::clone(&state.model), Arc::clone(&attempts));
        move |_: u32| {
            attempts.fetch_add(1, Ordering::SeqCst);
            let (model, x) = (Arc::clone(&model), Arc::clone(&x));
            async move {
                tokio::task::spawn_blocking(move || model.forward(&x, workspace))
                    .await
                    .unwrap_or_else(|e| Err(DeviceError::Driver(format!("worker failed: {e}"))))
            }
        }
    };
    let result = if state.settings.admission {
        // On a task of its own: a client that goes away drops this handler, and the permit
        // must not go back to the line while the forward pass still runs on its worker.
        let rt = state.rt.clone();
        let job = Job::new("mlp-forward").param("batch", req.batch);
        tokio::spawn(async move { rt.run(&job, &Hooks::default(), run_once).await })
            .await
            .unwrap_or_else(|e| {
                Err(RunError::Job(DeviceError::Driver(format!(
                    "job failed: {e}"
                ))))
            })
    } else {
        run_once(0).await.map_err(|e| {
            if matches!(e, DeviceError::OutOfMemory(_)) {
                RunError::OutOfMemory {
                    attempts: 1,
                    last: e,
                }
            } else {
                RunError::Job(e)
            }
        })
    };
    match result {
        Ok(y) => Json(InferResponse {
            checksum: checksum(&y),
            device: state.model.device().to_string(),
            attempts: attempts.load(Ordering::SeqCst),
        })
        .into_response(),
        Err(RunError::Admit(e @ AdmitError::Timeout { .. })) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue-timeout",
            e.to_string(),
        ),
        Err(RunError::Admit(e)) => error(StatusCode::SERVICE_UNAVAILABLE, "refused", e.to_string()),
        Err(e @ RunError::OutOfMemory { .. }) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            "out-of-memory",
            e.to_string(),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "device", e.to_string()),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.rt.render_metrics(),
    )
        .into_response()
}

/// On the CPU: a neighbour outside admission control that grabs `bytes` for `hold` every
/// `every` (another process's spike), so the retry path is exercised. Stops when `stop` fires.
pub fn spawn_noise(
    vram: SimVram,
    bytes: u64,
    every: Duration,
    hold: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if let Ok(held) = vram.alloc(bytes) {
                tokio::time::sleep(hold).await;
                drop(held);
            }
        }
    });
}
