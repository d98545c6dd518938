//! One AIPipeline's Vault side: its stages' ACL policies and Kubernetes-auth roles
//! ([`policies`]), the credentials delivered as Secrets, issued, renewed, replaced and revoked
//! ([`credentials`], [`secrets`]), the restarts of their consumers ([`restarts`]), and the
//! clean-up that the `portcullis.dev/vault-cleanup` finalizer holds deletion for
//! ([`finalizer`]).
//!
//! What the operator has created in Vault for a pipeline (policy and role names, lease ids) is
//! kept in a Secret in the operator's own namespace ([`state`]): workloads and pipeline owners
//! cannot read lease ids there, and a restarted operator knows what to renew and what to clean
//! up. Names are added there before they are written in Vault, and lease ids right after Vault
//! returns them, so the state Secret never misses what exists in Vault.
//!
//! Every Vault action is recorded in the decision log before it is made; failures after. A
//! failed Vault call is an [`Error::Vault`]: the step stops there, and [`reconcile`] turns it
//! into the outcome's problem (shown in the status, retried with backoff). Kubernetes and
//! decision-log errors end the reconcile.

pub(crate) mod credentials;
pub(crate) mod finalizer;
pub(crate) mod policies;
pub(crate) mod restarts;
pub(crate) mod secrets;
pub(crate) mod state;
pub(crate) mod sweep;
pub(crate) mod token;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};
use vaultrs::error::ClientError;

use super::metrics::VaultLabels;
use super::status::{Problem, Reason, VaultSummary};
use super::{Category, Context, Error, Result};
use crate::api::{AIPipeline, CredentialStatus};
use crate::audit::{Action as AuditAction, Entry};
use crate::k8s::{OwnerReference, PartialObjectMeta, ResourceExt, Secret, Store};
use crate::plan::{Plan, VaultPlan};
use crate::vault::{Session, VaultError, VaultErrorKind};

pub(crate) use finalizer::{FINALIZER, finalize};
use state::VaultState;
use token::SecretTokenStore;

/// The operator's Vault session, its token kept in a Secret.
pub(crate) type VaultSession = Session<SecretTokenStore>;

/// The bounded slots for Vault calls (`--vault-max-concurrent-requests`), with some kept for
/// renewals, revocations and lease lookups (`--vault-reserved-requests`). Each call is bounded
/// by `--vault-request-timeout`, so a slow or silent Vault holds a slot for at most that long;
/// a call that waits that long for a slot is not made (see [`Work::slot`]).
struct CallSlots {
    any: tokio::sync::Semaphore,
    keepalive: tokio::sync::Semaphore,
    shared: usize,
    reserved: usize,
}

impl CallSlots {
    fn new(max: usize, reserved: usize) -> CallSlots {
        // The flags are checked at start (`vault::check_call_slots`); here only kept sane.
        let reserved = reserved.clamp(1, max.max(2) - 1);
        let shared = max.max(2) - reserved;
        CallSlots {
            any: tokio::sync::Semaphore::new(shared),
            keepalive: tokio::sync::Semaphore::new(reserved),
            shared,
            reserved,
        }
    }

    /// How many slots a call of this kind may take.
    fn open_to(&self, keepalive: bool) -> usize {
        if keepalive {
            self.shared + self.reserved
        } else {
            self.shared
        }
    }

    /// A slot for one call: renewals, revocations and lookups take a reserved one or a shared
    /// one, whichever is free first; other calls wait for a shared one.
    async fn acquire(&self, keepalive: bool) -> tokio::sync::SemaphorePermit<'_> {
        let permit = if keepalive {
            tokio::select! {
                biased;
                p = self.keepalive.acquire() => p,
                p = self.any.acquire() => p,
            }
        } else {
            self.any.acquire().await
        };
        permit.expect("the call slots are never closed")
    }
}

/// Whether a Vault operation keeps delivered credentials alive or ends them: it goes first.
fn keeps_alive(operation: &str) -> bool {
    matches!(operation, "renew" | "revoke" | "lookup" | "sweep_revoke")
}

