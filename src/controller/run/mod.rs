//! The operator process around the reconciles: the HTTP endpoints, leader election
//! ([`leader`]), the caches and watches that feed the controller ([`caches`], [`mappers`]), the
//! housekeeping that forgets deleted pipelines ([`housekeeping`]), and shutdown.

pub(crate) mod caches;
mod housekeeping;
mod leader;
mod mappers;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube_lease_manager::LeaseManagerError;
use tracing::{error, info, warn};

use super::apply::AppliedState;
use super::claims::{ClaimIndex, ClaimWriter};
use super::metrics::Metrics;
use super::vault::token::{SecretTokenStore, TOKEN_SECRET};
use super::vault::{VaultCtx, VaultSession};
use super::{Context, RunConfig, VaultRunConfig, http, journal, reconcile};
use crate::api::AIPipeline;
use crate::audit::{AuditError, AuditLog, Keys, LogOptions};
use crate::k8s::{
    Client, Controller, ControllerConfig, ControllerError, LAST_APPLIED, PartialObjectMeta,
    Reporter, Secret, Store, WatchStreamExt, predicates, reflector, watcher,
};
use crate::plan::names::RECONCILE_ANNOTATION;
use crate::shard::Shard;
use caches::{CacheEvents, Caches, Streams, WatchScope};
use leader::Elected;

/// Runs the operator until SIGTERM or SIGINT, or until this replica loses the leader Lease.
pub async fn run(client: Client, config: RunConfig) -> Result<(), RunError> {
    let keys = load_keys(&config)?;
    let (metrics, health) = serve(&config).await?;

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let leadership = match leader::elect(&client, &config, &health, &metrics, &mut shutdown).await?
    {
        Elected::Leader(leadership) => leadership,
        Elected::ShutDown => return Ok(()),
    };
    health.ready.store(false, Ordering::Relaxed);

    let audit = open_decision_log(&config, &keys)?;

    let applied = Arc::new(AppliedState::default());
    let scope = WatchScope {
        namespace: config.watch_namespace.clone(),
        shard: config.shard,
    };
    let (caches, streams) = Caches::start(&client, &scope, config.vault.is_some(), &applied);
    let (pipelines, claims, controller) =
        pipeline_controller(&client, &scope, config.concurrency, &caches.events);
    let ctx = context(
        &client,
        &config,
        &caches,
        (pipelines.clone(), claims),
        applied,
        (&metrics, &health),
        audit,
    )?;
    if let Some(vault) = &ctx.vault {
        vault.set_pipelines(pipelines.clone());
    }
    super::access::start_for(&client, &config, &ctx)
        .await
        .map_err(RunError::Access)?;

    // No reconcile plans before the caches are full (see `Context::synced`).
    tokio::spawn(mark_synced(
        caches.clone(),
        ctx.clone(),
        health.clone(),
        config.policy_reports,
    ));
    tokio::spawn(housekeeping::forget_deleted_pipelines(
        ctx.clone(),
        pipelines.clone(),
    ));
    start_admission(&config, &scope, &ctx, &pipelines).await?;
    start_guardrails(&config, &scope, &ctx, &pipelines);

    let mut leadership = leadership;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
    let stop = async move {
        let _ = stop_rx.await;
    };

    // Every stream, so that every cache fills: a new managed kind does not compile until its
    // stream is handed to the controller here.
    let Streams {
        guardrails,
        namespaces,
        service_accounts,
        roles,
        role_bindings,
        network_policies,
        secrets,
    } = streams;
    let run = controller
        .owns_stream(service_accounts)
        .owns_stream(roles)
        .owns_stream(role_bindings)
        .owns_stream(network_policies)
        .owns_stream(secrets)
        .watches_stream(
            guardrails,
            mappers::guardrail_mapper(
                pipelines.clone(),
                caches.namespaces.clone(),
                caches.guardrails.clone(),
            ),
        )
        .watches_stream(
            namespaces,
            mappers::namespace_mapper(pipelines.clone(), caches.namespaces.clone()),
        )
        .graceful_shutdown_on(stop)
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| {
            log_failure(result);
            futures::future::ready(())
        });
    tokio::pin!(run);

    let reason = {
        let lost_leadership = async {
            match leadership.as_mut() {
                Some(leadership) => leadership.lost().await,
                None => futures::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = &mut run => Stop::ControllerStopped,
            () = &mut shutdown => Stop::Shutdown,
            () = lost_leadership => Stop::LostLease,
        }
    };
    if reason == Stop::LostLease {
        // Another replica may hold the Lease any moment now: stop writing at once. Dropping
        // the controller cancels the reconciles in flight at their next await.
        metrics.leader.set(0);
        error!(
            "this replica can no longer count on the leader Lease; stopping at once so that it restarts as a standby"
        );
        return Err(RunError::LostLease);
    }
    info!(%reason, "stopping: finishing the reconciles in flight");
    let _ = stop_tx.send(reason);
    if tokio::time::timeout(Duration::from_secs(20), &mut run)
        .await
        .is_err()
    {
        warn!("reconciles did not finish within 20 s");
    }
    metrics.leader.set(0);
    // Only now, with nothing in flight, may a standby take over.
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    Ok(())
}

