//! Puts a plan's objects in place: server-side apply with field manager `portcullis` and an
//! owner reference to the AIPipeline, pruning of objects no longer planned, drift detection, and
//! refusal to take over objects Portcullis does not own.
//!
//! Work is split in two so that the decision log is written before anything changes:
//! [`Applier::intents`] only reads (the index of the managed objects, and a GET of an object whose
//! resourceVersion is not the one our last write returned),
//! then the caller records the intents, then [`Applier::execute`] writes.
//!
//! Steady state costs no API writes: an object whose cached resourceVersion is the one our last
//! apply returned, for the same desired content, is left alone. Any other resourceVersion means
//! someone else wrote it; the live object is then compared with what we want, and re-applied
//! (a drift revert) only when it differs.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::index::{ManagedIndex, PerKind};
use crate::k8s::{
    Api, Client, DeleteParams, FIELD_MANAGER, KubeError, KubeResult, Managed, ManagedKind,
    NetworkPolicy, OwnerReference, Patch, PatchParams, Preconditions, ResourceExt, Role,
    RoleBinding, STAGE_LABEL, ServiceAccount, is_not_found,
};
use crate::plan::Object;

/// Evaluates `$body` with `$K` the type of the managed kind `$kind`: the one place that maps a
/// kind to its type. The match has no `_` arm, so a new [`ManagedKind`] does not compile until it
/// is mapped here.
macro_rules! with_kind {
    ($kind:expr, |$K:ident| $body:expr) => {
        match $kind {
            ManagedKind::ServiceAccount => {
                type $K = ServiceAccount;
                $body
            }
            ManagedKind::Role => {
                type $K = Role;
                $body
            }
            ManagedKind::RoleBinding => {
                type $K = RoleBinding;
                $body
            }
            ManagedKind::NetworkPolicy => {
                type $K = NetworkPolicy;
                $body
            }
        }
    };
}

/// (kind, namespace, name)
pub(crate) type ObjectKey = (ManagedKind, Box<str>, Box<str>);

/// The hash of the content of an apply (of its JSON).
pub(crate) type ContentHash = [u8; 16];

/// What we last applied, per object: the resourceVersion the API server returned and the hash
/// of the content we sent. Kept for every object the operator wrote, so it is kept small.
#[derive(Default)]
pub(crate) struct AppliedState(Mutex<HashMap<ObjectKey, (Box<str>, ContentHash)>>);

impl AppliedState {
    fn get(&self, key: &ObjectKey) -> Option<(Box<str>, ContentHash)> {
        self.0.lock().expect("applied-state lock").get(key).cloned()
    }

    fn set(&self, key: ObjectKey, rv: &str, hash: ContentHash) {
        self.0
            .lock()
            .expect("applied-state lock")
            .insert(key, (rv.into(), hash));
    }

    /// Whether `rv` of this object is the one our own last write returned: its watch event is
    /// the echo of that write, and re-reconciling for it would find nothing to do.
    pub(crate) fn is_own_write(
        &self,
        kind: ManagedKind,
        namespace: &str,
        name: &str,
        rv: &str,
    ) -> bool {
        let key: ObjectKey = (kind, namespace.into(), name.into());
        self.0
            .lock()
            .expect("applied-state lock")
            .get(&key)
            .is_some_and(|(ours, _)| &**ours == rv)
    }

    fn forget(&self, key: &ObjectKey) {
        self.0.lock().expect("applied-state lock").remove(key);
    }

    /// Forgets the objects that no longer exist (a deleted pipeline's children, collected by
    /// the garbage collector without a prune of ours).
    pub(crate) fn forget_gone(&self, index: &ManagedIndex) {
        self.0
            .lock()
            .expect("applied-state lock")
            .retain(|(kind, ns, name), _| index.get(*kind, ns, name).is_some());
    }
}

/// What is about to happen to one object, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Intent {
    /// The object does not exist: create it.
    Create,
    /// The plan changed: update it.
    Update,
    /// Someone else changed or deleted it: put it back.
    RevertDrift,
    /// No longer planned: delete it.
    Prune { uid: String },
    /// Exists and is not ours: leave it, and bind nothing of the stage to it.
    RefuseAdoption,
}

impl Intent {
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Intent::Create => "create",
            Intent::Update => "update",
            Intent::RevertDrift => "drift-reverted",
            Intent::Prune { .. } => "prune",
            Intent::RefuseAdoption => "adoption-refused",
        }
    }
}

