//! Credentials: leases issued, renewed, replaced and revoked on the schedule
//! `vault::leases::due` works out, each recorded before it is made.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tracing::{info, warn};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::secrets::Held;
use super::state::VaultState;
use super::{VaultProblem, VaultSide, Work, earliest, rfc3339, secrets};
use crate::api::CredentialStatus;
use crate::audit::Action as AuditAction;
use crate::controller::events::{self, EventReason};
use crate::controller::record;
use crate::controller::{Error, Result};
use crate::k8s::OwnerReference;
use crate::plan::CredentialRequest;
use crate::vault::VaultError;
use crate::vault::endpoints;
use crate::vault::leases::{self, Delivery, LeaseRecord, Step};

/// Which steps a pass over the credentials takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// Only renewals: they keep delivered credentials alive, so they go before anything else.
    Renewals,
    /// Everything due: renewals, revocations, then issues.
    All,
}

/// The credentials whose Vault calls failed in this reconcile.
#[derive(Debug, Default)]
pub(super) struct CredentialProblems {
    /// Per credential (stage, name), why its call failed, as its status shows it.
    by_credential: BTreeMap<(String, String), String>,
    /// The first failure, for the pipeline's conditions.
    pub first: Option<VaultProblem>,
}

/// Issues, renews, replaces and revokes what is due now: renewals first, and one credential's
/// failed Vault call does not stop the others (it is returned in `problems`, keyed by the
/// credential). Returns the earliest time something falls due next. `held` is what the
/// credential Secrets hold; it is confirmed against the API server where it differs from the
/// current lease, and kept up to date with what is written.
#[allow(clippy::too_many_arguments)]
pub(super) async fn converge(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    owner: &OwnerReference,
    state: &mut VaultState,
    held: &mut Held,
    pass: Pass,
    problems: &mut CredentialProblems,
) -> Result<Option<DateTime<Utc>>> {
    verify(work, client, side, state).await?;
    if pass == Pass::All {
        rotate_if_asked(work, side, state).await?;
    }
    for r in &side.vault.credentials {
        let current = state
            .leases
            .iter()
            .find(|l| l.is_current() && l.stage == r.stage && l.credential == r.name);
        if let Some(lease) = current
            && secrets::delivery(held, &r.secret_name, &lease.lease_id) != Delivery::Current
        {
            held.insert(
                r.secret_name.clone(),
                secrets::confirm(work, &r.secret_name).await?,
            );
        }
    }
    let (mut steps, mut wake) = leases::due(
        Utc::now(),
        &side.vault.credentials,
        &state.leases,
        |name, lease| secrets::delivery(held, name, lease),
    );
    // Renewals keep what is delivered alive: they go first, then revocations, then issues.
    steps.sort_by_key(|step| match step {
        Step::Renew { .. } => 0,
        Step::Revoke { .. } => 1,
        Step::Issue { .. } => 2,
    });
    for step in steps {
        if pass == Pass::Renewals && !matches!(step, Step::Renew { .. }) {
            continue;
        }
        let (credential, done) = match step {
            Step::Issue {
                request,
                replaces,
                why,
            } => {
                let r = &side.vault.credentials[request];
                // The Secret holds credentials of a lease the state does not know (the state
                // Secret was lost): their consumers are restarted onto the new ones as well.
                let replaces_unknown = replaces.is_none()
                    && secrets::delivery(held, &r.secret_name, "") == Delivery::Stale;
                let done = issue(
                    work,
                    client,
                    side,
                    owner,
                    state,
                    r,
                    replaces,
                    replaces_unknown,
                    why,
                )
                .await
                .map(|(lease_id, renew_at)| {
                    held.insert(r.secret_name.clone(), Some(leases::lease_hash(&lease_id)));
                    Some(renew_at)
                });
                ((r.stage.clone(), r.name.clone()), done)
            }
            Step::Renew { lease_id, request } => {
                let r = &side.vault.credentials[request];
                let done = renew(work, client, side, owner, state, r, &lease_id).await;
                ((r.stage.clone(), r.name.clone()), done)
            }
            Step::Revoke { lease_id, why } => {
                let credential = state
                    .leases
                    .iter()
                    .find(|l| l.lease_id == lease_id)
                    .map(|l| (l.stage.clone(), l.credential.clone()))
                    .unwrap_or_default();
                let done = revoke(
                    work,
                    client,
                    state,
                    &lease_id,
                    why,
                    side.subject(&credential.0),
                )
                .await
                .map(|()| None);
                (credential, done)
            }
        };
        match done {
            Ok(at) => {
                if let Some(at) = at {
                    wake = earliest(wake, at);
                }
            }
            // This credential's call failed (recorded): the others go on.
            Err(Error::Vault(problem)) => {
                problems
                    .by_credential
                    .entry(credential)
                    .or_insert_with(|| problem.to_string());
                problems.first.get_or_insert(problem);
            }
            Err(other) => return Err(other),
        }
    }
    Ok(wake)
}