/// Settings and state shared by every pipeline's Vault work.
pub(crate) struct VaultCtx {
    pub session: Arc<VaultSession>,
    /// The operator's own namespace, where the pipelines' state Secrets live.
    pub state_namespace: String,
    /// How long replaced credentials stay valid (after their consumers' restart).
    pub grace: chrono::Duration,
    /// Policies and roles are compared with Vault at least this often.
    pub resync: std::time::Duration,
    /// The credential Secrets (metadata, by label), in the watched namespaces.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// The prefix of the Vault policy and role names (`--vault-name-prefix`).
    pub name_prefix: String,
    restarts: restarts::Restarts,
    slots: CallSlots,
    states: tokio::sync::Mutex<HashMap<String, state::Kept>>,
    /// The pipelines of this operator, for the sweep to know every lease recorded.
    pipelines: std::sync::OnceLock<Store<AIPipeline>>,
    /// Whether leases no pipeline recorded are swept (not when sharded).
    sweep: bool,
    /// When each credentials path was last swept.
    swept: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Per pipeline uid, the session generation under which its leases were last looked up.
    verified: std::sync::Mutex<HashMap<String, u64>>,
    /// Per pipeline uid, what its policies and roles were last found in Vault as planned
    /// (a digest of the planned objects and the recorded names) and when: they are read again
    /// when that changes or `resync` has passed, not on every reconcile.
    checked: std::sync::Mutex<HashMap<String, (u64, std::time::Instant)>>,
    /// Per pipeline uid whose last reconcile ended with a Vault problem, when its next renewal
    /// (or revocation) is due: the retry's backoff never waits past it.
    due: std::sync::Mutex<HashMap<String, DateTime<Utc>>>,
}

impl VaultCtx {
    pub(crate) fn new(
        session: Arc<VaultSession>,
        state_namespace: String,
        grace: chrono::Duration,
        restart_min_interval: chrono::Duration,
        max_restarts_per_minute: usize,
        resync: std::time::Duration,
        secrets: Store<PartialObjectMeta<Secret>>,
    ) -> VaultCtx {
        let slots = CallSlots::new(
            session.config().max_concurrent_requests,
            session.config().reserved_requests,
        );
        VaultCtx {
            session,
            state_namespace,
            grace,
            resync,
            secrets,
            name_prefix: crate::plan::names::DEFAULT_VAULT_NAME_PREFIX.to_string(),
            restarts: restarts::Restarts::new(restart_min_interval, max_restarts_per_minute),
            slots,
            states: tokio::sync::Mutex::default(),
            pipelines: std::sync::OnceLock::new(),
            sweep: true,
            swept: std::sync::Mutex::default(),
            verified: std::sync::Mutex::default(),
            checked: std::sync::Mutex::default(),
            due: std::sync::Mutex::default(),
        }
    }

    /// The retry delay after a failed reconcile of pipeline `uid`: `backoff`, but no later than
    /// its next renewal or revocation, so one failing credential (its retries backing off to
    /// minutes) never lets the pipeline's other leases run out.
    pub(crate) fn retry_within_schedule(
        &self,
        uid: &str,
        backoff: std::time::Duration,
    ) -> std::time::Duration {
        let Some(due) = self.due.lock().expect("due lock").remove(uid) else {
            return backoff;
        };
        let until = (due - Utc::now())
            .to_std()
            .unwrap_or_default()
            .max(std::time::Duration::from_millis(500));
        backoff.min(until)
    }

    /// The operator's pipelines: the sweep starts once it has them.
    pub(crate) fn set_pipelines(&self, pipelines: Store<AIPipeline>) {
        let _ = self.pipelines.set(pipelines);
    }

    /// No sweep: a sharded operator cannot see the other shards' leases.
    pub(crate) fn without_sweep(mut self) -> VaultCtx {
        self.sweep = false;
        self
    }

    /// Drops the cached state of pipelines no longer in `live` (uids).
    pub(crate) async fn forget_deleted(&self, live: &std::collections::HashSet<String>) {
        self.states.lock().await.retain(|uid, _| live.contains(uid));
        self.verified
            .lock()
            .expect("verified lock")
            .retain(|uid, _| live.contains(uid));
        self.checked
            .lock()
            .expect("checked lock")
            .retain(|uid, _| live.contains(uid));
        self.due
            .lock()
            .expect("due lock")
            .retain(|uid, _| live.contains(uid));
    }
}

