//! One AIPipeline's reconcile, as the pipeline it is:
//!
//! ```text
//! cleanup                                        (a deleted pipeline: its Vault state)
//!   | plan -> record -> apply -> vault -> status (every other)
//! ```
//!
//! Each step is a named function with a typed outcome: [`cleanup()`] an `Action`, [`plan()`] a
//! `Plan` (or the spec's errors), [`record()`](super::record::record) what is now in the
//! decision log ([`Recorded`]), [`apply()`] what became of the managed objects ([`Applied`]),
//! [`vault()`] the Vault side ([`VaultOutcome`]), and [`status()`] the status it writes and what
//! the reconcile returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tracing::{info, warn};

use super::apply::{Applier, Change, Intent};
use super::error::{ApplyFailure, ApplyFailures};
use super::events::{self, EventReason};
use super::metrics::{Metrics, ResultLabels};
use super::record::{self, Recorded};
use super::reports;
use super::status::{self, Reason};
use super::vault::{self, VaultOutcome, VaultSide};
use super::{Context, Error, Result};
use crate::api::{AIPipeline, AIPipelineStatus};
use crate::k8s::{
    Action, Api, FIELD_MANAGER, ObjectReference, OwnerReference, Patch, PatchParams, Recorder,
    Resource, ResourceExt, now,
};
use crate::plan::{self, Plan};

/// Reconciles one AIPipeline. Children are cleaned up by owner references when it is deleted.
#[tracing::instrument(skip_all, fields(pipeline = %pipeline.name_any(), namespace = pipeline.namespace().unwrap_or_default()))]
pub(crate) async fn reconcile(pipeline: Arc<AIPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.time_reconcile();
    if pipeline.meta().deletion_timestamp.is_some() {
        return cleanup(&ctx, &pipeline).await;
    }
    if !wait_synced(&ctx).await {
        // Planning before the guardrail cache is full would apply the defaults and prune what
        // the guardrails allow. The caches fill within seconds of start-up; when they do not
        // (the API server is slow or refusing), come back later rather than spin.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let mut target = Target::of(&ctx, &pipeline)?;
    if record::requested(&ctx, &pipeline, &target).await? {
        // Asked for: compare with the status as the API server has it, not as last written.
        ctx.statuses
            .lock()
            .expect("status lock")
            .remove(&target.uid);
        target = Target::of(&ctx, &pipeline)?;
    }
    // The Secrets and restart targets the spec names, as the cluster has them (issue 11,
    // classes 9 and 11): the plan refuses those that are not the pipeline's.
    let facts =
        super::ownership::cluster_facts(&ctx.client, &pipeline, &target.namespace, &target.uid)
            .await
            .map_err(Error::Kube)?;
    let plan = match plan(&ctx, &pipeline, &target, &facts) {
        Ok(plan) => plan,
        Err(errors) => return invalid(&ctx, &target, &errors).await,
    };
    if let Some(directory) = &ctx.access {
        directory.set_plan(&plan, &target.uid, pipeline.status.as_ref());
    }
    let owner = owner_reference(&pipeline)?;
    let applier = ctx.applier();
    let changes = applier
        .intents(&target.namespace, &plan.objects, &owner)
        .await?;
    let recorded = match record::record(&ctx, &target, &plan, &changes).await {
        Ok(recorded) => recorded,
        Err(Error::Audit(e)) => {
            // Nothing is applied without its record. The Vault step still runs: renewals of
            // what was granted go ahead (their records are held), anything new stops at its
            // own record.
            let _ = vault(&ctx, &pipeline, &plan, &Applied::default(), &owner).await;
            return log_unavailable(&ctx, &target, e).await;
        }
        Err(other) => return Err(other),
    };
    let applied = apply(&ctx, &target, &applier, &changes).await;
    record::applied(&ctx, &target.uid, &changes, !applied.failures.0.is_empty());
    let vault = match vault(&ctx, &pipeline, &plan, &applied, &owner).await {
        Err(Error::Audit(e)) => return log_unavailable(&ctx, &target, e).await,
        other => other?,
    };
    status(&ctx, &target, &plan, &owner, recorded, applied, vault).await
}

/// The decision log cannot be written: say so in the status, and fail (retried).
async fn log_unavailable(
    ctx: &Context,
    target: &Target,
    error: super::journal::JournalError,
) -> Result<Action> {
    let old = target.old_status.as_ref();
    let new = status::log_unavailable(&error.to_string(), target.generation, old, now());
    if let Err(e) = write_status(ctx, &target.namespace, &target.name, &target.uid, old, new).await
    {
        warn!(error = %e, "could not say in the status that the decision log cannot be written");
    }
    Err(Error::Audit(error))
}

/// Waits (at most 30 s) until the caches are synced; whether they are.
async fn wait_synced(ctx: &Context) -> bool {
    if ctx.synced.load(Ordering::Acquire) {
        return true;
    }
    // Registered before the flag is read again, so that a notification in between is not lost.
    let notified = ctx.synced_notify.notified();
    if ctx.synced.load(Ordering::Acquire) {
        return true;
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), notified).await;
    ctx.synced.load(Ordering::Acquire)
}