/// A new value of the `portcullis.dev/rotate-now` annotation marks every current lease of the
/// pipeline's credentials for replacement, once: the value is kept in the state with the marks,
/// so a restart or a failed issue neither forgets nor repeats the rotation.
async fn rotate_if_asked(work: &Work<'_>, side: &VaultSide, state: &mut VaultState) -> Result<()> {
    let Some(value) = work.rotate_now.as_ref() else {
        return Ok(());
    };
    if state.rotated_for.as_ref() == Some(value) {
        return Ok(());
    }
    for l in state.leases.iter_mut().filter(|l| {
        l.is_current()
            && side
                .vault
                .credentials
                .iter()
                .any(|r| r.stage == l.stage && r.name == l.credential)
    }) {
        l.rotate_requested = true;
    }
    state.rotated_for = Some(value.clone());
    info!(pipeline = %work.name, namespace = %work.namespace, value = %value, "a rotation of the pipeline's credentials was asked for");
    work.save(state).await
}

/// After the operator's token changed (a restart resuming it, or a new login), looks up every
/// lease the pipeline holds: Vault revokes every lease a token created when that token dies
/// (revoked, expired while the operator was down), so a lease Vault no longer knows ends now:
/// it is replaced (its consumers restarted) and never reported as delivered. A live lease
/// issued under another token than the current one (the kept token's Secret was lost) ends when
/// that token, which nobody renews any more, does: it is replaced now.
async fn verify(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    state: &mut VaultState,
) -> Result<()> {
    let generation = work.vault.session.generation();
    let verified = work
        .vault
        .verified
        .lock()
        .expect("verified lock")
        .get(&work.uid)
        .copied();
    if verified == Some(generation) {
        return Ok(());
    }
    let now = Utc::now();
    let accessor = work.vault.session.accessor();
    let mut gone = Vec::new();
    let mut orphaned = Vec::new();
    for lease in &state.leases {
        let object = format!(
            "credential {}/{} ({})",
            lease.stage, lease.credential, lease.path
        );
        let found = work
            .call(
                "lookup",
                Some(&lease.stage),
                &object,
                endpoints::lease_lookup(client, &lease.lease_id),
            )
            .await?;
        let foreign = lease
            .token_accessor
            .as_ref()
            .is_some_and(|a| !accessor.is_empty() && *a != accessor);
        if found.is_some() && foreign && lease.is_current() && !lease.orphaned {
            let mut e = work.entry(
                AuditAction::VaultFailed,
                Some(&lease.stage),
                object.clone(),
                format!(
                    "lease {} was issued under an operator token it no longer holds (revoked, or its Secret lost); it ends when that token does, if it has not already: issuing new credentials and restarting their consumers",
                    leases::lease_hash(&lease.lease_id)
                ),
            );
            e.subject = side.subject(&lease.stage);
            work.record_keepalive(e).await?;
            orphaned.push(lease.lease_id.clone());
        }
        if found.is_none() {
            let mut e = work.entry(
                AuditAction::VaultFailed,
                Some(&lease.stage),
                object,
                format!(
                    "lease {} is gone from Vault (revoked with the operator's token that created it, or expired); {}",
                    leases::lease_hash(&lease.lease_id),
                    if lease.is_current() {
                        "issuing new credentials and restarting their consumers"
                    } else {
                        "it was already replaced"
                    }
                ),
            );
            e.subject = side.subject(&lease.stage);
            work.record_keepalive(e).await?;
            gone.push(lease.lease_id.clone());
        }
    }
    for l in state
        .leases
        .iter_mut()
        .filter(|l| orphaned.contains(&l.lease_id))
    {
        l.orphaned = true;
    }
    if !gone.is_empty() || !orphaned.is_empty() {
        // A current lease that is gone has expired as far as anyone can use it; a replaced
        // one has nothing left to revoke.
        state
            .leases
            .retain(|l| l.is_current() || !gone.contains(&l.lease_id));
        for l in state
            .leases
            .iter_mut()
            .filter(|l| gone.contains(&l.lease_id))
        {
            l.expires_at = now;
            l.renew_at = now;
        }
        work.save(state).await?;
    }
    work.vault
        .verified
        .lock()
        .expect("verified lock")
        .insert(work.uid.clone(), generation);
    Ok(())
}

