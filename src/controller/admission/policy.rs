//! The ValidatingAdmissionPolicy of one namespace, built from its pipelines' plans (pure).
//!
//! One policy and one binding per namespace with AIPipelines, its CEL generated literally from
//! the plans: the stages' ServiceAccounts, the labels their pods must carry, and their credential
//! Secrets. Literal CEL rather than a parameter resource because CEL cannot read structured
//! parameters from a ConfigMap, and a policy that says everything it checks can be read with
//! `kubectl get validatingadmissionpolicy -o yaml`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::k8s::{
    MANAGED_BY, METADATA_NAME_LABEL, PIPELINE_LABEL, STAGE_LABEL, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
};
use crate::plan::{Object, Plan};

/// The label naming the namespace a cluster-scoped admission object is about.
pub(crate) const NAMESPACE_LABEL: &str = "portcullis.dev/namespace";

/// The name of the policy and of its binding for `namespace`.
pub(crate) fn policy_name(namespace: &str) -> String {
    format!("portcullis-workloads-{namespace}")
}

/// What the policy knows of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StageIdentity {
    pub service_account: String,
    /// `portcullis.dev/pipeline` and `portcullis.dev/stage` with the stage's values.
    pub identity: BTreeMap<String, String>,
    /// The `matchLabels` of the stage's NetworkPolicy podSelector, as planned.
    pub pod_selector: BTreeMap<String, String>,
    /// The stage's credential Secrets.
    pub secrets: BTreeSet<String>,
}

impl StageIdentity {
    /// Every label a pod running as the stage's ServiceAccount must carry.
    fn required_labels(&self) -> BTreeMap<String, String> {
        let mut all = self.pod_selector.clone();
        all.extend(self.identity.clone());
        all
    }
}

/// The stages of `plans`, from the planned objects (so that the policy asks for exactly the
/// labels the NetworkPolicies select by).
pub(crate) fn stages(plans: &[Plan]) -> Vec<StageIdentity> {
    let mut out = Vec::new();
    for plan in plans {
        for stage in &plan.stages {
            let sa = &stage.service_account;
            let mut identity = StageIdentity {
                service_account: sa.clone(),
                ..StageIdentity::default()
            };
            for object in &plan.objects {
                if object.name() != sa {
                    continue;
                }
                match object {
                    Object::ServiceAccount(o) => {
                        identity.identity = o
                            .metadata
                            .labels
                            .iter()
                            .flatten()
                            .filter(|(k, _)| *k == PIPELINE_LABEL || *k == STAGE_LABEL)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                    }
                    Object::NetworkPolicy(np) => {
                        identity.pod_selector = np
                            .spec
                            .as_ref()
                            .and_then(|s| s.pod_selector.as_ref())
                            .and_then(|s| s.match_labels.clone())
                            .unwrap_or_default();
                    }
                    Object::Role(_) | Object::RoleBinding(_) => {}
                }
            }
            identity.secrets = plan
                .vault
                .credentials
                .iter()
                .filter(|c| c.stage == stage.name)
                .map(|c| c.secret_name.clone())
                .collect();
            out.push(identity);
        }
    }
    out.sort_by(|a, b| a.service_account.cmp(&b.service_account));
    // Two stages planned under one ServiceAccount name (a name collision between pipelines)
    // would make the CEL map literal invalid, and the policy refuse every pod of the
    // namespace: the first keeps the name.
    out.dedup_by(|later, first| later.service_account == first.service_account);
    out
}