/// What every step needs to know of the pipeline being reconciled.
pub(crate) struct Target {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    /// The status last written: ours, when the cached AIPipeline predates our last write.
    pub old_status: Option<AIPipelineStatus>,
    pub recorder: Recorder,
    pub reference: ObjectReference,
}

impl Target {
    fn of(ctx: &Context, pipeline: &AIPipeline) -> Result<Target> {
        let uid = pipeline.uid().unwrap_or_default();
        let written = ctx.statuses.lock().expect("status lock").get(&uid).cloned();
        let old_status = match (written, pipeline.status.as_ref()) {
            (Some(w), Some(cached)) if cached.observed_generation <= w.observed_generation => {
                Some(w)
            }
            (Some(w), None) => Some(w),
            (_, cached) => cached.cloned(),
        };
        Ok(Target {
            namespace: pipeline.namespace().ok_or(Error::NotNamespaced)?,
            name: pipeline.name_any(),
            uid,
            generation: pipeline.meta().generation,
            old_status,
            recorder: ctx.recorder(),
            reference: pipeline.object_ref(&()),
        })
    }
}

/// The cleanup step, for a deleted pipeline: Kubernetes objects go by owner references;
/// Vault's are cleaned here, and the finalizer holds the deletion until they are.
async fn cleanup(ctx: &Context, pipeline: &AIPipeline) -> Result<Action> {
    match vault::finalize(ctx, pipeline).await {
        Ok(()) => Ok(Action::await_change()),
        Err(Error::Vault(problem)) => {
            let namespace = pipeline.namespace().ok_or(Error::NotNamespaced)?;
            let uid = pipeline.uid().unwrap_or_default();
            let old = pipeline.status.as_ref();
            let new = status::cleanup_pending(
                &problem.to_status(),
                pipeline.meta().generation,
                old,
                now(),
            );
            write_status(ctx, &namespace, &pipeline.name_any(), &uid, old, new).await?;
            Err(Error::Vault(problem))
        }
        Err(other) => Err(other),
    }
}

/// The plan step: the pipeline against the guardrails and its namespace's labels, from the
/// caches. Pure once they are read.
fn plan(
    ctx: &Context,
    pipeline: &AIPipeline,
    target: &Target,
    facts: &crate::policy::ClusterFacts,
) -> std::result::Result<Plan, Vec<String>> {
    let labels = ctx.namespace_labels(&target.namespace);
    let guardrails: Vec<_> = ctx
        .guardrails
        .state()
        .iter()
        .map(|g| (**g).clone())
        .collect();
    let claims = credential_claims(ctx, pipeline, &target.namespace);
    let options = plan::PlanOptions {
        vault_name_prefix: ctx
            .vault
            .as_ref()
            .map_or(plan::names::DEFAULT_VAULT_NAME_PREFIX, |v| {
                v.name_prefix.as_str()
            }),
        claims: Some(&claims),
        cluster: Some(facts),
    };
    plan::validate_and_build_with(pipeline, &target.namespace, &labels, &guardrails, options)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}