/// Why Vault is not in the state the plan asks for.
#[derive(Debug, thiserror::Error)]
pub enum VaultProblem {
    /// A Vault call (or the operator's login) failed.
    #[error(transparent)]
    Call(#[from] VaultError),
    /// The credential's Secret exists and belongs to someone else.
    #[error(
        "Secret {namespace}/{name} exists and is not this pipeline's; no credentials were issued for {credential}. Delete or rename that Secret, or choose another secretName"
    )]
    SecretNotOwned {
        namespace: String,
        name: String,
        /// `credential <stage>/<name> (<path>)`
        credential: String,
    },
    /// A Vault policy or role of the planned name exists and was not written by Portcullis for
    /// this stage: it is left alone.
    #[error(
        "{object} exists in Vault and was not written by Portcullis for this stage, so it was left alone; remove or rename it in Vault, or run the operator with another --vault-name-prefix"
    )]
    ObjectNotOwned { object: String },
    /// The stages ask for Vault, and the operator runs without it.
    #[error(
        "the stages ask for Vault access, but the operator runs without --vault-address; nothing was written to Vault"
    )]
    NotConfigured,
    /// A deleted pipeline holds Vault state, and the operator runs without Vault.
    #[error(
        "the pipeline's leases, Vault policies and roles are still in Vault, and the operator runs without --vault-address: run it with Vault to clean them up, or remove the finalizer {FINALIZER} by hand to abandon them"
    )]
    CleanupNotConfigured,
}

impl VaultProblem {
    /// The condition reason that shows it.
    pub fn reason(&self) -> Reason {
        match self {
            VaultProblem::Call(e) => match e.kind() {
                VaultErrorKind::Unavailable => Reason::VaultUnavailable,
                VaultErrorKind::Refused => Reason::VaultRefused,
                VaultErrorKind::Login => Reason::VaultLoginFailed,
                VaultErrorKind::TokenStore => Reason::KubernetesError,
                VaultErrorKind::Busy => Reason::VaultBusy,
            },
            VaultProblem::SecretNotOwned { .. } => Reason::SecretNotOwned,
            VaultProblem::ObjectNotOwned { .. } => Reason::VaultRefused,
            VaultProblem::NotConfigured | VaultProblem::CleanupNotConfigured => {
                Reason::VaultNotConfigured
            }
        }
    }

    pub fn category(&self) -> Category {
        match self {
            VaultProblem::Call(e) => match e.kind() {
                VaultErrorKind::Unavailable | VaultErrorKind::TokenStore => Category::Unavailable,
                VaultErrorKind::Refused | VaultErrorKind::Login => Category::Refused,
                // Nothing failed: the queue was long. Retried soon, not backed off to minutes.
                VaultErrorKind::Busy => Category::Transient,
            },
            VaultProblem::SecretNotOwned { .. } | VaultProblem::ObjectNotOwned { .. } => {
                Category::Refused
            }
            VaultProblem::NotConfigured | VaultProblem::CleanupNotConfigured => Category::Invalid,
        }
    }

    /// The problem as a condition shows it.
    pub fn to_status(&self) -> Problem {
        Problem {
            reason: self.reason(),
            message: self.to_string(),
        }
    }
}

/// What the Vault side of a reconcile came to.
#[derive(Debug, Default)]
pub(crate) struct VaultOutcome {
    /// Why Vault is not in the state the plan asks for.
    pub problem: Option<VaultProblem>,
    /// Per stage, its delivered credentials.
    pub credentials: Vec<(String, CredentialStatus)>,
    /// How many credentials are requested.
    pub requested: usize,
    /// How many of them are delivered with a lease that has not expired.
    pub live: usize,
    /// When to look again.
    pub wake: Option<DateTime<Utc>>,
}

impl VaultOutcome {
    /// The outcome as the status shows it.
    pub(crate) fn summary(&self) -> VaultSummary {
        VaultSummary {
            problem: self.problem.as_ref().map(VaultProblem::to_status),
            credentials: self.credentials.clone(),
            requested: self.requested,
            live: self.live,
        }
    }
}

/// The Vault side of a plan. This is the one place the controller reads the plan's Vault
/// fields; every Vault step works from it.
#[derive(Debug, Clone, Default)]
pub(crate) struct VaultSide {
    pub vault: VaultPlan,
    /// Per stage, its ServiceAccount's user name: the subject of its decision-log records.
    subjects: BTreeMap<String, String>,
}

impl VaultSide {
    pub(crate) fn of(plan: &Plan) -> VaultSide {
        VaultSide {
            vault: plan.vault.clone(),
            subjects: plan
                .stages
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        format!(
                            "system:serviceaccount:{}:{}",
                            plan.namespace, s.service_account
                        ),
                    )
                })
                .collect(),
        }
    }

    /// Whether the plan asks anything of Vault.
    pub(crate) fn asks_for_vault(&self) -> bool {
        !self.vault.policies.is_empty() || !self.vault.credentials.is_empty()
    }

    /// Only what belongs to the stages `keep` keeps.
    pub(crate) fn only_stages(self, keep: impl Fn(&str) -> bool) -> VaultSide {
        VaultSide {
            vault: self.vault.for_stages(keep),
            subjects: self.subjects,
        }
    }

    fn subject(&self, stage: &str) -> Option<String> {
        self.subjects.get(stage).cloned()
    }
}

