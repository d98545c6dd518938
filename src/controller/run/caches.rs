//! The caches the reconciles read, and the watch streams that feed the controller: guardrails,
//! namespaces (metadata), the managed kinds (the compact [`ManagedIndex`] of every object of the
//! watched namespaces), and the credential Secrets (metadata, by label) when Vault is
//! configured. Every cache but the guardrails' holds only the namespaces of this operator's
//! [`WatchScope`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::Ready;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tracing::info;

use crate::api::AccessGuardrail;
use crate::controller::apply::AppliedState;
use crate::controller::index::{IndexWriter, ManagedIndex, PerKind, Synced};
use crate::k8s::{
    Api, Client, MANAGED_BY, Managed, Namespace, NamespaceResourceScope, NetworkPolicy,
    PIPELINE_LABEL, PartialObjectMeta, ResourceExt, Role, RoleBinding, Secret, ServiceAccount,
    Store, WatchStreamExt, reflector, trim_cached_metadata, watcher,
};
use crate::shard::Shard;

/// What a watcher yields.
type Event<K> = Result<watcher::Event<K>, watcher::Error>;

/// How many watch events the shared caches have taken, per cache. The loops that look at every
/// pipeline each second (the coverage check, guardrail statuses and isolation, the admission
/// policies) compare these first, so an idle operator does no work per pipeline.
#[derive(Debug, Default)]
pub(crate) struct CacheEvents {
    pub pipelines: AtomicU64,
    pub guardrails: AtomicU64,
    pub namespaces: AtomicU64,
}

impl CacheEvents {
    /// The counts now: equal to an earlier snapshot when no cache has changed since.
    pub(crate) fn snapshot(&self) -> [u64; 3] {
        [
            self.pipelines.load(Ordering::Acquire),
            self.guardrails.load(Ordering::Acquire),
            self.namespaces.load(Ordering::Acquire),
        ]
    }

    /// Counts the events of a watch stream into the counter `which` picks.
    pub(crate) fn counting<T, E>(
        events: &Arc<CacheEvents>,
        which: fn(&CacheEvents) -> &AtomicU64,
    ) -> impl FnMut(&Result<T, E>) + Send + 'static {
        let events = events.clone();
        move |_| {
            which(&events).fetch_add(1, Ordering::Release);
        }
    }
}