/// Who claimed this pipeline's credential paths and Secret names first, among the pipelines
/// the operator watches: the claim index names those that share one of them, so the others are
/// never looked at.
fn credential_claims(
    ctx: &Context,
    pipeline: &AIPipeline,
    namespace: &str,
) -> crate::policy::CredentialClaims {
    let has_credentials = pipeline
        .spec
        .stages
        .iter()
        .any(|s| s.vault.iter().any(|v| !v.credentials.is_empty()));
    if !has_credentials {
        return crate::policy::CredentialClaims::default();
    }
    let this = crate::k8s::ObjectRef::from_obj(pipeline);
    let others: Vec<Arc<AIPipeline>> = ctx
        .claims
        .sharing(pipeline)
        .iter()
        .filter(|r| **r != this)
        .filter_map(|r| ctx.pipelines.get(r))
        .collect();
    // The pipeline as this reconcile has it, whether or not the index has seen it yet.
    let sharing = others.iter().map(|p| &**p).chain(std::iter::once(pipeline));
    crate::policy::CredentialClaims::from_pipelines(sharing, namespace)
}

/// A spec that cannot be planned: say so in the status and an Event, and wait for the next
/// change; it never hot-loops.
async fn invalid(ctx: &Context, target: &Target, errors: &[String]) -> Result<Action> {
    let old = target.old_status.as_ref();
    let new = status::invalid(errors, target.generation, old, now());
    if old != Some(&new) {
        events::warn(
            &target.recorder,
            &target.reference,
            EventReason::InvalidSpec,
            errors.join("; "),
        )
        .await;
    }
    write_status(ctx, &target.namespace, &target.name, &target.uid, old, new).await?;
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: "invalid_spec".into(),
        })
        .inc();
    Ok(Action::await_change())
}

/// What the apply step came to.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Objects Portcullis refused to take over, as (stage, `Kind namespace/name`).
    pub refused: Vec<(String, String)>,
    /// Writes that failed.
    pub failures: ApplyFailures,
}

impl Applied {
    fn stage_refused(&self, stage: &str) -> bool {
        self.refused.iter().any(|(s, _)| s == stage)
    }
}

/// The apply step: makes the recorded changes, counts them, and announces refused adoptions
/// and reverted drift in Events.
async fn apply(
    ctx: &Context,
    target: &Target,
    applier: &Applier<'_>,
    changes: &[Change],
) -> Applied {
    let results = applier.execute(changes).await;
    let mut applied = Applied::default();
    for (change, result) in changes.iter().zip(results) {
        let kind = change.kind;
        match (&change.intent, result) {
            (Intent::RefuseAdoption, _) => {
                Metrics::kind(&ctx.metrics.adoptions_refused, kind);
                applied
                    .refused
                    .push((change.stage.clone(), change.object()));
                events::warn(
                    &target.recorder,
                    &target.reference,
                    EventReason::AdoptionRefused,
                    change.refusal(),
                )
                .await;
            }
            (intent, Some(error)) => {
                warn!(object = %change.object(), action = intent.action(), %error, "applying a managed object failed");
                applied.failures.0.push(ApplyFailure {
                    action: intent.action(),
                    object: change.object(),
                    source: error,
                });
            }
            (Intent::Prune { .. }, None) => Metrics::kind(&ctx.metrics.pruned, kind),
            (Intent::RevertDrift, None) => {
                Metrics::kind(&ctx.metrics.drift_reverts, kind);
                Metrics::kind(&ctx.metrics.applied, kind);
                info!(object = %change.object(), "reverted a change made outside Portcullis");
                events::warn(
                    &target.recorder,
                    &target.reference,
                    EventReason::DriftReverted,
                    format!(
                        "{} was changed or deleted outside Portcullis and was put back",
                        change.object()
                    ),
                )
                .await;
            }
            (_, None) => Metrics::kind(&ctx.metrics.applied, kind),
        }
    }
    applied
}

/// The Vault step: policies, roles and credentials, only for the stages whose identity was
/// applied (a stage refused for adoption gets no Vault role bound to a ServiceAccount name that
/// someone else owns). `None` when the pipeline does not involve Vault.
async fn vault(
    ctx: &Context,
    pipeline: &AIPipeline,
    plan: &Plan,
    applied: &Applied,
    owner: &OwnerReference,
) -> Result<Option<VaultOutcome>> {
    let side = VaultSide::of(plan);
    if !vault::involved(&side, pipeline) {
        return Ok(None);
    }
    let side = side.only_stages(|stage| !applied.stage_refused(stage));
    vault::reconcile(ctx, pipeline, &side, owner)
        .await
        .map(Some)
}