/// A CEL string literal (JSON's escapes are CEL's).
fn lit(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

fn map_lit(entries: impl IntoIterator<Item = (String, String)>) -> String {
    let body: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| format!("{}: {v}", lit(&k)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

fn labels_lit(labels: &BTreeMap<String, String>) -> String {
    map_lit(labels.iter().map(|(k, v)| (k.clone(), lit(v))))
}

/// `labels` as `k=v, k=v`, for messages.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The CEL of `has all of the labels of the map at variables.<var>[s]`.
fn carries(var: &str, s: &str) -> String {
    format!(
        "variables.{var}[{s}].all(k, k in variables.labels && variables.labels[k] == variables.{var}[{s}][k])"
    )
}

/// The rules, each with the message a refusal quotes.
fn validations() -> Value {
    json!([
        {
            "expression": format!("!(variables.serviceAccount in variables.stageLabels) || {}", carries("stageLabels", "variables.serviceAccount")),
            "messageExpression": "'runs as ServiceAccount ' + variables.serviceAccount + ', the identity of a Portcullis stage, so it must carry that stage\\'s labels: ' + variables.stageLabelText[variables.serviceAccount]",
            "reason": "Forbidden",
        },
        {
            "expression": "variables.selectedBy.all(s, s == variables.serviceAccount)",
            "messageExpression": "'carries the labels of the Portcullis stage of ServiceAccount ' + variables.selectedBy.filter(s, s != variables.serviceAccount).join(', ') + ' (its identity labels or its NetworkPolicy podSelector) but runs as ' + variables.serviceAccount + ': a pod with a stage\\'s labels must run as that stage\\'s ServiceAccount'",
            "reason": "Forbidden",
        },
        {
            "expression": "variables.actor == '' || variables.serviceAccount == variables.actor",
            "messageExpression": "'created or changed by the Portcullis stage ServiceAccount ' + variables.actor + ', so it must run as ' + variables.actor + ', not as ' + variables.serviceAccount",
            "reason": "Forbidden",
        },
        {
            "expression": "variables.actor == '' || size(variables.foreignSecrets) == 0",
            "messageExpression": "'created or changed by the Portcullis stage ServiceAccount ' + variables.actor + ', which may mount only its own stage\\'s credential Secrets; refused: ' + variables.foreignSecrets.join(', ')",
            "reason": "Forbidden",
        },
    ])
}

/// The policy and binding of `namespace`, or `None` when it has no stages.
pub(crate) fn build(
    namespace: &str,
    stages: &[StageIdentity],
) -> Option<(ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding)> {
    if stages.is_empty() {
        return None;
    }
    let name = policy_name(namespace);
    let stage_labels = map_lit(
        stages
            .iter()
            .map(|s| (s.service_account.clone(), labels_lit(&s.required_labels()))),
    );
    let stage_label_text = map_lit(stages.iter().map(|s| {
        (
            s.service_account.clone(),
            lit(&labels_text(&s.required_labels())),
        )
    }));
    let identities = map_lit(
        stages
            .iter()
            .map(|s| (s.service_account.clone(), labels_lit(&s.identity))),
    );
    let pod_selectors = map_lit(
        stages
            .iter()
            .filter(|s| !s.pod_selector.is_empty())
            .map(|s| (s.service_account.clone(), labels_lit(&s.pod_selector))),
    );
    let secrets: Vec<String> = stages
        .iter()
        .flat_map(|s| {
            s.secrets
                .iter()
                .map(move |secret| lit(&format!("{}:{secret}", s.service_account)))
        })
        .collect();
    let prefix = format!("system:serviceaccount:{namespace}:");
    let user = "request.userInfo.username";
    let allowed = |x: &str| format!("((variables.actor + ':' + {x}) in variables.stageSecrets)");
    let variables = json!([
        {"name": "template", "expression": "object.kind == 'Pod' ? object : (object.kind == 'CronJob' ? object.spec.jobTemplate.?spec.?template.orValue({}) : object.spec.?template.orValue({}))"},
        {"name": "labels", "expression": "variables.template.?metadata.?labels.orValue({})"},
        {"name": "spec", "expression": "variables.template.?spec.orValue({})"},
        {"name": "serviceAccount", "expression": "variables.spec.?serviceAccountName.orValue('') != '' ? variables.spec.serviceAccountName : (variables.spec.?serviceAccount.orValue('') != '' ? variables.spec.serviceAccount : 'default')"},
        {"name": "stageLabels", "expression": stage_labels},
        {"name": "stageLabelText", "expression": stage_label_text},
        {"name": "identities", "expression": identities},
        {"name": "podSelectors", "expression": pod_selectors},
        {"name": "stageSecrets", "expression": format!("[{}]", secrets.join(", "))},
        {"name": "selectedBy", "expression": format!(
            "variables.stageLabels.filter(s, {} || (s in variables.podSelectors && {}))",
            carries("identities", "s"), carries("podSelectors", "s"))},
        {"name": "actor", "expression": format!(
            "{user}.startsWith({p}) && {user}.substring({n}) in variables.stageLabels ? {user}.substring({n}) : ''",
            p = lit(&prefix), n = prefix.len())},
        {"name": "containers", "expression": "variables.spec.?containers.orValue([]) + variables.spec.?initContainers.orValue([]) + variables.spec.?ephemeralContainers.orValue([])"},
        {"name": "foreignSecrets", "expression": format!(
            "variables.spec.?volumes.orValue([]).filter(v, has(v.secret) && !{a}).map(v, 'volume ' + v.name + ' (Secret ' + v.secret.?secretName.orValue('') + ')') \
             + variables.spec.?volumes.orValue([]).filter(v, has(v.projected) && v.projected.?sources.orValue([]).exists(s, has(s.secret) && !{b})).map(v, 'projected volume ' + v.name) \
             + variables.containers.filter(c, c.?env.orValue([]).exists(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef) && !{c})).map(c, 'env of container ' + c.name) \
             + variables.containers.filter(c, c.?envFrom.orValue([]).exists(e, has(e.secretRef) && !{d})).map(c, 'envFrom of container ' + c.name)",
            a = allowed("v.secret.?secretName.orValue('')"),
            b = allowed("s.secret.?name.orValue('')"),
            c = allowed("e.valueFrom.secretKeyRef.?name.orValue('')"),
            d = allowed("e.secretRef.?name.orValue('')"))},
    ]);
    let validations = validations();
    let labels = json!({MANAGED_BY.0: MANAGED_BY.1, NAMESPACE_LABEL: namespace});
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            // An expression that cannot be evaluated refuses: this is a security control, and
            // the API server evaluates it itself (there is no webhook to be unavailable).
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                     "resources": ["pods", "pods/ephemeralcontainers", "replicationcontrollers"]},
                    {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                     "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"]},
                    {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                     "resources": ["jobs", "cronjobs"]},
                ],
                "matchPolicy": "Equivalent",
            },
            // An update that changes neither the labels nor the spec (a finalizer removed, say)
            // is not checked: objects that predate the policy can still be deleted.
            "matchConditions": [{
                "name": "created-or-relabelled-or-respecified",
                "expression": "request.operation == 'CREATE' || object.?metadata.?labels.orValue({}) != oldObject.?metadata.?labels.orValue({}) || object.?spec.orValue({}) != oldObject.?spec.orValue({})",
            }],
            "variables": variables,
            "validations": validations,
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {METADATA_NAME_LABEL: namespace}}},
        },
    });
    Some((
        serde_json::from_value(policy).expect("a ValidatingAdmissionPolicy"),
        serde_json::from_value(binding).expect("a ValidatingAdmissionPolicyBinding"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::validate_and_build;

    fn fraud_plan() -> Plan {
        let yaml = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/pipelines/fraud-detector.yaml"
        ))
        .unwrap();
        let pipeline = serde_saphyr::from_str(&yaml).unwrap();
        validate_and_build(&pipeline, "ml-fraud", &BTreeMap::new(), &[]).unwrap()
    }

    #[test]
    fn stages_carry_the_planned_selector_and_identity() {
        let stages = stages(&[fraud_plan()]);
        let ingest = stages
            .iter()
            .find(|s| s.service_account == "fraud-detector-ingest")
            .unwrap();
        assert_eq!(ingest.pod_selector["app"], "fraud-ingest");
        assert_eq!(ingest.identity[STAGE_LABEL], "ingest");
        assert_eq!(ingest.identity[PIPELINE_LABEL], "fraud-detector");
        let required = ingest.required_labels();
        assert_eq!(required.len(), 3, "{required:?}");
    }

    #[test]
    fn colliding_service_account_names_keep_the_first_stage() {
        let mut first = fraud_plan();
        let second = fraud_plan();
        first.stages.extend(second.stages);
        first.objects.extend(second.objects);
        let stages = stages(&[first]);
        assert_eq!(stages.len(), 3, "{stages:?}");
    }

    #[test]
    fn no_stages_no_policy() {
        assert!(build("ml", &[]).is_none());
    }

    #[test]
    fn the_binding_selects_only_its_namespace() {
        let (policy, binding) = build("ml-fraud", &stages(&[fraud_plan()])).unwrap();
        let spec = binding.spec.unwrap();
        assert_eq!(spec.policy_name.as_deref(), policy.metadata.name.as_deref());
        let selector = spec.match_resources.unwrap().namespace_selector.unwrap();
        assert_eq!(
            selector.match_labels.unwrap()[METADATA_NAME_LABEL],
            "ml-fraud"
        );
        assert_eq!(policy.spec.unwrap().failure_policy.as_deref(), Some("Fail"));
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(lit("a'b\"c\\"), r#""a'b\"c\\""#);
    }
}
