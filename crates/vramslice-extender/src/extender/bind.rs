//! The bind verb: re-check and reserve under the ledger lock, then one Binding that carries the
//! placement annotations; a failed binding releases the reservation.
//!
//! A bind runs to its end in a task of its own: kube-scheduler gives up on the HTTP call after
//! its `httpTimeout`, and a bind dropped between reserving and releasing would leave its
//! reservation behind. When the Binding's answer is lost or unsure (a transport error, a
//! timeout, 409, 429, 5xx), the API server is asked whether the pod is bound; when even that
//! cannot be told, the reservation stays, marked unsettled, until the pod is seen or the
//! reservation expires, and the next bind of the pod checks again and may replace it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use vramslice_api::names::{ANNOTATION_ASSIGNED_AT, ANNOTATION_GPU_UUID};
use vramslice_core::cluster::ledger::{ReserveError, ReserveRequest};
use vramslice_core::cluster::placement::{PodRequest, Policy};

use super::{BadRequest, Extender, parse_body};
use crate::cluster::ApiError;
use crate::convert::{format_time, pod_request, policy_of};
use crate::metrics::Outcome;
use crate::wire::{ExtenderBindingArgs, ExtenderBindingResult};

/// How long the Binding POST may take (the client does not retry it) before the bind asks the
/// API server whether it took.
const BINDING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the read that tells whether a pod is bound may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after a bind gave up its Binding may still land: kube-apiserver's default request
/// timeout (`--request-timeout`, 1m), after which it stops handling a request it answered 504
/// or whose client went away. Only after that does "not bound" read back mean it never will.
const MAY_STILL_LAND: Duration = Duration::from_secs(60);