/// Whether the plan or what is held for the pipeline involves Vault.
pub(crate) fn involved(side: &VaultSide, pipeline: &AIPipeline) -> bool {
    side.asks_for_vault() || finalizer::holds(pipeline)
}

/// One pipeline's Vault work, with what it needs from the reconcile.
struct Work<'a> {
    ctx: &'a Context,
    vault: &'a VaultCtx,
    namespace: String,
    name: String,
    uid: String,
    generation: Option<i64>,
    /// The `portcullis.dev/rotate-now` annotation's value.
    rotate_now: Option<String>,
    /// The pipeline, for its Events.
    reference: crate::k8s::ObjectReference,
}

impl<'a> Work<'a> {
    /// Whether one more Vault call (a wait for a slot, then the call, each bounded by the
    /// request timeout) could run into the next renewal of the pipeline's leases
    /// ([`crate::vault::leases::renewal_near`]). Checks that can wait (policies and roles of an
    /// unchanged plan, the sweep) do not start then, so a renewal is never held up behind
    /// them: it goes first, and the check follows right after.
    fn renewal_near(&self, state: &state::VaultState) -> bool {
        let bound = chrono::Duration::from_std(self.vault.session.config().request_timeout * 2)
            .unwrap_or_default();
        crate::vault::leases::renewal_near(&state.leases, Utc::now(), bound)
    }

    fn new(ctx: &'a Context, vault: &'a VaultCtx, pipeline: &AIPipeline) -> Work<'a> {
        Work {
            ctx,
            vault,
            namespace: pipeline.namespace().unwrap_or_default(),
            name: pipeline.name_any(),
            uid: pipeline.uid().unwrap_or_default(),
            generation: pipeline.metadata.generation,
            rotate_now: pipeline
                .annotations()
                .get(crate::plan::names::ROTATE_NOW_ANNOTATION)
                .cloned(),
            reference: crate::k8s::Resource::object_ref(pipeline, &()),
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
        e.pipeline_uid = Some(self.uid.clone());
        e
    }

    async fn record(&self, entry: Entry) -> Result<()> {
        self.ctx.record(vec![entry]).await
    }

    /// Records a renewal, a revocation or a failure, which go ahead even while the decision log
    /// cannot be written (their records are then held and appended late).
    async fn record_keepalive(&self, entry: Entry) -> Result<()> {
        self.ctx.record_keepalive(vec![entry]).await
    }

    /// Records `entry`, the intent of a Vault action (such as `renew <lease>`), before it is
    /// made, unless the action retries one whose last attempt failed: that is in the log
    /// already, from its first attempt, and the attempt is counted instead (see
    /// [`Work::attempted`]).
    async fn record_intent(&self, intent: &str, entry: Entry, keepalive: bool) -> Result<()> {
        if crate::controller::record::intent_retried(self.ctx, &self.uid, intent) {
            return Ok(());
        }
        if keepalive {
            self.record_keepalive(entry).await
        } else {
            self.record(entry).await
        }
    }

    /// After an attempt at the action `intent`: a failed Vault call is counted (its retry not
    /// recorded again); an answer after failed attempts returns how many failed, for the
    /// record that closes the intent (0: none, nothing to record).
    fn attempted<T>(&self, intent: &str, result: &Result<T>) -> u32 {
        match result {
            Err(e) => {
                self.attempt_failed(intent, e);
                0
            }
            Ok(_) => self.attempt_answered(intent),
        }
    }

    /// An attempt at the action `intent` failed; a failed Vault call is counted.
    fn attempt_failed(&self, intent: &str, e: &Error) {
        if matches!(e, Error::Vault(_)) {
            crate::controller::record::intent_failed(self.ctx, &self.uid, intent);
        }
    }

    /// Vault answered an attempt at the action `intent`: how many attempts failed before.
    fn attempt_answered(&self, intent: &str) -> u32 {
        crate::controller::record::intent_done(self.ctx, &self.uid, intent)
    }

