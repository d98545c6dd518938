//! Which pipelines a guardrail or namespace change affects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::api::{AIPipeline, AccessGuardrail};
use crate::k8s::{Namespace, ObjectRef, PartialObjectMeta, ResourceExt, Store, namespace_labels};

/// The pipelines a guardrail change affects: those in namespaces its old or new selector
/// matches, with a stage of a role its old or new version sets a ceiling for.
pub(super) fn guardrail_mapper(
    pipelines: Store<AIPipeline>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
) -> impl Fn(AccessGuardrail) -> Vec<ObjectRef<AIPipeline>> + Send + Sync + 'static {
    let last_seen: Mutex<HashMap<String, AccessGuardrail>> = Mutex::default();
    move |guardrail| {
        let previous = last_seen
            .lock()
            .expect("guardrail map lock")
            .insert(guardrail.name_any(), guardrail.clone());
        let versions: Vec<&AccessGuardrail> = std::iter::once(&guardrail)
            .chain(previous.as_ref())
            .collect();
        pipelines
            .state()
            .iter()
            .filter(|p| {
                let labels = namespace_labels(&namespaces, &p.namespace().unwrap_or_default());
                versions.iter().any(|g| {
                    crate::policy::selects(&g.spec.namespace_selector, &labels)
                        && p.spec
                            .stages
                            .iter()
                            .any(|s| g.spec.roles.get(s.role).is_some())
                })
            })
            .map(|p| ObjectRef::from_obj(&**p))
            .collect()
    }
}

/// The pipelines a namespace change affects: those in the namespace, when its labels changed.
pub(super) fn namespace_mapper(
    pipelines: Store<AIPipeline>,
) -> impl Fn(PartialObjectMeta<Namespace>) -> Vec<ObjectRef<AIPipeline>> + Send + Sync + 'static {
    let last_seen: Mutex<HashMap<String, BTreeMap<String, String>>> = Mutex::default();
    move |namespace| {
        let name = namespace.name_any();
        let labels = namespace.labels().clone();
        let previous = last_seen
            .lock()
            .expect("namespace map lock")
            .insert(name.clone(), labels.clone());
        if previous.as_ref() == Some(&labels) {
            return Vec::new();
        }
        pipelines
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(name.as_str()))
            .map(|p| ObjectRef::from_obj(&**p))
            .collect()
    }
}
