//! Keeps, per namespace with AIPipelines, a ValidatingAdmissionPolicy and its binding that make
//! the API server itself refuse pods and workloads that borrow a stage's identity ([`policy`]).
//!
//! A small reconciler of its own beside the pipeline controller, driven by the pipeline cache:
//! once a second it fingerprints each namespace's pipelines (name, generation), the guardrails
//! and the namespace's labels, and re-plans, applies or deletes only the namespaces whose
//! fingerprint changed. The policy objects are cluster-scoped, so they cannot be owned by the
//! pipelines (owner references across scopes are not followed); they carry
//! `app.kubernetes.io/managed-by=portcullis` and `portcullis.dev/namespace=<ns>`, and a policy
//! whose namespace (of this operator's scope) has no valid pipeline left is deleted, also after
//! a restart (the existing ones are listed at start). Never in kube-system nor in the
//! operator's own namespace.

pub(crate) mod policy;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::Context;
use crate::api::AIPipeline;
use crate::k8s::{
    Api, DeleteParams, FIELD_MANAGER, KubeResult, MANAGED_BY, Patch, PatchParams, ResourceExt,
    Store, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, is_not_found,
};
use crate::plan::{self, Plan};

const PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// Namespaces that never get a policy: the control plane's and the operator's own (a mistake
/// there could stop the cluster or the operator itself from running pods).
fn exempt(namespace: &str, operator_namespace: &str) -> bool {
    namespace == "kube-system" || namespace == operator_namespace
}

/// Keeps the policies in step with the pipelines until the process ends. `owns` says which
/// namespaces are this operator's (its watch scope and shard).
pub(crate) async fn keep_policies(
    ctx: Arc<Context>,
    pipelines: Store<AIPipeline>,
    operator_namespace: String,
    owns: impl Fn(&str) -> bool + Send + 'static,
) {
    let mut applied: HashMap<String, u64> = HashMap::new();
    let mut last_seen: Option<[u64; 3]> = None;
    let mut listed = false;
    // A second between rounds; doubled after a round with a failure (the API server refusing,
    // or the operator lacking the RBAC for these objects), up to a minute, so that a lasting
    // failure is not logged every second.
    let mut pause = PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        if !ctx.synced.load(Ordering::Acquire) {
            continue;
        }
        pause = (pause * 2).min(MAX_PAUSE);
        if !listed {
            // What an earlier run left: each is re-applied or deleted below.
            match existing(&ctx).await {
                Ok(namespaces) => {
                    for ns in namespaces.into_iter().filter(|ns| owns(ns)) {
                        applied.insert(ns, 0);
                    }
                    listed = true;
                }
                Err(error) => {
                    warn!(%error, "cannot list the ValidatingAdmissionPolicies Portcullis keeps; retrying");
                    continue;
                }
            }
        }
        // No cache took an event since the last round without a failure: nothing changed.
        let seen = ctx.events.snapshot();
        if last_seen == Some(seen) {
            pause = PAUSE;
            continue;
        }
        let mut failed = 0;
        let wanted = fingerprints(&ctx, &pipelines, &operator_namespace);
        for (namespace, (fingerprint, members)) in &wanted {
            if applied.get(namespace) == Some(fingerprint) {
                continue;
            }
            let plans = plans(&ctx, members, namespace);
            let result = match policy::build(namespace, &policy::stages(&plans)) {
                Some(objects) => apply(&ctx, namespace, objects).await,
                None => delete(&ctx, namespace).await,
            };
            match result {
                Ok(()) => {
                    applied.insert(namespace.clone(), *fingerprint);
                }
                Err(error) => {
                    failed += 1;
                    warn!(%namespace, %error, "cannot write the namespace's ValidatingAdmissionPolicy; retrying");
                }
            }
        }
        let gone: Vec<String> = applied
            .keys()
            .filter(|ns| !wanted.contains_key(*ns))
            .cloned()
            .collect();
        for namespace in gone {
            match delete(&ctx, &namespace).await {
                Ok(()) => {
                    applied.remove(&namespace);
                }
                Err(error) => {
                    failed += 1;
                    warn!(%namespace, %error, "cannot delete the ValidatingAdmissionPolicy of a namespace without pipelines; retrying");
                }
            }
        }
        if failed == 0 {
            pause = PAUSE;
            last_seen = Some(seen);
        }
        ctx.metrics
            .admission
            .policies
            .set(i64::try_from(applied.len()).unwrap_or(i64::MAX));
    }
}