fn object(r: &CredentialRequest) -> String {
    format!("credential {}/{} ({})", r.stage, r.name, r.path)
}

/// Records, then issues new credentials into the request's Secret; the lease it replaces (if
/// any) is retired after the grace period. Returns the new lease and when to renew it.
#[allow(clippy::too_many_arguments)]
async fn issue(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    owner: &OwnerReference,
    state: &mut VaultState,
    r: &CredentialRequest,
    replaces: Option<String>,
    replaces_unknown: bool,
    why: &str,
) -> Result<(String, DateTime<Utc>)> {
    let object = object(r);
    secrets::refuse_foreign(work, side, r, &object).await?;
    let (action, message) = match &replaces {
        Some(old) => (
            AuditAction::CredentialRotated,
            format!(
                "issuing new credentials from {} for stage {} into Secret {} ({why}); lease {} is revoked {}s after its consumers restart",
                r.path,
                r.stage,
                r.secret_name,
                leases::lease_hash(old),
                work.vault.grace.num_seconds()
            ),
        ),
        None => (
            AuditAction::CredentialIssued,
            format!(
                "issuing credentials from {} for stage {} into Secret {} ({why})",
                r.path, r.stage, r.secret_name
            ),
        ),
    };
    // A retry of an issue whose last attempt failed is in the log already: it is counted, and
    // recorded once more when it succeeds.
    let intent = format!(
        "{action:?} {object} {}",
        replaces.as_deref().unwrap_or_default()
    );
    let mut e = work.entry(action, Some(&r.stage), object.clone(), message);
    e.subject = side.subject(&r.stage);
    work.record_intent(&intent, e, false).await?;
    let issued = work
        .call(
            "issue",
            Some(&r.stage),
            &object,
            endpoints::read_credentials(client, &r.path),
        )
        .await;
    let failed_before = work.attempted(&intent, &issued);
    let issued = issued?;
    let now = Utc::now();
    let ttl = leases::seconds(r.ttl);
    let expires_at = leases::planned_expiry(now, leases::seconds(issued.lease_duration), ttl);
    let record = LeaseRecord {
        stage: r.stage.clone(),
        credential: r.name.clone(),
        path: r.path.clone(),
        secret_name: r.secret_name.clone(),
        lease_id: issued.lease_id.clone(),
        issued_at: now,
        expires_at,
        renew_at: leases::renew_at(now, expires_at - now, &issued.lease_id),
        renewable: issued.renewable,
        granted_seconds: issued.lease_duration,
        replace_next: false,
        retire_at: None,
        restart_pending: (replaces.is_some() || replaces_unknown) && !r.restart_targets.is_empty(),
        token_accessor: Some(work.vault.session.accessor()).filter(|a| !a.is_empty()),
        orphaned: false,
        rotate_requested: false,
    };
    if let Some(old) = &replaces
        && let Some(l) = state.leases.iter_mut().find(|l| &l.lease_id == old)
    {
        l.retire_at = Some(now + work.vault.grace);
    }
    state.leases.push(record.clone());
    if let Err(e) = work.save(state).await {
        // Not kept: revoke it now rather than leave it untracked.
        warn!(error = %e, "could not keep a new lease; revoking it");
        let _ = work
            .slotted("revoke", endpoints::lease_revoke(client, &issued.lease_id))
            .await;
        state.leases.retain(|l| l.lease_id != issued.lease_id);
        return Err(e);
    }
    secrets::write(work, r, &record, Some(&issued.data), owner).await?;
    if failed_before > 0 {
        let done = format!(
            "issued credentials from {} for stage {} into Secret {} (lease {}; {why})",
            r.path,
            r.stage,
            r.secret_name,
            leases::lease_hash(&issued.lease_id)
        );
        record_retried(work, side, r, action, &done, failed_before).await?;
    }
    info!(stage = %r.stage, credential = %r.name, secret = %r.secret_name, lease = %leases::lease_hash(&issued.lease_id), "issued credentials");
    let (reason, verb) = if replaces.is_some() || replaces_unknown {
        (EventReason::CredentialsRotated, "rotated")
    } else {
        (EventReason::CredentialsIssued, "issued")
    };
    events::normal(
        &work.ctx.recorder(),
        &work.reference,
        reason,
        format!(
            "{verb} credentials {}/{} from {} into Secret {} (lease {}): {why}",
            r.stage,
            r.name,
            r.path,
            r.secret_name,
            leases::lease_hash(&issued.lease_id)
        ),
    )
    .await;
    Ok((record.lease_id, record.renew_at))
}

