//! The stages' Vault ACL policies and Kubernetes-auth roles: their names kept before they are
//! written, written when Vault's differ from the plan, and deleted (then forgotten) when no
//! longer planned.

use tracing::info;
use vaultrs::client::VaultClient;

use super::state::VaultState;
use super::{VaultProblem, VaultSide, Work};
use crate::audit::Action as AuditAction;
use crate::controller::{Error, Result};
use crate::vault::endpoints::{self, KubernetesRole};

/// Puts the planned policies and roles in Vault and deletes the ones no longer planned.
pub(super) async fn converge(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    state: &mut VaultState,
) -> Result<()> {
    let mount = work.vault.session.config().workload_auth_mount.clone();
    let digest = digest(side, state, &mount);
    let last = work
        .vault
        .checked
        .lock()
        .expect("checked lock")
        .get(&work.uid)
        .copied();
    // Found as planned, and the plan is the same: read again once `resync` has passed, as a
    // check that can wait (not while a renewal is near, and postponed when Vault is too busy
    // to take it). A changed plan is put in place now.
    let unchanged = last.is_some_and(|(d, _)| d == digest);
    if unchanged && last.is_some_and(|(_, at)| at.elapsed() < work.vault.resync) {
        return Ok(());
    }
    let names_new = side
        .vault
        .policies
        .iter()
        .any(|p| !state.policies.contains(&p.name))
        || side
            .vault
            .roles
            .iter()
            .any(|r| !state.roles.contains(&r.name));
    if names_new {
        claim_unrecorded(work, client, side, state, &mount).await?;
        state
            .policies
            .extend(side.vault.policies.iter().map(|p| p.name.clone()));
        state
            .roles
            .extend(side.vault.roles.iter().map(|r| r.name.clone()));
        work.save(state).await?;
    }
    for policy in &side.vault.policies {
        let object = format!("Vault policy {}", policy.name);
        let stage = Some(policy.stage.as_str());
        let read = endpoints::policy_read(client, &policy.name);
        let Some(current) =
            read_or_postpone(work, state, unchanged, "policy_read", stage, &object, read).await?
        else {
            return Ok(());
        };
        let hcl = policy.hcl();
        if current.as_deref() != Some(hcl.as_str()) {
            let why = if current.is_some() {
                "it was changed outside Portcullis or the plan changed; writing the planned rules"
            } else {
                "writing the stage's allowed paths"
            };
            let mut e = work.entry(
                AuditAction::PolicyWritten,
                stage,
                object.clone(),
                format!("{object}: {why}"),
            );
            e.subject = side.subject(&policy.stage);
            work.record(e).await?;
            let write = endpoints::policy_write(client, &policy.name, &hcl);
            work.call("policy_write", stage, &object, write).await?;
            info!(policy = %policy.name, "wrote a Vault policy");
        }
    }
    for role in &side.vault.roles {
        let object = format!("Vault role auth/{mount}/role/{}", role.name);
        let stage = Some(role.stage.as_str());
        let read = endpoints::role_read(client, &mount, &role.name);
        let Some(current) =
            read_or_postpone(work, state, unchanged, "role_read", stage, &object, read).await?
        else {
            return Ok(());
        };
        let want = KubernetesRole {
            bound_service_account_names: role.bound_service_account_names.clone(),
            bound_service_account_namespaces: role.bound_service_account_namespaces.clone(),
            token_policies: role.token_policies.clone(),
            token_ttl: role.token_ttl,
            token_max_ttl: role.token_max_ttl,
            token_no_default_policy: true,
        };
        if current.as_ref() != Some(&want) {
            let why = if current.is_some() {
                "it was changed outside Portcullis or the plan changed; writing the planned binding"
            } else {
                "binding it to the stage's ServiceAccount"
            };
            let mut e = work.entry(
                AuditAction::RoleWritten,
                stage,
                object.clone(),
                format!(
                    "{object}: {why} (bound to {}/{}, policy {}, token TTL {}s, max {}s)",
                    work.namespace,
                    role.bound_service_account_names.join(","),
                    role.token_policies.join(","),
                    role.token_ttl,
                    role.token_max_ttl
                ),
            );
            e.subject = side.subject(&role.stage);
            work.record(e).await?;
            let write = endpoints::role_write(client, &mount, &role.name, &want);
            work.call("role_write", stage, &object, write).await?;
            info!(role = %role.name, "wrote a Vault Kubernetes-auth role");
        }
    }
    delete_unplanned(work, client, state, side, "no longer planned").await?;
    let digest = self::digest(side, state, &mount);
    work.vault
        .checked
        .lock()
        .expect("checked lock")
        .insert(work.uid.clone(), (digest, std::time::Instant::now()));
    Ok(())
}