/// Per namespace with pipelines: a fingerprint of what its policy is built from, and its
/// pipelines.
fn fingerprints(
    ctx: &Context,
    pipelines: &Store<AIPipeline>,
    operator_namespace: &str,
) -> BTreeMap<String, (u64, Vec<Arc<AIPipeline>>)> {
    let mut guardrails: Vec<(String, String)> = ctx
        .guardrails
        .state()
        .iter()
        .map(|g| (g.name_any(), g.resource_version().unwrap_or_default()))
        .collect();
    guardrails.sort();
    let mut by_namespace: BTreeMap<String, Vec<Arc<AIPipeline>>> = BTreeMap::new();
    for pipeline in pipelines.state() {
        let Some(namespace) = pipeline.namespace() else {
            continue;
        };
        if exempt(&namespace, operator_namespace) || pipeline.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        by_namespace.entry(namespace).or_default().push(pipeline);
    }
    by_namespace
        .into_iter()
        .map(|(namespace, mut members)| {
            members.sort_by_key(|p| p.name_any());
            let generations: Vec<(String, Option<i64>)> = members
                .iter()
                .map(|p| (p.name_any(), p.metadata.generation))
                .collect();
            let fingerprint = BuildHasherDefault::<DefaultHasher>::default().hash_one((
                &generations,
                &guardrails,
                ctx.namespace_labels(&namespace),
            ));
            (namespace, (fingerprint, members))
        })
        .collect()
}

/// The plans of a namespace's valid pipelines (an invalid one has no stages yet).
fn plans(ctx: &Context, pipelines: &[Arc<AIPipeline>], namespace: &str) -> Vec<Plan> {
    let labels = ctx.namespace_labels(namespace);
    let guardrails: Vec<_> = ctx
        .guardrails
        .state()
        .iter()
        .map(|g| (**g).clone())
        .collect();
    pipelines
        .iter()
        .filter_map(|p| plan::validate_and_build(p, namespace, &labels, &guardrails).ok())
        .collect()
}

/// The namespaces of the policies Portcullis keeps now.
async fn existing(ctx: &Context) -> KubeResult<Vec<String>> {
    let selector = format!(
        "{}={},{}",
        MANAGED_BY.0,
        MANAGED_BY.1,
        policy::NAMESPACE_LABEL
    );
    let list = Api::<ValidatingAdmissionPolicy>::all(ctx.client.clone())
        .list_metadata(&kube::api::ListParams::default().labels(&selector))
        .await?;
    Ok(list
        .items
        .iter()
        .filter_map(|p| p.labels().get(policy::NAMESPACE_LABEL).cloned())
        .collect())
}

async fn apply(
    ctx: &Context,
    namespace: &str,
    (policy, binding): (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding),
) -> KubeResult<()> {
    let name = policy::policy_name(namespace);
    let api = Api::<ValidatingAdmissionPolicy>::all(ctx.client.clone());
    if let Some(existing) = api.get_metadata_opt(&name).await?
        && existing.labels().get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1)
    {
        // Someone else's object of the same name: never taken over.
        ctx.metrics
            .adoptions_refused
            .get_or_create(&super::metrics::KindLabels {
                kind: "ValidatingAdmissionPolicy".into(),
            })
            .inc();
        warn!(%namespace, policy = %name, "a ValidatingAdmissionPolicy of this name exists and is not Portcullis's: not taking it over, so the namespace's pods are not checked at admission; rename or delete it");
        return Ok(());
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(&policy)).await?;
    Api::<ValidatingAdmissionPolicyBinding>::all(ctx.client.clone())
        .patch(&name, &params, &Patch::Apply(&binding))
        .await?;
    info!(%namespace, policy = %name, "ValidatingAdmissionPolicy applied");
    Ok(())
}

/// Deletes the binding, then the policy; what is already gone is not an error.
async fn delete(ctx: &Context, namespace: &str) -> KubeResult<()> {
    let name = policy::policy_name(namespace);
    let gone = |r: KubeResult<_>| match r {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    };
    gone(
        Api::<ValidatingAdmissionPolicyBinding>::all(ctx.client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<ValidatingAdmissionPolicy>::all(ctx.client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
    )?;
    info!(%namespace, policy = %name, "ValidatingAdmissionPolicy deleted: no pipelines left in the namespace");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::exempt;

    #[test]
    fn the_control_plane_and_the_operator_are_never_constrained() {
        assert!(exempt("kube-system", "portcullis-system"));
        assert!(exempt("portcullis-system", "portcullis-system"));
        assert!(!exempt("ml-fraud", "portcullis-system"));
    }
}
