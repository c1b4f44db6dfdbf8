//! The admission decision: does a new pod need `schedulerName: vramslice-scheduler`, and the
//! JSON Patch (RFC 6902) that sets it.
//!
//! Data enters as a [`PodAdmissionView`] (the pod's scheduler name, node name, annotations and
//! the resource names and quantities of every container and init container) and leaves as an
//! [`AdmissionDecision`]: either a patch or the reason the pod is left alone. The webhook crate
//! turns an `AdmissionReview` into the view and the decision back into a response.
//!
//! The API server fills in `default-scheduler` for a pod that names no scheduler *before*
//! mutating webhooks run, so the webhook never sees an empty name for such a pod. Treating
//! `default-scheduler` as "no choice made" is therefore what makes the webhook useful; it is on
//! by default ([`AdmissionPolicy::override_default_scheduler`]) and a pod that really wants the
//! default scheduler says so with the annotation [`ANNOTATION_KEEP_SCHEDULER`]` = "true"`.

use serde::Serialize;

use crate::units::RESOURCE_PREFIX;

use crate::names::SCHEDULER_NAME;
/// The name the API server defaults an empty `spec.schedulerName` to.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";
pub use crate::names::ANNOTATION_KEEP_SCHEDULER;
/// JSON Pointer of the field the patch writes.
pub const SCHEDULER_NAME_PATH: &str = "/spec/schedulerName";

/// What the decision needs to know about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAdmissionView {
    /// `spec.schedulerName` as received (`None` when absent).
    pub scheduler_name: Option<String>,
    /// `spec.nodeName` as received (`None` when absent).
    pub node_name: Option<String>,
    /// Value of the [`ANNOTATION_KEEP_SCHEDULER`] annotation, if any.
    pub keep_scheduler_annotation: Option<String>,
    /// `(resource name, quantity)` from the limits and requests of every container and init
    /// container, in any order.
    pub resources: Vec<(String, String)>,
}

/// Cluster settings of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionPolicy {
    /// Also redirect pods whose scheduler name is `default-scheduler` (see the module docs).
    pub override_default_scheduler: bool,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            override_default_scheduler: true,
        }
    }
}

/// One JSON Patch operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatchOperation {
    /// `add` when the field is absent, `replace` when it is present.
    pub op: PatchOp,
    /// JSON Pointer of the field.
    pub path: String,
    /// The new value.
    pub value: String,
}

/// The JSON Patch operations the webhook uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchOp {
    /// Add a member (the field is absent).
    Add,
    /// Replace a member (the field is present).
    Replace,
}

/// Why a pod is admitted unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unchanged {
    /// No container or init container asks for a non-zero `vramslice.io/vram-*` resource.
    NoVramRequest,
    /// The pod already names the vramslice scheduler.
    AlreadyVramslice,
    /// The pod names another scheduler on purpose (the name is kept).
    OtherScheduler(String),
    /// The pod names `default-scheduler` and the policy does not override it.
    DefaultSchedulerKept,
    /// The pod carries the opt-out annotation.
    OptedOut,
    /// The pod is created with `spec.nodeName` set: no scheduler will look at it.
    AlreadyBound(String),
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionDecision {
    /// Apply this patch.
    Patch(Vec<PatchOperation>),
    /// Leave the pod as it is.
    Unchanged(Unchanged),
}

impl AdmissionDecision {
    /// The patch, if the pod is to be changed.
    pub fn patch(&self) -> Option<&[PatchOperation]> {
        match self {
            AdmissionDecision::Patch(ops) => Some(ops),
            AdmissionDecision::Unchanged(_) => None,
        }
    }
}

/// Whether a `(name, quantity)` pair asks for vramslice memory. Extended resources are whole
/// numbers, so only a quantity that parses as zero is "no request"; anything else (including a
/// quantity this function cannot read) counts, and the scheduler will say what is wrong with it.
pub fn requests_vram(name: &str, quantity: &str) -> bool {
    name.starts_with(RESOURCE_PREFIX)
        && name.len() > RESOURCE_PREFIX.len()
        && quantity.trim().parse::<u64>() != Ok(0)
}

