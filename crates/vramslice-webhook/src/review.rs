//! `AdmissionReview` (admission.k8s.io/v1) in and out: the pod becomes a
//! [`PodAdmissionView`](vramslice_core::cluster::admission::PodAdmissionView), the core decides, and the decision becomes an always-allowed response
//! with an optional base64 JSON Patch.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vramslice_api::convert::admission_view;
use vramslice_core::cluster::admission::{AdmissionDecision, AdmissionPolicy, Unchanged, decide};

/// API version of the reviews this webhook speaks.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// An incoming `AdmissionReview` (only the fields the webhook reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewIn {
    /// Must be `admission.k8s.io/v1`.
    pub api_version: String,
    /// Must be `AdmissionReview`.
    pub kind: String,
    /// The request; absent means the review is malformed.
    pub request: Option<AdmissionRequest>,
}

/// The request part of a review.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed back in the response.
    pub uid: String,
    /// `CREATE`, `UPDATE`, ...
    #[serde(default)]
    pub operation: String,
    /// Namespace of the object, for logs.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The object being admitted.
    #[serde(default)]
    pub object: Option<Value>,
}

/// The outgoing review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewOut {
    /// `admission.k8s.io/v1`.
    pub api_version: String,
    /// `AdmissionReview`.
    pub kind: String,
    /// The answer.
    pub response: AdmissionResponse,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's UID.
    pub uid: String,
    /// Always true: this webhook only ever mutates.
    pub allowed: bool,
    /// `JSONPatch` when a patch is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// Base64 of the JSON Patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Warnings shown to the client (kubectl prints them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A review that cannot be answered (the HTTP layer turns it into a 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    /// Not an `admission.k8s.io/v1` `AdmissionReview`.
    #[error("expected an admission.k8s.io/v1 AdmissionReview, got {api_version} {kind}")]
    WrongKind {
        /// The apiVersion received.
        api_version: String,
        /// The kind received.
        kind: String,
    },
    /// The review carries no request.
    #[error("AdmissionReview has no request")]
    NoRequest,
}

/// What happened to one request, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The scheduler name was set.
    Mutated,
    /// The pod was left as it is.
    Unchanged,
    /// The object was not a pod this webhook can read; admitted unchanged.
    Unreadable,
}

impl Outcome {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Mutated => "mutated",
            Outcome::Unchanged => "unchanged",
            Outcome::Unreadable => "unreadable",
        }
    }
}

/// Answer a review. Every well-formed review is allowed; the pod gets a patch when the core's
/// decision says so.
pub fn review(
    input: AdmissionReviewIn,
    policy: AdmissionPolicy,
) -> Result<(AdmissionReviewOut, Outcome), ReviewError> {
    if input.api_version != ADMISSION_API_VERSION || input.kind != "AdmissionReview" {
        return Err(ReviewError::WrongKind {
            api_version: input.api_version,
            kind: input.kind,
        });
    }
    let request = input.request.ok_or(ReviewError::NoRequest)?;
    let mut response = AdmissionResponse {
        uid: request.uid,
        allowed: true,
        patch_type: None,
        patch: None,
        warnings: Vec::new(),
    };
    let pod = (request.operation == "CREATE")
        .then_some(request.object)
        .flatten()
        .and_then(|o| serde_json::from_value::<Pod>(o).ok());
    let outcome = match pod {
        None => Outcome::Unreadable,
        Some(pod) => match decide(&admission_view(&pod), policy) {
            AdmissionDecision::Patch(ops) => match serde_json::to_vec(&ops) {
                Ok(bytes) => {
                    response.patch_type = Some("JSONPatch".to_string());
                    response.patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
                    Outcome::Mutated
                }
                Err(_) => Outcome::Unreadable,
            },
            AdmissionDecision::Unchanged(Unchanged::OtherScheduler(name)) => {
                response.warnings.push(format!(
                    "pod requests vramslice VRAM but names scheduler {name:?}; vramslice only \
                     places pods of vramslice-scheduler"
                ));
                Outcome::Unchanged
            }
            AdmissionDecision::Unchanged(_) => Outcome::Unchanged,
        },
    };
    let out = AdmissionReviewOut {
        api_version: ADMISSION_API_VERSION.to_string(),
        kind: "AdmissionReview".to_string(),
        response,
    };
    Ok((out, outcome))
}