/// One planned change to one object.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub kind: ManagedKind,
    pub namespace: String,
    pub name: String,
    /// The stage the object belongs to.
    pub stage: String,
    pub intent: Intent,
    /// The full object to apply (with owner reference), for create, update and drift revert.
    pub desired: Option<Value>,
    pub hash: ContentHash,
}

impl Change {
    pub(crate) fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// Why the object is not taken over, and what to do: for a refused adoption.
    pub(crate) fn refusal(&self) -> String {
        format!(
            "{} already exists and is not owned by this AIPipeline; Portcullis does not take over objects it did not create. Delete it if it is stale, or rename the stage",
            self.object()
        )
    }

    fn key(&self) -> ObjectKey {
        (
            self.kind,
            self.namespace.as_str().into(),
            self.name.as_str().into(),
        )
    }
}

/// Reads and writes the managed objects.
pub(crate) struct Applier<'a> {
    pub client: &'a Client,
    /// Every managed object of the watched namespaces (see [`ManagedIndex`]).
    pub index: &'a ManagedIndex,
    pub applied: &'a AppliedState,
}

fn content_hash(v: &Value) -> ContentHash {
    let digest = Sha256::digest(v.to_string().as_bytes());
    let mut hash = ContentHash::default();
    hash.copy_from_slice(&digest[..16]);
    hash
}

/// Whether every field set in `want` has the same value in `have`. Lists must have the same
/// length (Portcullis's lists are atomic: a rule someone added is drift). Empty values count
/// as absent, since the API server drops them.
pub fn json_subset(want: &Value, have: &Value) -> bool {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, wv)| match h.get(k) {
            Some(hv) => json_subset(wv, hv),
            None => empty(wv),
        }),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| json_subset(a, b))
        }
        (w, h) if empty(w) && empty(h) => true,
        (w, h) => w == h,
    }
}

fn owned_by(refs: &[OwnerReference], uid: &str) -> bool {
    refs.iter().any(|r| r.uid == uid)
}

fn stage_of(object: &Object) -> String {
    object
        .metadata()
        .labels
        .as_ref()
        .and_then(|l| l.get(STAGE_LABEL))
        .cloned()
        .unwrap_or_default()
}

