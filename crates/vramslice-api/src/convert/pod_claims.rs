//! Which `ResourceClaim`s a pod uses, and which of them each of its containers uses: a pod
//! names claims in `spec.resourceClaims` directly (`resourceClaimName`) or through a template,
//! whose claim's name its status records once the resource claim controller made it;
//! containers name the pod's entries in `resources.claims`.

use k8s_openapi::api::core::v1::{Container, Pod};

/// What one entry of a pod's `spec.resourceClaims` stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodClaimEntry {
    /// The `ResourceClaim` of this name.
    Claim(String),
    /// A claim to be made from a template, not made yet.
    NotMadeYet,
    /// No claim is needed for it (the status records it without a name).
    NotNeeded,
}

/// The pod's `spec.resourceClaims` entries by name, each resolved.
pub fn pod_claim_entries(pod: &Pod) -> Vec<(String, PodClaimEntry)> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_deref())
        .unwrap_or_default();
    pod.spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            let status = statuses.iter().find(|s| s.name == entry.name);
            let resolved = match (&entry.resource_claim_name, status) {
                (Some(name), _) => PodClaimEntry::Claim(name.clone()),
                (None, Some(status)) => match &status.resource_claim_name {
                    Some(name) => PodClaimEntry::Claim(name.clone()),
                    // Recorded without a name: "generating a ResourceClaim was not
                    // necessary" (the API's own words); the entry can be ignored.
                    None => PodClaimEntry::NotNeeded,
                },
                (None, None) if entry.resource_claim_template_name.is_some() => {
                    PodClaimEntry::NotMadeYet
                }
                (None, None) => PodClaimEntry::NotNeeded,
            };
            (entry.name.clone(), resolved)
        })
        .collect()
}

/// The claims `pod` uses (their `ResourceClaim` names), and how many of those made from its
/// templates are not made yet.
pub fn pod_claim_names(pod: &Pod) -> (Vec<String>, usize) {
    let mut names = Vec::new();
    let mut not_made = 0;
    for (_, entry) in pod_claim_entries(pod) {
        match entry {
            PodClaimEntry::Claim(name) => names.push(name),
            PodClaimEntry::NotMadeYet => not_made += 1,
            PodClaimEntry::NotNeeded => {}
        }
    }
    (names, not_made)
}

/// Per container (init containers first, then the others), the `ResourceClaim` names it uses
/// through `resources.claims`, each once; entries not resolved to a claim are left out.
pub fn claims_by_container(pod: &Pod) -> Vec<(String, Vec<String>)> {
    let entries = pod_claim_entries(pod);
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let uses = |c: &Container| {
        let mut names: Vec<String> = Vec::new();
        for used in c
            .resources
            .as_ref()
            .and_then(|r| r.claims.as_deref())
            .unwrap_or_default()
        {
            let claim = entries.iter().find_map(|(entry, resolved)| match resolved {
                PodClaimEntry::Claim(name) if *entry == used.name => Some(name),
                _ => None,
            });
            if let Some(name) = claim
                && !names.contains(name)
            {
                names.push(name.clone());
            }
        }
        (c.name.clone(), names)
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(uses)
        .collect()
}

/// The containers of `pod` that use claim `claim` together with other claims, each with those
/// others (by `ResourceClaim` name): the candidates for two claims' CDI edits meeting in one
/// container. Whether the others are vramslice's is the caller's to find out.
pub fn containers_sharing(pod: &Pod, claim: &str) -> Vec<(String, Vec<String>)> {
    claims_by_container(pod)
        .into_iter()
        .filter(|(_, names)| names.iter().any(|n| n == claim))
        .map(|(container, names)| {
            let others: Vec<String> = names.into_iter().filter(|n| n != claim).collect();
            (container, others)
        })
        .filter(|(_, others)| !others.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    #[test]
    fn entries_resolve_through_the_spec_or_the_status() {
        let p = pod(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ml" },
            "spec": {
                "resourceClaims": [
                    { "name": "direct", "resourceClaimName": "shared-vram" },
                    { "name": "made", "resourceClaimTemplateName": "vram" },
                    { "name": "pending", "resourceClaimTemplateName": "vram" },
                    { "name": "skipped", "resourceClaimTemplateName": "vram" }
                ],
                "initContainers": [{ "name": "load", "resources": { "claims": [{ "name": "made" }] } }],
                "containers": [
                    { "name": "server", "resources": { "claims": [
                        { "name": "direct" }, { "name": "made", "request": "vram" },
                        { "name": "made" }, { "name": "pending" } ] } },
                    { "name": "plain" }
                ]
            },
            "status": { "resourceClaimStatuses": [
                { "name": "made", "resourceClaimName": "p-made-x7k2p" },
                { "name": "skipped" }
            ] }
        }));
        assert_eq!(
            pod_claim_entries(&p),
            [
                (
                    "direct".to_string(),
                    PodClaimEntry::Claim("shared-vram".into())
                ),
                (
                    "made".to_string(),
                    PodClaimEntry::Claim("p-made-x7k2p".into())
                ),
                ("pending".to_string(), PodClaimEntry::NotMadeYet),
                ("skipped".to_string(), PodClaimEntry::NotNeeded),
            ]
        );
        assert_eq!(
            pod_claim_names(&p),
            (
                vec!["shared-vram".to_string(), "p-made-x7k2p".to_string()],
                1
            )
        );
        let by_container = claims_by_container(&p);
        assert_eq!(
            by_container,
            [
                ("load".to_string(), vec!["p-made-x7k2p".to_string()]),
                (
                    "server".to_string(),
                    vec!["shared-vram".to_string(), "p-made-x7k2p".to_string()]
                ),
                ("plain".to_string(), vec![]),
            ]
        );
        assert!(claims_by_container(&Pod::default()).is_empty());
        assert_eq!(
            containers_sharing(&p, "p-made-x7k2p"),
            [("server".to_string(), vec!["shared-vram".to_string()])],
            "the init container uses it alone"
        );
        assert!(containers_sharing(&p, "other").is_empty());
    }
}
