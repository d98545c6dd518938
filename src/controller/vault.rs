//! One AIPipeline's Vault side: its stages' ACL policies and Kubernetes-auth roles, and the
//! credentials delivered as Secrets (issued, renewed, replaced, revoked), and the clean-up that
//! the `portcullis.dev/vault-cleanup` finalizer holds deletion for.
//!
//! What the operator has created in Vault for a pipeline (policy and role names, lease ids) is
//! kept in a Secret in the operator's own namespace, `portcullis-vault-<pipeline uid>`: workloads
//! and pipeline owners cannot read lease ids there, and a restarted operator knows what to renew
//! and what to clean up. Names are added there before they are written in Vault, and lease ids
//! right after Vault returns them, so the state Secret never misses what exists in Vault.
//!
//! Every Vault action is recorded in the decision log before it is made; failures after.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{ApiResource, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};
use vaultrs::client::VaultClient;

use super::metrics::VaultLabels;
use super::{Context, Error, Result};
use crate::api::{AIPipeline, CredentialStatus, WorkloadKind};
use crate::audit::{Action as AuditAction, Entry};
use crate::k8s::{FIELD_MANAGER, MANAGED_BY, PIPELINE_LABEL, STAGE_LABEL};
use crate::plan::{CredentialRequest, Plan};
use crate::vault::endpoints::{self, KubernetesRole};
use crate::vault::leases::{self, LeaseRecord, Step};
use crate::vault::{Session, VaultError};

/// Held on every AIPipeline with Vault state until that state is gone from Vault.
pub const FINALIZER: &str = "portcullis.dev/vault-cleanup";
/// The pod-template annotation that restarts a workload.
pub const RESTARTED_AT: &str = "portcullis.dev/restarted-at";

/// Settings and state shared by every pipeline's Vault work.
pub struct VaultCtx {
    pub session: Arc<Session>,
    /// How long replaced credentials stay valid (after their consumers' restart).
    pub grace: chrono::Duration,
    /// A workload is restarted at most once per this interval.
    pub restart_min_interval: chrono::Duration,
    /// At most this many workload restarts per minute, over all pipelines.
    pub max_restarts_per_minute: usize,
    /// Policies and roles are compared with Vault at least this often.
    pub resync: std::time::Duration,
    /// The credential Secrets (metadata, by label), in the watched namespaces.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    states: tokio::sync::Mutex<HashMap<String, VaultState>>,
    restarts: Mutex<VecDeque<Instant>>,
}

impl VaultCtx {
    pub fn new(
        session: Arc<Session>,
        grace: chrono::Duration,
        restart_min_interval: chrono::Duration,
        max_restarts_per_minute: usize,
        resync: std::time::Duration,
        secrets: Store<PartialObjectMeta<Secret>>,
    ) -> VaultCtx {
        VaultCtx {
            session,
            grace,
            restart_min_interval,
            max_restarts_per_minute,
            resync,
            secrets,
            states: tokio::sync::Mutex::default(),
            restarts: Mutex::default(),
        }
    }

    /// Drops the cached state of pipelines no longer in `live` (uids).
    pub async fn forget_deleted(&self, live: &std::collections::HashSet<String>) {
        self.states.lock().await.retain(|uid, _| live.contains(uid));
    }

    /// Takes one restart from the global budget, if any is left this minute.
    fn take_restart(&self) -> bool {
        let mut window = self.restarts.lock().expect("restart lock");
        let now = Instant::now();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) > std::time::Duration::from_secs(60))
        {
            window.pop_front();
        }
        if window.len() >= self.max_restarts_per_minute {
            return false;
        }
        window.push_back(now);
        true
    }
}

/// What the operator has in Vault for one pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VaultState {
    #[serde(default)]
    pub policies: BTreeSet<String>,
    #[serde(default)]
    pub roles: BTreeSet<String>,
    #[serde(default)]
    pub leases: Vec<LeaseRecord>,
}

impl VaultState {
    fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.roles.is_empty() && self.leases.is_empty()
    }
}

