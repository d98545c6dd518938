//! The index of the managed objects: every ServiceAccount, Role, RoleBinding and NetworkPolicy of
//! the watched namespaces (Portcullis's own and everyone else's, to refuse taking over others'
//! without a read), keeping per object only what the reconciles read: its name and namespace, its
//! uid (the prune precondition), its resourceVersion (drift detection), the uids of the
//! AIPipelines it is owned by (adoption refusal, pruning) and its `portcullis.dev/stage` label.
//! That is about a quarter of what a metadata cache (`Store<PartialObjectMeta<K>>`) held per
//! object, and a by-owner index lets a reconcile find its pipeline's own objects (to prune)
//! without going over every object of the cluster.
//!
//! It is filled from the watch streams of the managed kinds, one [`IndexWriter`] per kind, with
//! the reflector's relist semantics: a relist (`Init` .. `InitDone`) builds a fresh copy of the
//! kind's index, swapped in whole at `InitDone`, which also marks the kind synced ([`Synced`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::k8s::{ManagedKind, PartialObjectMeta, STAGE_LABEL, watcher};

/// One value per managed kind, one field per [`ManagedKind`]. Where every kind must be handled
/// (pruning, watching, waiting for the caches), it is built or destructured exhaustively, so a
/// new kind does not compile until it is.
#[derive(Debug, Clone, Default)]
pub(crate) struct PerKind<T> {
    pub service_accounts: T,
    pub roles: T,
    pub role_bindings: T,
    pub network_policies: T,
}

impl<T> PerKind<T> {
    /// The value of `kind`.
    pub(crate) fn get(&self, kind: ManagedKind) -> &T {
        match kind {
            ManagedKind::ServiceAccount => &self.service_accounts,
            ManagedKind::Role => &self.roles,
            ManagedKind::RoleBinding => &self.role_bindings,
            ManagedKind::NetworkPolicy => &self.network_policies,
        }
    }
}

impl<T> PerKind<T> {
    /// The values, one per kind.
    pub(crate) fn into_array(self) -> [T; 4] {
        let PerKind {
            service_accounts,
            roles,
            role_bindings,
            network_policies,
        } = self;
        [service_accounts, roles, role_bindings, network_policies]
    }
}

impl PerKind<ManagedKind> {
    /// Every managed kind.
    pub(crate) const KINDS: PerKind<ManagedKind> = PerKind {
        service_accounts: ManagedKind::ServiceAccount,
        roles: ManagedKind::Role,
        role_bindings: ManagedKind::RoleBinding,
        network_policies: ManagedKind::NetworkPolicy,
    };
}

/// What the index keeps of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Indexed {
    pub uid: Box<str>,
    pub resource_version: Box<str>,
    /// The `portcullis.dev/stage` label, if any.
    pub stage: Option<Box<str>>,
    /// The uids of the AIPipelines among its owners (usually none or one).
    owners: Box<[Arc<str>]>,
}

impl Indexed {
    /// Whether the AIPipeline with `uid` is among its owners.
    pub(crate) fn owned_by(&self, uid: &str) -> bool {
        self.owners.iter().any(|o| &**o == uid)
    }
}

/// Where an object is: (namespace, name).
type Place = (Arc<str>, Arc<str>);

/// One kind's objects, by namespace and name, and by owning AIPipeline.
#[derive(Debug, Default)]
struct KindIndex {
    /// namespace -> name -> object. The namespace is shared by its objects (and `by_owner`).
    objects: HashMap<Arc<str>, HashMap<Arc<str>, Indexed>>,
    /// AIPipeline uid -> (namespace, name) of the objects it owns.
    by_owner: HashMap<Arc<str>, Vec<Place>>,
}

impl KindIndex {
    fn get(&self, namespace: &str, name: &str) -> Option<&Indexed> {
        self.objects.get(namespace)?.get(name)
    }

