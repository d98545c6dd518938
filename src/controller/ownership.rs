//! Looks up the Secrets and workloads a pipeline names, for the plan to decide whether they
//! are the pipeline's ([`crate::policy::cluster`]). A handful of GETs per reconcile: one per
//! Secret name and per restart target the spec names.
//!
//! A lookup the operator is not allowed to make (without Vault the chart grants it nothing on
//! Secrets or workloads) marks the name unknown, and the plan refuses it: nothing is granted on
//! a Secret whose owner is unknown (without Vault no credential Secret is ever delivered, so no
//! such Secret can be the pipeline's). Any other failure fails the reconcile, which is retried: a passing API
//! error never turns into a denial (and a pruned Role).

use crate::api::{AIPipeline, WorkloadKind};
use crate::k8s::{
    Api, ApiResource, Client, DaemonSet, Deployment, DynamicObject, ResourceExt, Secret,
    StatefulSet, is_not_found,
};
use crate::policy::cluster::{self, ClusterFacts, SecretFact, WorkloadFact};

fn is_forbidden(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 403)
}

/// The ServiceAccount a workload's pod template runs as (`default` when it names none).
pub(crate) fn template_service_account(workload: &DynamicObject) -> String {
    let spec = &workload.data["spec"]["template"]["spec"];
    spec["serviceAccountName"]
        .as_str()
        .or_else(|| spec["serviceAccount"].as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string()
}

pub(crate) fn workload_api(
    client: &Client,
    namespace: &str,
    kind: WorkloadKind,
) -> Api<DynamicObject> {
    let resource = match kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The Secrets and restart targets `pipeline` names in `namespace`, as the API server has
/// them. `uid` is the pipeline's: a Secret is its when an owner reference says so.
pub(crate) async fn cluster_facts(
    client: &Client,
    pipeline: &AIPipeline,
    namespace: &str,
    uid: &str,
) -> kube::Result<ClusterFacts> {
    let mut facts = ClusterFacts::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in cluster::named_secrets(pipeline) {
        let fact = match secrets.get_metadata_opt(&name).await {
            Ok(None) => SecretFact::Absent,
            Ok(Some(meta)) if meta.owner_references().iter().any(|o| o.uid == uid) => {
                SecretFact::Owned
            }
            Ok(Some(meta)) => {
                let owners: Vec<(String, String)> = meta
                    .owner_references()
                    .iter()
                    .map(|o| (o.kind.clone(), o.name.clone()))
                    .collect();
                SecretFact::Foreign(cluster::describe_secret_owner(&owners, meta.labels(), None))
            }
            Err(e) if is_forbidden(&e) => SecretFact::Unknown(format!(
                "the operator may not read Secrets in {namespace}; without Vault it delivers no credentials"
            )),
            Err(e) => return Err(e),
        };
        facts.secrets.insert(name, fact);
    }
    for (kind, name) in cluster::named_workloads(pipeline) {
        let fact = match workload_api(client, namespace, kind).get_opt(&name).await {
            Ok(None) => WorkloadFact::Absent,
            Ok(Some(workload)) => WorkloadFact::RunsAs(template_service_account(&workload)),
            Err(e) if is_forbidden(&e) => WorkloadFact::Unknown(format!(
                "the operator may not read {kind:?}s in {namespace}; without Vault it restarts nothing"
            )),
            Err(e) if is_not_found(&e) => WorkloadFact::Absent,
            Err(e) => return Err(e),
        };
        facts.workloads.insert((kind, name), fact);
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_template_without_a_service_account_runs_as_default() {
        let mut workload = DynamicObject::new("w", &ApiResource::erase::<Deployment>(&()));
        workload.data = serde_json::json!({"spec": {"template": {"spec": {}}}});
        assert_eq!(template_service_account(&workload), "default");
        workload.data = serde_json::json!({"spec": {"template": {"spec": {"serviceAccountName": "fraud-train"}}}});
        assert_eq!(template_service_account(&workload), "fraud-train");
    }
}
