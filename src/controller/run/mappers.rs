//! Which pipelines a guardrail or namespace change affects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::api::{AIPipeline, AccessGuardrail};
use crate::k8s::{
    Namespace, ObjectRef, PartialObjectMeta, Resource, ResourceExt, Store, namespace_labels,
};

/// The pipelines a guardrail change affects: those in namespaces its old or new selector
/// matches, with a stage of a role its old or new version sets a ceiling for.
pub(super) fn guardrail_mapper(
    pipelines: Store<AIPipeline>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    guardrails: Store<AccessGuardrail>,
) -> impl Fn(AccessGuardrail) -> Vec<ObjectRef<AIPipeline>> + Send + Sync + 'static {
    let last_seen: Mutex<LastSeen<AccessGuardrail>> = Mutex::default();
    move |guardrail| {
        let previous = {
            let mut seen = last_seen.lock().expect("guardrail map lock");
            let previous = if guardrail.meta().deletion_timestamp.is_some() {
                seen.remove(&guardrail.name_any())
            } else {
                seen.insert(guardrail.name_any(), guardrail.clone())
            };
            seen.forget_gone(|name| guardrails.get(&ObjectRef::new(name)).is_some());
            previous
        };
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
    namespaces: Store<PartialObjectMeta<Namespace>>,
) -> impl Fn(PartialObjectMeta<Namespace>) -> Vec<ObjectRef<AIPipeline>> + Send + Sync + 'static {
    let last_seen: Mutex<LastSeen<BTreeMap<String, String>>> = Mutex::default();
    move |namespace| {
        let name = namespace.name_any();
        let labels = namespace.labels().clone();
        let previous = {
            let mut seen = last_seen.lock().expect("namespace map lock");
            let previous = seen.insert(name.clone(), labels.clone());
            seen.forget_gone(|n| namespaces.get(&ObjectRef::new(n)).is_some());
            previous
        };
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

/// What a mapper last saw, by object name.
struct LastSeen<V> {
    map: HashMap<String, V>,
    /// The size at which objects that are gone are next forgotten.
    trim_at: usize,
}

impl<V> Default for LastSeen<V> {
    fn default() -> Self {
        LastSeen {
            map: HashMap::new(),
            trim_at: 64,
        }
    }
}

impl<V> LastSeen<V> {
    fn insert(&mut self, name: String, value: V) -> Option<V> {
        self.map.insert(name, value)
    }

    fn remove(&mut self, name: &str) -> Option<V> {
        self.map.remove(name)
    }

    /// Forgets objects that are gone, once the map holds twice as many as after the last
    /// time (so the cost per event stays constant, and a deleted guardrail or namespace is
    /// not remembered for ever).
    fn forget_gone(&mut self, exists: impl Fn(&str) -> bool) {
        if self.map.len() >= self.trim_at {
            self.map.retain(|name, _| exists(name));
            self.trim_at = (self.map.len() * 2).max(64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_gone_is_forgotten_as_the_map_grows() {
        let mut seen: LastSeen<u32> = LastSeen::default();
        for i in 0..1000 {
            seen.insert(format!("ns-{i}"), i);
            // Only the last ten exist at any time.
            seen.forget_gone(|name| {
                name.strip_prefix("ns-")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n + 10 > i)
            });
        }
        assert!(seen.map.len() <= 64, "{} remembered", seen.map.len());
        assert!(seen.map.contains_key("ns-999"));
    }
}