    fn upsert<K>(&mut self, meta: &PartialObjectMeta<K>) {
        let (Some(namespace), Some(name)) = (&meta.metadata.namespace, &meta.metadata.name) else {
            return;
        };
        self.remove(namespace, name);
        let namespace: Arc<str> = match self.objects.get_key_value(namespace.as_str()) {
            Some((ns, _)) => ns.clone(),
            None => namespace.as_str().into(),
        };
        let name: Arc<str> = name.as_str().into();
        let owners: Box<[Arc<str>]> = meta
            .metadata
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.kind == "AIPipeline")
            .map(|o| {
                let owner: Arc<str> = match self.by_owner.get_key_value(o.uid.as_str()) {
                    Some((uid, _)) => uid.clone(),
                    None => o.uid.as_str().into(),
                };
                self.by_owner
                    .entry(owner.clone())
                    .or_default()
                    .push((namespace.clone(), name.clone()));
                owner
            })
            .collect();
        let indexed = Indexed {
            uid: meta.metadata.uid.as_deref().unwrap_or_default().into(),
            resource_version: meta
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or_default()
                .into(),
            stage: meta
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(STAGE_LABEL))
                .map(|s| s.as_str().into()),
            owners,
        };
        self.objects
            .entry(namespace)
            .or_default()
            .insert(name, indexed);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(names) = self.objects.get_mut(namespace) else {
            return;
        };
        let Some(old) = names.remove(name) else {
            return;
        };
        if names.is_empty() {
            self.objects.remove(namespace);
        }
        for owner in &old.owners {
            if let Some(owned) = self.by_owner.get_mut(owner) {
                owned.retain(|(ns, n)| !(&**ns == namespace && &**n == name));
                if owned.is_empty() {
                    self.by_owner.remove(owner);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.objects.values().map(HashMap::len).sum()
    }
}

/// The managed objects of the watched namespaces, per kind. Shared by the reconciles (which
/// read it) and the watch streams (which write it, through their [`IndexWriter`]).
#[derive(Debug, Default)]
pub(crate) struct ManagedIndex {
    kinds: PerKind<RwLock<KindIndex>>,
}

impl ManagedIndex {
    /// An empty index, and one writer per kind with its readiness.
    pub(crate) fn new() -> (Arc<ManagedIndex>, PerKind<(IndexWriter, Synced)>) {
        let index = Arc::new(ManagedIndex::default());
        let writer = |kind| IndexWriter::new(index.clone(), kind);
        let kinds = PerKind::KINDS;
        let writers = PerKind {
            service_accounts: writer(kinds.service_accounts),
            roles: writer(kinds.roles),
            role_bindings: writer(kinds.role_bindings),
            network_policies: writer(kinds.network_policies),
        };
        (index, writers)
    }

    fn read(&self, kind: ManagedKind) -> std::sync::RwLockReadGuard<'_, KindIndex> {
        self.kinds.get(kind).read().expect("managed index lock")
    }

    fn write(&self, kind: ManagedKind) -> std::sync::RwLockWriteGuard<'_, KindIndex> {
        self.kinds.get(kind).write().expect("managed index lock")
    }

    /// The object of `kind` named `name` in `namespace`, if it exists.
    pub(crate) fn get(&self, kind: ManagedKind, namespace: &str, name: &str) -> Option<Indexed> {
        self.read(kind).get(namespace, name).cloned()
    }

    /// The objects of `kind` in `namespace` that the AIPipeline with uid `owner` owns, by name.
    pub(crate) fn owned_by(
        &self,
        kind: ManagedKind,
        namespace: &str,
        owner: &str,
    ) -> Vec<(Arc<str>, Indexed)> {
        let index = self.read(kind);
        let mut owned: Vec<(Arc<str>, Indexed)> = index
            .by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter(|(ns, _)| &**ns == namespace)
            .filter_map(|(ns, name)| Some((name.clone(), index.get(ns, name)?.clone())))
            .collect();
        drop(index);
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        owned
    }

    /// How many objects of `kind` it holds.
    #[cfg(test)]
    pub(crate) fn len(&self, kind: ManagedKind) -> usize {
        self.read(kind).len()
    }
}

/// Whether a kind's index holds a full list yet.
#[derive(Debug, Clone)]
pub(crate) struct Synced(watch::Receiver<bool>);

impl Synced {
    /// Waits until the kind's first list is in. `false` if its writer was dropped first.
    pub(crate) async fn wait(&self) -> bool {
        self.0.clone().wait_for(|ready| *ready).await.is_ok()
    }
}

/// Writes one kind's watch events into the [`ManagedIndex`], as a reflector writes its store.
#[derive(Debug)]
pub(crate) struct IndexWriter {
    index: Arc<ManagedIndex>,
    kind: ManagedKind,
    /// The relist in progress (from `Init` to `InitDone`).
    buffer: Option<KindIndex>,
    ready: watch::Sender<bool>,
}

