//! Decisions as `wgpolicyk8s.io/v1alpha2` PolicyReports, for Policy Reporter and the other tools
//! that read the reports Kyverno, Trivy and Falco write.
//!
//! One report per AIPipeline, in its namespace, named `portcullis-<pipeline>`, owned by the
//! pipeline (so it goes when the pipeline does): a `pass` result for each allowed item and a
//! `fail` result for each denied one, with the reason as the rule, the AccessGuardrail (or the
//! floor) as the policy, and the stage, field and item as properties. It is written when the
//! pipeline's decisions change, only when the API server serves the PolicyReport kind (the CRD
//! that Kyverno or Policy Reporter installs); otherwise nothing is written.

use serde_json::{Value, json};

use crate::k8s::{
    Api, ApiResource, Client, DynamicObject, FIELD_MANAGER, KubeResult, OwnerReference, Patch,
    PatchParams,
};
use crate::plan::Plan;
use crate::policy::Decision;

/// The group and version of the reports.
pub(crate) const API_VERSION: &str = "wgpolicyk8s.io/v1alpha2";

/// The kind, as the API server serves it.
pub(crate) fn resource() -> ApiResource {
    ApiResource {
        group: "wgpolicyk8s.io".into(),
        version: "v1alpha2".into(),
        api_version: API_VERSION.into(),
        kind: "PolicyReport".into(),
        plural: "policyreports".into(),
    }
}

/// Whether the API server serves PolicyReports.
pub(crate) async fn served(client: &Client) -> bool {
    client
        .list_api_group_resources(API_VERSION)
        .await
        .is_ok_and(|list| list.resources.iter().any(|r| r.name == "policyreports"))
}

/// The report's name for a pipeline.
pub(crate) fn name(pipeline: &str) -> String {
    format!("portcullis-{pipeline}")
}

/// Reasons whose denial means the request reached for something no guardrail can allow: a
/// `high` severity. Others are `medium`, allowed items `info`.
const HIGH: &[&str] = &[
    "WildcardForbidden",
    "EscalationVerb",
    "ForbiddenSubresource",
    "ClusterScoped",
    "PrivilegedWrite",
    "SecretNotOwned",
    "CrossStageCredential",
    "MetadataEndpoint",
    "SudoCapability",
    "VaultSystemPath",
];

/// The report for `plan`, owned by the pipeline `owner`; `time` in seconds since the epoch.
pub(crate) fn report(plan: &Plan, owner: &OwnerReference, time: i64) -> Value {
    let results: Vec<Value> = plan
        .decisions
        .iter()
        .map(|d| result(plan, d, time))
        .collect();
    let fail = plan.denied();
    json!({
        "apiVersion": API_VERSION,
        "kind": "PolicyReport",
        "metadata": {
            "name": name(&plan.pipeline),
            "namespace": plan.namespace,
            "labels": {"app.kubernetes.io/managed-by": "portcullis"},
            "ownerReferences": [owner],
        },
        "scope": {
            "apiVersion": owner.api_version,
            "kind": owner.kind,
            "name": owner.name,
            "namespace": plan.namespace,
            "uid": owner.uid,
        },
        "summary": {"pass": results.len() - fail, "fail": fail, "warn": 0, "error": 0, "skip": 0},
        "results": results,
    })
}

fn result(plan: &Plan, d: &Decision, time: i64) -> Value {
    let reason = d.reason.as_str();
    let (result, severity) = if d.is_allowed() {
        ("pass", "info")
    } else if HIGH.contains(&reason) {
        ("fail", "high")
    } else {
        ("fail", "medium")
    };
    json!({
        "source": "portcullis",
        "policy": policy_of(d),
        "rule": reason,
        "category": d.item.kind(),
        "result": result,
        "severity": severity,
        "scored": true,
        "message": d.message,
        "timestamp": {"seconds": time, "nanos": 0},
        "properties": {
            "stage": d.stage,
            "field": d.field,
            "item": d.item.to_string(),
            "pipeline": plan.pipeline,
        },
    })
}

/// The policy a decision came from, as reports name it: the AccessGuardrail named in the
/// message, or the built-in floor and defaults.
fn policy_of(d: &Decision) -> String {
    d.message
        .split("AccessGuardrail ")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
                .next()
        })
        .filter(|name| !name.is_empty())
        .map_or_else(
            || "portcullis-floor".to_string(),
            |name| format!("AccessGuardrail/{name}"),
        )
}

/// Writes the report with server-side apply.
pub(crate) async fn write(client: &Client, report: &Value) -> KubeResult<()> {
    let namespace = report["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = report["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource());
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(report),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Item, Reason, Verdict};

    fn decision(verdict: Verdict, reason: Reason, message: &str) -> Decision {
        let guardrail = message
            .contains("ml-training")
            .then(|| "ml-training".to_string());
        Decision {
            stage: "train".into(),
            field: "spec.stages[1].permissions[0]".into(),
            item: Item::Kubernetes {
                api_group: String::new(),
                resource: "configmaps".into(),
                verb: "get".into(),
                resource_names: vec!["params".into()],
            },
            verdict,
            reason,
            message: message.into(),
            guardrail,
        }
    }

    #[test]
    fn a_report_has_a_result_per_decision_and_counts_them() {
        let plan = Plan {
            pipeline: "churn".into(),
            namespace: "ml".into(),
            stages: vec![],
            objects: vec![],
            vault: Default::default(),
            decisions: vec![
                decision(
                    Verdict::Allow,
                    Reason::WithinGuardrail,
                    "allowed by AccessGuardrail ml-training",
                ),
                decision(
                    Verdict::Deny,
                    Reason::EscalationVerb,
                    "escalate is never granted",
                ),
                decision(
                    Verdict::Deny,
                    Reason::OutsideGuardrail,
                    "not allowed by AccessGuardrail ml-training; ask",
                ),
            ],
            cluster_checked: true,
        };
        let owner = OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: "AIPipeline".into(),
            name: "churn".into(),
            uid: "u-1".into(),
            ..OwnerReference::default()
        };
        let r = report(&plan, &owner, 1_800_000_000);
        assert_eq!(r["metadata"]["name"], "portcullis-churn");
        assert_eq!(r["summary"]["pass"], 1);
        assert_eq!(r["summary"]["fail"], 2);
        let results = r["results"].as_array().unwrap();
        assert_eq!(
            results
                .iter()
                .map(|r| (
                    r["result"].as_str().unwrap(),
                    r["severity"].as_str().unwrap(),
                    r["policy"].as_str().unwrap()
                ))
                .collect::<Vec<_>>(),
            [
                ("pass", "info", "AccessGuardrail/ml-training"),
                ("fail", "high", "portcullis-floor"),
                ("fail", "medium", "AccessGuardrail/ml-training"),
            ]
        );
        assert_eq!(results[1]["rule"], "EscalationVerb");
        assert_eq!(results[1]["properties"]["item"], "get configmaps/params");
        assert_eq!(r["scope"]["uid"], "u-1");
    }
}
