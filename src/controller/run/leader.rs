//! Leader election: only the replica holding the leader Lease watches and writes.

use std::future::Future;
use std::sync::atomic::Ordering;

use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use super::RunError;
use crate::controller::RunConfig;
use crate::controller::http::Health;
use crate::controller::metrics::Metrics;
use crate::k8s::{Client, FIELD_MANAGER};

type LeaseTask = JoinHandle<Result<LeaseManager, LeaseManagerError>>;

/// The Lease this replica holds.
pub(crate) struct Leadership {
    is_leader: watch::Receiver<bool>,
    _task: LeaseTask,
}

impl Leadership {
    /// Resolves when this replica no longer holds the Lease.
    pub(crate) async fn lost(mut self) {
        while self.is_leader.changed().await.is_ok() {
            if !*self.is_leader.borrow_and_update() {
                return;
            }
        }
    }
}

/// How the wait for the Lease ended.
pub(crate) enum Elected {
    /// This replica leads; `None` when run without leader election.
    Leader(Option<Leadership>),
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
        .with_duration(15)
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
    Ok(Elected::Leader(Some(Leadership {
        is_leader,
        _task: task,
    })))
}