/// Decide whether the pod gets `schedulerName: vramslice-scheduler`.
pub fn decide(pod: &PodAdmissionView, policy: AdmissionPolicy) -> AdmissionDecision {
    if !pod.resources.iter().any(|(n, q)| requests_vram(n, q)) {
        return AdmissionDecision::Unchanged(Unchanged::NoVramRequest);
    }
    if let Some(node) = pod.node_name.as_deref().filter(|n| !n.is_empty()) {
        return AdmissionDecision::Unchanged(Unchanged::AlreadyBound(node.to_string()));
    }
    if pod.keep_scheduler_annotation.as_deref().map(str::trim) == Some("true") {
        return AdmissionDecision::Unchanged(Unchanged::OptedOut);
    }
    let op = match pod.scheduler_name.as_deref() {
        None => PatchOp::Add,
        Some("") => PatchOp::Replace,
        Some(SCHEDULER_NAME) => {
            return AdmissionDecision::Unchanged(Unchanged::AlreadyVramslice);
        }
        Some(DEFAULT_SCHEDULER) if policy.override_default_scheduler => PatchOp::Replace,
        Some(DEFAULT_SCHEDULER) => {
            return AdmissionDecision::Unchanged(Unchanged::DefaultSchedulerKept);
        }
        Some(other) => {
            return AdmissionDecision::Unchanged(Unchanged::OtherScheduler(other.into()));
        }
    };
    AdmissionDecision::Patch(vec![PatchOperation {
        op,
        path: SCHEDULER_NAME_PATH.to_string(),
        value: SCHEDULER_NAME.to_string(),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(scheduler: Option<&str>, resources: &[(&str, &str)]) -> PodAdmissionView {
        PodAdmissionView {
            scheduler_name: scheduler.map(str::to_string),
            resources: resources
                .iter()
                .map(|(n, q)| (n.to_string(), q.to_string()))
                .collect(),
            ..PodAdmissionView::default()
        }
    }

    fn set_to(op: PatchOp) -> AdmissionDecision {
        AdmissionDecision::Patch(vec![PatchOperation {
            op,
            path: "/spec/schedulerName".into(),
            value: "vramslice-scheduler".into(),
        }])
    }

    const VRAM: (&str, &str) = ("vramslice.io/vram-gib", "6");

    #[test]
    fn scheduler_name_constant_matches_the_contract() {
        assert_eq!(SCHEDULER_NAME, "vramslice-scheduler");
    }

    #[test]
    fn absent_empty_and_default_names_are_redirected() {
        let p = AdmissionPolicy::default();
        assert_eq!(decide(&pod(None, &[VRAM]), p), set_to(PatchOp::Add));
        assert_eq!(decide(&pod(Some(""), &[VRAM]), p), set_to(PatchOp::Replace));
        assert_eq!(
            decide(&pod(Some("default-scheduler"), &[VRAM]), p),
            set_to(PatchOp::Replace)
        );
    }

    #[test]
    fn default_scheduler_kept_when_policy_says_so() {
        let p = AdmissionPolicy {
            override_default_scheduler: false,
        };
        assert_eq!(
            decide(&pod(Some("default-scheduler"), &[VRAM]), p),
            AdmissionDecision::Unchanged(Unchanged::DefaultSchedulerKept)
        );
        assert_eq!(decide(&pod(None, &[VRAM]), p), set_to(PatchOp::Add));
    }

    #[test]
    fn other_and_own_scheduler_names_are_kept() {
        let p = AdmissionPolicy::default();
        assert_eq!(
            decide(&pod(Some("volcano"), &[VRAM]), p),
            AdmissionDecision::Unchanged(Unchanged::OtherScheduler("volcano".into()))
        );
        assert_eq!(
            decide(&pod(Some("vramslice-scheduler"), &[VRAM]), p),
            AdmissionDecision::Unchanged(Unchanged::AlreadyVramslice)
        );
    }

    #[test]
    fn every_unit_resource_counts_and_nothing_else() {
        for name in [
            "vramslice.io/vram-gib",
            "vramslice.io/vram-512mib",
            "vramslice.io/vram-256mib",
            "vramslice.io/vram-128mib",
        ] {
            assert!(
                decide(&pod(None, &[(name, "1")]), AdmissionPolicy::default())
                    .patch()
                    .is_some()
            );
        }
        for (name, q) in [
            ("nvidia.com/gpu", "1"),
            ("cpu", "2"),
            ("memory", "1Gi"),
            ("vramslice.io/vram-", "4"),
            ("vramslice.io/other", "4"),
            ("example.com/vramslice.io/vram-gib", "4"),
            ("vramslice.io/vram-gib", "0"),
            ("vramslice.io/vram-gib", " 0 "),
        ] {
            assert_eq!(
                decide(&pod(None, &[(name, q)]), AdmissionPolicy::default()),
                AdmissionDecision::Unchanged(Unchanged::NoVramRequest),
                "{name}={q}"
            );
        }
        assert_eq!(
            decide(&pod(None, &[]), AdmissionPolicy::default()),
            AdmissionDecision::Unchanged(Unchanged::NoVramRequest)
        );
    }

    #[test]
    fn unreadable_quantity_still_counts_as_a_request() {
        assert!(requests_vram("vramslice.io/vram-gib", "2Gi"));
        assert!(requests_vram("vramslice.io/vram-gib", "lots"));
    }

    #[test]
    fn one_vram_container_among_others_is_enough() {
        let p = pod(None, &[("cpu", "1"), ("vramslice.io/vram-gib", "0"), VRAM]);
        assert_eq!(decide(&p, AdmissionPolicy::default()), set_to(PatchOp::Add));
    }

    #[test]
    fn bound_and_opted_out_pods_are_kept() {
        let mut p = pod(None, &[VRAM]);
        p.node_name = Some("gpu-1".into());
        assert_eq!(
            decide(&p, AdmissionPolicy::default()),
            AdmissionDecision::Unchanged(Unchanged::AlreadyBound("gpu-1".into()))
        );
        p.node_name = Some(String::new());
        assert!(decide(&p, AdmissionPolicy::default()).patch().is_some());
        p.keep_scheduler_annotation = Some("true".into());
        assert_eq!(
            decide(&p, AdmissionPolicy::default()),
            AdmissionDecision::Unchanged(Unchanged::OptedOut)
        );
        p.keep_scheduler_annotation = Some("false".into());
        assert!(decide(&p, AdmissionPolicy::default()).patch().is_some());
    }

    #[test]
    fn patch_serializes_as_rfc6902() {
        let d = decide(&pod(None, &[VRAM]), AdmissionPolicy::default());
        let ops = d.patch().unwrap_or_default();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, PatchOp::Add);
        assert_eq!(ops[0].path, SCHEDULER_NAME_PATH);
    }

    fn name_strategy() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some(String::new())),
            Just(Some(DEFAULT_SCHEDULER.to_string())),
            Just(Some(SCHEDULER_NAME.to_string())),
            "[a-z-]{1,12}".prop_map(Some),
        ]
    }

    fn resource_strategy() -> impl Strategy<Value = (String, String)> {
        (
            prop_oneof![
                Just("vramslice.io/vram-gib".to_string()),
                Just("vramslice.io/vram-128mib".to_string()),
                Just("nvidia.com/gpu".to_string()),
                Just("cpu".to_string()),
                "[a-z./-]{1,20}",
            ],
            prop_oneof![
                Just("0".to_string()),
                (1u64..64).prop_map(|n| n.to_string())
            ],
        )
    }

    proptest! {
        #[test]
        fn decision_is_exactly_the_rule(
            scheduler in name_strategy(),
            node in prop_oneof![Just(None), Just(Some("n1".to_string()))],
            opt_out in any::<bool>(),
            override_default in any::<bool>(),
            resources in proptest::collection::vec(resource_strategy(), 0..6),
        ) {
            let view = PodAdmissionView {
                scheduler_name: scheduler.clone(),
                node_name: node.clone(),
                keep_scheduler_annotation: opt_out.then(|| "true".to_string()),
                resources: resources.clone(),
            };
            let policy = AdmissionPolicy { override_default_scheduler: override_default };
            let wants_vram = resources.iter().any(|(n, q)| n.starts_with("vramslice.io/vram-") && q != "0");
            let unnamed = match scheduler.as_deref() {
                None | Some("") => true,
                Some("default-scheduler") => override_default,
                _ => false,
            };
            let expected = wants_vram && node.is_none() && !opt_out && unnamed;
            let decision = decide(&view, policy);
            prop_assert_eq!(decision.patch().is_some(), expected);
            if let Some(ops) = decision.patch() {
                // Only the scheduler name is ever touched, and applying the patch is final.
                prop_assert!(ops.iter().all(|o| o.path == SCHEDULER_NAME_PATH && o.value == SCHEDULER_NAME));
                let patched = PodAdmissionView { scheduler_name: Some(SCHEDULER_NAME.into()), ..view };
                prop_assert_eq!(decide(&patched, policy), AdmissionDecision::Unchanged(Unchanged::AlreadyVramslice));
            }
        }
    }
}
