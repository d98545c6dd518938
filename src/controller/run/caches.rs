//! The caches the reconciles read, and the watch streams that feed the controller: guardrails,
//! namespaces (metadata), the managed kinds (metadata, every object of the watched namespaces),
//! and the credential Secrets (metadata, by label) when Vault is configured.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tracing::info;

use crate::api::AccessGuardrail;
use crate::controller::apply::{AppliedState, ChildStores};
use crate::k8s::{
    Api, Client, MANAGED_BY, Managed, Namespace, NamespaceResourceScope, NetworkPolicy,
    PIPELINE_LABEL, PartialObjectMeta, ResourceExt, Role, RoleBinding, Secret, ServiceAccount,
    Store, WatchStreamExt, reflector, trim_cached_metadata, watcher,
};

/// A stream of changed objects that should trigger reconciles.
pub type Changes<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// The caches, and the streams that fill them (each stream must be polled, by the controller,
/// for its cache to fill).
#[derive(Clone)]
pub struct Caches {
    pub guardrails: Store<AccessGuardrail>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub children: ChildStores,
    /// Empty and never synced without Vault.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    vault: bool,
}

/// The streams behind [`Caches`], one per managed kind and one per other cache.
pub struct Streams {
    pub guardrails: Changes<AccessGuardrail>,
    pub namespaces: Changes<PartialObjectMeta<Namespace>>,
    pub service_accounts: Changes<PartialObjectMeta<ServiceAccount>>,
    pub roles: Changes<PartialObjectMeta<Role>>,
    pub role_bindings: Changes<PartialObjectMeta<RoleBinding>>,
    pub network_policies: Changes<PartialObjectMeta<NetworkPolicy>>,
    pub secrets: Changes<PartialObjectMeta<Secret>>,
}

impl Caches {
    /// The caches of the watched namespace (or all), with the credential Secrets' when `vault`.
    pub fn start(
        client: &Client,
        watch_namespace: &Option<String>,
        vault: bool,
        applied: &Arc<AppliedState>,
    ) -> (Caches, Streams) {
        let namespace_config = match watch_namespace {
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
        .default_backoff()
        .touched_objects()
        .boxed();
        let (namespaces, namespace_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        let namespace_events = reflector::reflector(
            namespace_writer,
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                namespace_config,
            ),
        )
        .default_backoff()
        .touched_objects()
        .boxed();
        let (service_accounts, sa_events) =
            child::<ServiceAccount>(client, watch_namespace, applied);
        let (roles, role_events) = child::<Role>(client, watch_namespace, applied);
        let (role_bindings, rb_events) = child::<RoleBinding>(client, watch_namespace, applied);
        let (network_policies, np_events) =
            child::<NetworkPolicy>(client, watch_namespace, applied);
        // One field per managed kind: a new kind does not compile until it is watched here.
        let children = ChildStores {
            service_accounts,
            roles,
            role_bindings,
            network_policies,
        };

        // Credential Secrets (metadata, only Portcullis's, by label) when Vault is configured.
        let (secrets, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        let secret_events = if vault {
            reflector::reflector(
                secret_writer,
                watcher(
                    scoped::<PartialObjectMeta<Secret>>(client, watch_namespace),
                    watcher::Config::default().labels(&format!(
                        "{}={},{PIPELINE_LABEL}",
                        MANAGED_BY.0, MANAGED_BY.1
                    )),
                )
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
            secrets,
            vault,
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
    pub async fn wait_synced(&self) -> bool {
        let synced = async {
            self.guardrails.wait_until_ready().await?;
            self.namespaces.wait_until_ready().await?;
            let ChildStores {
                service_accounts,
                roles,
                role_bindings,
                network_policies,
            } = &self.children;
            service_accounts.wait_until_ready().await?;
            roles.wait_until_ready().await?;
            role_bindings.wait_until_ready().await?;
            network_policies.wait_until_ready().await?;
            if self.vault {
                self.secrets.wait_until_ready().await?;
            }
            Ok::<_, reflector::store::WriterDropped>(())
        };
        let ok = synced.await.is_ok();
        if ok {
            info!("caches synced");
        }
        ok
    }
}

/// An Api over every namespace, or over the one being watched.
pub fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: crate::k8s::Resource<Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The metadata cache of one managed kind, and the stream of its changes that should trigger a
/// reconcile. The echo of the operator's own writes (an update whose resourceVersion is the one
/// the write returned) triggers none: there is nothing to do for it. Deletions and everyone
/// else's writes do.
fn child<K: Managed>(
    client: &Client,
    namespace: &Option<String>,
    applied: &Arc<AppliedState>,
) -> (
    Store<PartialObjectMeta<K>>,
    impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store::<PartialObjectMeta<K>>();
    let applied = applied.clone();
    let stream = reflector::reflector(
        writer,
        watcher(
            scoped::<PartialObjectMeta<K>>(client, namespace),
            watcher::Config::default(),
        )
        .modify(|meta| trim_cached_metadata(&mut meta.metadata)),
    )
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
    });
    (store, stream)
}