/// The tasks that enforce at admission, as configured: the per-namespace
/// ValidatingAdmissionPolicies, the AIPipeline webhook, and the foreign-grant watchdog; and,
/// always, the coverage check (pods of a pipeline that no stage selects).
async fn start_admission(
    config: &RunConfig,
    scope: &WatchScope,
    ctx: &Arc<Context>,
    pipelines: &Store<AIPipeline>,
) -> Result<(), RunError> {
    {
        let scope = scope.clone();
        tokio::spawn(super::coverage::watch(
            ctx.clone(),
            pipelines.clone(),
            scope.namespace.clone(),
            move |ns: &str| scope.owns(ns),
        ));
    }
    if let Some(webhook) = &config.webhook {
        let scope = scope.clone();
        super::webhook::start(ctx.clone(), webhook.clone(), move |ns: &str| scope.owns(ns))
            .await
            .map_err(RunError::Webhook)?;
    }
    if config.foreign_grants {
        tokio::spawn(super::watchdog::watch(
            ctx.clone(),
            pipelines.clone(),
            scope.namespace.clone(),
        ));
    }
    if config.admission_policies {
        let scope = scope.clone();
        tokio::spawn(super::admission::keep_policies(
            ctx.clone(),
            pipelines.clone(),
            config.lease_namespace.clone(),
            move |ns: &str| scope.owns(ns),
        ));
    }
    Ok(())
}

/// The AccessGuardrails' statuses (only when this operator sees every pipeline) and the
/// namespace isolation they ask for.
fn start_guardrails(
    config: &RunConfig,
    scope: &WatchScope,
    ctx: &Arc<Context>,
    pipelines: &Store<AIPipeline>,
) {
    let owner = scope.clone();
    let settings = super::guardrails::Settings {
        statuses: scope.namespace.is_none() && !scope.shard.is_sharded(),
        operator_namespace: config.lease_namespace.clone(),
        watch_namespace: scope.namespace.clone(),
        owns: Arc::new(move |ns: &str| owner.owns(ns)),
    };
    tokio::spawn(super::guardrails::keep(
        ctx.clone(),
        pipelines.clone(),
        settings,
    ));
}

/// Serves /healthz, /readyz and /metrics, from the start (a standby answers too).
async fn serve(config: &RunConfig) -> Result<(Arc<Metrics>, Arc<http::Health>), RunError> {
    let metrics = Arc::new(Metrics::default());
    metrics.set_shard(config.shard);
    let health = Arc::new(http::Health::default());
    let listener = http::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            address: config.metrics_addr,
            source,
        })?;
    info!(address = %config.metrics_addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(http::serve(listener, health.clone(), metrics.clone()));
    Ok((metrics, health))
}

