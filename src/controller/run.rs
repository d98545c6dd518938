//! The operator process around the reconciles: leader election, the caches and watches that
//! feed the controller, the housekeeping that forgets deleted pipelines, and shutdown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube_lease_manager::LeaseManagerError;
use tracing::{error, info, warn};

use super::apply::{AppliedState, ChildStores};
use super::metrics::Metrics;
use super::vault::token::SecretTokenStore;
use super::vault::{VaultCtx, VaultSession};
use super::{Context, RunConfig, http, journal, reconcile};
use crate::api::{AIPipeline, AccessGuardrail};
use crate::audit::{AuditError, AuditLog};
use crate::k8s::{
    Api, Client, Controller, ControllerConfig, ControllerError, FIELD_MANAGER, MANAGED_BY, Managed,
    Namespace, NamespaceResourceScope, NetworkPolicy, ObjectRef, PIPELINE_LABEL, PartialObjectMeta,
    Reporter, ResourceExt, Role, RoleBinding, Secret, ServiceAccount, Store, WatchStreamExt,
    predicates, reflector, watcher,
};

/// An Api over every namespace, or over the one being watched.
fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
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
        .modify(|meta| {
            meta.managed_fields_mut().clear();
            meta.annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        }),
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

/// Runs the operator until SIGTERM or SIGINT, or until this replica loses the leader Lease.
pub async fn run(client: Client, config: RunConfig) -> Result<(), RunError> {
    let key = crate::audit::load_key(&config.audit_key).map_err(RunError::AuditKey)?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(http::Health::default());
    let listener = http::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            address: config.metrics_addr,
            source,
        })?;
    info!(address = %config.metrics_addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(http::serve(listener, health.clone(), metrics.clone()));

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    // Leader election: only the holder of the Lease watches and writes.
    let mut lease = None;
    if config.leader_election {
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &config.lease_name)
                .with_namespace(&config.lease_namespace)
                .with_identity(&config.identity)
                .with_duration(15)
                .with_grace(5)
                .with_field_manager(FIELD_MANAGER)
                .build()
                .await
                .map_err(RunError::LeaderElection)?;
        let (mut is_leader, task) = manager.watch().await;
        health.ready.store(true, Ordering::Relaxed);
        info!(lease = %config.lease_name, namespace = %config.lease_namespace, identity = %config.identity, "waiting to become the leader");
        loop {
            if *is_leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = is_leader.changed() => if changed.is_err() {
                    return Err(RunError::LeaderElectionStopped);
                },
                () = &mut shutdown => {
                    info!("shutting down before becoming the leader");
                    drop(is_leader);
                    if let Ok(Ok(manager)) = task.await { let _ = manager.release().await; }
                    return Ok(());
                }
            }
        }
        info!(identity = %config.identity, "became the leader");
        metrics.leader.set(1);
        lease = Some((is_leader, task));
    }
    health.ready.store(false, Ordering::Relaxed);

    // The decision log is opened (its chain verified and continued) only now, as the leader: a
    // standby sharing the file must not hold a stale view of the chain.
    let mut audit = AuditLog::open(&config.audit_log, &key).map_err(RunError::AuditLog)?;
    if let Some(bytes) = audit.truncated_tail() {
        warn!(bytes, path = %config.audit_log.display(), "removed a torn last line from the decision log (a write interrupted by a crash; it was never acknowledged)");
    }
    if config.echo_decisions {
        audit = audit.with_echo(Box::new(std::io::stdout()));
    }

    // Caches.
    let namespace_config = match &config.watch_namespace {
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
    .touched_objects();
    let (namespaces, namespace_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let namespace_events = reflector::reflector(
        namespace_writer,
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            namespace_config,
        ),
    )
    .default_backoff()
    .touched_objects();
    let applied = Arc::new(AppliedState::default());
    let watch = &config.watch_namespace;
    let (service_accounts, sa_events) = child::<ServiceAccount>(&client, watch, &applied);
    let (roles, role_events) = child::<Role>(&client, watch, &applied);
    let (role_bindings, rb_events) = child::<RoleBinding>(&client, watch, &applied);
    let (network_policies, np_events) = child::<NetworkPolicy>(&client, watch, &applied);
    // One field per managed kind: a new kind does not compile until it is watched here.
    let children = ChildStores {
        service_accounts,
        roles,
        role_bindings,
        network_policies,
    };

    // Credential Secrets (metadata, only Portcullis's, by label) when Vault is configured.
    let (secrets, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let secret_events = match &config.vault {
        Some(_) => reflector::reflector(
            secret_writer,
            watcher(
                scoped::<PartialObjectMeta<Secret>>(&client, &config.watch_namespace),
                watcher::Config::default().labels(&format!(
                    "{}={},{PIPELINE_LABEL}",
                    MANAGED_BY.0, MANAGED_BY.1
                )),
            )
            .modify(|meta| meta.managed_fields_mut().clear()),
        )
        .default_backoff()
        .touched_objects()
        .boxed(),
        None => futures::stream::pending().boxed(),
    };
    let vault_ctx = match &config.vault {
        Some(v) => {
            let store = SecretTokenStore::new(client.clone(), &v.connection.state_namespace);
            let session =
                VaultSession::new(v.connection.clone(), store).map_err(RunError::VaultClient)?;
            tokio::spawn(session.clone().keep_renewed());
            info!(address = %v.connection.address, auth_mount = %v.connection.auth_mount, role = %v.connection.auth_role, "Vault configured");
            let chrono =
                |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            Some(VaultCtx::new(
                session,
                chrono(v.revoke_grace),
                chrono(v.restart_min_interval),
                v.max_restarts_per_minute,
                v.resync,
                secrets.clone(),
            ))
        }
        None => None,
    };

    let synced = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context {
        client: client.clone(),
        guardrails: guardrails.clone(),
        namespaces: namespaces.clone(),
        children: children.clone(),
        applied: applied.clone(),
        metrics: metrics.clone(),
        journal: journal::Journal::start(audit).map_err(RunError::Journal)?,
        reporter: Reporter {
            controller: "portcullis".into(),
            instance: Some(config.identity.clone()),
        },
        synced: synced.clone(),
        recorded: Mutex::default(),
        statuses: Mutex::default(),
        failures: Mutex::default(),
        vault: vault_ctx,
    });

    // AIPipelines trigger a reconcile when their generation changes (a new spec, or deletion):
    // not for the echo of the operator's own status writes, nor for label or annotation edits.
    let (pipelines, pipeline_writer) = reflector::store::<AIPipeline>();
    let pipeline_events = reflector::reflector(
        pipeline_writer,
        watcher(
            scoped::<AIPipeline>(&client, &config.watch_namespace),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(pipeline_events, pipelines.clone())
        // A short debounce folds the burst of watch events that one reconcile's own writes cause
        // (and the controller manager's reactions to them) into one follow-up reconcile.
        .with_config(
            ControllerConfig::default()
                .concurrency(config.concurrency)
                .debounce(Duration::from_millis(250)),
        );
    let guardrail_mapper = guardrail_mapper(pipelines.clone(), namespaces.clone());
    let namespace_mapper = namespace_mapper(pipelines.clone());

    let ready = {
        let (g, n, c, health, synced_flag) = (
            guardrails.clone(),
            namespaces.clone(),
            children.clone(),
            health.clone(),
            synced.clone(),
        );
        let secrets = config.vault.is_some().then(|| secrets.clone());
        async move {
            let synced = async {
                g.wait_until_ready().await?;
                n.wait_until_ready().await?;
                let ChildStores {
                    service_accounts,
                    roles,
                    role_bindings,
                    network_policies,
                } = &c;
                service_accounts.wait_until_ready().await?;
                roles.wait_until_ready().await?;
                role_bindings.wait_until_ready().await?;
                network_policies.wait_until_ready().await?;
                match secrets {
                    Some(s) => s.wait_until_ready().await,
                    None => Ok(()),
                }
            };
            if synced.await.is_ok() {
                synced_flag.store(true, Ordering::Release);
                health.ready.store(true, Ordering::Relaxed);
                info!("caches synced");
            }
        }
    };
    tokio::spawn(ready);

    // Forget deleted pipelines' per-pipeline memory now and then.
    {
        let (ctx, pipelines) = (ctx.clone(), pipelines.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(300));
            every.tick().await;
            loop {
                every.tick().await;
                if !ctx.synced.load(Ordering::Acquire) {
                    continue;
                }
                let live = pipelines
                    .state()
                    .iter()
                    .filter_map(|p| p.uid())
                    .collect::<HashSet<_>>();
                ctx.forget_deleted(&live).await;
            }
        });
    }

    let lost_leadership = async move {
        match lease {
            Some((mut is_leader, _task)) => loop {
                if is_leader.changed().await.is_err() || !*is_leader.borrow_and_update() {
                    return;
                }
            },
            None => futures::future::pending::<()>().await,
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
    let stop = async move {
        let _ = stop_rx.await;
    };

    let run = controller
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(rb_events)
        .owns_stream(np_events)
        .owns_stream(secret_events)
        .watches_stream(guardrail_events, guardrail_mapper)
        .watches_stream(namespace_events, namespace_mapper)
        .graceful_shutdown_on(stop)
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                // Counted and logged by error_policy.
                Ok(_) | Err(ControllerError::ReconcilerFailed(..)) => {}
                Err(ControllerError::ObjectNotFound(object)) => {
                    tracing::debug!(%object, "a scheduled reconcile's pipeline is gone");
                }
                Err(error) => warn!(%error, "the controller's watch or queue failed"),
            }
            futures::future::ready(())
        });
    tokio::pin!(run);

    let reason = tokio::select! {
        () = &mut run => Stop::ControllerStopped,
        () = &mut shutdown => Stop::Shutdown,
        () = lost_leadership => Stop::LostLease,
    };
    info!(%reason, "stopping: finishing the reconciles in flight");
    let _ = stop_tx.send(reason);
    if tokio::time::timeout(Duration::from_secs(20), &mut run)
        .await
        .is_err()
    {
        warn!("reconciles did not finish within 20 s");
    }
    metrics.leader.set(0);
    if reason == Stop::LostLease {
        error!(
            "another replica holds the leader Lease now; exiting so that this one restarts as a standby"
        );
        return Err(RunError::LostLease);
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The pipelines a guardrail change affects: those in namespaces its old or new selector
/// matches, with a stage of a role its old or new version sets a ceiling for.
fn guardrail_mapper(
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
                let labels =
                    crate::k8s::namespace_labels(&namespaces, &p.namespace().unwrap_or_default());
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
fn namespace_mapper(
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

/// Why the controller stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    ControllerStopped,
    Shutdown,
    LostLease,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::ControllerStopped => "the controller stopped",
            Stop::Shutdown => "shutdown requested",
            Stop::LostLease => "lost the leader Lease",
        })
    }
}

/// Why `portcullis run` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    AuditKey(#[source] AuditError),
    #[error("cannot listen on {address} for /healthz, /readyz and /metrics: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    LeaderElection(#[source] LeaseManagerError),
    #[error("leader election stopped")]
    LeaderElectionStopped,
    #[error("{0}")]
    AuditLog(#[source] AuditError),
    #[error("cannot start the decision log writer: {0}")]
    Journal(#[source] std::io::Error),
    #[error("{0}")]
    VaultClient(#[source] crate::vault::ClientBuildError),
    #[error("lost the leader Lease")]
    LostLease,
}
