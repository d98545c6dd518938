//! What the webhook answers for one AIPipeline (pure): refused when it is invalid, or when a
//! guardrail selecting its namespace says `enforcement: Enforce` and anything it asks for is
//! denied. The refusal quotes the validation errors or the decisions.

use std::collections::BTreeMap;

use crate::api::{AIPipeline, AccessGuardrail, Enforcement};
use crate::plan;
use crate::policy;

/// The webhook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Review {
    Allowed,
    /// The spec does not validate: its errors.
    Invalid(Vec<String>),
    /// Denied items under an enforcing guardrail: the guardrails, and the denials.
    Denied {
        guardrails: Vec<String>,
        denials: Vec<String>,
    },
}

impl Review {
    /// The metric label and decision-record reason of a refusal.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Review::Allowed => "Allowed",
            Review::Invalid(_) => "InvalidSpec",
            Review::Denied { .. } => "EnforcedGuardrail",
        }
    }

    /// The message the API server returns to the client.
    pub(crate) fn message(&self, namespace: &str, name: &str) -> String {
        match self {
            Review::Allowed => String::new(),
            Review::Invalid(errors) => format!(
                "AIPipeline {namespace}/{name} is invalid: {}",
                errors.join("; ")
            ),
            Review::Denied {
                guardrails,
                denials,
            } => format!(
                "AIPipeline {namespace}/{name} asks for what the AccessGuardrail {} (enforcement: Enforce) denies: {}",
                guardrails.join(", "),
                denials.join("; ")
            ),
        }
    }
}

/// Reviews `pipeline` in `namespace`, whose labels are `namespace_labels`.
pub(crate) fn review(
    pipeline: &AIPipeline,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    guardrails: &[AccessGuardrail],
) -> Review {
    let plan = match plan::validate_and_build(pipeline, namespace, namespace_labels, guardrails) {
        Ok(plan) => plan,
        Err(errors) => return Review::Invalid(errors.iter().map(ToString::to_string).collect()),
    };
    let labels = crate::k8s::with_name_label(namespace_labels.clone(), namespace);
    let enforcing: Vec<String> = policy::applicable_guardrails(&labels, guardrails)
        .into_iter()
        .filter(|g| g.spec.enforcement == Enforcement::Enforce)
        .map(|g| g.metadata.name.clone().unwrap_or_default())
        .collect();
    if enforcing.is_empty() || plan.denied() == 0 {
        return Review::Allowed;
    }
    let denials = plan
        .decisions
        .iter()
        .filter(|d| !d.is_allowed())
        .map(|d| {
            format!(
                "stage {} {} ({}) [{}]: {}",
                d.stage, d.item, d.field, d.reason, d.message
            )
        })
        .collect();
    Review::Denied {
        guardrails: enforcing,
        denials,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example<T: serde::de::DeserializeOwned>(path: &str) -> T {
        let text =
            std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_saphyr::from_str(&text).unwrap()
    }

    fn fraud() -> AIPipeline {
        example("examples/pipelines/fraud-detector.yaml")
    }

    fn guardrails(enforcement: Enforcement) -> Vec<AccessGuardrail> {
        ["ingestion", "training", "deployment"]
            .iter()
            .map(|role| {
                let mut g: AccessGuardrail = example(&format!("examples/guardrails/{role}.yaml"));
                g.spec.enforcement = enforcement;
                g.spec.namespace_selector = Default::default();
                g
            })
            .collect()
    }

    fn over_asking() -> AIPipeline {
        let mut p = fraud();
        p.spec.stages[0].permissions[0].verbs = vec!["get".into(), "delete".into()];
        p
    }

    #[test]
    fn an_enforcing_guardrail_refuses_an_over_asking_pipeline_quoting_the_denial() {
        let review = review(
            &over_asking(),
            "ml-fraud",
            &BTreeMap::new(),
            &guardrails(Enforcement::Enforce),
        );
        let Review::Denied { denials, .. } = &review else {
            panic!("{review:?}");
        };
        assert!(denials.iter().any(|d| d.contains("delete")), "{denials:?}");
        assert!(
            review
                .message("ml-fraud", "fraud-detector")
                .contains("enforcement: Enforce")
        );
    }

    #[test]
    fn an_auditing_guardrail_accepts_it() {
        assert_eq!(
            review(
                &over_asking(),
                "ml-fraud",
                &BTreeMap::new(),
                &guardrails(Enforcement::Audit)
            ),
            Review::Allowed
        );
    }

    #[test]
    fn an_invalid_pipeline_is_refused_with_its_errors() {
        let mut p = fraud();
        p.spec.stages[1].name = p.spec.stages[0].name.clone();
        let review = review(&p, "ml-fraud", &BTreeMap::new(), &[]);
        assert!(
            matches!(&review, Review::Invalid(errors) if !errors.is_empty()),
            "{review:?}"
        );
    }
}