impl Applier<'_> {
    /// The changes needed to put `objects` in place for the pipeline with `owner`, and to prune
    /// what the pipeline no longer plans. Reads only.
    pub(crate) async fn intents(
        &self,
        namespace: &str,
        objects: &[Object],
        owner: &OwnerReference,
    ) -> KubeResult<Vec<Change>> {
        // One read per object at most, all at once.
        let reads = objects.iter().map(|object| async move {
            let mut value = serde_json::to_value(object).expect("planned objects serialize");
            value["metadata"]["ownerReferences"] = serde_json::json!([owner]);
            let hash = content_hash(&value);
            let (name, uid) = (object.name(), owner.uid.as_str());
            let kind = ManagedKind::of(object);
            let intent = with_kind!(kind, |K| {
                self.intent::<K>(namespace, name, &value, &hash, uid).await
            })?;
            Ok::<_, KubeError>(intent.map(|intent| Change {
                kind,
                namespace: namespace.into(),
                name: name.into(),
                stage: stage_of(object),
                intent,
                desired: Some(value),
                hash,
            }))
        });
        let mut changes = Vec::new();
        for change in futures::future::join_all(reads).await {
            changes.extend(change?);
        }
        // A refused object makes its whole stage unsafe to apply: a RoleBinding must never bind a
        // Role to a ServiceAccount that someone else controls.
        let refused: BTreeSet<String> = changes
            .iter()
            .filter(|c| matches!(c.intent, Intent::RefuseAdoption))
            .map(|c| c.stage.clone())
            .collect();
        changes
            .retain(|c| !refused.contains(&c.stage) || matches!(c.intent, Intent::RefuseAdoption));

        let planned: BTreeSet<(ManagedKind, &str)> = objects
            .iter()
            .map(|o| (ManagedKind::of(o), o.name()))
            .collect();
        // Every kind is pruned: `PerKind` has one field per kind, and a new kind does not compile
        // until it is in `PerKind::KINDS`.
        for kind in PerKind::KINDS.into_array() {
            self.prune_candidates(kind, namespace, &owner.uid, &planned, &mut changes);
        }
        Ok(changes)
    }

    async fn intent<K>(
        &self,
        namespace: &str,
        name: &str,
        desired: &Value,
        hash: &ContentHash,
        uid: &str,
    ) -> KubeResult<Option<Intent>>
    where
        K: Managed,
    {
        let key: ObjectKey = (K::KIND, namespace.into(), name.into());
        let remembered = self.applied.get(&key);
        match self.index.get(K::KIND, namespace, name) {
            Some(indexed) => {
                if !indexed.owned_by(uid) {
                    return Ok(Some(Intent::RefuseAdoption));
                }
                let rv = &*indexed.resource_version;
                if remembered
                    .as_ref()
                    .is_some_and(|(r, h)| &**r == rv && h == hash)
                {
                    return Ok(None);
                }
            }
            // The index holds every object of this kind in the watched namespaces (synced before
            // any reconcile): an object it lacks and we never wrote does not exist, so no read
            // is needed. One we wrote may just not have reached the cache yet: read it.
            None if remembered.is_none() => return Ok(Some(Intent::Create)),
            None => {}
        }
        // The index cannot settle it: read the live object.
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let Some(live) = api.get_opt(name).await? else {
            return Ok(Some(if remembered.is_some() {
                Intent::RevertDrift
            } else {
                Intent::Create
            }));
        };
        if !owned_by(live.owner_references(), uid) {
            return Ok(Some(Intent::RefuseAdoption));
        }
        let live_value = serde_json::to_value(&live).expect("objects serialize");
        let mut want = desired.clone();
        if let Some(meta) = want.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("name");
            meta.remove("namespace");
        }
        if json_subset(&want, &live_value) {
            self.applied.set(
                key,
                live.meta().resource_version.as_deref().unwrap_or_default(),
                *hash,
            );
            return Ok(None);
        }
        Ok(Some(match remembered {
            Some((_, h)) if h == *hash => Intent::RevertDrift,
            _ => Intent::Update,
        }))
    }

    /// A prune for each object of `kind` in `namespace` that the pipeline with `uid` owns and no
    /// longer plans, by name: a lookup of the pipeline's own objects, not a scan of them all.
    fn prune_candidates(
        &self,
        kind: ManagedKind,
        namespace: &str,
        uid: &str,
        planned: &BTreeSet<(ManagedKind, &str)>,
        out: &mut Vec<Change>,
    ) {
        for (name, indexed) in self.index.owned_by(kind, namespace, uid) {
            if planned.contains(&(kind, &*name)) {
                continue;
            }
            out.push(Change {
                kind,
                namespace: namespace.into(),
                name: name.to_string(),
                stage: indexed.stage.as_deref().unwrap_or_default().to_string(),
                intent: Intent::Prune {
                    uid: indexed.uid.to_string(),
                },
                desired: None,
                hash: ContentHash::default(),
            });
        }
    }

    /// Makes the changes. Returns, per change, the error if it failed.
    pub(crate) async fn execute(&self, changes: &[Change]) -> Vec<Option<KubeError>> {
        let futures = changes.iter().map(|c| self.execute_one(c));
        futures::future::join_all(futures)
            .await
            .into_iter()
            .map(Result::err)
            .collect()
    }

    async fn execute_one(&self, change: &Change) -> KubeResult<()> {
        match &change.intent {
            Intent::RefuseAdoption => Ok(()),
            _ => with_kind!(change.kind, |K| self.write::<K>(change).await),
        }
    }

    async fn write<K>(&self, change: &Change) -> KubeResult<()>
    where
        K: Managed,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &change.namespace);
        match &change.intent {
            Intent::Prune { uid } => {
                self.applied.forget(&change.key());
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::background()
                };
                match api.delete(&change.name, &params).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            _ => {
                let desired = change.desired.as_ref().expect("applies carry the object");
                let params = PatchParams::apply(FIELD_MANAGER).force();
                let applied = api
                    .patch(&change.name, &params, &Patch::Apply(desired))
                    .await?;
                self.applied.set(
                    change.key(),
                    applied
                        .meta()
                        .resource_version
                        .as_deref()
                        .unwrap_or_default(),
                    change.hash,
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_defaults_but_not_changed_or_added_rules() {
        let want =
            json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]});
        let defaulted = json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": []}], "extra": 1});
        assert!(json_subset(&want, &defaulted));
        let widened = json!({"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]});
        assert!(!json_subset(&want, &widened));
        let added = json!({"rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
        ]});
        assert!(!json_subset(&want, &added));
        assert!(json_subset(&json!({"a": "", "b": []}), &json!({})));
        assert!(!json_subset(
            &json!({"automountServiceAccountToken": false}),
            &json!({"automountServiceAccountToken": true})
        ));
    }
}
