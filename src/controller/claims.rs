//! Who names each credential: for every Vault credential path and every (namespace, Secret
//! name), the AIPipelines whose spec asks for it, kept from the pipeline watch.
//!
//! A credential path is owned by the pipeline that claimed it first, cluster-wide (see
//! [`crate::policy::CredentialClaims`]), so planning a pipeline with credentials needs the other
//! pipelines that name the same paths or Secrets. Going over every watched pipeline for that made
//! each such reconcile O(N), and a cold start O(N²); this index answers in the size of the
//! answer. It follows the reflector's relist semantics, as [`super::index`] does: a relist
//! (`Init` .. `InitDone`) builds a fresh copy, swapped in whole at `InitDone`.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use crate::api::AIPipeline;
use crate::k8s::{ObjectRef, watcher};

/// What a pipeline's credential can collide on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A Vault credential path: owned by one pipeline cluster-wide.
    Path(String),
    /// A credential Secret: (namespace, name).
    Secret(String, String),
}

/// The keys a pipeline's spec names.
fn keys(pipeline: &AIPipeline) -> Vec<Key> {
    let namespace = pipeline.metadata.namespace.clone().unwrap_or_default();
    pipeline
        .spec
        .stages
        .iter()
        .flat_map(|s| s.vault.iter().flat_map(|v| &v.credentials))
        .flat_map(|c| {
            [
                Key::Path(c.path.clone()),
                Key::Secret(namespace.clone(), c.secret_name.clone()),
            ]
        })
        .collect()
}

#[derive(Debug, Default)]
struct Claims {
    by_key: HashMap<Key, HashSet<ObjectRef<AIPipeline>>>,
    by_pipeline: HashMap<ObjectRef<AIPipeline>, Vec<Key>>,
}

impl Claims {
    fn upsert(&mut self, pipeline: &AIPipeline) {
        let reference = ObjectRef::from_obj(pipeline);
        self.remove(&reference);
        let keys = keys(pipeline);
        if keys.is_empty() {
            return;
        }
        for key in &keys {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(reference.clone());
        }
        self.by_pipeline.insert(reference, keys);
    }

    fn remove(&mut self, reference: &ObjectRef<AIPipeline>) {
        for key in self.by_pipeline.remove(reference).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(reference);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }
}

/// The index, shared by the pipeline watch (which writes it) and the reconciles (which read it).
#[derive(Debug, Default)]
pub(crate) struct ClaimIndex {
    claims: RwLock<Claims>,
}

impl ClaimIndex {
    /// The pipelines that name one of `pipeline`'s credential paths anywhere, or one of its
    /// Secret names in its namespace (`pipeline` itself included, once the watch has seen it).
    pub(crate) fn sharing(&self, pipeline: &AIPipeline) -> HashSet<ObjectRef<AIPipeline>> {
        let claims = self.claims.read().expect("claim index lock");
        keys(pipeline)
            .iter()
            .filter_map(|key| claims.by_key.get(key))
            .flatten()
            .cloned()
            .collect()
    }

    /// The number of pipelines that name at least one credential (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.claims
            .read()
            .expect("claim index lock")
            .by_pipeline
            .len()
    }
}

/// Writes the pipeline watch's events into a [`ClaimIndex`].
#[derive(Debug)]
pub(crate) struct ClaimWriter {
    index: std::sync::Arc<ClaimIndex>,
    /// The relist in progress (from `Init` to `InitDone`).
    buffer: Option<Claims>,
}

impl ClaimWriter {
    pub(crate) fn new(index: std::sync::Arc<ClaimIndex>) -> ClaimWriter {
        ClaimWriter {
            index,
            buffer: None,
        }
    }

    /// Applies one watch event, with the reflector's relist semantics.
    pub(crate) fn apply(&mut self, event: &watcher::Event<AIPipeline>) {
        match event {
            watcher::Event::Init => self.buffer = Some(Claims::default()),
            watcher::Event::InitApply(p) => self.buffer.get_or_insert_default().upsert(p),
            watcher::Event::InitDone => {
                let fresh = self.buffer.take().unwrap_or_default();
                let old = std::mem::replace(
                    &mut *self.index.claims.write().expect("claim index lock"),
                    fresh,
                );
                // Freed outside the lock.
                drop(old);
            }
            watcher::Event::Apply(p) => self
                .index
                .claims
                .write()
                .expect("claim index lock")
                .upsert(p),
            watcher::Event::Delete(p) => self
                .index
                .claims
                .write()
                .expect("claim index lock")
                .remove(&ObjectRef::from_obj(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pipeline(namespace: &str, name: &str, creds: &[(&str, &str)]) -> AIPipeline {
        let creds: Vec<_> = creds
            .iter()
            .map(|(path, secret)| serde_json::json!({"name": "c", "path": path, "ttl": "15m", "secretName": secret}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "AIPipeline",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"stages": [{
                "name": "train", "role": "Training",
                "podSelector": {"matchLabels": {"app": "t"}},
                "vault": {"credentials": creds}
            }]}
        }))
        .expect("pipeline")
    }

    fn names(set: &HashSet<ObjectRef<AIPipeline>>) -> Vec<String> {
        let mut v: Vec<String> = set
            .iter()
            .map(|r| format!("{}/{}", r.namespace.clone().unwrap_or_default(), r.name))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn finds_who_shares_a_path_anywhere_and_a_secret_in_the_same_namespace_only() {
        let index = Arc::new(ClaimIndex::default());
        let mut writer = ClaimWriter::new(index.clone());
        let a = pipeline("a", "p", &[("database/creds/x", "creds")]);
        let same_path = pipeline("b", "q", &[("database/creds/x", "other")]);
        let same_secret_elsewhere = pipeline("b", "r", &[("database/creds/y", "creds")]);
        let same_secret_here = pipeline("a", "s", &[("database/creds/z", "creds")]);
        let unrelated = pipeline("a", "t", &[("database/creds/w", "w")]);
        for p in [
            &a,
            &same_path,
            &same_secret_elsewhere,
            &same_secret_here,
            &unrelated,
        ] {
            writer.apply(&watcher::Event::Apply(p.clone()));
        }
        assert_eq!(names(&index.sharing(&a)), ["a/p", "a/s", "b/q"]);

        // A changed spec moves the pipeline's keys; a deletion drops them.
        let moved = pipeline("b", "q", &[("database/creds/v", "other")]);
        writer.apply(&watcher::Event::Apply(moved));
        writer.apply(&watcher::Event::Delete(same_secret_here));
        assert_eq!(names(&index.sharing(&a)), ["a/p"]);
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn a_relist_replaces_the_index_only_when_it_is_complete() {
        let index = Arc::new(ClaimIndex::default());
        let mut writer = ClaimWriter::new(index.clone());
        let a = pipeline("a", "p", &[("database/creds/x", "creds")]);
        let b = pipeline("b", "q", &[("database/creds/x", "creds")]);
        writer.apply(&watcher::Event::Apply(a.clone()));
        writer.apply(&watcher::Event::Apply(b.clone()));
        writer.apply(&watcher::Event::Init);
        writer.apply(&watcher::Event::InitApply(a.clone()));
        // Mid-relist, readers still see the old, complete index.
        assert_eq!(names(&index.sharing(&a)), ["a/p", "b/q"]);
        writer.apply(&watcher::Event::InitDone);
        // `b` was deleted while the watch was down: the relist forgets it.
        assert_eq!(names(&index.sharing(&a)), ["a/p"]);
        assert!(index.sharing(&pipeline("c", "r", &[])).is_empty());
    }
}