/// What the Vault side of a reconcile came to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VaultOutcome {
    /// Why Vault is not in the state the plan asks for.
    pub error: Option<VaultProblem>,
    /// Per stage, its delivered credentials.
    pub credentials: Vec<(String, CredentialStatus)>,
    /// How many credentials are requested.
    pub requested: usize,
    /// How many of them are delivered with a lease that has not expired.
    pub live: usize,
    /// When to look again.
    pub wake: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VaultProblem {
    /// `VaultUnavailable`, `VaultRefused`, `VaultLoginFailed`, `VaultNotConfigured`,
    /// `SecretNotOwned` or `KubernetesError`.
    pub reason: &'static str,
    pub message: String,
}

fn problem(e: &VaultError) -> VaultProblem {
    VaultProblem {
        reason: match e {
            VaultError::Unavailable(_) => "VaultUnavailable",
            VaultError::Refused(_) => "VaultRefused",
            VaultError::Login(_) => "VaultLoginFailed",
            VaultError::Kube(_) => "KubernetesError",
        },
        message: e.to_string(),
    }
}

/// Whether the plan or what is held for the pipeline involves Vault.
pub fn involved(plan: &Plan, pipeline: &AIPipeline) -> bool {
    !plan.vault_policies.is_empty()
        || !plan.credentials.is_empty()
        || pipeline.finalizers().iter().any(|f| f == FINALIZER)
}

fn state_secret_name(uid: &str) -> String {
    format!("portcullis-vault-{uid}")
}

/// One pipeline's Vault work, with what it needs from the reconcile.
struct Work<'a> {
    ctx: &'a Context,
    vault: &'a VaultCtx,
    namespace: String,
    name: String,
    uid: String,
    generation: Option<i64>,
}