    /// Makes one Vault call: counted, and when it fails, recorded and returned as
    /// [`Error::Vault`].
    async fn call<T>(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: &str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T> {
        let slot = self.slot(operation, stage, object).await?;
        self.made(operation, stage, object, slot, call).await
    }

    /// A check that can wait (a policy or role of an unchanged plan, read again at resync):
    /// made as [`Work::call`] when a slot comes free within the request timeout. When none
    /// does, it is postponed and `None` returned: counted with the result `busy`, but not a
    /// failure of the pipeline, for what the last check found in place stands until the next.
    async fn check<T>(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: &str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<Option<T>> {
        let Some(slot) = self.wait_for_slot(operation).await else {
            self.count(operation, "busy");
            debug!(pipeline = %self.name, namespace = %self.namespace, operation, object, "a check of Vault was postponed: no call slot came free");
            return Ok(None);
        };
        self.made(operation, stage, object, slot, call)
            .await
            .map(Some)
    }

    /// Makes a call in the slot it was given: counted, and when it fails, recorded.
    async fn made<T>(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: &str,
        slot: tokio::sync::SemaphorePermit<'a>,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let result = call.await;
        drop(slot);
        self.ctx.metrics.observe_vault(operation, started.elapsed());
        match result {
            Ok(v) => {
                self.count(operation, "ok");
                self.succeeded(operation, object);
                Ok(v)
            }
            Err(e) => Err(self
                .failed(
                    operation,
                    stage,
                    object.to_string(),
                    VaultError::from_client(operation, e),
                )
                .await),
        }
    }

    /// Records a failed Vault call. The error to return: the Vault problem, or the decision
    /// log's if the failure could not be recorded.
    async fn failed(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: String,
        e: VaultError,
    ) -> Error {
        self.count(operation, e.label());
        warn!(pipeline = %self.name, namespace = %self.namespace, operation, error = %e, "a Vault call failed");
        // A failure that repeats is recorded once, with how often it repeated when it changes.
        let call = format!("{operation} {object}");
        let Some(message) =
            crate::controller::record::vault_failure(self.ctx, &self.uid, &call, &e.to_string())
        else {
            return Error::Vault(VaultProblem::Call(e));
        };
        // The Event follows the record: once per change of outcome.
        super::events::warn(
            &self.ctx.recorder(),
            &self.reference,
            super::events::EventReason::VaultFailed,
            format!("{object}: {message}"),
        )
        .await;
        match self
            .record_keepalive(self.entry(AuditAction::VaultFailed, stage, object, message))
            .await
        {
            Ok(()) => Error::Vault(VaultProblem::Call(e)),
            Err(log) => log,
        }
    }

    /// A Vault call succeeded: its next failure is recorded again.
    fn succeeded(&self, operation: &str, object: &str) {
        if let Some(times) = crate::controller::record::vault_success(
            self.ctx,
            &self.uid,
            &format!("{operation} {object}"),
        ) {
            info!(pipeline = %self.name, namespace = %self.namespace, operation, object, failed_times = times, "a Vault call that was failing succeeded");
        }
    }

    /// A slot for one Vault call (see [`CallSlots`]), waited for at most as long as one call
    /// may take: if every slot the call may take stays busy that long, Vault is slow and the
    /// queue long, and the call is not made. That is a failure of the call (recorded once,
    /// counted with the result `busy`), shown as the problem of its credential or pipeline
    /// (reason `VaultBusy`) and retried, so a pipeline that waits says so.
    async fn slot(
        &self,
        operation: &str,
        stage: Option<&str>,
        object: &str,
    ) -> Result<tokio::sync::SemaphorePermit<'a>> {
        let started = std::time::Instant::now();
        match self.wait_for_slot(operation).await {
            Some(permit) => Ok(permit),
            None => {
                let keepalive = keeps_alive(operation);
                let busy = VaultError::Busy {
                    operation: operation.to_string(),
                    slots: self.vault.slots.open_to(keepalive),
                    waited: started.elapsed(),
                };
                Err(self
                    .failed(operation, stage, object.to_string(), busy)
                    .await)
            }
        }
    }

    /// Waits for a slot for `operation` at most as long as one call may take (measured);
    /// `None` if none came free.
    async fn wait_for_slot(&self, operation: &str) -> Option<tokio::sync::SemaphorePermit<'a>> {
        let slots: &'a CallSlots = &self.vault.slots;
        let bound = self.vault.session.config().request_timeout;
        let metrics = &self.ctx.metrics;
        let started = std::time::Instant::now();
        metrics.vault_slots.waiting.inc();
        let acquired = tokio::time::timeout(bound, slots.acquire(keeps_alive(operation))).await;
        metrics.vault_slots.waiting.dec();
        metrics
            .vault_slots
            .wait
            .get_or_create(&super::metrics::OperationLabels {
                operation: operation.into(),
            })
            .observe(started.elapsed().as_secs_f64());
        acquired.ok()
    }

