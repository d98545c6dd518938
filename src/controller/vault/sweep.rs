//! The sweep: leases under a credentials path that no pipeline recorded are revoked.
//!
//! A lease escapes tracking when the operator dies between Vault issuing it and the state
//! Secret recording it, when Vault completed an issue whose answer was lost (a timeout), or when
//! a lease that could not be recorded could not be revoked either. Such a lease would live its
//! secrets engine's `default_ttl` (the read sends no TTL). So, at most once per `--vault-resync`
//! per path, each credentials path a pipeline issues from is listed
//! (`LIST sys/leases/lookup/<path>/`), and every lease there that no pipeline's state records and
//! that is older than `--credential-revoke-grace` is recorded (`credential-revoked`, with
//! "sweep") and revoked.
//!
//! What counts as recorded is every pipeline's state (this operator's pipelines, all loaded
//! first), so pipelines sharing a path never lose each other's leases. A credentials path must
//! therefore be Portcullis's alone: a lease someone else issued there is revoked too. A sharded
//! operator does not sweep: one shard cannot see another's state.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use tracing::{info, warn};
use vaultrs::client::VaultClient;

use super::state::VaultState;
use super::{VaultSide, Work};
use crate::audit::Action as AuditAction;
use crate::controller::Result;
use crate::k8s::ResourceExt;
use crate::vault::endpoints;
use crate::vault::leases::lease_hash;

/// Makes the sweep of every path `side` issues from fall due `delay` from now (and not
/// before): after a lost state, the leases it recorded are unknown, and are swept once their
/// consumers had time to move to the new credentials.
pub(super) fn sweep_after(work: &Work<'_>, side: &VaultSide, delay: std::time::Duration) {
    let vault = work.vault;
    let at = std::time::Instant::now().checked_sub(vault.resync.saturating_sub(delay));
    let mut swept = vault.swept.lock().expect("sweep lock");
    for r in &side.vault.credentials {
        match at {
            Some(at) => swept.insert(r.path.clone(), at),
            None => swept.remove(&r.path),
        };
    }
}

/// When the next sweep of a path `side` issues from falls due (`None`: none was swept yet).
pub(super) fn next_due(work: &Work<'_>, side: &VaultSide) -> Option<DateTime<Utc>> {
    let vault = work.vault;
    if !vault.sweep {
        return None;
    }
    let (instant, now) = (std::time::Instant::now(), Utc::now());
    let swept = vault.swept.lock().expect("sweep lock");
    side.vault
        .credentials
        .iter()
        .filter_map(|r| swept.get(&r.path))
        .map(|at| {
            let wait = (*at + vault.resync).saturating_duration_since(instant);
            now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero())
        })
        .min()
}

/// Sweeps the paths `side` issues from whose last sweep is older than the resync interval. A
/// check that can wait: not while a renewal of this pipeline is near (the renewal goes first),
/// and postponed when Vault is too busy to take the listing.
pub(super) async fn converge(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    state: &VaultState,
) -> Result<()> {
    let vault = work.vault;
    if !vault.sweep || !work.ctx.synced.load(Ordering::Acquire) || vault.pipelines.get().is_none() {
        return Ok(());
    }
    if work.renewal_near(state) {
        return Ok(());
    }
    let now = std::time::Instant::now();
    let due: Vec<String> = {
        let mut swept = vault.swept.lock().expect("sweep lock");
        side.vault
            .credentials
            .iter()
            .map(|r| r.path.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|path| {
                let fresh = swept
                    .get(path)
                    .is_some_and(|at| now.duration_since(*at) < vault.resync);
                if !fresh {
                    swept.insert(path.clone(), now);
                }
                !fresh
            })
            .collect()
    };
    for path in due {
        sweep(work, client, &path).await?;
    }
    Ok(())
}

async fn sweep(work: &Work<'_>, client: &VaultClient, path: &str) -> Result<()> {
    let Some(slot) = work.wait_for_slot("sweep_list").await else {
        work.count("sweep_list", "busy");
        // Postponed: the next reconcile of a pipeline issuing from `path` sweeps it.
        work.vault.swept.lock().expect("sweep lock").remove(path);
        return Ok(());
    };
    let listed = endpoints::lease_list(client, path).await;
    drop(slot);
    let listed = match listed {
        Ok(listed) => {
            work.count("sweep_list", "ok");
            listed
        }
        Err(e) => {
            let e = crate::vault::VaultError::from_client("sweep_list", e);
            work.count("sweep_list", e.label());
            warn!(path, error = %e, "could not list the leases under a credentials path; no sweep (does the operator's policy allow list and sudo on sys/leases/lookup/<path>/*?)");
            return Ok(());
        }
    };
    if listed.is_empty() {
        return Ok(());
    }
    // The cached states first; only if some lease is in none of them, every pipeline's.
    let cached: HashSet<String> = super::recorded_leases(work.vault)
        .await
        .into_iter()
        .collect();
    let mut unrecorded: Vec<String> = listed
        .into_iter()
        .filter(|id| !cached.contains(id))
        .collect();
    if unrecorded.is_empty() {
        return Ok(());
    }
    let recorded = recorded(work).await?;
    unrecorded.retain(|id| !recorded.contains(id));
    for lease_id in unrecorded {
        let Some(lookup) = work
            .slotted("lookup", endpoints::lease_lookup(client, &lease_id))
            .await
            .ok()
            .flatten()
        else {
            continue;
        };
        let issued = lookup
            .issue_time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let Some(issued) = issued else { continue };
        if Utc::now() - issued < work.vault.grace {
            continue;
        }
        // A lease recorded meanwhile (an issue that was just saved) is not swept.
        if super::recorded_leases(work.vault).await.contains(&lease_id) {
            continue;
        }
        let hash = lease_hash(&lease_id);
        let object = format!("lease under {path}");
        // Revoking takes access away: it goes ahead even while the log cannot be written.
        work.record_keepalive(work.entry(
            AuditAction::CredentialRevoked,
            None,
            object.clone(),
            format!(
                "sweep: revoking lease {hash} under {path}: issued {}, recorded by no pipeline (an issue cut short by a crash or a lost answer)",
                super::rfc3339(issued)
            ),
        ))
        .await?;
        work.call(
            "sweep_revoke",
            None,
            &object,
            endpoints::lease_revoke(client, &lease_id),
        )
        .await?;
        info!(path, lease = %hash, "revoked a lease no pipeline recorded");
    }
    Ok(())
}

/// Every lease id any of this operator's pipelines records (their states loaded as needed).
async fn recorded(work: &Work<'_>) -> Result<HashSet<String>> {
    let Some(pipelines) = work.vault.pipelines.get() else {
        return Ok(HashSet::new());
    };
    let mut ids = HashSet::new();
    for pipeline in pipelines.state() {
        let Some(uid) = pipeline.uid() else { continue };
        let state = work.state_of(&uid).await?;
        ids.extend(state.leases.into_iter().map(|l| l.lease_id));
    }
    Ok(ids)
}