/// The status step: writes the status the steps came to, and turns what failed into the
/// reconcile's error (retried by category), or what is scheduled into when to come back.
async fn status(
    ctx: &Context,
    target: &Target,
    plan: &Plan,
    owner: &OwnerReference,
    recorded: Recorded,
    applied: Applied,
    vault: Option<VaultOutcome>,
) -> Result<Action> {
    let outcome = status::Outcome {
        refused: applied.refused,
        errors: applied.failures.0.iter().map(ToString::to_string).collect(),
        vault: vault.as_ref().map(VaultOutcome::summary),
    };
    let old = target.old_status.as_ref();
    let decided_anew = old.and_then(|s| s.recorded_decisions.as_deref()) != Some(&recorded.digest);
    let mut new = status::for_plan(plan, &outcome, target.generation, old, now());
    new.recorded_decisions = Some(recorded.digest);
    write_status(ctx, &target.namespace, &target.name, &target.uid, old, new).await?;
    if decided_anew && ctx.policy_reports.load(Ordering::Relaxed) {
        let report = reports::report(plan, owner, chrono::Utc::now().timestamp());
        if let Err(error) = reports::write(&ctx.client, &report).await {
            // Advisory: the decision log and the status hold the same; written again when the
            // decisions next change.
            warn!(%error, "could not write the pipeline's PolicyReport");
        }
    }

    if !applied.failures.0.is_empty() {
        return Err(Error::Apply(applied.failures));
    }
    let (problem, wake) = match vault {
        Some(v) => (v.problem, v.wake),
        None => (None, None),
    };
    if let Some(problem) = problem.filter(|p| p.reason() != Reason::VaultNotConfigured) {
        // Retried with backoff; the Secrets already delivered stay until their leases end.
        return Err(Error::Vault(problem));
    }
    ctx.failures
        .lock()
        .expect("failures lock")
        .remove(&target.uid);
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: "ok".into(),
        })
        .inc();
    Ok(match wake {
        // Credentials have a schedule: come back for the next renewal, revocation or retry.
        Some(at) => Action::requeue(
            (at - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
                .max(Duration::from_millis(500)),
        ),
        None => Action::await_change(),
    })
}

/// What `error_policy` does: count, log, and retry with a delay that depends on the error's
/// category.
pub(crate) fn error_policy(pipeline: Arc<AIPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut map = ctx.failures.lock().expect("failures lock");
        let n = map.entry(pipeline.uid().unwrap_or_default()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: error.metric_label().into(),
        })
        .inc();
    warn!(pipeline = %pipeline.name_any(), namespace = pipeline.namespace().unwrap_or_default(), %error, category = ?error.category(), "reconcile failed");
    let retry = error.retry_after(failures);
    Action::requeue(match ctx.vault.as_ref() {
        Some(vault) => vault.retry_within_schedule(&pipeline.uid().unwrap_or_default(), retry),
        None => retry,
    })
}

fn owner_reference(pipeline: &AIPipeline) -> Result<OwnerReference> {
    pipeline
        .controller_owner_ref(&())
        .ok_or(Error::NotNamespaced)
        .map(|mut r| {
            r.block_owner_deletion = Some(true);
            r
        })
}

/// Writes the status when it differs from what is there (steady state writes nothing).
async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    uid: &str,
    old: Option<&AIPipelineStatus>,
    new: AIPipelineStatus,
) -> Result<()> {
    ctx.metrics.observe_pipeline(uid, namespace, name, &new);
    if old.map(status::reconciled_part).as_ref() == Some(&new) {
        return Ok(());
    }
    let api: Api<AIPipeline> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": "portcullis.dev/v1alpha1",
        "kind": "AIPipeline",
        "status": new,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.statuses
        .lock()
        .expect("status lock")
        .insert(uid.to_string(), new);
    Ok(())
}
