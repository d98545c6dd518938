//! The namespace-wide default-deny NetworkPolicy of `spec.isolateUnselectedPods`.
//!
//! One NetworkPolicy per namespace, `portcullis-default-deny`: every pod, no rule, Ingress and
//! Egress. NetworkPolicies add up, so a stage's pods keep the flows their own policy grants, and
//! every pod no stage selects is cut off. It carries the operator's labels and
//! `portcullis.dev/isolation: namespace`; an object of that name without that label is someone
//! else's (or a stage's) and is never touched.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use tracing::{info, warn};

use crate::controller::Context;
use crate::k8s::{
    Api, DeleteParams, FIELD_MANAGER, KubeResult, MANAGED_BY, NetworkPolicy, ObjectMeta, Patch,
    PatchParams, Preconditions, ResourceExt, is_not_found,
};

/// The NetworkPolicy's name.
pub(crate) const NAME: &str = "portcullis-default-deny";

/// The label that marks the NetworkPolicy as this one (stage policies carry the operator's
/// labels too).
pub(crate) const LABEL: (&str, &str) = ("portcullis.dev/isolation", "namespace");

/// The annotation naming the guardrails that asked for it.
pub(crate) const GUARDRAILS_ANNOTATION: &str = "portcullis.dev/guardrails";

/// Namespaces never isolated: the control plane's and the operator's own (isolating it would
/// cut the operator off the API server).
pub(crate) fn exempt(namespace: &str, operator_namespace: &str) -> bool {
    namespace == "kube-system" || namespace == operator_namespace
}

/// The NetworkPolicy for `namespace`, asked for by `guardrails`.
pub(crate) fn build(namespace: &str, guardrails: &[String]) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (LABEL.0.to_string(), LABEL.1.to_string()),
            ])),
            annotations: Some(BTreeMap::from([(
                GUARDRAILS_ANNOTATION.to_string(),
                guardrails.join(","),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: None,
            egress: None,
        }),
    }
}

fn is_ours(meta: &ObjectMeta) -> bool {
    let labels = meta.labels.as_ref();
    let has = |(k, v): (&str, &str)| labels.and_then(|l| l.get(k)).map(String::as_str) == Some(v);
    has(MANAGED_BY) && has(LABEL)
}

/// What became of an apply.
pub(crate) enum Applied {
    /// Written; the resourceVersion the API server returned.
    Written(String),
    /// An object of the name exists and is not this one: left alone.
    Refused,
}

/// Applies the NetworkPolicy (server-side apply), unless an object of its name is someone
/// else's.
pub(crate) async fn apply(
    ctx: &Context,
    namespace: &str,
    guardrails: &[String],
) -> KubeResult<Applied> {
    let api = Api::<NetworkPolicy>::namespaced(ctx.client.clone(), namespace);
    if let Some(existing) = api.get_metadata_opt(NAME).await?
        && !is_ours(&existing.metadata)
    {
        ctx.metrics
            .adoptions_refused
            .get_or_create(&crate::controller::metrics::KindLabels {
                kind: "NetworkPolicy".into(),
            })
            .inc();
        warn!(%namespace, networkpolicy = NAME, "a NetworkPolicy of this name exists and is not Portcullis's namespace isolation: not taking it over, so the namespace's unselected pods are not isolated; rename or delete it");
        return Ok(Applied::Refused);
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = api
        .patch(NAME, &params, &Patch::Apply(&build(namespace, guardrails)))
        .await?;
    info!(%namespace, networkpolicy = NAME, guardrails = %guardrails.join(","), "namespace isolation applied: pods no stage selects get no traffic");
    Ok(Applied::Written(
        written.resource_version().unwrap_or_default(),
    ))
}

/// Deletes the NetworkPolicy if it is this one (by its label, with its uid as a
/// precondition); what is already gone is not an error.
pub(crate) async fn delete(ctx: &Context, namespace: &str) -> KubeResult<()> {
    let api = Api::<NetworkPolicy>::namespaced(ctx.client.clone(), namespace);
    let Some(existing) = api.get_metadata_opt(NAME).await? else {
        return Ok(());
    };
    if !is_ours(&existing.metadata) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(NAME, &params).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    info!(%namespace, networkpolicy = NAME, "namespace isolation removed: no guardrail asks for it, or no pipeline is left");
    Ok(())
}

/// The namespaces (of `owns`) that have the NetworkPolicy now, with its resourceVersion.
pub(crate) async fn existing(
    ctx: &Context,
    watch_namespace: Option<&str>,
    owns: &(impl Fn(&str) -> bool + ?Sized),
) -> KubeResult<BTreeMap<String, String>> {
    let api = match watch_namespace {
        Some(ns) => Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns),
        None => Api::<NetworkPolicy>::all(ctx.client.clone()),
    };
    let selector = format!("{}={},{}={}", MANAGED_BY.0, MANAGED_BY.1, LABEL.0, LABEL.1);
    let list = api
        .list_metadata(&kube::api::ListParams::default().labels(&selector))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|np| np.name_any() == NAME)
        .filter_map(|np| {
            let ns = np.namespace()?;
            owns(&ns).then(|| (ns, np.resource_version().unwrap_or_default()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_selects_every_pod_and_allows_nothing() {
        let np = build("ml", &["a".into(), "b".into()]);
        let spec = np.spec.expect("spec");
        assert_eq!(spec.pod_selector, Some(LabelSelector::default()));
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string(), "Egress".to_string()][..])
        );
        assert!(spec.ingress.is_none() && spec.egress.is_none());
        assert!(is_ours(&np.metadata));
        let stage_policy = ObjectMeta {
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..ObjectMeta::default()
        };
        assert!(
            !is_ours(&stage_policy),
            "a stage's policy carries the operator's labels but is not the isolation"
        );
    }

    #[test]
    fn the_operator_and_the_control_plane_are_never_isolated() {
        assert!(exempt("kube-system", "portcullis-system"));
        assert!(exempt("portcullis-system", "portcullis-system"));
        assert!(!exempt("ml", "portcullis-system"));
    }
}