/// Records that an issue retried after `failed` failed attempts (its intent recorded once, at
/// the first) is `done`.
async fn record_retried(
    work: &Work<'_>,
    side: &VaultSide,
    r: &CredentialRequest,
    action: AuditAction,
    done: &str,
    failed: u32,
) -> Result<()> {
    let mut e = work.entry(
        action,
        Some(&r.stage),
        object(r),
        record::retried_message(done, failed),
    );
    e.subject = side.subject(&r.stage);
    work.record_keepalive(e).await
}

/// Records, then renews a lease. A lease Vault no longer knows is marked for replacement.
/// Returns when to look at it again.
async fn renew(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    owner: &OwnerReference,
    state: &mut VaultState,
    r: &CredentialRequest,
    lease_id: &str,
) -> Result<Option<DateTime<Utc>>> {
    let hash = leases::lease_hash(lease_id);
    let object = object(r);
    let mut e = work.entry(
        AuditAction::CredentialRenewed,
        Some(&r.stage),
        object.clone(),
        format!("renewing lease {hash} by {}s", r.ttl),
    );
    e.subject = side.subject(&r.stage);
    let intent = format!("renew {lease_id}");
    work.record_intent(&intent, e, true).await?;
    let slot = match work.slot("renew", Some(&r.stage), &object).await {
        Ok(slot) => slot,
        Err(e) => {
            work.attempt_failed(&intent, &e);
            return Err(e);
        }
    };
    let result = endpoints::lease_renew(client, lease_id, r.ttl).await;
    drop(slot);
    let renewed = match result {
        Ok(v) => {
            work.count("renew", "ok");
            work.succeeded("renew", &object);
            let failed = work.attempt_answered(&intent);
            if failed > 0 {
                let mut e = work.entry(
                    AuditAction::CredentialRenewed,
                    Some(&r.stage),
                    object.clone(),
                    record::retried_message(&format!("renewed lease {hash}"), failed),
                );
                e.subject = side.subject(&r.stage);
                work.record_keepalive(e).await?;
            }
            Some(v)
        }
        Err(ClientError::APIError {
            code: 400 | 404,
            errors,
        }) => {
            // The lease is gone (expired, revoked, or its token was): replace it.
            work.count("renew", "refused");
            work.attempt_answered(&intent);
            work.record_keepalive(work.entry(
                AuditAction::VaultFailed,
                Some(&r.stage),
                object.clone(),
                format!(
                    "renewing lease {hash} was refused ({}); issuing new credentials",
                    errors.join("; ")
                ),
            ))
            .await?;
            None
        }
        Err(e) => {
            let e = VaultError::from_client("renew", e);
            let e = work.failed("renew", Some(&r.stage), object, e).await;
            work.attempt_failed(&intent, &e);
            return Err(e);
        }
    };
    let now = Utc::now();
    let Some(l) = state.leases.iter_mut().find(|l| l.lease_id == lease_id) else {
        return Ok(None);
    };
    match renewed {
        Some(renewed) => {
            let ttl = leases::seconds(r.ttl);
            l.expires_at =
                leases::planned_expiry(now, leases::seconds(renewed.lease_duration), ttl);
            l.renewable = renewed.renewable;
            // Vault cut the renewal short: the max TTL is near. Replace the lease now, while it
            // still has time left for the grace period.
            l.replace_next = leases::cut_short(renewed.lease_duration, r.ttl, l.granted_seconds);
            l.renew_at = if l.replace_next {
                now
            } else {
                leases::renew_at(now, l.expires_at - now, lease_id)
            };
            l.granted_seconds = renewed.lease_duration;
        }
        None => {
            l.replace_next = true;
            l.renewable = false;
            l.renew_at = now;
        }
    }
    let record = l.clone();
    work.save(state).await?;
    secrets::write(work, r, &record, None, owner).await?;
    Ok(Some(record.renew_at))
}