/// What every reconcile shares, over the caches just started.
fn context(
    client: &Client,
    config: &RunConfig,
    caches: &Caches,
    (pipelines, claims): (Store<AIPipeline>, Arc<ClaimIndex>),
    applied: Arc<AppliedState>,
    (metrics, health): (&Arc<Metrics>, &Arc<http::Health>),
    audit: AuditLog,
) -> Result<Arc<Context>, RunError> {
    if config.shard.is_sharded() {
        info!(shard = %config.shard, "reconciling only the namespaces of this shard");
    }
    let vault = match &config.vault {
        Some(v) => Some(vault_context(
            client,
            v,
            config.shard,
            caches.secrets.clone(),
        )?),
        None => None,
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        pipelines,
        claims,
        events: caches.events.clone(),
        guardrails: caches.guardrails.clone(),
        namespaces: caches.namespaces.clone(),
        children: caches.children.clone(),
        applied,
        metrics: metrics.clone(),
        journal: journal::Journal::start(audit, health.log.clone(), metrics.clone())
            .map_err(RunError::Journal)?,
        reporter: Reporter {
            controller: "portcullis".into(),
            instance: Some(config.identity.clone()),
        },
        synced: Arc::new(AtomicBool::new(false)),
        synced_notify: Arc::default(),
        policy_reports: AtomicBool::new(false),
        recorded: Mutex::default(),
        statuses: Mutex::default(),
        failures: Mutex::default(),
        repeats: Mutex::default(),
        vault,
        access: config.access.as_ref().map(|_| Arc::default()),
    });
    Ok(ctx)
}

/// The decision log's key, and earlier keys after a rotation: read before anything else, so a
/// missing key fails at once.
fn load_keys(config: &RunConfig) -> Result<Keys, RunError> {
    let key = crate::audit::load_key(&config.audit_key).map_err(RunError::AuditKey)?;
    let previous = config
        .audit_previous_keys
        .iter()
        .map(crate::audit::load_key)
        .collect::<Result<Vec<_>, _>>()
        .map_err(RunError::AuditKey)?;
    Ok(Keys::with_previous(&key, &previous))
}

/// Opens the decision log (its chain verified and continued). Only the leader does: a standby
/// sharing the file must not hold a stale view of the chain. Each shard has its own file (see
/// `Shard::path`): two shards never append to one chain.
fn open_decision_log(config: &RunConfig, keys: &Keys) -> Result<AuditLog, RunError> {
    let audit_path = config.shard.path(&config.audit_log);
    let options = LogOptions {
        max_segment_bytes: config.audit_segment_bytes,
        keep_segments: config.audit_keep_segments,
        writer: Some(config.identity.clone()),
    };
    let mut audit = AuditLog::open_with(&audit_path, keys, options).map_err(RunError::AuditLog)?;
    info!(path = %audit_path.display(), last_seq = audit.last_seq(), key_id = audit.key_id(), "opened the decision log");
    if let Some(bytes) = audit.truncated_tail() {
        warn!(bytes, path = %audit_path.display(), "removed a torn last line from the decision log (a write interrupted by a crash; it was never acknowledged)");
    }
    if config.echo_decisions {
        audit = audit.with_echo(Box::new(std::io::stdout()));
    }
    Ok(audit)
}

/// The AIPipeline cache, the index of who names which credential (kept from the same watch),
/// and the controller over them. AIPipelines trigger a reconcile when their generation changes
/// (a new spec, or deletion): not for the echo of the operator's own status writes, nor for
/// label or annotation edits.
fn pipeline_controller(
    client: &Client,
    scope: &WatchScope,
    concurrency: u16,
    events: &Arc<CacheEvents>,
) -> (Store<AIPipeline>, Arc<ClaimIndex>, Controller<AIPipeline>) {
    let (pipelines, pipeline_writer) = reflector::store::<AIPipeline>();
    let claims = Arc::new(ClaimIndex::default());
    let mut claim_writer = ClaimWriter::new(claims.clone());
    let pipeline_events = reflector::reflector(
        pipeline_writer,
        watcher(scope.api::<AIPipeline>(client), watcher::Config::default())
            .filter(scope.keep_namespaced())
            // Managed fields and kubectl's copy of the whole object are never read, and would
            // be most of what the cache holds per pipeline.
            .modify(|p| {
                p.metadata.managed_fields = None;
                if let Some(annotations) = p.metadata.annotations.as_mut() {
                    annotations.remove(LAST_APPLIED);
                }
            })
            .inspect_ok(move |event| claim_writer.apply(event)),
    )
    // Counted once the cache holds the event, so a count never runs ahead of the cache.
    .inspect(CacheEvents::counting(events, |e| &e.pipelines))
    .default_backoff()
    .applied_objects()
    .predicate_filter(generation_or_request, Default::default());
    let controller = Controller::for_stream(pipeline_events, pipelines.clone())
        // No debounce: the echo of the operator's own writes is filtered out where it arrives
        // (see `caches`), so a debounce would only delay every first reconcile of a new
        // pipeline (it was 250 ms, most of a new pipeline's time to Ready).
        .with_config(ControllerConfig::default().concurrency(concurrency));
    (pipelines, claims, controller)
}