    /// Makes one Vault call in a slot, however long it waits for one, without the counting and
    /// recording of [`Work::call`]: for the revocation of a lease that could not be kept, which
    /// must not be skipped.
    async fn slotted<T>(&self, operation: &str, call: impl Future<Output = T>) -> T {
        let _slot = self.vault.slots.acquire(keeps_alive(operation)).await;
        call.await
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
}

/// Puts the Vault side of the plan in place. Errors are Kubernetes or decision-log errors;
/// Vault problems are in the outcome (recorded, and retried at the returned wake time).
pub(crate) async fn reconcile(
    ctx: &Context,
    pipeline: &AIPipeline,
    side: &VaultSide,
    owner: &OwnerReference,
) -> Result<VaultOutcome> {
    let mut outcome = VaultOutcome {
        requested: side.vault.credentials.len(),
        ..VaultOutcome::default()
    };
    let Some(vault) = ctx.vault.as_ref() else {
        if side.asks_for_vault() {
            outcome.problem = Some(VaultProblem::NotConfigured);
        }
        return Ok(outcome);
    };
    let work = Work::new(ctx, vault, pipeline);
    let mut state = work.load().await?;
    let lost = finalizer::holds(pipeline)
        && state.is_empty()
        && !side.vault.credentials.is_empty()
        && !work.has_state_secret().await;
    if lost {
        lost_state(&work, side).await?;
    }
    if !finalizer::holds(pipeline) {
        finalizer::add(ctx, pipeline).await?;
    }
    let mut held = secrets::held(&work, side);
    let mut problems = credentials::CredentialProblems::default();
    let settled = settled(pipeline, side);
    let mut converged = converge(
        &work,
        side,
        owner,
        &mut state,
        &mut held,
        &mut problems,
        settled,
    )
    .await;
    if token_lost(vault, &converged).await {
        // The operator's token died while it ran (revoked, or expired), and with it every lease
        // it created: the refused calls said so. Go again at once with a new login, so that
        // the leases are looked up, found gone and replaced now, and the status never reports
        // them delivered.
        problems = credentials::CredentialProblems::default();
        converged = converge(
            &work,
            side,
            owner,
            &mut state,
            &mut held,
            &mut problems,
            false,
        )
        .await;
    }
    match converged {
        Ok((wake, None)) => outcome.wake = wake,
        Ok((wake, Some(problem))) => {
            // Retried with backoff, but the other credentials' schedule is kept.
            if let Some(wake) = wake {
                vault
                    .due
                    .lock()
                    .expect("due lock")
                    .insert(work.uid.clone(), wake);
            }
            outcome.problem = Some(problem);
            outcome.wake = wake;
        }
        Err(Error::Vault(problem)) => {
            outcome.problem = Some(problem);
            outcome.wake = Some(Utc::now() + chrono::Duration::seconds(5));
        }
        Err(other) => return Err(other),
    }
    (outcome.credentials, outcome.live) = credentials::delivered(side, &state, &held, &problems);
    Ok(outcome)
}

/// Whether a Vault call of `converged` was refused because the operator's token is gone: a
/// refused call may mean that, so the token is checked (outside the call) and dropped if Vault
/// no longer knows it; the next call logs in again.
async fn token_lost(
    vault: &VaultCtx,
    converged: &Result<(Option<DateTime<Utc>>, Option<VaultProblem>)>,
) -> bool {
    let refused = match converged {
        Ok((_, Some(problem))) | Err(Error::Vault(problem)) => {
            problem.reason() == Reason::VaultRefused
        }
        _ => false,
    };
    refused && vault.session.check_token().await
}

/// The pipeline holds Vault state (its finalizer says so) but its state Secret is gone
/// (deleted, or lost with a restore of the cluster): the leases it recorded are unknown, still
/// live, and their credentials still in use. New credentials are issued (the Secrets holding
/// unknown credentials get them, their consumers restarted), and the credentials paths are swept
/// one grace period later, revoking the old leases. Recorded, never silent.
async fn lost_state(work: &Work<'_>, side: &VaultSide) -> Result<()> {
    let paths: std::collections::BTreeSet<&str> = side
        .vault
        .credentials
        .iter()
        .map(|r| r.path.as_str())
        .collect();
    let paths: Vec<&str> = paths.into_iter().collect();
    warn!(pipeline = %work.name, namespace = %work.namespace, "the pipeline's Vault state Secret is gone; re-issuing its credentials, restarting their consumers and sweeping the old leases");
    work.record_keepalive(work.entry(
        AuditAction::VaultFailed,
        None,
        format!("Secret {}/portcullis-vault-{}", work.vault.state_namespace, work.uid),
        format!(
            "the pipeline's Vault state Secret is gone, and with it the record of its leases: issuing new credentials, restarting their consumers, and sweeping the unrecorded leases under {} after {}s",
            paths.join(", "),
            work.vault.grace.num_seconds()
        ),
    ))
    .await?;
    if work.vault.sweep {
        sweep::sweep_after(work, side, work.vault.grace.to_std().unwrap_or_default());
    }
    Ok(())
}

/// Whether the pipeline's status says that its last reconcile, of this generation, had every
/// credential delivered and no Vault problem: then a status that only moves the renewed
/// expiries is as true as a full reconcile's.
fn settled(pipeline: &AIPipeline, side: &VaultSide) -> bool {
    use super::status::types;
    let Some(status) = pipeline.status.as_ref() else {
        return false;
    };
    let credentials: Vec<&CredentialStatus> =
        status.stages.iter().flat_map(|s| &s.credentials).collect();
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.as_str())
    };
    status.observed_generation == pipeline.metadata.generation
        && credentials.len() == side.vault.credentials.len()
        && credentials
            .iter()
            .all(|c| c.problem.is_none() && c.lease_hash.is_some())
        && condition(types::VAULT_SYNCED) == Some("True")
        && condition(types::CREDENTIALS_READY) == Some("True")
}

