//! What the cluster holds under the names a pipeline uses: the Secrets its stages would read
//! (a credential's `secretName`, `secrets` with `resourceNames`) and the workloads its
//! credentials restart (`restartTargets`). Pure: the controller looks them up and passes them
//! in; `plan` offline has none, and then such grants are allowed but marked unverified.
//!
//! A name is the pipeline's only when the cluster says so: a Secret that exists is the
//! pipeline's when it carries an owner reference to the AIPipeline (Portcullis writes one into
//! every credential Secret; labels alone prove nothing, anyone who may create a Secret sets
//! them); a workload is the pipeline's when its pod template runs as one of the pipeline's
//! stage ServiceAccounts (whoever may start pods as that identity already holds what a restart
//! could reach, and the admission policy pins those pods to the stage's labels).

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{AIPipeline, AIPipelineSpec, WorkloadKind};

/// A Secret, as the cluster has it under a name the pipeline uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFact {
    /// No Secret of that name: Portcullis creates it as the pipeline's when it delivers the
    /// credential, and never takes over one created meanwhile.
    Absent,
    /// It carries an owner reference to this AIPipeline.
    Owned,
    /// It exists and is not this pipeline's; the text says whose it is, for the message
    /// ([`describe_secret_owner`]).
    Foreign(String),
    /// It could not be looked up (the text says why): refused, as its owner is unknown.
    Unknown(String),
}

/// A workload, as the cluster has it under a name a credential's `restartTargets` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadFact {
    /// No such workload now: nothing is restarted, and ownership is checked again before
    /// each restart.
    Absent,
    /// It exists; its pod template runs as this ServiceAccount (`default` when it names none).
    RunsAs(String),
    /// It could not be looked up (the text says why): refused.
    Unknown(String),
}

impl ClusterFacts {
    /// Whether every name was looked up (none is [`SecretFact::Unknown`] or
    /// [`WorkloadFact::Unknown`]).
    pub fn complete(&self) -> bool {
        !self
            .secrets
            .values()
            .any(|f| matches!(f, SecretFact::Unknown(_)))
            && !self
                .workloads
                .values()
                .any(|f| matches!(f, WorkloadFact::Unknown(_)))
    }
}

/// The Secrets and workloads a pipeline names, looked up in its namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterFacts {
    pub secrets: BTreeMap<String, SecretFact>,
    pub workloads: BTreeMap<(WorkloadKind, String), WorkloadFact>,
}

/// The Secret names a pipeline's stages use: credential `secretName`s and the `resourceNames`
/// of permissions on `secrets` (core group). These are what the controller looks up.
pub fn named_secrets(pipeline: &AIPipeline) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for stage in &pipeline.spec.stages {
        for cred in stage.vault.iter().flat_map(|v| &v.credentials) {
            out.insert(cred.secret_name.clone());
        }
        for rule in &stage.permissions {
            let secrets = rule.api_groups.iter().any(String::is_empty)
                && rule
                    .resources
                    .iter()
                    .any(|r| super::floor::resource_base(r) == "secrets");
            if secrets {
                out.extend(rule.resource_names.iter().cloned());
            }
        }
    }
    out
}

/// The workloads a pipeline's credentials name as restart targets.
pub fn named_workloads(pipeline: &AIPipeline) -> BTreeSet<(WorkloadKind, String)> {
    pipeline
        .spec
        .stages
        .iter()
        .flat_map(|s| s.vault.iter().flat_map(|v| &v.credentials))
        .flat_map(|c| &c.restart_targets)
        .map(|t| (t.kind, t.name.clone()))
        .collect()
}

/// Whom an existing Secret that is not the pipeline's belongs to, in words, from its owner
/// references (kind, name), its labels and its type (when known).
pub fn describe_secret_owner(
    owners: &[(String, String)],
    labels: &BTreeMap<String, String>,
    secret_type: Option<&str>,
) -> String {
    if let Some((kind, name)) = owners.first() {
        return format!("owned by {kind} {name}");
    }
    let helm = secret_type == Some("helm.sh/release.v1")
        || labels.get("owner").is_some_and(|o| o == "helm");
    if helm {
        let release = labels.get("name").map_or("", String::as_str);
        return format!("a Helm release Secret (release {release:?})");
    }
    if let Some(pipeline) = labels.get(crate::plan::names::PIPELINE_LABEL) {
        return format!(
            "labelled for pipeline {pipeline:?} but owned by no AIPipeline (labels prove nothing)"
        );
    }
    "owned by nobody Portcullis knows (created outside Portcullis)".into()
}

/// Whether a pod template running as `service_account` runs as one of `pipeline`'s stages.
pub fn runs_as_stage(
    namespace: &str,
    pipeline: &str,
    spec: &AIPipelineSpec,
    service_account: &str,
) -> bool {
    spec.stages
        .iter()
        .any(|s| crate::plan::names::stage_object(namespace, pipeline, &s.name) == service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helm_release_secret_is_named_as_one() {
        let labels = BTreeMap::from([
            ("owner".to_string(), "helm".to_string()),
            ("name".to_string(), "vault".to_string()),
        ]);
        let text = describe_secret_owner(&[], &labels, None);
        assert!(
            text.contains("Helm release") && text.contains("vault"),
            "{text}"
        );
        let owned = describe_secret_owner(
            &[("AIPipeline".into(), "other".into())],
            &BTreeMap::new(),
            None,
        );
        assert_eq!(owned, "owned by AIPipeline other");
    }
}
