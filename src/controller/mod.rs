//! `portcullis run`: the controller that applies plans to the cluster.
//!
//! It watches AIPipelines, AccessGuardrails and Namespaces (their labels), and the metadata of
//! the objects it manages. A guardrail or namespace change re-reconciles exactly the pipelines
//! it affects. Only the replica holding the leader Lease watches and writes; a replica that loses
//! the lease exits, and its restart waits as a standby.

mod apply;
mod http;
mod journal;
mod metrics;
mod reconcile;
pub mod status;
pub(crate) mod vault;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{error, info, warn};

pub use crate::k8s::FIELD_MANAGER;
pub use apply::json_subset;
use apply::{AppliedState, ChildStores};
use metrics::Metrics;

use crate::api::{AIPipeline, AccessGuardrail};
use crate::audit::{AuditLog, Entry};

/// Everything a reconcile can fail with. Each has a stable label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("decision log: {0}")]
    Audit(String),
    #[error("applying the plan: {0}")]
    Apply(String),
    #[error("the AIPipeline has no namespace")]
    NotNamespaced,
    #[error("Vault: {0}")]
    Vault(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable label for the `result` of `portcullis_reconciles_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_error",
            Error::Audit(_) => "audit_error",
            Error::Apply(_) => "apply_error",
            Error::NotNamespaced => "not_namespaced",
            Error::Vault(_) => "vault_error",
        }
    }

    /// How long to wait before retrying, after `failures` failures in a row. A decision log
    /// that cannot be written stops all changes (nothing may change unrecorded), and is retried
    /// slowly. Vault is retried with exponential backoff, 2 s doubling up to 2 minutes.
    pub fn retry_after(&self, failures: u32) -> Duration {
        match self {
            Error::Audit(_) => Duration::from_secs(30),
            Error::NotNamespaced => Duration::from_secs(300),
            Error::Vault(_) => Duration::from_secs(
                2u64.saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1))
                    .min(120),
            ),
            Error::Kube(_) | Error::Apply(_) => Duration::from_secs(5),
        }
    }
}

/// Settings of `portcullis run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub audit_log: PathBuf,
    pub audit_key: PathBuf,
    pub metrics_addr: SocketAddr,
    pub leader_election: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub concurrency: u16,
    /// Watch and manage only this namespace.
    pub watch_namespace: Option<String>,
    /// Also write each decision record to stdout.
    pub echo_decisions: bool,
    /// Vault, when configured.
    pub vault: Option<VaultRunConfig>,
}

/// Vault settings of `portcullis run`.
#[derive(Debug, Clone)]
pub struct VaultRunConfig {
    pub connection: crate::vault::VaultConfig,
    /// How long replaced credentials stay valid after their consumers restart.
    pub revoke_grace: Duration,
    /// A workload is restarted at most once per this interval.
    pub restart_min_interval: Duration,
    /// At most this many workload restarts per minute, over all pipelines.
    pub max_restarts_per_minute: usize,
    /// Policies and roles are compared with Vault at least this often.
    pub resync: Duration,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub guardrails: Store<AccessGuardrail>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    children: ChildStores,
    applied: Arc<AppliedState>,
    pub metrics: Arc<Metrics>,
    journal: journal::Journal,
    reporter: Reporter,
    /// Set once the guardrail, namespace and managed-object caches hold a full list. Until then
    /// a reconcile would plan against missing guardrails (and prune what they allow), so it
    /// waits.
    synced: Arc<std::sync::atomic::AtomicBool>,
    /// The digest of the decisions last recorded per AIPipeline uid. The status holds it too
    /// (for restarts), but the cached AIPipeline a reconcile gets may predate our last status
    /// write.
    recorded: Mutex<HashMap<String, String>>,
    /// The status last written per AIPipeline uid, for the same reason.
    statuses: Mutex<HashMap<String, crate::api::AIPipelineStatus>>,
    /// Failed reconciles in a row per AIPipeline uid, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Vault, when the operator is configured with it.
    vault: Option<vault::VaultCtx>,
}

impl Context {
    fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }

    /// A namespace's labels as selectors see them.
    fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        crate::k8s::namespace_labels(&self.namespaces, namespace)
    }

    /// Drops what is remembered per AIPipeline for those no longer in `live` (uids): deleted
    /// pipelines leave nothing behind in memory.
    async fn forget_deleted(&self, live: &std::collections::HashSet<String>) {
        self.recorded
            .lock()
            .expect("recorded lock")
            .retain(|uid, _| live.contains(uid));
        self.statuses
            .lock()
            .expect("status lock")
            .retain(|uid, _| live.contains(uid));
        self.failures
            .lock()
            .expect("failures lock")
            .retain(|uid, _| live.contains(uid));
        if let Some(vault) = &self.vault {
            vault.forget_deleted(live).await;
        }
    }

    /// Appends to the decision log and waits until the records are on disk.
    async fn record(&self, entries: Vec<Entry>) -> Result<()> {
        self.journal.record(entries).await.map_err(Error::Audit)
    }
}