/// Records, then revokes a lease and forgets it.
pub(super) async fn revoke(
    work: &Work<'_>,
    client: &VaultClient,
    state: &mut VaultState,
    lease_id: &str,
    why: &str,
    subject: Option<String>,
) -> Result<()> {
    let Some(lease) = state
        .leases
        .iter()
        .find(|l| l.lease_id == lease_id)
        .cloned()
    else {
        return Ok(());
    };
    let object = format!(
        "credential {}/{} ({})",
        lease.stage, lease.credential, lease.path
    );
    let mut e = work.entry(
        AuditAction::CredentialRevoked,
        Some(&lease.stage),
        object.clone(),
        format!("revoking lease {}: {why}", leases::lease_hash(lease_id)),
    );
    e.subject = subject.clone();
    let intent = format!("revoke {lease_id}");
    work.record_intent(&intent, e, true).await?;
    let revoked = work
        .call(
            "revoke",
            Some(&lease.stage),
            &object,
            endpoints::lease_revoke(client, lease_id),
        )
        .await;
    let failed = work.attempted(&intent, &revoked);
    revoked?;
    if failed > 0 {
        let done = format!("revoked lease {}", leases::lease_hash(lease_id));
        let mut e = work.entry(
            AuditAction::CredentialRevoked,
            Some(&lease.stage),
            object,
            record::retried_message(&done, failed),
        );
        e.subject = subject;
        work.record_keepalive(e).await?;
    }
    state.leases.retain(|l| l.lease_id != lease_id);
    work.save(state).await
}

/// The delivered credentials for the status (a current lease whose credentials its Secret
/// holds), and how many of them have a lease that has not expired.
/// A credential whose last Vault call failed is listed too, with the failure (`problem`), and,
/// when it is not delivered, nothing else.
pub(super) fn delivered(
    side: &VaultSide,
    state: &VaultState,
    held: &Held,
    problems: &CredentialProblems,
) -> (Vec<(String, CredentialStatus)>, usize) {
    let now = Utc::now();
    let mut live = 0;
    let statuses = side
        .vault
        .credentials
        .iter()
        .filter_map(|r| {
            let problem = problems
                .by_credential
                .get(&(r.stage.clone(), r.name.clone()))
                .cloned();
            let lease = state
                .leases
                .iter()
                .find(|l| l.is_current() && l.stage == r.stage && l.credential == r.name)
                .filter(|l| {
                    secrets::delivery(held, &r.secret_name, &l.lease_id) == Delivery::Current
                });
            let Some(lease) = lease else {
                return problem.map(|problem| {
                    (
                        r.stage.clone(),
                        CredentialStatus {
                            name: r.name.clone(),
                            secret_name: Some(r.secret_name.clone()),
                            problem: Some(problem),
                            ..CredentialStatus::default()
                        },
                    )
                });
            };
            live += usize::from(lease.expires_at > now);
            Some((
                r.stage.clone(),
                CredentialStatus {
                    name: r.name.clone(),
                    secret_name: Some(r.secret_name.clone()),
                    lease_expires_at: Some(rfc3339(lease.expires_at)),
                    rotated_at: Some(rfc3339(lease.issued_at)),
                    lease_hash: Some(leases::lease_hash(&lease.lease_id)),
                    problem,
                },
            ))
        })
        .collect();
    (statuses, live)
}