/// When an unsettled reservation's pod is read back, each wait after the last; the first is
/// [`MAY_STILL_LAND`]. All of them end well within the reservations' expiry (300 s).
const SETTLE_DELAYS: [Duration; 4] = [
    MAY_STILL_LAND,
    Duration::from_secs(15),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// How a Binding ended.
enum Bound {
    /// The pod is bound to the node.
    Yes,
    /// It is not: the message says why.
    No(String),
    /// Nobody can tell now: the message says why.
    Unknown(String),
}

impl Extender {
    /// The bind verb: re-check and reserve under the ledger lock, then one Binding that also
    /// carries the placement annotations; a failure releases the reservation (unless whether
    /// the Binding took cannot be told) and is returned in `Error`. Runs to its end even when
    /// the caller stops waiting (see the module doc).
    pub async fn bind(self: &Arc<Self>, body: &[u8]) -> Result<ExtenderBindingResult, BadRequest> {
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
        let who = format!("{}/{}", args.pod_namespace, args.pod_name);
        let Some(in_flight) = self.bind_starts() else {
            self.metrics()
                .record("bind", Outcome::Error, std::time::Duration::ZERO);
            return Ok(ExtenderBindingResult {
                error: format!(
                    "cannot bind pod {who}: this extender is handing over to a new leader (draining); the pod is scheduled again"
                ),
            });
        };
        let this = Arc::clone(self);
        // Counted in the task, so that a bind that outlives the caller's wait is counted too.
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            let started = std::time::Instant::now();
            let answer = this.bind_checked(&args).await;
            let outcome = match &answer {
                Ok(outcome) | Err((_, outcome)) => *outcome,
            };
            this.metrics().record("bind", outcome, started.elapsed());
            answer
        });
        let error = match task.await {
            Ok(Ok(_)) => String::new(),
            Ok(Err((message, _))) => message,
            Err(e) => {
                self.metrics()
                    .record("bind", Outcome::Error, std::time::Duration::ZERO);
                format!("cannot bind pod {who}: {e}")
            }
        };
        Ok(ExtenderBindingResult { error })
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

    async fn bind_checked(
        self: &Arc<Self>,
        args: &ExtenderBindingArgs,
    ) -> Result<Outcome, (String, Outcome)> {
        let (ns, name, node) = (&args.pod_namespace, &args.pod_name, &args.node);
        let who = format!("{ns}/{name}");
        let fail = |msg: String| (msg, Outcome::Error);
        let (uid, request, policy) = self.pod_to_bind(args, &who).await.map_err(fail)?;
        let Some(request) = request else {
            // No VRAM: bind like the default binder would.
            return match self
                .bind_or_confirm(ns, name, &uid, node, BTreeMap::new())
                .await
            {
                Bound::Yes => Ok(Outcome::Ignored),
                Bound::No(message) | Bound::Unknown(message) => Err(fail(message)),
            };
        };
        self.readiness()
            .map_err(|e| fail(format!("cannot bind pod {who}: vramslice extender {e}")))?;
        let now = self.now();
        let reserve = ReserveRequest {
            uid: uid.clone(),
            namespace: ns.clone(),
            name: name.clone(),
            request,
        };
        let mut placement = self
            .ledger_mut()
            .reserve(reserve.clone(), node, policy, now);
        if let Err(ReserveError::Unsettled { .. }) = &placement
            && self.ledger_mut().take_unsettled(&uid, now, MAY_STILL_LAND)
        {
            // Its earlier bind could not tell whether the Binding took: ask now (meanwhile the
            // reservation reads as in flight to any other bind of the pod).
            placement = match self.bound_where(ns, name, &uid).await {
                Some(None) => {
                    let mut ledger = self.ledger_mut();
                    ledger.release(&uid);
                    tracing::info!(pod = %who, "an unsettled reservation's pod is not bound; reserving again");
                    ledger.reserve(reserve, node, policy, now)
                }
                Some(Some(bound)) => {
                    let mut ledger = self.ledger_mut();
                    if ledger.pod(&uid).is_some_and(|p| p.node == bound) {
                        // Its earlier Binding took: booked as bound where it was reserved.
                        ledger.confirm_bound(&uid);
                    } else {
                        // The pod watch records it where it is.
                        ledger.unsettle(&uid, now);
                    }
                    drop(ledger);
                    if bound == *node {
                        // Bound where this bind asks: done, as a Binding answered 409 for a
                        // pod bound here is (an error would make kube-scheduler unreserve a
                        // bound pod).
                        tracing::info!(pod = %who, node = %node, "an unsettled reservation's earlier Binding took");
                        return Ok(Outcome::Ok);
                    }
                    Err(ReserveError::AlreadyBound {
                        pod: who.clone(),
                        node: bound,
                    })
                }
                None => {
                    let token = self.ledger_mut().unsettle(&uid, now);
                    self.settle_later(ns, name, &uid, token);
                    placement
                }
            };
        }
        if let Err(ReserveError::AlreadyBound { node: bound, .. }) = &placement
            && bound == node
        {
            // A retry of a bind that took (kube-scheduler gave up waiting for it): done, as for
            // a Binding answered 409 for a pod bound here; nothing is booked twice.
            tracing::info!(pod = %who, node = %node, "already bound where this bind asks");
            return Ok(Outcome::Ok);
        }
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
            Bound::Yes => {
                self.ledger_mut().confirm_bound(&uid);
                tracing::info!(pod = %who, node = %node, gpu = %placement.gpu_uuid,
                    index = ?placement.gpu_indices, bytes = request.bytes(),
                    bytes_per_gpu = request.share_bytes(), "bound");
                Ok(Outcome::Ok)
            }
            Bound::No(message) => {
                self.ledger_mut().release(&uid);
                tracing::warn!(pod = %who, node = %node, error = %message, "bind failed; reservation released");
                Err(fail(message))
            }
            Bound::Unknown(message) => {
                let token = self.ledger_mut().unsettle(&uid, self.now());
                tracing::warn!(pod = %who, node = %node, error = %message, "bind outcome unknown; reservation kept until the pod is seen, read back not bound, or expired");
                self.settle_later(ns, name, &uid, token);
                Err(fail(message))
            }
        }
    }

    /// Create the Binding; when its answer is lost or unsure, ask the API server whether it
    /// took.
    async fn bind_or_confirm(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        node: &str,
        annotations: BTreeMap<String, String>,
    ) -> Bound {
        let call = tokio::time::timeout(
            BINDING_TIMEOUT,
            self.cluster.bind_pod(ns, name, uid, node, annotations),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Transport(format!(
                "no answer within {}s",
                BINDING_TIMEOUT.as_secs()
            )))
        });
        let (e, may_still_land) = match call {
            Ok(()) => return Bound::Yes,
            Err(ApiError::NotFound) => {
                return Bound::No(format!("cannot bind pod {ns}/{name}: pod not found"));
            }
            Err(e @ ApiError::Refused(_)) => {
                return Bound::No(format!("cannot bind pod {ns}/{name} to node {node}: {e}"));
            }
            // The pod is not as the Binding needs it, now: reading it back tells why.
            Err(e @ ApiError::Conflict(_)) => (e, false),
            // The answer was lost, not necessarily the Binding, which may even land later.
            Err(e @ (ApiError::Transport(_) | ApiError::Unsure(_))) => (e, true),
        };
        let failed = format!("cannot bind pod {ns}/{name} to node {node}: {e}");
        match self.bound_where(ns, name, uid).await {
            Some(Some(bound)) if bound == node => {
                tracing::info!(pod = %format_args!("{ns}/{name}"), error = %e,
                    "binding answer lost or refused, but the pod is bound");
                Bound::Yes
            }
            Some(Some(_)) => Bound::No(failed),
            Some(None) if !may_still_land => Bound::No(failed),
            Some(None) => Bound::Unknown(format!(
                "{failed}; the pod is not bound yet, but the binding may still take, so its reservation stays until that is read back"
            )),
            None => Bound::Unknown(format!(
                "{failed}; whether the binding took cannot be read back now, so its reservation stays until it can"
            )),
        }
    }

    /// Read back, from a minute on and a few times over, whether the pod of the reservation left
    /// unsettled under `token` was bound: not bound releases it (unless a bind took it or left
    /// it unsettled again since, under a token with its own read-back); bound where it was
    /// reserved confirms it ([`vramslice_core::Ledger::confirm_bound`]), bound elsewhere leaves
    /// it to the pod watch, which records the pod where it is. A bind of the pod may settle it sooner
    /// ([`ReserveError::Unsettled`]); what neither settles expires.
    fn settle_later(self: &Arc<Self>, ns: &str, name: &str, uid: &str, token: Option<u64>) {
        let Some(token) = token else { return };
        let this = Arc::clone(self);
        let (ns, name, uid) = (ns.to_string(), name.to_string(), uid.to_string());
        tokio::spawn(async move {
            for delay in SETTLE_DELAYS {
                tokio::time::sleep(delay).await;
                if this.ledger().unsettled_token(&uid) != Some(token) {
                    return;
                }
                match this.bound_where(&ns, &name, &uid).await {
                    Some(None) => {
                        if this.ledger_mut().release_unsettled(&uid, token) {
                            tracing::info!(pod = %format_args!("{ns}/{name}"), "read back not bound; unsettled reservation released");
                        }
                        return;
                    }
                    Some(Some(bound)) => {
                        let mut ledger = this.ledger_mut();
                        if ledger.unsettled_token(&uid) == Some(token)
                            && ledger.pod(&uid).is_some_and(|p| p.node == bound)
                        {
                            ledger.confirm_bound(&uid);
                        }
                        return;
                    }
                    None => {}
                }
            }
        });
    }

    /// Where the API server shows the pod (same UID) bound: `Some(None)` when it is not bound
    /// (or gone, or another pod now has the name), `None` when that cannot be read now.
    async fn bound_where(&self, ns: &str, name: &str, uid: &str) -> Option<Option<String>> {
        match tokio::time::timeout(CONFIRM_TIMEOUT, self.cluster.get_pod(ns, name)).await {
            Ok(Ok(pod)) if pod.metadata.uid.as_deref() == Some(uid) => {
                Some(pod.spec.and_then(|s| s.node_name))
            }
            Ok(Ok(_) | Err(ApiError::NotFound)) => Some(None),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}
