//! The JSON kube-scheduler speaks to extenders: `k8s.io/kube-scheduler/extender/v1` types, which
//! carry no json tags, so the keys are the Go field names (`Pod`, `Nodes`, `NodeNames`,
//! `FailedNodes`, `FailedAndUnresolvableNodes`, `Error`, `Host`, `Score`, `PodName`,
//! `PodNamespace`, `PodUID`, `Node`). Go's decoder matches keys case-insensitively, so the
//! lower-case spellings are accepted too.
//!
//! The pod is read into [`WirePod`], only the fields placement needs (unknown fields are
//! ignored). Nodes of a full `NodeList` are kept as raw JSON and echoed back untouched.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// `ExtenderArgs`: the body of filter and prioritize calls.
#[derive(Debug, Deserialize)]
pub struct ExtenderArgs<'a> {
    /// The pod being scheduled.
    #[serde(rename = "Pod", alias = "pod", default)]
    pub pod: Option<WirePod>,
    /// Candidate nodes, when the extender is not `nodeCacheCapable`.
    #[serde(rename = "Nodes", alias = "nodes", default, borrow)]
    pub nodes: Option<WireNodeList<'a>>,
    /// Candidate node names, when the extender is `nodeCacheCapable`.
    #[serde(
        rename = "NodeNames",
        alias = "nodeNames",
        alias = "nodenames",
        default,
        borrow
    )]
    pub node_names: Option<Vec<NodeName<'a>>>,
}

/// A node name from the request, borrowed from the body when it holds no escapes (serde's own
/// `Cow<str>` inside a `Vec` always copies: one allocation per name, 5,000 per call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName<'a>(pub Cow<'a, str>);

impl AsRef<str> for NodeName<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for NodeName<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = NodeName<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a node name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(NodeName(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(NodeName(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(NodeName(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A `v1.NodeList` with its items kept as raw JSON.
#[derive(Debug, Deserialize)]
pub struct WireNodeList<'a> {
    /// The nodes (Go sends `null` for an empty list).
    #[serde(default, borrow)]
    pub items: Option<Vec<&'a RawValue>>,
}

/// The part of a node placement reads: its name.
#[derive(Debug, Deserialize)]
pub struct WireNodeName {
    /// `metadata`.
    #[serde(default)]
    pub metadata: WireNameOnly,
}

/// `metadata.name` alone.
#[derive(Debug, Default, Deserialize)]
pub struct WireNameOnly {
    /// The name.
    #[serde(default)]
    pub name: String,
}

/// The fields of a `v1.Pod` placement needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WirePod {
    /// `metadata`.
    #[serde(default)]
    pub metadata: WireMeta,
    /// `spec`.
    #[serde(default)]
    pub spec: Option<WireSpec>,
}

/// Pod metadata.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WireMeta {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// UID.
    #[serde(default)]
    pub uid: String,
    /// Annotations.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Pod spec: containers and init containers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSpec {
    /// App containers.
    #[serde(default)]
    pub containers: Option<Vec<WireContainer>>,
    /// Init containers.
    #[serde(default)]
    pub init_containers: Option<Vec<WireContainer>>,
}

/// One container's resources.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireContainer {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Limits and requests.
    #[serde(default)]
    pub resources: Option<WireResources>,
    /// `Always` marks a sidecar init container.
    #[serde(default)]
    pub restart_policy: Option<String>,
}

/// `resources`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WireResources {
    /// Limits.
    #[serde(default)]
    pub limits: Option<BTreeMap<String, Quantity>>,
    /// Requests.
    #[serde(default)]
    pub requests: Option<BTreeMap<String, Quantity>>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Default, Serialize)]
pub struct ExtenderFilterResult<'a> {
    /// Nodes that passed, as the full objects received (non-`nodeCacheCapable` mode).
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeListOut<'a>>,
    /// Names of nodes that passed (`nodeCacheCapable` mode).
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<&'a str>>,
    /// Nodes that failed, with the reason.
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: FailedNodes<'a>,
    /// Nodes that failed where preemption cannot help, with the reason.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: FailedNodes<'a>,
    /// A failure of the whole call.
    #[serde(rename = "Error")]
    pub error: String,
}

/// Node name → reason, written as a JSON object in the order the nodes were refused. The
/// candidates kube-scheduler sends are distinct, so a list does what a map would, without
/// thousands of ordered inserts per filter call.
#[derive(Debug, Default)]
pub struct FailedNodes<'a>(Vec<(&'a str, Reason)>);

impl<'a> FailedNodes<'a> {
    /// Records `node`'s refusal.
    pub fn insert(&mut self, node: &'a str, reason: Reason) {
        self.0.push((node, reason));
    }

    /// How many nodes were refused.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no node was refused.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for FailedNodes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(node, reason)| (node, reason)))
    }
}

/// A failure reason, shared between nodes and cached by the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(pub Arc<str>);

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A `v1.NodeList` to send back, items untouched.
#[derive(Debug, Serialize)]
pub struct NodeListOut<'a> {
    /// Empty list metadata, as Go writes it.
    pub metadata: BTreeMap<String, String>,
    /// The nodes.
    pub items: Vec<&'a RawValue>,
}

/// `HostPriority`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPriority<'a> {
    /// Node name.
    #[serde(rename = "Host", borrow)]
    pub host: Cow<'a, str>,
    /// Score 0..=10.
    #[serde(rename = "Score")]
    pub score: i64,
}

/// `ExtenderBindingArgs`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExtenderBindingArgs {
    /// Pod name.
    #[serde(rename = "PodName", alias = "podName", alias = "podname", default)]
    pub pod_name: String,
    /// Pod namespace.
    #[serde(
        rename = "PodNamespace",
        alias = "podNamespace",
        alias = "podnamespace",
        default
    )]
    pub pod_namespace: String,
    /// Pod UID.
    #[serde(rename = "PodUID", alias = "podUID", alias = "poduid", default)]
    pub pod_uid: String,
    /// The node kube-scheduler chose.
    #[serde(rename = "Node", alias = "node", default)]
    pub node: String,
}

/// `ExtenderBindingResult`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtenderBindingResult {
    /// Empty on success.
    #[serde(rename = "Error")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_borrow_from_the_body_unless_escaped() {
        let body = r#"{"NodeNames":["gpu-node-1","gpu\u002dnode-2"]}"#;
        let args: ExtenderArgs = serde_json::from_str(body).expect("valid args");
        let names = args.node_names.expect("names");
        assert!(matches!(names[0].0, Cow::Borrowed("gpu-node-1")));
        assert!(matches!(&names[1].0, Cow::Owned(s) if s == "gpu-node-2"));
    }

    #[test]
    fn a_node_name_that_is_not_a_string_is_refused() {
        let err = serde_json::from_str::<ExtenderArgs>(r#"{"NodeNames":[7]}"#)
            .expect_err("a number is no node name");
        assert!(err.to_string().contains("a node name"), "{err}");
    }
}
