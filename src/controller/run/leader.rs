//! Leader election: only the replica holding the leader Lease watches and writes.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::RunError;
use crate::controller::RunConfig;
use crate::controller::http::Health;
use crate::controller::metrics::Metrics;
use crate::k8s::{Api, Client, FIELD_MANAGER, Lease};

type LeaseTask = JoinHandle<Result<LeaseManager, LeaseManagerError>>;

/// How long the Lease is held without a renewal before a standby may take it.
const LEASE_SECONDS: u64 = 15;

/// How long after its last renewal the leader goes on writing: less than the Lease's duration,
/// so that it has stopped (the Lease checked every [`CHECK_EVERY`]) before a standby can take
/// over.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The Lease this replica holds.
pub(crate) struct Leadership {
    is_leader: watch::Receiver<bool>,
    task: LeaseTask,
    leases: Api<Lease>,
    name: String,
    identity: String,
    /// When the Lease was last seen renewed by this replica.
    renewed: Instant,
}

impl Leadership {
    /// Resolves when this replica no longer holds the Lease, or may no longer count on holding
    /// it: the Lease names another holder, or it was not seen renewed for [`RENEW_DEADLINE`]
    /// (the API server refuses the renewal, or cannot be reached). Stop writing at once then.
    pub(crate) async fn lost(&mut self) {
        let mut check = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                changed = self.is_leader.changed() => {
                    if changed.is_err() || !*self.is_leader.borrow_and_update() {
                        return;
                    }
                }
                _ = check.tick() => {
                    if let Some(why) = self.past_deadline().await {
                        warn!(lease = %self.name, why, "this replica can no longer count on holding the leader Lease");
                        return;
                    }
                }
            }
        }
    }

    /// Why this replica may no longer count on the Lease, if it may not.
    async fn past_deadline(&mut self) -> Option<&'static str> {
        match self.leases.get_opt(&self.name).await {
            Ok(Some(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                    return Some("another replica holds it");
                }
                let renewed = spec.renew_time.and_then(|t| {
                    let age = Duration::try_from(crate::k8s::now().0.duration_since(t.0)).ok()?;
                    Instant::now().checked_sub(age)
                });
                if let Some(renewed) = renewed {
                    self.renewed = self.renewed.max(renewed);
                }
            }
            Ok(None) => return Some("it was deleted"),
            // Unreachable: go by the last renewal seen.
            Err(_) => {}
        }
        (self.renewed.elapsed() > RENEW_DEADLINE)
            .then_some("it was not renewed within the renew deadline")
    }

    /// Gives the Lease up, so that a standby takes over at once. Call it only after every
    /// reconcile has finished.
    pub(crate) async fn release(self: Box<Self>) {
        drop(self.is_leader);
        if let Ok(Ok(manager)) = self.task.await
            && let Err(e) = manager.release().await
        {
            warn!(error = %e, "could not release the leader Lease; a standby takes over when it expires");
        }
    }
}

/// How the wait for the Lease ended.
pub(crate) enum Elected {
    /// This replica leads; `None` when run without leader election.
    Leader(Option<Box<Leadership>>),
    /// Shutdown was asked for while waiting as a standby.
    ShutDown,
}

/// Waits, as a ready standby, until this replica holds the leader Lease (at once without leader
/// election), or until `shutdown`.
pub(crate) async fn elect(
    client: &Client,
    config: &RunConfig,
    health: &Health,
    metrics: &Metrics,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Elected, RunError> {
    if !config.leader_election {
        return Ok(Elected::Leader(None));
    }
    // Each shard elects its own leader: the replicas of one shard share a Lease.
    let lease_name = config.shard.name(&config.lease_name);
    let manager = LeaseManagerBuilder::new(client.clone(), &lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&config.identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(5)
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
        .map_err(RunError::LeaderElection)?;
    let (mut is_leader, task) = manager.watch().await;
    health.ready.store(true, Ordering::Relaxed);
    info!(lease = %lease_name, namespace = %config.lease_namespace, identity = %config.identity, "waiting to become the leader");
    loop {
        if *is_leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = is_leader.changed() => if changed.is_err() {
                return Err(RunError::LeaderElectionStopped);
            },
            () = &mut *shutdown => {
                info!("shutting down before becoming the leader");
                drop(is_leader);
                if let Ok(Ok(manager)) = task.await { let _ = manager.release().await; }
                return Ok(Elected::ShutDown);
            }
        }
    }
    info!(identity = %config.identity, "became the leader");
    metrics.leader.set(1);
    Ok(Elected::Leader(Some(Box::new(Leadership {
        is_leader,
        task,
        leases: Api::namespaced(client.clone(), &config.lease_namespace),
        name: lease_name,
        identity: config.identity.clone(),
        renewed: Instant::now(),
    }))))
}