/// Reads a policy or role. For a plan unchanged since the last check that is a check that can
/// wait: `None` (postponed, not marked as checked) when a renewal of the pipeline is near or no
/// call slot comes free.
async fn read_or_postpone<T>(
    work: &Work<'_>,
    state: &VaultState,
    unchanged: bool,
    operation: &str,
    stage: Option<&str>,
    object: &str,
    read: impl std::future::Future<Output = Result<T, vaultrs::error::ClientError>>,
) -> Result<Option<T>> {
    if !unchanged {
        return work.call(operation, stage, object, read).await.map(Some);
    }
    if work.renewal_near(state) {
        return Ok(None);
    }
    work.check(operation, stage, object, read).await
}

/// A digest of what [`converge`] puts in place: the planned policies and roles and the names
/// recorded as the pipeline's (the ones to delete when no longer planned).
fn digest(side: &VaultSide, state: &VaultState, mount: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    mount.hash(&mut h);
    for p in &side.vault.policies {
        (&p.name, p.hcl()).hash(&mut h);
    }
    format!("{:?}", side.vault.roles).hash(&mut h);
    (&state.policies, &state.roles).hash(&mut h);
    h.finish()
}

/// Before the operator records a policy or role name as its own, the object of that name must
/// not exist in Vault as someone else's: a policy must carry this stage's ownership header
/// ([`crate::plan::VaultPolicy::owns`]) and a role this stage's policy. Names it recorded are
/// its own, and drift in them is reverted.
async fn claim_unrecorded(
    work: &Work<'_>,
    client: &VaultClient,
    side: &VaultSide,
    state: &VaultState,
    mount: &str,
) -> Result<()> {
    for policy in side
        .vault
        .policies
        .iter()
        .filter(|p| !state.policies.contains(&p.name))
    {
        let object = format!("Vault policy {}", policy.name);
        let stage = Some(policy.stage.as_str());
        let current = work
            .call(
                "policy_read",
                stage,
                &object,
                endpoints::policy_read(client, &policy.name),
            )
            .await?;
        if current.as_deref().is_some_and(|e| !policy.owns(e)) {
            return Err(not_owned(work, stage, object).await);
        }
    }
    for role in side
        .vault
        .roles
        .iter()
        .filter(|r| !state.roles.contains(&r.name))
    {
        let object = format!("Vault role auth/{mount}/role/{}", role.name);
        let stage = Some(role.stage.as_str());
        let current = work
            .call(
                "role_read",
                stage,
                &object,
                endpoints::role_read(client, mount, &role.name),
            )
            .await?;
        if current
            .as_ref()
            .is_some_and(|e| !role.owns(&e.token_policies))
        {
            return Err(not_owned(work, stage, object).await);
        }
    }
    Ok(())
}

/// Records that `object` exists in Vault and is not Portcullis's for this stage, and returns
/// the problem (or the decision log's error when it could not be recorded).
async fn not_owned(work: &Work<'_>, stage: Option<&str>, object: String) -> Error {
    let problem = VaultProblem::ObjectNotOwned {
        object: object.clone(),
    };
    let entry = work.entry(AuditAction::VaultFailed, stage, object, problem.to_string());
    match work.record(entry).await {
        Ok(()) => Error::Vault(problem),
        Err(log) => log,
    }
}

/// A policy or role Portcullis wrote and no longer plans.
enum Unplanned {
    Role(String),
    Policy(String),
}

/// Records, then deletes the roles and policies `side` no longer has, and forgets them.
pub(super) async fn delete_unplanned(
    work: &Work<'_>,
    client: &VaultClient,
    state: &mut VaultState,
    side: &VaultSide,
    why: &str,
) -> Result<()> {
    let mount = work.vault.session.config().workload_auth_mount.clone();
    let roles = state
        .roles
        .iter()
        .filter(|n| !side.vault.roles.iter().any(|r| &r.name == *n))
        .cloned()
        .map(Unplanned::Role);
    let policies = state
        .policies
        .iter()
        .filter(|n| !side.vault.policies.iter().any(|p| &p.name == *n))
        .cloned()
        .map(Unplanned::Policy);
    // Roles first: a role never points at a policy that is already gone.
    let targets: Vec<Unplanned> = roles.chain(policies).collect();
    for target in targets {
        let (object, operation) = match &target {
            Unplanned::Role(name) => (
                format!("Vault role auth/{mount}/role/{name}"),
                "role_delete",
            ),
            Unplanned::Policy(name) => (format!("Vault policy {name}"), "policy_delete"),
        };
        work.record(work.entry(
            AuditAction::Prune,
            None,
            object.clone(),
            format!("deleting {object}: {why}"),
        ))
        .await?;
        match &target {
            Unplanned::Role(name) => {
                work.call(
                    operation,
                    None,
                    &object,
                    endpoints::role_delete(client, &mount, name),
                )
                .await?;
                state.roles.remove(name);
            }
            Unplanned::Policy(name) => {
                work.call(
                    operation,
                    None,
                    &object,
                    endpoints::policy_delete(client, name),
                )
                .await?;
                state.policies.remove(name);
            }
        }
        work.save(state).await?;
    }
    Ok(())
}