/// An Api over every namespace, or over the one being watched.
fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
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

/// Runs the operator until SIGTERM or SIGINT, or until this replica loses the leader Lease.
pub async fn run(client: Client, config: RunConfig) -> Result<(), RunError> {
    let key = crate::audit::load_key(&config.audit_key).map_err(|e| run_error(e.to_string()))?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(http::Health::default());
    let listener = http::bind(config.metrics_addr).await.map_err(|e| {
        run_error(format!(
            "cannot listen on {} for /healthz, /readyz and /metrics: {e}",
            config.metrics_addr
        ))
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
                .map_err(|e| run_error(format!("leader election: {e}")))?;
        let (mut is_leader, task) = manager.watch().await;
        health.ready.store(true, Ordering::Relaxed);
        info!(lease = %config.lease_name, namespace = %config.lease_namespace, identity = %config.identity, "waiting to become the leader");
        loop {
            if *is_leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = is_leader.changed() => if changed.is_err() {
                    return Err(run_error("leader election stopped"));
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
    let mut audit =
        AuditLog::open(&config.audit_log, &key).map_err(|e| run_error(e.to_string()))?;
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
    // The echo of the operator's own writes (an update whose resourceVersion is the one the
    // write returned) triggers no reconcile: there is nothing to do for it. Deletions and
    // everyone else's writes do.
    let applied = Arc::new(AppliedState::default());
    macro_rules! child {
        ($kind:ty) => {{
            let (store, writer) = reflector::store::<PartialObjectMeta<$kind>>();
            let applied = applied.clone();
            let stream = reflector::reflector(
                writer,
                watcher(
                    scoped::<PartialObjectMeta<$kind>>(&client, &config.watch_namespace),
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
                        <$kind as crate::k8s::Managed>::KIND,
                        o.namespace().as_deref().unwrap_or_default(),
                        &o.name_any(),
                        o.resource_version().as_deref().unwrap_or_default(),
                    ),
                    _ => false,
                };
                futures::future::ready(match event {
                    Ok(watcher::Event::Apply(_)) if own => None,
                    Ok(
                        watcher::Event::Apply(o)
                        | watcher::Event::InitApply(o)
                        | watcher::Event::Delete(o),
                    ) => Some(Ok(o)),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => Some(Err(e)),
                })
            });
            (store, stream)
        }};
    }
    let (service_accounts, sa_events) = child!(ServiceAccount);
    let (roles, role_events) = child!(Role);
    let (role_bindings, rb_events) = child!(RoleBinding);
    let (network_policies, np_events) = child!(NetworkPolicy);
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
                    "{}={},{}",
                    crate::k8s::MANAGED_BY.0,
                    crate::k8s::MANAGED_BY.1,
                    crate::k8s::PIPELINE_LABEL
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
            let session = crate::vault::Session::new(v.connection.clone(), client.clone())
                .map_err(run_error)?;
            tokio::spawn(session.clone().keep_renewed());
            info!(address = %v.connection.address, auth_mount = %v.connection.auth_mount, role = %v.connection.auth_role, "Vault configured");
            let chrono =
                |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
            Some(vault::VaultCtx::new(
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

    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctx = Arc::new(Context {
        client: client.clone(),
        guardrails: guardrails.clone(),
        namespaces: namespaces.clone(),
        children: children.clone(),
        applied: applied.clone(),
        metrics: metrics.clone(),
        journal: journal::Journal::start(audit)
            .map_err(|e| run_error(format!("cannot start the decision log writer: {e}")))?,
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
    .predicate_filter(kube::runtime::predicates::generation, Default::default());
    let controller = Controller::for_stream(pipeline_events, pipelines.clone())
        // A short debounce folds the burst of watch events that one reconcile's own writes cause
        // (and the controller manager's reactions to them) into one follow-up reconcile.
        .with_config(
            kube::runtime::controller::Config::default()
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
                c.service_accounts.wait_until_ready().await?;
                c.roles.wait_until_ready().await?;
                c.role_bindings.wait_until_ready().await?;
                c.network_policies.wait_until_ready().await?;
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
                    .collect::<std::collections::HashSet<_>>();
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
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
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
        .for_each(|_| futures::future::ready(()));
    tokio::pin!(run);

    let reason = tokio::select! {
        () = &mut run => "the controller stopped",
        () = &mut shutdown => "shutdown requested",
        () = lost_leadership => "lost the leader Lease",
    };
    info!(reason, "stopping: finishing the reconciles in flight");
    let _ = stop_tx.send(reason);
    if tokio::time::timeout(Duration::from_secs(20), &mut run)
        .await
        .is_err()
    {
        warn!("reconciles did not finish within 20 s");
    }
    metrics.leader.set(0);
    if reason == "lost the leader Lease" {
        error!(
            "another replica holds the leader Lease now; exiting so that this one restarts as a standby"
        );
        return Err(run_error("lost the leader Lease"));
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

/// Why `portcullis run` could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

fn run_error(message: impl Into<String>) -> RunError {
    RunError(message.into())
}