/// The Vault steps in order: renewals first (they keep what is delivered alive), then policies
/// and roles, then the other credential steps, the Secrets, the sweep and the restarts. A
/// failed Vault call of one step, or of one credential (in `problems`), does not stop the
/// others; the first such problem is returned with when to come back. When the pipeline was
/// `settled` and a lease was renewed, it stops after the renewals: the status shows the new
/// expiry at once, and the rest follows in the next reconcile, right after.
async fn converge(
    work: &Work<'_>,
    side: &VaultSide,
    owner: &OwnerReference,
    state: &mut VaultState,
    held: &mut secrets::Held,
    problems: &mut credentials::CredentialProblems,
    settled: bool,
) -> Result<(Option<DateTime<Utc>>, Option<VaultProblem>)> {
    let client = match work.vault.session.client().await {
        Ok(client) => client,
        Err(e) => return Err(work.failed("login", None, "Vault session".into(), e).await),
    };
    let before: Vec<DateTime<Utc>> = state.leases.iter().map(|l| l.expires_at).collect();
    credentials::converge(
        work,
        &client,
        side,
        owner,
        state,
        held,
        credentials::Pass::Renewals,
        problems,
    )
    .await?;
    let renewed = state
        .leases
        .iter()
        .zip(&before)
        .any(|(l, was)| l.expires_at > *was);
    if settled && renewed && problems.first.is_none() {
        return Ok((Some(Utc::now()), None));
    }
    let mut problem = vault_problem(policies::converge(work, &client, side, state).await)?;
    let wake = credentials::converge(
        work,
        &client,
        side,
        owner,
        state,
        held,
        credentials::Pass::All,
        problems,
    )
    .await?;
    secrets::prune(work, side).await?;
    if problem.is_none() {
        problem = vault_problem(sweep::converge(work, &client, side, state).await)?;
    }
    let wake = restarts::converge(work, side, state, wake).await?;
    // A sweep brought forward (after a lost state) is due before the resync.
    let wake = match sweep::next_due(work, side) {
        Some(due) => earliest(wake, due),
        None => wake,
    };
    let problem = problem.or_else(|| problems.first.take());
    Ok((
        earliest(
            wake,
            Utc::now()
                + chrono::Duration::from_std(work.vault.resync)
                    .unwrap_or(chrono::Duration::minutes(5)),
        ),
        problem,
    ))
}

/// A step's Vault problem, taken out of its result; other errors stay errors.
fn vault_problem(result: Result<()>) -> Result<Option<VaultProblem>> {
    match result {
        Ok(()) => Ok(None),
        Err(Error::Vault(problem)) => Ok(Some(problem)),
        Err(other) => Err(other),
    }
}

