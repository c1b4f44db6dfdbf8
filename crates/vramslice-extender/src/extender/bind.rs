//! The bind verb: re-check and reserve under the ledger lock, then one Binding that carries the
//! placement annotations; a failed binding releases the reservation.

use std::collections::BTreeMap;

use vramslice_api::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID};
use vramslice_core::cluster::ledger::{ReserveError, ReserveRequest};
use vramslice_core::cluster::placement::{PodRequest, Policy};

use super::{BadRequest, Extender, parse_body};
use crate::cluster::ApiError;
use crate::convert::{format_time, pod_request, policy_of};
use crate::metrics::Outcome;
use crate::wire::{ExtenderBindingArgs, ExtenderBindingResult};

impl Extender {
    /// The bind verb: re-check and reserve under the ledger lock, then one Binding that also
    /// carries the placement annotations; any failure releases the reservation and is returned
    /// in `Error`.
    pub async fn bind(&self, body: &[u8]) -> Result<(ExtenderBindingResult, Outcome), BadRequest> {
        let args: ExtenderBindingArgs = parse_body(body, "ExtenderBindingArgs")?;
        for (value, field) in [
            (&args.pod_name, "PodName"),
            (&args.pod_namespace, "PodNamespace"),
            (&args.node, "Node"),
        ] {
            if value.is_empty() {
                return Err(BadRequest::MissingField(field));
            }
        }
        let (error, outcome) = match self.bind_checked(&args).await {
            Ok(outcome) => (String::new(), outcome),
            Err((message, outcome)) => (message, outcome),
        };
        Ok((ExtenderBindingResult { error }, outcome))
    }

    /// The pod to bind: as its filter call showed it (no API call), else read from the API
    /// server. Returns its UID, request and policy.
    async fn pod_to_bind(
        &self,
        args: &ExtenderBindingArgs,
        who: &str,
    ) -> Result<(String, Option<PodRequest>, Policy), String> {
        let (ns, name) = (&args.pod_namespace, &args.pod_name);
        if !args.pod_uid.is_empty()
            && let Some(seen) = self.pending.take(&args.pod_uid)
            && seen.namespace == *ns
            && seen.name == *name
        {
            return Ok((args.pod_uid.clone(), seen.request, seen.policy));
        }
        let pod = self.cluster.get_pod(ns, name).await.map_err(|e| match e {
            ApiError::NotFound => format!("cannot bind pod {who}: pod not found"),
            other => format!("cannot bind pod {who}: reading the pod failed: {other}"),
        })?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if !args.pod_uid.is_empty() && args.pod_uid != uid {
            return Err(format!(
                "cannot bind pod {who}: it has UID {uid}, the bind names UID {}",
                args.pod_uid
            ));
        }
        let request = pod_request(&pod, &self.config.resources)
            .map_err(|e| format!("cannot bind pod {who}: {e}"))?;
        let policy = match request {
            None => self.config.policy,
            Some(_) => policy_of(who, pod.metadata.annotations.as_ref(), self.config.policy)
                .map_err(|e| format!("cannot bind pod {who}: {e}"))?,
        };
        Ok((uid, request, policy))
    }

    async fn bind_checked(&self, args: &ExtenderBindingArgs) -> Result<Outcome, (String, Outcome)> {
        let (ns, name, node) = (&args.pod_namespace, &args.pod_name, &args.node);
        let who = format!("{ns}/{name}");
        let fail = |msg: String| (msg, Outcome::Error);
        let (uid, request, policy) = self.pod_to_bind(args, &who).await.map_err(fail)?;
        let Some(request) = request else {
            // No VRAM: bind like the default binder would.
            self.bind_or_confirm(ns, name, &uid, node, BTreeMap::new())
                .await
                .map_err(fail)?;
            return Ok(Outcome::Ignored);
        };
        self.readiness()
            .map_err(|e| fail(format!("cannot bind pod {who}: vramslice extender {e}")))?;
        let now = self.now();
        let placement = {
            let mut ledger = self.ledger_mut();
            let reserve = ReserveRequest {
                uid: uid.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                request,
            };
            ledger.reserve(reserve, node, policy, now)
        };
        let placement = placement.map_err(|e| {
            let outcome = match e {
                ReserveError::NoFit(_) => Outcome::Conflict,
                _ => Outcome::Error,
            };
            (
                format!("cannot bind pod {who} to node {node}: {e}"),
                outcome,
            )
        })?;
        let annotations = BTreeMap::from([
            (ANNOTATION_GPU_UUID.to_string(), placement.gpu_uuid.clone()),
            (ANNOTATION_ASSIGNED_AT.to_string(), format_time(now)),
        ]);
        match self
            .bind_or_confirm(ns, name, &uid, node, annotations)
            .await
        {
            Ok(()) => {
                tracing::info!(pod = %who, node = %node, gpu = %placement.gpu_uuid,
                    index = ?placement.gpu_indices, bytes = request.bytes(),
                    bytes_per_gpu = request.share_bytes(), "bound");
                Ok(Outcome::Ok)
            }
            Err(message) => {
                self.ledger_mut().release(&uid);
                tracing::warn!(pod = %who, node = %node, error = %message, "bind failed; reservation released");
                Err(fail(message))
            }
        }
    }

    /// Create the Binding; when its answer is lost, ask the API server whether it took.
    async fn bind_or_confirm(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        node: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), String> {
        match self
            .cluster
            .bind_pod(ns, name, uid, node, annotations)
            .await
        {
            Ok(()) => Ok(()),
            // The answer was lost, not necessarily the Binding: ask the API server.
            Err(e @ ApiError::Transport(_)) if self.bound_to(ns, name, uid, node).await => {
                tracing::info!(pod = %format_args!("{ns}/{name}"), error = %e,
                    "binding answer lost, but the pod is bound");
                Ok(())
            }
            Err(ApiError::NotFound) => Err(format!("cannot bind pod {ns}/{name}: pod not found")),
            Err(e) => Err(format!("cannot bind pod {ns}/{name} to node {node}: {e}")),
        }
    }

    /// Whether the API server shows the pod (same UID) bound to `node`.
    async fn bound_to(&self, ns: &str, name: &str, uid: &str, node: &str) -> bool {
        self.cluster.get_pod(ns, name).await.is_ok_and(|pod| {
            pod.metadata.uid.as_deref() == Some(uid)
                && pod.spec.and_then(|s| s.node_name).as_deref() == Some(node)
        })
    }
}