impl<'a> Work<'a> {
    fn new(ctx: &'a Context, vault: &'a VaultCtx, pipeline: &AIPipeline) -> Work<'a> {
        Work {
            ctx,
            vault,
            namespace: pipeline.namespace().unwrap_or_default(),
            name: pipeline.name_any(),
            uid: pipeline.uid().unwrap_or_default(),
            generation: pipeline.metadata.generation,
        }
    }

    fn entry(
        &self,
        action: AuditAction,
        stage: Option<&str>,
        object: String,
        message: String,
    ) -> Entry {
        let mut e = Entry::new(action, &self.namespace, &self.name, message);
        e.stage = stage.map(str::to_string);
        e.object = Some(object);
        e.generation = self.generation;
        e
    }

    async fn record(&self, entry: Entry) -> Result<()> {
        self.ctx.record(vec![entry]).await
    }

    /// Records a failed Vault call and turns it into the outcome's problem.
    async fn failed(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: String,
        e: VaultError,
    ) -> Result<VaultProblem> {
        self.count(operation, e.label());
        warn!(pipeline = %self.name, namespace = %self.namespace, operation, error = %e, "a Vault call failed");
        self.record(self.entry(AuditAction::VaultFailed, stage, object, e.to_string()))
            .await?;
        Ok(problem(&e))
    }

    fn count(&self, operation: &str, result: &str) {
        self.ctx
            .metrics
            .vault_operations
            .get_or_create(&VaultLabels {
                operation: operation.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Caches the pipeline's state, and moves the lease gauge by the change in its lease count.
    async fn keep(&self, state: &VaultState) {
        let previous = self
            .vault
            .states
            .lock()
            .await
            .insert(self.uid.clone(), state.clone())
            .map_or(0, |s| s.leases.len());
        self.ctx
            .metrics
            .credential_leases
            .inc_by(state.leases.len() as i64 - previous as i64);
    }

    async fn load(&self) -> Result<VaultState> {
        if let Some(s) = self.vault.states.lock().await.get(&self.uid) {
            return Ok(s.clone());
        }
        let api: Api<Secret> = Api::namespaced(
            self.ctx.client.clone(),
            &self.vault.session.config().state_namespace,
        );
        let secret = api
            .get_opt(&state_secret_name(&self.uid))
            .await
            .map_err(Error::Kube)?;
        let state = match secret.and_then(|s| s.data).and_then(|d| d.get("state.json").cloned()) {
            Some(bytes) => serde_json::from_slice(&bytes.0).map_err(|e| {
                Error::Apply(format!(
                    "the Vault state Secret {} is unreadable ({e}); restore it from a backup, or delete it and revoke this pipeline's leases by hand",
                    state_secret_name(&self.uid)
                ))
            })?,
            None => VaultState::default(),
        };
        self.keep(&state).await;
        Ok(state)
    }

    async fn save(&self, state: &VaultState) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(
            self.ctx.client.clone(),
            &self.vault.session.config().state_namespace,
        );
        let name = state_secret_name(&self.uid);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    (
                        "app.kubernetes.io/component".to_string(),
                        "vault-state".to_string(),
                    ),
                ])),
                annotations: Some(BTreeMap::from([(
                    "portcullis.dev/pipeline".to_string(),
                    format!("{}/{}", self.namespace, self.name),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "state.json".to_string(),
                ByteString(serde_json::to_vec(state).expect("state serializes")),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let mut value = serde_json::to_value(&secret).expect("a Secret serializes");
        value["apiVersion"] = json!("v1");
        value["kind"] = json!("Secret");
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
        .map_err(Error::Kube)?;
        self.keep(state).await;
        Ok(())
    }
}

/// Puts the plan's Vault side in place. Errors are Kubernetes or decision-log errors; Vault
/// failures are in the outcome (recorded, and retried at the returned wake time).
pub async fn reconcile(
    ctx: &Context,
    vault: Option<&VaultCtx>,
    pipeline: &AIPipeline,
    plan: &Plan,
    owner: &OwnerReference,
) -> Result<VaultOutcome> {
    let mut outcome = VaultOutcome {
        requested: plan.credentials.len(),
        ..VaultOutcome::default()
    };
    let Some(vault) = vault else {
        if !plan.vault_policies.is_empty() || !plan.credentials.is_empty() {
            outcome.error = Some(VaultProblem {
                reason: "VaultNotConfigured",
                message: "the stages ask for Vault access, but the operator runs without --vault-address; nothing was written to Vault".into(),
            });
        }
        return Ok(outcome);
    };
    let work = Work::new(ctx, vault, pipeline);
    let mut state = work.load().await?;
    if !pipeline.finalizers().iter().any(|f| f == FINALIZER) {
        add_finalizer(ctx, pipeline).await?;
    }

    let result = {
        let client = match vault.session.client().await {
            Ok(c) => c,
            Err(e) => {
                outcome.error = Some(
                    work.failed("login", None, "Vault session".into(), e)
                        .await?,
                );
                (outcome.credentials, outcome.live) = delivered(plan, &state);
                outcome.wake = Some(Utc::now() + chrono::Duration::seconds(5));
                return Ok(outcome);
            }
        };
        converge(&work, &client, plan, owner, &mut state, &mut outcome).await
    };
    if let Err(problem) = result? {
        if problem.reason == "VaultRefused" {
            // A refused call may mean the operator's token is gone; check it outside the call.
            vault.session.check_token().await;
        }
        outcome.error = Some(problem);
        outcome.wake = Some(Utc::now() + chrono::Duration::seconds(5));
    }
    (outcome.credentials, outcome.live) = delivered(plan, &state);
    Ok(outcome)
}

/// The delivered credentials for the status, and how many of them have a lease that has not
/// expired.
fn delivered(plan: &Plan, state: &VaultState) -> (Vec<(String, CredentialStatus)>, usize) {
    let now = Utc::now();
    let mut live = 0;
    let statuses = plan
        .credentials
        .iter()
        .filter_map(|r| {
            let lease = state
                .leases
                .iter()
                .find(|l| l.is_current() && l.stage == r.stage && l.credential == r.name)?;
            live += usize::from(lease.expires_at > now);
            Some((
                r.stage.clone(),
                CredentialStatus {
                    name: r.name.clone(),
                    secret_name: Some(r.secret_name.clone()),
                    lease_expires_at: Some(rfc3339(lease.expires_at)),
                    rotated_at: Some(rfc3339(lease.issued_at)),
                    lease_hash: Some(leases::lease_hash(&lease.lease_id)),
                },
            ))
        })
        .collect();
    (statuses, live)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The Vault steps; `Ok(Err(problem))` when Vault failed (recorded already).
async fn converge(
    work: &Work<'_>,
    client: &VaultClient,
    plan: &Plan,
    owner: &OwnerReference,
    state: &mut VaultState,
    outcome: &mut VaultOutcome,
) -> Result<Result<(), VaultProblem>> {
    let mount = work.vault.session.config().workload_auth_mount.clone();
    let subject = |stage: &str| {
        plan.stages.iter().find(|s| s.name == stage).map(|s| {
            format!(
                "system:serviceaccount:{}:{}",
                work.namespace, s.service_account
            )
        })
    };
    macro_rules! vault_call {
        ($operation:expr, $stage:expr, $object:expr, $call:expr) => {
            match $call.await {
                Ok(v) => {
                    work.count($operation, "ok");
                    v
                }
                Err(e) => {
                    let e = VaultError::from_client($operation, e);
                    return Ok(Err(work.failed($operation, $stage, $object, e).await?));
                }
            }
        };
    }

    // 1. Policies and roles: names kept before they are written.
    let names_new = plan
        .vault_policies
        .iter()
        .any(|p| !state.policies.contains(&p.name))
        || plan
            .vault_roles
            .iter()
            .any(|r| !state.roles.contains(&r.name));
    if names_new {
        state
            .policies
            .extend(plan.vault_policies.iter().map(|p| p.name.clone()));
        state
            .roles
            .extend(plan.vault_roles.iter().map(|r| r.name.clone()));
        work.save(state).await?;
    }
    for policy in &plan.vault_policies {
        let object = format!("Vault policy {}", policy.name);
        let current = vault_call!(
            "policy_read",
            Some(&policy.stage),
            object.clone(),
            endpoints::policy_read(client, &policy.name)
        );
        if current.as_deref() != Some(policy.hcl.as_str()) {
            let why = if current.is_some() {
                "it was changed outside Portcullis or the plan changed; writing the planned rules"
            } else {
                "writing the stage's allowed paths"
            };
            let mut e = work.entry(
                AuditAction::PolicyWritten,
                Some(&policy.stage),
                object.clone(),
                format!("{object}: {why}"),
            );
            e.subject = subject(&policy.stage);
            work.record(e).await?;
            vault_call!(
                "policy_write",
                Some(&policy.stage),
                object.clone(),
                endpoints::policy_write(client, &policy.name, &policy.hcl)
            );
            info!(policy = %policy.name, "wrote a Vault policy");
        }
    }
    for role in &plan.vault_roles {
        let object = format!("Vault role auth/{mount}/role/{}", role.name);
        let want = KubernetesRole {
            bound_service_account_names: role.bound_service_account_names.clone(),
            bound_service_account_namespaces: role.bound_service_account_namespaces.clone(),
            token_policies: role.token_policies.clone(),
            token_ttl: role.token_ttl,
            token_max_ttl: role.token_max_ttl,
            token_no_default_policy: true,
        };
        let current = vault_call!(
            "role_read",
            Some(&role.stage),
            object.clone(),
            endpoints::role_read(client, &mount, &role.name)
        );
        if current.as_ref() != Some(&want) {
            let why = if current.is_some() {
                "it was changed outside Portcullis or the plan changed; writing the planned binding"
            } else {
                "binding it to the stage's ServiceAccount"
            };
            let mut e = work.entry(
                AuditAction::RoleWritten,
                Some(&role.stage),
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
            e.subject = subject(&role.stage);
            work.record(e).await?;
            vault_call!(
                "role_write",
                Some(&role.stage),
                object.clone(),
                endpoints::role_write(client, &mount, &role.name, &want)
            );
            info!(role = %role.name, "wrote a Vault Kubernetes-auth role");
        }
    }
    // Prune what is no longer planned: delete in Vault, then forget.
    if let Err(p) = delete_unplanned(work, client, state, plan, "no longer planned").await? {
        return Ok(Err(p));
    }

    // 2. Credentials.
    let secrets_of = |name: &str| {
        work.vault
            .secrets
            .get(&ObjectRef::new(name).within(&work.namespace))
            .filter(|s| s.owner_references().iter().any(|o| o.uid == work.uid))
    };
    let (steps, mut wake) = leases::due(Utc::now(), &plan.credentials, &state.leases, |name| {
        secrets_of(name).is_some()
    });
    for step in steps {
        match step {
            Step::Issue {
                request,
                replaces,
                why,
            } => {
                let r = &plan.credentials[request];
                let object = format!("credential {}/{} ({})", r.stage, r.name, r.path);
                if secrets_of(&r.secret_name).is_none() {
                    let api: Api<Secret> =
                        Api::namespaced(work.ctx.client.clone(), &work.namespace);
                    if let Some(existing) = api
                        .get_metadata_opt(&r.secret_name)
                        .await
                        .map_err(Error::Kube)?
                        && !existing
                            .owner_references()
                            .iter()
                            .any(|o| o.uid == work.uid)
                    {
                        let message = format!(
                            "Secret {}/{} exists and is not this pipeline's; no credentials were issued for {object}. Delete or rename that Secret, or choose another secretName",
                            work.namespace, r.secret_name
                        );
                        let mut e = work.entry(
                            AuditAction::AdoptionRefused,
                            Some(&r.stage),
                            format!("Secret {}/{}", work.namespace, r.secret_name),
                            message.clone(),
                        );
                        e.subject = subject(&r.stage);
                        work.record(e).await?;
                        return Ok(Err(VaultProblem {
                            reason: "SecretNotOwned",
                            message,
                        }));
                    }
                }
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
                let mut e = work.entry(action, Some(&r.stage), object.clone(), message);
                e.subject = subject(&r.stage);
                work.record(e).await?;
                let issued = vault_call!(
                    "issue",
                    Some(&r.stage),
                    object.clone(),
                    endpoints::read_credentials(client, &r.path)
                );
                let now = Utc::now();
                let ttl = chrono::Duration::seconds(r.ttl as i64);
                let expires_at = leases::planned_expiry(
                    now,
                    chrono::Duration::seconds(issued.lease_duration as i64),
                    ttl,
                );
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
                    restart_pending: replaces.is_some() && !r.restart_targets.is_empty(),
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
                    let _ = endpoints::lease_revoke(client, &issued.lease_id).await;
                    state.leases.retain(|l| l.lease_id != issued.lease_id);
                    return Err(e);
                }
                write_credential_secret(work, r, &record, Some(&issued.data), owner).await?;
                info!(stage = %r.stage, credential = %r.name, secret = %r.secret_name, lease = %leases::lease_hash(&issued.lease_id), "issued credentials");
                wake = earliest(wake, record.renew_at);
            }
            Step::Renew { lease_id, request } => {
                let r = &plan.credentials[request];
                let hash = leases::lease_hash(&lease_id);
                let object = format!("credential {}/{} ({})", r.stage, r.name, r.path);
                let mut e = work.entry(
                    AuditAction::CredentialRenewed,
                    Some(&r.stage),
                    object.clone(),
                    format!("renewing lease {hash} by {}s", r.ttl),
                );
                e.subject = subject(&r.stage);
                work.record(e).await?;
                let renewed = match endpoints::lease_renew(client, &lease_id, r.ttl).await {
                    Ok(v) => {
                        work.count("renew", "ok");
                        Some(v)
                    }
                    Err(vaultrs::error::ClientError::APIError {
                        code: 400 | 404,
                        errors,
                    }) => {
                        // The lease is gone (expired, revoked, or its token was): replace it.
                        work.count("renew", "refused");
                        work.record(work.entry(
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
                        return Ok(Err(work.failed("renew", Some(&r.stage), object, e).await?));
                    }
                };
                let now = Utc::now();
                let Some(l) = state.leases.iter_mut().find(|l| l.lease_id == lease_id) else {
                    continue;
                };
                match renewed {
                    Some(renewed) => {
                        let ttl = chrono::Duration::seconds(r.ttl as i64);
                        l.expires_at = leases::planned_expiry(
                            now,
                            chrono::Duration::seconds(renewed.lease_duration as i64),
                            ttl,
                        );
                        l.renewable = renewed.renewable;
                        // Vault cut the renewal short: the max TTL is near. Replace the lease
                        // now, while it still has time left for the grace period.
                        l.replace_next =
                            leases::cut_short(renewed.lease_duration, r.ttl, l.granted_seconds);
                        l.renew_at = if l.replace_next {
                            now
                        } else {
                            leases::renew_at(now, l.expires_at - now, &lease_id)
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
                write_credential_secret(work, r, &record, None, owner).await?;
                wake = earliest(wake, record.renew_at);
            }
            Step::Revoke { lease_id, why } => {
                let stage = state
                    .leases
                    .iter()
                    .find(|l| l.lease_id == lease_id)
                    .map(|l| l.stage.clone())
                    .unwrap_or_default();
                if let Err(p) = revoke(work, client, state, &lease_id, why, subject(&stage)).await?
                {
                    return Ok(Err(p));
                }
            }
        }
    }

    // 3. Secrets of credentials no longer requested.
    let api: Api<Secret> = Api::namespaced(work.ctx.client.clone(), &work.namespace);
    for secret in work.vault.secrets.state() {
        let ours = secret.namespace().as_deref() == Some(work.namespace.as_str())
            && secret.owner_references().iter().any(|o| o.uid == work.uid)
            && secret.labels().get(PIPELINE_LABEL) == Some(&work.name);
        if ours
            && !plan
                .credentials
                .iter()
                .any(|r| r.secret_name == secret.name_any())
        {
            let object = format!("Secret {}/{}", work.namespace, secret.name_any());
            work.record(work.entry(
                AuditAction::Prune,
                secret.labels().get(STAGE_LABEL).map(String::as_str),
                object.clone(),
                format!("deleting {object}: its credential is no longer requested"),
            ))
            .await?;
            match api
                .delete(&secret.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }

    // 4. Restart the consumers of replaced credentials.
    let pending: Vec<usize> = state
        .leases
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_current() && l.restart_pending)
        .map(|(i, _)| i)
        .collect();
    for i in pending {
        let lease = state.leases[i].clone();
        let Some(r) = plan
            .credentials
            .iter()
            .find(|r| r.stage == lease.stage && r.name == lease.credential)
        else {
            continue;
        };
        match restart_targets(work, r).await? {
            None => {
                state.leases[i].restart_pending = false;
                work.save(state).await?;
            }
            Some(retry_at) => wake = earliest(wake, retry_at),
        }
    }

    outcome.wake = earliest(
        wake,
        Utc::now()
            + chrono::Duration::from_std(work.vault.resync).unwrap_or(chrono::Duration::minutes(5)),
    );
    Ok(Ok(()))
}

fn earliest(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Writes the credential Secret: the data keys of Vault's response (strings as they are, other
/// values as JSON), and annotations with the lease's expiry and hash. Without `data`, only the
/// annotations change (a renewal).
async fn write_credential_secret(
    work: &Work<'_>,
    r: &CredentialRequest,
    lease: &LeaseRecord,
    data: Option<&serde_json::Map<String, Value>>,
    owner: &OwnerReference,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(work.ctx.client.clone(), &work.namespace);
    let annotations = BTreeMap::from([
        (
            "portcullis.dev/lease-expires-at".to_string(),
            rfc3339(lease.expires_at),
        ),
        (
            "portcullis.dev/lease-hash".to_string(),
            leases::lease_hash(&lease.lease_id),
        ),
        (
            "portcullis.dev/issued-at".to_string(),
            rfc3339(lease.issued_at),
        ),
        ("portcullis.dev/source-path".to_string(), r.path.clone()),
    ]);
    let Some(data) = data else {
        let patch = json!({"metadata": {"annotations": annotations}});
        return match api
            .patch(
                &r.secret_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        };
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(r.secret_name.clone()),
            namespace: Some(work.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (PIPELINE_LABEL.to_string(), work.name.clone()),
                (STAGE_LABEL.to_string(), r.stage.clone()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| {
                    let bytes = match v {
                        Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    (k.clone(), ByteString(bytes))
                })
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(&secret).expect("a Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    api.patch(
        &r.secret_name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Restarts a credential's restart targets (a pod-template annotation), unless one was
/// restarted less than the minimum interval ago or the minute's budget is spent: then
/// `Some(when to try again)`. Missing targets are skipped.
async fn restart_targets(work: &Work<'_>, r: &CredentialRequest) -> Result<Option<DateTime<Utc>>> {
    let now = Utc::now();
    let apis: Vec<(String, Api<DynamicObject>)> = r
        .restart_targets
        .iter()
        .map(|t| {
            let resource = match t.kind {
                WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
                WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
                WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
            };
            (
                t.name.clone(),
                Api::namespaced_with(work.ctx.client.clone(), &work.namespace, &resource),
            )
        })
        .collect();
    // Wait for the slowest target's interval, so that all restart together.
    let mut present = Vec::new();
    for ((name, api), target) in apis.iter().zip(&r.restart_targets) {
        let Some(object) = api.get_opt(name).await.map_err(Error::Kube)? else {
            warn!(kind = ?target.kind, name, "a restart target does not exist; skipping it");
            continue;
        };
        let last = object.data["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        if let Some(last) = last
            && last + work.vault.restart_min_interval > now
        {
            return Ok(Some(last + work.vault.restart_min_interval));
        }
        present.push((name, api, target));
    }
    for (name, api, target) in present {
        if !work.vault.take_restart() {
            return Ok(Some(now + chrono::Duration::seconds(10)));
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: rfc3339(now)}}}}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        work.ctx.metrics.workload_restarts.inc();
        info!(kind = ?target.kind, name, stage = %r.stage, credential = %r.name, "restarted a workload for its new credentials");
    }
    Ok(None)
}

async fn add_finalizer(ctx: &Context, pipeline: &AIPipeline) -> Result<()> {
    let api: Api<AIPipeline> = Api::namespaced(
        ctx.client.clone(),
        &pipeline.namespace().unwrap_or_default(),
    );
    let mut finalizers = pipeline.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": pipeline.resource_version()}});
    api.patch(
        &pipeline.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// A deleted pipeline: revoke its leases, delete its roles and policies, forget its state, and
/// let the deletion go on. `Ok(Some(problem))` while Vault is unreachable (retried).
pub async fn finalize(
    ctx: &Context,
    vault: Option<&VaultCtx>,
    pipeline: &AIPipeline,
) -> Result<Option<VaultProblem>> {
    if !pipeline.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(None);
    }
    if let Some(vault) = vault {
        let work = Work::new(ctx, vault, pipeline);
        let mut state = work.load().await?;
        if !state.is_empty() {
            let result = {
                let client = match vault.session.client().await {
                    Ok(c) => c,
                    Err(e) => {
                        return Ok(Some(
                            work.failed("login", None, "Vault session".into(), e)
                                .await?,
                        ));
                    }
                };
                clean(&work, &client, &mut state).await?
            };
            if let Err(problem) = result {
                return Ok(Some(problem));
            }
        }
        let api: Api<Secret> =
            Api::namespaced(ctx.client.clone(), &vault.session.config().state_namespace);
        match api
            .delete(&state_secret_name(&work.uid), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Kube(e)),
        }
        vault.states.lock().await.remove(&work.uid);
    } else {
        // Removing the finalizer now would abandon live leases, policies and roles: keep it
        // and say what to do.
        return Ok(Some(VaultProblem {
            reason: "VaultNotConfigured",
            message: format!(
                "the pipeline's leases, Vault policies and roles are still in Vault, and the operator runs without --vault-address: run it with Vault to clean them up, or remove the finalizer {FINALIZER} by hand to abandon them"
            ),
        }));
    }
    let api: Api<AIPipeline> = Api::namespaced(
        ctx.client.clone(),
        &pipeline.namespace().unwrap_or_default(),
    );
    let finalizers: Vec<&String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": pipeline.resource_version()}});
    match api
        .patch(
            &pipeline.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn clean(
    work: &Work<'_>,
    client: &VaultClient,
    state: &mut VaultState,
) -> Result<Result<(), VaultProblem>> {
    let ids: Vec<String> = state.leases.iter().map(|l| l.lease_id.clone()).collect();
    for id in ids {
        if let Err(p) = revoke(work, client, state, &id, "the pipeline is deleted", None).await? {
            return Ok(Err(p));
        }
    }
    delete_unplanned(
        work,
        client,
        state,
        &Plan::default(),
        "the pipeline is deleted",
    )
    .await
}

/// Records, then revokes a lease and forgets it.
async fn revoke(
    work: &Work<'_>,
    client: &VaultClient,
    state: &mut VaultState,
    lease_id: &str,
    why: &str,
    subject: Option<String>,
) -> Result<Result<(), VaultProblem>> {
    let Some(lease) = state
        .leases
        .iter()
        .find(|l| l.lease_id == lease_id)
        .cloned()
    else {
        return Ok(Ok(()));
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
    e.subject = subject;
    work.record(e).await?;
    if let Err(e) = endpoints::lease_revoke(client, lease_id).await {
        let e = VaultError::from_client("revoke", e);
        return Ok(Err(work
            .failed("revoke", Some(&lease.stage), object, e)
            .await?));
    }
    work.count("revoke", "ok");
    state.leases.retain(|l| l.lease_id != lease_id);
    work.save(state).await?;
    Ok(Ok(()))
}

/// Records, then deletes the roles and policies the plan no longer has, and forgets them.
async fn delete_unplanned(
    work: &Work<'_>,
    client: &VaultClient,
    state: &mut VaultState,
    plan: &Plan,
    why: &str,
) -> Result<Result<(), VaultProblem>> {
    let mount = work.vault.session.config().workload_auth_mount.clone();
    let roles: Vec<String> = state
        .roles
        .iter()
        .filter(|n| !plan.vault_roles.iter().any(|r| &r.name == *n))
        .cloned()
        .collect();
    let policies: Vec<String> = state
        .policies
        .iter()
        .filter(|n| !plan.vault_policies.iter().any(|p| &p.name == *n))
        .cloned()
        .collect();
    // Roles first: a role never points at a policy that is already gone.
    let targets = roles
        .into_iter()
        .map(|n| (true, n))
        .chain(policies.into_iter().map(|n| (false, n)));
    for (is_role, name) in targets {
        let (object, operation) = if is_role {
            (
                format!("Vault role auth/{mount}/role/{name}"),
                "role_delete",
            )
        } else {
            (format!("Vault policy {name}"), "policy_delete")
        };
        work.record(work.entry(
            AuditAction::Prune,
            None,
            object.clone(),
            format!("deleting {object}: {why}"),
        ))
        .await?;
        let result = if is_role {
            endpoints::role_delete(client, &mount, &name).await
        } else {
            endpoints::policy_delete(client, &name).await
        };
        if let Err(e) = result {
            let e = VaultError::from_client(operation, e);
            return Ok(Err(work.failed(operation, None, object, e).await?));
        }
        work.count(operation, "ok");
        if is_role {
            state.roles.remove(&name);
        } else {
            state.policies.remove(&name);
        }
        work.save(state).await?;
    }
    Ok(Ok(()))
}
