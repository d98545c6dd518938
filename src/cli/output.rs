//! Renders plans as a table for people, YAML for `kubectl apply`, or JSON for tools.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use crate::plan::Plan;
use crate::policy::Decision;

/// The ServiceAccount a decision is about, as the API server names it.
pub fn subject(plan: &Plan, stage: &str) -> String {
    let sa = plan
        .stages
        .iter()
        .find(|s| s.name == stage)
        .map(|s| s.service_account.as_str())
        .unwrap_or_default();
    format!("system:serviceaccount:{}:{sa}", plan.namespace)
}

/// One decision as the JSON output and the decision log show it.
pub fn decision_json(plan: &Plan, d: &Decision) -> Value {
    json!({
        "pipeline": plan.pipeline,
        "namespace": plan.namespace,
        "stage": d.stage,
        "subject": subject(plan, &d.stage),
        "field": d.field,
        "kind": d.item.kind(),
        "item": d.item.to_string(),
        "verdict": d.verdict.as_str(),
        "reason": d.reason.as_str(),
        "message": d.message,
    })
}

fn to_value(v: impl Serialize) -> Value {
    serde_json::to_value(v).expect("plan types serialize to JSON")
}

/// `{objects, vault: {policies, roles}, credentials, decisions}` for all plans.
pub fn json(plans: &[Plan]) -> String {
    let objects: Vec<Value> = plans
        .iter()
        .flat_map(|p| &p.objects)
        .map(to_value)
        .collect();
    let policies: Vec<Value> = plans
        .iter()
        .flat_map(|p| &p.vault_policies)
        .map(|v| json!({"name": v.name, "hcl": v.hcl}))
        .collect();
    let roles: Vec<Value> = plans
        .iter()
        .flat_map(|p| &p.vault_roles)
        .map(to_value)
        .collect();
    let credentials: Vec<Value> = plans
        .iter()
        .flat_map(|p| p.credentials.iter().map(move |c| (p, c)))
        .map(|(p, c)| {
            let mut v = to_value(c);
            v["namespace"] = json!(p.namespace);
            v["pipeline"] = json!(p.pipeline);
            v
        })
        .collect();
    let decisions: Vec<Value> = plans
        .iter()
        .flat_map(|p| p.decisions.iter().map(move |d| decision_json(p, d)))
        .collect();
    let doc = json!({
        "objects": objects,
        "vault": {"policies": policies, "roles": roles},
        "credentials": credentials,
        "decisions": decisions,
    });
    let mut out = serde_json::to_string_pretty(&doc).expect("JSON values serialize");
    out.push('\n');
    out
}

/// The Kubernetes objects as a YAML stream ready for `kubectl apply -f -`, then the Vault
/// policies and roles as comments (they are not Kubernetes objects).
pub fn yaml(plans: &[Plan]) -> String {
    let mut out = String::new();
    for object in plans.iter().flat_map(|p| &p.objects) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(object).expect("objects serialize to YAML"));
    }
    for plan in plans {
        for policy in &plan.vault_policies {
            let _ = writeln!(out, "# Vault policy sys/policies/acl/{}", policy.name);
            for line in policy.hcl.lines() {
                if line.is_empty() {
                    out.push_str("#\n");
                } else {
                    let _ = writeln!(out, "#   {line}");
                }
            }
        }
        for role in &plan.vault_roles {
            let _ = writeln!(
                out,
                "# Vault role auth/<workloads mount>/role/{}: bound_service_account_names={} bound_service_account_namespaces={} token_policies={} token_ttl={}s token_max_ttl={}s",
                role.name,
                role.bound_service_account_names.join(","),
                role.bound_service_account_namespaces.join(","),
                role.token_policies.join(","),
                role.token_ttl,
                role.token_max_ttl
            );
        }
    }
    out
}

/// Per stage, what is granted and what is denied and why.
pub fn table(plans: &[Plan]) -> String {
    let mut out = String::new();
    let (mut stages, mut granted, mut denied) = (0, 0, 0);
    for plan in plans {
        let _ = writeln!(out, "AIPipeline {}/{}", plan.namespace, plan.pipeline);
        for stage in &plan.stages {
            stages += 1;
            granted += stage.granted;
            denied += stage.denied;
            let bound = if stage.guardrails.is_empty() {
                "built-in defaults (no AccessGuardrail applies)".to_string()
            } else {
                format!("AccessGuardrail {}", stage.guardrails.join(", "))
            };
            let _ = writeln!(
                out,
                "  stage {} ({}) runs as ServiceAccount {}; bound by {bound}",
                stage.name,
                stage.role.as_str(),
                stage.service_account
            );
            for d in plan.decisions.iter().filter(|d| d.stage == stage.name) {
                let verdict = if d.is_allowed() { "GRANT" } else { "DENY " };
                let _ = write!(out, "    {verdict} {}", d.item);
                if d.is_allowed() {
                    out.push('\n');
                } else {
                    let _ = writeln!(out, "  [{}]", d.reason);
                    let _ = writeln!(out, "          {}", d.message);
                }
            }
        }
        let names: Vec<&str> = plan
            .vault_policies
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        if !names.is_empty() {
            let _ = writeln!(out, "  vault policies and roles: {}", names.join(", "));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} pipelines, {stages} stages: {granted} granted, {denied} denied.",
        plans.len()
    );
    out
}