/// A stream of changed objects that should trigger reconciles.
pub(crate) type Changes<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The caches, and the streams that fill them (each stream must be polled, by the controller,
/// for its cache to fill).
#[derive(Clone)]
pub(crate) struct Caches {
    pub guardrails: Store<AccessGuardrail>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// The managed objects, and whether each kind's first list is in.
    pub children: Arc<ManagedIndex>,
    children_synced: PerKind<Synced>,
    /// Empty and never synced without Vault.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    vault: bool,
    /// How many events the guardrail and namespace caches (and the pipelines', counted by the
    /// pipeline watch) have taken.
    pub events: Arc<CacheEvents>,
}

/// The streams behind [`Caches`], one per managed kind and one per other cache.
pub(crate) struct Streams {
    pub guardrails: Changes<AccessGuardrail>,
    pub namespaces: Changes<PartialObjectMeta<Namespace>>,
    pub service_accounts: Changes<PartialObjectMeta<ServiceAccount>>,
    pub roles: Changes<PartialObjectMeta<Role>>,
    pub role_bindings: Changes<PartialObjectMeta<RoleBinding>>,
    pub network_policies: Changes<PartialObjectMeta<NetworkPolicy>>,
    pub secrets: Changes<PartialObjectMeta<Secret>>,
}

impl Caches {
    /// The caches of the namespaces in `scope`, with the credential Secrets' when `vault`.
    pub(crate) fn start(
        client: &Client,
        scope: &WatchScope,
        vault: bool,
        applied: &Arc<AppliedState>,
    ) -> (Caches, Streams) {
        let events = &Arc::new(CacheEvents::default());
        let namespace_config = match &scope.namespace {
            Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
            None => watcher::Config::default(),
        };
        let (guardrails, guardrail_writer) = reflector::store::<AccessGuardrail>();
        let guardrail_events = reflector::reflector(
            guardrail_writer,
            watcher(
                Api::<AccessGuardrail>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        // Counted once the cache holds the event, so a count never runs ahead of the cache.
        .inspect(CacheEvents::counting(events, |e| &e.guardrails))
        .default_backoff()
        .filter_map(spec_changes())
        .boxed();
        let (namespaces, namespace_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        let namespace_events = reflector::reflector(
            namespace_writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                namespace_config,
            )
            .filter(scope.keep(|ns: &PartialObjectMeta<Namespace>| Some(ns.name_any()))),
        )
        .inspect(CacheEvents::counting(events, |e| &e.namespaces))
        .default_backoff()
        .touched_objects()
        .boxed();
        // One field per managed kind: a new kind does not compile until it is watched here.
        let (children, writers) = ManagedIndex::new();
        let PerKind {
            service_accounts: (sa_writer, sa_synced),
            roles: (role_writer, role_synced),
            role_bindings: (rb_writer, rb_synced),
            network_policies: (np_writer, np_synced),
        } = writers;
        let sa_events = child::<ServiceAccount>(client, scope, applied, sa_writer);
        let role_events = child::<Role>(client, scope, applied, role_writer);
        let rb_events = child::<RoleBinding>(client, scope, applied, rb_writer);
        let np_events = child::<NetworkPolicy>(client, scope, applied, np_writer);
        let children_synced = PerKind {
            service_accounts: sa_synced,
            roles: role_synced,
            role_bindings: rb_synced,
            network_policies: np_synced,
        };

        // Credential Secrets (metadata, only Portcullis's, by label) when Vault is configured.
        let (secrets, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        let secret_events = if vault {
            reflector::reflector(
                secret_writer,
                watcher(
                    scope.api::<PartialObjectMeta<Secret>>(client),
                    watcher::Config::default().labels(&format!(
                        "{}={},{PIPELINE_LABEL}",
                        MANAGED_BY.0, MANAGED_BY.1
                    )),
                )
                .filter(scope.keep_namespaced())
                .modify(|meta| trim_cached_metadata(&mut meta.metadata)),
            )
            .default_backoff()
            .touched_objects()
            .boxed()
        } else {
            futures::stream::pending().boxed()
        };
        let caches = Caches {
            guardrails,
            namespaces,
            children,
            children_synced,
            secrets,
            vault,
            events: events.clone(),
        };
        let streams = Streams {
            guardrails: guardrail_events,
            namespaces: namespace_events,
            service_accounts: sa_events.boxed(),
            roles: role_events.boxed(),
            role_bindings: rb_events.boxed(),
            network_policies: np_events.boxed(),
            secrets: secret_events,
        };
        (caches, streams)
    }

    /// Waits until every cache holds a full list. `false` if a cache's writer was dropped.
    pub(crate) async fn wait_synced(&self) -> bool {
        let synced = async {
            self.guardrails.wait_until_ready().await.ok()?;
            self.namespaces.wait_until_ready().await.ok()?;
            let PerKind {
                service_accounts,
                roles,
                role_bindings,
                network_policies,
            } = &self.children_synced;
            for kind in [service_accounts, roles, role_bindings, network_policies] {
                kind.wait().await.then_some(())?;
            }
            if self.vault {
                self.secrets.wait_until_ready().await.ok()?;
            }
            Some(())
        };
        let ok = synced.await.is_some();
        if ok {
            info!("caches synced");
        }
        ok
    }
}

/// What this operator watches: every namespace or one (`--watch-namespace`), and of those only
/// the namespaces its shard owns (`--shard-index`/`--shard-count`). AccessGuardrails are
/// cluster-scoped and few: every shard watches them all.
#[derive(Debug, Clone, Default)]
pub(crate) struct WatchScope {
    pub namespace: Option<String>,
    pub shard: Shard,
}

impl WatchScope {
    /// An Api over every namespace, or over the one being watched. With more than one shard it
    /// still lists every namespace's objects: [`WatchScope::keep`] drops the others' before
    /// they reach a cache.
    pub(crate) fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: crate::k8s::Resource<Scope = NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    /// Whether the objects of `namespace` are this operator's to cache and reconcile.
    pub(crate) fn owns(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace) && self.shard.owns(namespace)
    }

    /// A filter for a watch stream, put between the watcher and its reflector (before any
    /// `.modify`, so that nothing is done for what is dropped): it drops the
    /// events of objects in namespaces this shard does not own (`namespace_of` says which
    /// namespace an object is of; `None` keeps it), so that neither the cache nor the
    /// controller sees them. Errors and the list's start and end markers pass.
    pub(crate) fn keep<K, F>(
        &self,
        namespace_of: F,
    ) -> impl FnMut(&Event<K>) -> Ready<bool> + use<K, F>
    where
        F: Fn(&K) -> Option<String> + Send + 'static,
    {
        let scope = self.clone();
        move |event| {
            futures::future::ready(match event {
                Ok(
                    watcher::Event::Apply(o)
                    | watcher::Event::InitApply(o)
                    | watcher::Event::Delete(o),
                ) => namespace_of(o).is_none_or(|ns| scope.owns(&ns)),
                Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => true,
            })
        }
    }

    /// [`WatchScope::keep`] for namespaced objects.
    pub(crate) fn keep_namespaced<K: ResourceExt>(
        &self,
    ) -> impl FnMut(&Event<K>) -> Ready<bool> + use<K> {
        self.keep(|o: &K| o.namespace())
    }
}

/// A filter of guardrail watch events that lets through what can change a plan: a new guardrail,
/// a new generation (its spec), a deletion. The operator's own writes of a guardrail's status
/// (and anyone's label or annotation edits) leave the generation alone, so they reconcile
/// nothing: without this, each status write re-reconciled every pipeline the guardrail bounds.
fn spec_changes()
-> impl FnMut(Event<AccessGuardrail>) -> Ready<Option<Result<AccessGuardrail, watcher::Error>>>
+ Send
+ 'static {
    let mut seen: std::collections::HashMap<String, (Option<String>, Option<i64>)> =
        std::collections::HashMap::new();
    move |event| {
        futures::future::ready(match event {
            Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) => {
                let version = (g.metadata.uid.clone(), g.metadata.generation);
                (seen.insert(g.name_any(), version.clone()) != Some(version)).then_some(Ok(g))
            }
            Ok(watcher::Event::Delete(g)) => {
                seen.remove(&g.name_any());
                Some(Ok(g))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        })
    }
}

/// The stream of one managed kind's changes that should trigger a reconcile, which also feeds
/// `index` (the kind's part of the [`ManagedIndex`]). The echo of the operator's own writes (an
/// update whose resourceVersion is the one the write returned) triggers none: there is nothing
/// to do for it. Deletions and everyone else's writes do.
fn child<K: Managed>(
    client: &Client,
    scope: &WatchScope,
    applied: &Arc<AppliedState>,
    mut index: IndexWriter,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static {
    let applied = applied.clone();
    watcher(
        scope.api::<PartialObjectMeta<K>>(client),
        watcher::Config::default(),
    )
    .filter(scope.keep_namespaced())
    // Only the metadata the controller maps by (its owner references) is left on what goes on.
    .modify(|meta| trim_cached_metadata(&mut meta.metadata))
    .inspect(move |event| {
        if let Ok(event) = event {
            index.apply(event);
        }
    })
    .default_backoff()
    .filter_map(move |event| {
        let own = match &event {
            Ok(watcher::Event::Apply(o)) => applied.is_own_write(
                K::KIND,
                o.namespace().as_deref().unwrap_or_default(),
                &o.name_any(),
                o.resource_version().as_deref().unwrap_or_default(),
            ),
            _ => false,
        };
        futures::future::ready(match event {
            Ok(watcher::Event::Apply(_)) if own => None,
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) => Some(Ok(o)),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        })
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::k8s::ObjectMeta;

    fn sa(namespace: &str) -> PartialObjectMeta<ServiceAccount> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some("sa".into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    /// A guardrail's status writes reconcile nothing; a new spec, a new guardrail of the same
    /// name and a deletion do.
    #[tokio::test]
    async fn only_a_guardrails_spec_changes_reach_the_controller() {
        use crate::api::{AccessGuardrail, AccessGuardrailStatus};
        let guardrail = |uid: &str, generation: i64, pipelines: u32| {
            let mut g: AccessGuardrail =
                serde_json::from_value(serde_json::json!({"metadata": {"name": "g"}, "spec": {}}))
                    .expect("guardrail");
            g.metadata.uid = Some(uid.into());
            g.metadata.generation = Some(generation);
            g.status = Some(AccessGuardrailStatus {
                pipelines,
                ..AccessGuardrailStatus::default()
            });
            g
        };
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(guardrail("a", 1, 0))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(guardrail("a", 1, 5))),
            Ok(watcher::Event::Apply(guardrail("a", 2, 5))),
            Ok(watcher::Event::Apply(guardrail("a", 2, 6))),
            Ok(watcher::Event::Delete(guardrail("a", 2, 6))),
            Ok(watcher::Event::Apply(guardrail("b", 1, 0))),
        ];
        let passed: Vec<(String, i64)> = futures::stream::iter(events)
            .filter_map(spec_changes())
            .map(|g| {
                let g = g.expect("no error");
                (
                    g.metadata.uid.unwrap_or_default(),
                    g.metadata.generation.unwrap_or_default(),
                )
            })
            .collect()
            .await;
        let expected: Vec<(String, i64)> = [("a", 1), ("a", 2), ("a", 2), ("b", 1)]
            .iter()
            .map(|(u, g)| (u.to_string(), *g))
            .collect();
        assert_eq!(passed, expected);
    }

    /// The events of namespaces another shard owns never reach the reflector.
    #[tokio::test]
    async fn a_shard_keeps_only_its_namespaces_events() {
        // Of two shards, "team-a" and "ml-prod" belong to 0, "default" and "kube-system" to 1.
        let scope = WatchScope {
            namespace: None,
            shard: Shard::new(0, 2).unwrap(),
        };
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(sa("team-a"))),
            Ok(watcher::Event::InitApply(sa("default"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(sa("kube-system"))),
            Ok(watcher::Event::Apply(sa("ml-prod"))),
            Ok(watcher::Event::Delete(sa("default"))),
            Ok(watcher::Event::Delete(sa("team-a"))),
        ];
        let kept: Vec<String> = futures::stream::iter(events)
            .filter(scope.keep_namespaced())
            .map(|e| match e {
                Ok(watcher::Event::Init) => "init".to_string(),
                Ok(watcher::Event::InitDone) => "done".to_string(),
                Ok(
                    watcher::Event::Apply(o)
                    | watcher::Event::InitApply(o)
                    | watcher::Event::Delete(o),
                ) => o.namespace().unwrap_or_default(),
                Err(e) => e.to_string(),
            })
            .collect()
            .await;
        assert_eq!(kept, ["init", "team-a", "done", "ml-prod", "team-a"]);

        let one = WatchScope {
            namespace: Some("team-a".into()),
            shard: Shard::ALL,
        };
        assert!(one.owns("team-a") && !one.owns("default"));
        assert!(WatchScope::default().owns("default"));
    }
}