/// The lease ids in the cached states.
async fn recorded_leases(vault: &VaultCtx) -> Vec<String> {
    vault
        .states
        .lock()
        .await
        .values()
        .flat_map(|k| k.state.leases.iter().map(|l| l.lease_id.clone()))
        .collect()
}

fn earliest(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.min(b)))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{CredentialRequest, VaultPolicy};

    fn call(code: u16) -> VaultProblem {
        VaultProblem::Call(VaultError::from_client(
            "issue",
            ClientError::APIError {
                code,
                errors: vec!["x".into()],
            },
        ))
    }

    #[test]
    fn each_problem_has_its_condition_reason_and_retry_category() {
        assert_eq!(call(503).reason(), Reason::VaultUnavailable);
        assert_eq!(call(503).category(), Category::Unavailable);
        assert_eq!(call(403).reason(), Reason::VaultRefused);
        assert_eq!(call(403).category(), Category::Refused);
        let not_owned = VaultProblem::SecretNotOwned {
            namespace: "ml".into(),
            name: "db".into(),
            credential: "credential ingest/db (database/creds/x)".into(),
        };
        assert_eq!(not_owned.reason(), Reason::SecretNotOwned);
        assert_eq!(
            not_owned.to_status().message,
            "Secret ml/db exists and is not this pipeline's; no credentials were issued for credential ingest/db (database/creds/x). Delete or rename that Secret, or choose another secretName"
        );
        for p in [
            VaultProblem::NotConfigured,
            VaultProblem::CleanupNotConfigured,
        ] {
            assert_eq!(p.reason(), Reason::VaultNotConfigured);
            assert_eq!(p.category(), Category::Invalid);
        }
        // The reconcile's error says "Vault: " and the problem, as the status does.
        assert_eq!(
            Error::Vault(call(403)).to_string(),
            format!("Vault: {}", call(403))
        );
    }

    #[tokio::test]
    async fn renewals_get_a_slot_while_other_calls_hold_every_shared_one() {
        let slots = CallSlots::new(3, 1);
        assert_eq!((slots.open_to(false), slots.open_to(true)), (2, 3));
        let _issues = (slots.acquire(false).await, slots.acquire(false).await);
        // A third issue waits; a renewal takes the reserved slot.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), slots.acquire(false)).await;
        assert!(waiting.is_err(), "no shared slot is free");
        let renewal = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            slots.acquire(keeps_alive("renew")),
        )
        .await;
        assert!(renewal.is_ok(), "the reserved slot is free for a renewal");
        assert!(!keeps_alive("issue") && !keeps_alive("policy_write"));
        // Flags out of range are kept sane: one slot of each kind at least.
        let slots = CallSlots::new(1, 5);
        assert_eq!((slots.shared, slots.reserved), (1, 1));
    }

    #[test]
    fn a_call_without_a_slot_is_busy_and_retried_soon() {
        let busy = VaultProblem::Call(VaultError::Busy {
            operation: "issue".into(),
            slots: 12,
            waited: std::time::Duration::from_secs(10),
        });
        assert_eq!(busy.reason(), Reason::VaultBusy);
        assert_eq!(busy.category(), Category::Transient);
        assert!(
            busy.to_string()
                .starts_with("waiting for a Vault call slot: issue was not sent, all 12 slots it may take stayed busy for 10s"),
            "{busy}"
        );
    }

    #[test]
    fn the_vault_side_keeps_only_the_stages_asked_for() {
        let side = VaultSide {
            vault: VaultPlan {
                policies: vec![VaultPolicy {
                    name: "p".into(),
                    namespace: "ml".into(),
                    pipeline: "fraud".into(),
                    stage: "ingest".into(),
                    rules: Vec::new(),
                }],
                roles: Vec::new(),
                credentials: vec![CredentialRequest {
                    stage: "train".into(),
                    name: "db".into(),
                    path: "database/creds/x".into(),
                    ttl: 60,
                    secret_name: "db".into(),
                    restart_targets: Vec::new(),
                }],
            },
            ..VaultSide::default()
        };
        assert!(side.asks_for_vault());
        let side = side.only_stages(|s| s == "train");
        assert!(side.vault.policies.is_empty());
        assert_eq!(side.vault.credentials.len(), 1);
        assert!(!side.only_stages(|_| false).asks_for_vault());
    }
}