/// What makes an AIPipeline event worth a reconcile: a new generation (a new spec, or
/// deletion), or a new value of an annotation that asks for something
/// ([`RECONCILE_ANNOTATION`], [`crate::plan::names::ROTATE_NOW_ANNOTATION`]).
fn generation_or_request(pipeline: &AIPipeline) -> Option<u64> {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let generation = predicates::generation(pipeline)?;
    let annotations = crate::k8s::ResourceExt::annotations(pipeline);
    let request = annotations.get(RECONCILE_ANNOTATION);
    let rotate = annotations.get(crate::plan::names::ROTATE_NOW_ANNOTATION);
    Some(BuildHasherDefault::<DefaultHasher>::default().hash_one((generation, request, rotate)))
}

/// Logs what the controller reports besides reconciles (those are counted and logged by
/// `error_policy`): its watches' and queue's failures.
fn log_failure<T, E, Q>(result: Result<T, ControllerError<E, Q>>)
where
    E: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    match result {
        Ok(_) | Err(ControllerError::ReconcilerFailed(..)) => {}
        Err(ControllerError::ObjectNotFound(object)) => {
            tracing::debug!(%object, "a scheduled reconcile's pipeline is gone");
        }
        Err(error) => warn!(%error, "the controller's watch or queue failed"),
    }
}

/// Once every cache holds a full list: reconciles may plan, and /readyz says ready.
async fn mark_synced(
    caches: Caches,
    ctx: Arc<Context>,
    health: Arc<http::Health>,
    policy_reports: bool,
) {
    if caches.wait_synced().await {
        if policy_reports {
            let served = super::reports::served(&ctx.client).await;
            if served {
                info!("writing a wgpolicyk8s.io PolicyReport per pipeline");
            } else {
                warn!(
                    "--policy-reports: the API server does not serve wgpolicyk8s.io/v1alpha2 PolicyReports (install Policy Reporter's or Kyverno's CRDs); writing none"
                );
            }
            ctx.policy_reports.store(served, Ordering::Relaxed);
        }
        ctx.synced.store(true, Ordering::Release);
        ctx.synced_notify.notify_waiters();
        health.ready.store(true, Ordering::Relaxed);
    }
}

/// The Vault session (its token kept in a Secret, renewed in the background) and the settings
/// every pipeline's Vault work shares.
fn vault_context(
    client: &Client,
    v: &VaultRunConfig,
    shard: Shard,
    secrets: Store<PartialObjectMeta<Secret>>,
) -> Result<VaultCtx, RunError> {
    // Each shard logs in to Vault on its own and keeps its own token.
    let store = SecretTokenStore::new(
        client.clone(),
        &v.state_namespace,
        &shard.name(TOKEN_SECRET),
    );
    let session = VaultSession::new(v.connection.clone(), store).map_err(RunError::VaultClient)?;
    tokio::spawn(session.clone().keep_renewed());
    info!(address = %v.connection.address, auth_mount = %v.connection.auth_mount, role = %v.connection.auth_role, "Vault configured");
    let chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let mut vault = VaultCtx::new(
        session,
        v.state_namespace.clone(),
        chrono(v.revoke_grace),
        chrono(v.restart_min_interval),
        v.max_restarts_per_minute,
        v.resync,
        secrets,
    );
    vault.name_prefix.clone_from(&v.name_prefix);
    Ok(if shard.is_sharded() {
        vault.without_sweep()
    } else {
        vault
    })
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
    #[error("{0}")]
    Webhook(#[source] super::webhook::WebhookError),
    #[error("{0}")]
    Access(#[source] super::access::AccessError),
}