impl IndexWriter {
    fn new(index: Arc<ManagedIndex>, kind: ManagedKind) -> (IndexWriter, Synced) {
        let (ready, synced) = watch::channel(false);
        let writer = IndexWriter {
            index,
            kind,
            buffer: None,
            ready,
        };
        (writer, Synced(synced))
    }

    /// Applies one watch event: `Init` starts a fresh list, `InitApply` adds to it, `InitDone`
    /// swaps it in (and marks the kind synced), `Apply` upserts and `Delete` removes.
    pub(crate) fn apply<K>(&mut self, event: &watcher::Event<PartialObjectMeta<K>>) {
        match event {
            watcher::Event::Init => self.buffer = Some(KindIndex::default()),
            watcher::Event::InitApply(o) => self.buffer.get_or_insert_default().upsert(o),
            watcher::Event::InitDone => {
                let fresh = self.buffer.take().unwrap_or_default();
                let old = std::mem::replace(&mut *self.index.write(self.kind), fresh);
                // Freed outside the lock.
                drop(old);
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(o) => self.index.write(self.kind).upsert(o),
            watcher::Event::Delete(o) => {
                if let (Some(namespace), Some(name)) = (&o.metadata.namespace, &o.metadata.name) {
                    self.index.write(self.kind).remove(namespace, name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{ObjectMeta, OwnerReference, ServiceAccount};

    fn owner(kind: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "portcullis.dev/v1alpha1".into(),
            kind: kind.into(),
            name: "p".into(),
            uid: uid.into(),
            ..Default::default()
        }
    }

    fn sa(
        namespace: &str,
        name: &str,
        rv: &str,
        owners: Vec<OwnerReference>,
    ) -> PartialObjectMeta<ServiceAccount> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(format!("uid-{namespace}-{name}")),
                resource_version: Some(rv.into()),
                labels: Some([(STAGE_LABEL.to_string(), format!("stage-{name}"))].into()),
                owner_references: Some(owners),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    const SA: ManagedKind = ManagedKind::ServiceAccount;
    type Event = watcher::Event<PartialObjectMeta<ServiceAccount>>;

    fn names(owned: &[(Arc<str>, Indexed)]) -> Vec<&str> {
        owned.iter().map(|(n, _)| &**n).collect()
    }

    #[tokio::test]
    async fn a_relist_is_swapped_in_whole_at_its_end() {
        let (index, writers) = ManagedIndex::new();
        let (mut writer, synced) = writers.service_accounts;
        let p1 = || vec![owner("AIPipeline", "p1")];
        writer.apply(&Event::Init);
        writer.apply(&watcher::Event::InitApply(sa("a", "one", "1", p1())));
        writer.apply(&watcher::Event::InitApply(sa("a", "two", "2", p1())));
        // Not visible, nor synced, until the list is complete.
        assert_eq!(index.len(SA), 0);
        assert!(index.get(SA, "a", "one").is_none());
        assert!(!*synced.0.borrow());
        writer.apply(&Event::InitDone);
        assert!(synced.wait().await);
        assert_eq!(index.len(SA), 2);
        assert_eq!(names(&index.owned_by(SA, "a", "p1")), ["one", "two"]);

        // A relist replaces everything: "one" is gone (deleted while the watch was down), "two"
        // changed, "three" is new; until InitDone the old list stays readable.
        writer.apply(&Event::Init);
        writer.apply(&watcher::Event::InitApply(sa("a", "two", "5", p1())));
        writer.apply(&watcher::Event::InitApply(sa("a", "three", "6", p1())));
        assert_eq!(
            index.get(SA, "a", "one").unwrap().resource_version.as_ref(),
            "1"
        );
        writer.apply(&Event::InitDone);
        assert!(index.get(SA, "a", "one").is_none());
        assert_eq!(
            index.get(SA, "a", "two").unwrap().resource_version.as_ref(),
            "5"
        );
        assert_eq!(names(&index.owned_by(SA, "a", "p1")), ["three", "two"]);
        assert_eq!(index.len(SA), 2);
        // The other kinds are untouched and not synced.
        assert_eq!(index.len(ManagedKind::Role), 0);
        assert!(!*writers.roles.1.0.borrow());
    }

    #[test]
    fn every_kind_has_its_field() {
        for kind in PerKind::KINDS.into_array() {
            assert_eq!(*PerKind::KINDS.get(kind), kind);
        }
    }

    #[test]
    fn apply_upserts_and_delete_removes() {
        let (index, writers) = ManagedIndex::new();
        let (mut writer, _) = writers.service_accounts;
        writer.apply(&Event::Init);
        writer.apply(&Event::InitDone);
        writer.apply(&watcher::Event::Apply(sa(
            "a",
            "one",
            "1",
            vec![owner("AIPipeline", "p1")],
        )));
        let one = index.get(SA, "a", "one").unwrap();
        assert_eq!(
            (&*one.uid, &*one.resource_version, one.stage.as_deref()),
            ("uid-a-one", "1", Some("stage-one"))
        );
        assert!(one.owned_by("p1") && !one.owned_by("p2"));
        // Same name, other namespace: another object.
        assert!(index.get(SA, "b", "one").is_none());

        // An update that moves it to another owner moves it in the by-owner index.
        writer.apply(&watcher::Event::Apply(sa(
            "a",
            "one",
            "2",
            vec![owner("AIPipeline", "p2")],
        )));
        assert_eq!(
            index.get(SA, "a", "one").unwrap().resource_version.as_ref(),
            "2"
        );
        assert!(index.owned_by(SA, "a", "p1").is_empty());
        assert_eq!(names(&index.owned_by(SA, "a", "p2")), ["one"]);
        assert_eq!(index.len(SA), 1);

        writer.apply(&watcher::Event::Delete(sa("a", "one", "3", vec![])));
        assert!(index.get(SA, "a", "one").is_none());
        assert!(index.owned_by(SA, "a", "p2").is_empty());
        assert_eq!(index.len(SA), 0);
        let kind = index.read(SA);
        assert!(kind.objects.is_empty() && kind.by_owner.is_empty());
    }

    #[test]
    fn by_owner_lookups_are_per_pipeline_namespace_and_kind() {
        let (index, writers) = ManagedIndex::new();
        let (mut sas, _) = writers.service_accounts;
        let (mut roles, _) = writers.roles;
        let p = |uid: &str| vec![owner("AIPipeline", uid)];
        sas.apply(&watcher::Event::Apply(sa("a", "z", "1", p("p1"))));
        sas.apply(&watcher::Event::Apply(sa("a", "y", "1", p("p1"))));
        sas.apply(&watcher::Event::Apply(sa("a", "x", "1", p("p2"))));
        sas.apply(&watcher::Event::Apply(sa("b", "w", "1", p("p1"))));
        let role = PartialObjectMeta::<crate::k8s::Role> {
            types: None,
            metadata: sa("a", "r", "1", p("p1")).metadata,
            _phantom: Default::default(),
        };
        roles.apply(&watcher::Event::Apply(role));

        let owned = index.owned_by(SA, "a", "p1");
        assert_eq!(names(&owned), ["y", "z"]);
        assert_eq!(&*owned[0].1.uid, "uid-a-y");
        assert_eq!(names(&index.owned_by(SA, "b", "p1")), ["w"]);
        assert_eq!(names(&index.owned_by(SA, "a", "p2")), ["x"]);
        assert_eq!(names(&index.owned_by(ManagedKind::Role, "a", "p1")), ["r"]);
        assert!(
            index
                .owned_by(ManagedKind::RoleBinding, "a", "p1")
                .is_empty()
        );
        assert!(index.owned_by(SA, "a", "p3").is_empty());
    }

    #[test]
    fn a_foreign_object_is_indexed_but_owned_by_no_pipeline() {
        let (index, writers) = ManagedIndex::new();
        let (mut writer, _) = writers.service_accounts;
        // No owner, and an owner that is not an AIPipeline.
        writer.apply(&watcher::Event::Apply(sa("a", "mine-not", "7", vec![])));
        writer.apply(&watcher::Event::Apply(sa(
            "a",
            "deployed",
            "8",
            vec![owner("Deployment", "d1")],
        )));
        let foreign = index.get(SA, "a", "mine-not").unwrap();
        assert!(!foreign.owned_by("p1") && !foreign.owned_by(""));
        assert_eq!(&*foreign.resource_version, "7");
        let deployed = index.get(SA, "a", "deployed").unwrap();
        assert!(!deployed.owned_by("d1"));
        assert!(index.owned_by(SA, "a", "d1").is_empty());
        assert!(index.read(SA).by_owner.is_empty());
        assert_eq!(index.len(SA), 2);
    }
}
