//! NetworkPolicies as Kubernetes applies them: which pod may open a connection to which pod
//! on which port.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Rendering, labels, strs};

/// A pod of a workload: the role its container runs and its labels.
pub struct Pod {
    pub role: String,
    pub labels: BTreeMap<String, String>,
}

pub fn selector_matches(sel: &Value, l: &BTreeMap<String, String>) -> bool {
    let by_labels = labels(&sel["matchLabels"])
        .iter()
        .all(|(k, v)| l.get(k) == Some(v));
    let by_expressions = sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap();
            let values = strs(&e["values"]);
            match e["operator"].as_str().unwrap() {
                "In" => l.get(key).is_some_and(|v| values.contains(v)),
                "NotIn" => !l.get(key).is_some_and(|v| values.contains(v)),
                "Exists" => l.contains_key(key),
                "DoesNotExist" => !l.contains_key(key),
                other => panic!("operator {other}"),
            }
        });
    by_labels && by_expressions
}

/// Whether `peers` (a rule's `from` or `to`) includes a pod of this namespace.
pub fn peers_include(peers: &Value, pod: &Pod) -> bool {
    match peers.as_array() {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list.iter().any(|p| {
            // Peers in other namespaces or IP blocks are never ril's own pods.
            p["namespaceSelector"].is_null()
                && p["ipBlock"].is_null()
                && selector_matches(&p["podSelector"], &pod.labels)
        }),
    }
}

pub fn ports_include(ports: &Value, port: u16) -> bool {
    match ports.as_array() {
        None => true,
        Some(list) if list.is_empty() => true,
        Some(list) => list.iter().any(|p| {
            p["protocol"].as_str().unwrap_or("TCP") == "TCP"
                && p["port"].as_u64() == Some(u64::from(port))
        }),
    }
}

pub fn policy_types(policy: &Value) -> Vec<String> {
    let t = strs(&policy["spec"]["policyTypes"]);
    if !t.is_empty() {
        return t;
    }
    let mut t = vec!["Ingress".to_string()];
    if policy["spec"]["egress"].is_array() {
        t.push("Egress".into());
    }
    t
}

/// Kubernetes' semantics: a connection needs the source's egress and the destination's
/// ingress; a pod no policy of a direction selects is open in that direction.
pub fn allowed(r: &Rendering, from: &Pod, to: &Pod, port: u16) -> bool {
    let direction = |pod: &Pod, ty: &str, rules: &str, peers: &str, other: &Pod| {
        let policies: Vec<_> = r
            .of_kind("NetworkPolicy")
            .filter(|p| selector_matches(&p["spec"]["podSelector"], &pod.labels))
            .filter(|p| policy_types(p).iter().any(|t| t == ty))
            .collect();
        policies.is_empty()
            || policies.iter().any(|p| {
                p["spec"][rules]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        peers_include(&rule[peers], other) && ports_include(&rule["ports"], port)
                    })
            })
    };
    direction(from, "Egress", "egress", "to", to)
        && direction(to, "Ingress", "ingress", "from", from)
}
