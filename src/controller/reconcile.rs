//! One AIPipeline's reconcile, as named steps: plan -> record -> apply -> status.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::apply::{Applier, Change, Intent};
use super::metrics::{DecisionLabels, Metrics, ResultLabels};
use super::status::{self, Outcome};
use super::vault;
use super::{Context, Error, Result};
use crate::api::{AIPipeline, AIPipelineStatus};
use crate::audit::{Action as AuditAction, Entry};
use crate::k8s::FIELD_MANAGER;
use crate::plan::{self, Plan};

/// Reconciles one AIPipeline. Children are cleaned up by owner references when it is deleted.
#[tracing::instrument(skip_all, fields(pipeline = %pipeline.name_any(), namespace = pipeline.namespace().unwrap_or_default()))]
pub async fn reconcile(pipeline: Arc<AIPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.time_reconcile();
    if pipeline.meta().deletion_timestamp.is_some() {
        // Kubernetes objects go by owner references; Vault's are cleaned here, and the
        // finalizer holds the deletion until they are.
        return match vault::finalize(&ctx, ctx.vault.as_ref(), &pipeline).await? {
            None => Ok(Action::await_change()),
            Some(problem) => {
                let namespace = pipeline.namespace().ok_or(Error::NotNamespaced)?;
                let uid = pipeline.uid().unwrap_or_default();
                let old = pipeline.status.clone();
                let new = status::cleanup_pending(
                    &problem,
                    pipeline.meta().generation,
                    old.as_ref(),
                    now(),
                );
                write_status(
                    &ctx,
                    &namespace,
                    &pipeline.name_any(),
                    &uid,
                    old.as_ref(),
                    new,
                )
                .await?;
                Err(Error::Vault(problem.message))
            }
        };
    }
    if !ctx.synced.load(std::sync::atomic::Ordering::Acquire) {
        // Planning before the guardrail cache is full would apply the defaults and prune what
        // the guardrails allow. The caches fill within seconds of start-up.
        return Ok(Action::requeue(std::time::Duration::from_millis(200)));
    }
    let namespace = pipeline.namespace().ok_or(Error::NotNamespaced)?;
    let name = pipeline.name_any();
    let generation = pipeline.meta().generation;
    // The status we last wrote is newer than a cached AIPipeline that predates that write.
    let uid = pipeline.uid().unwrap_or_default();
    let written = ctx.statuses.lock().expect("status lock").get(&uid).cloned();
    let old_status = match (&written, pipeline.status.as_ref()) {
        (Some(w), Some(cached)) if cached.observed_generation <= w.observed_generation => Some(w),
        (Some(w), None) => Some(w),
        (_, cached) => cached,
    };
    let recorder = ctx.recorder();
    let reference = pipeline.object_ref(&());

    let labels = ctx.namespace_labels(&namespace);
    let guardrails: Vec<_> = ctx
        .guardrails
        .state()
        .iter()
        .map(|g| (**g).clone())
        .collect();
    let plan = match plan::build(&pipeline, &namespace, &labels, &guardrails) {
        Ok(plan) => plan,
        Err(errors) => {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            let new = status::invalid(&errors, generation, old_status, now());
            if old_status != Some(&new) {
                publish(
                    &recorder,
                    &reference,
                    EventType::Warning,
                    "InvalidSpec",
                    "Plan",
                    errors.join("; "),
                )
                .await;
            }
            write_status(&ctx, &namespace, &name, &uid, old_status, new).await?;
            ctx.metrics
                .reconciles
                .get_or_create(&ResultLabels {
                    result: "invalid_spec".into(),
                })
                .inc();
            // A spec that cannot be planned waits for the next change; it never hot-loops.
            return Ok(Action::await_change());
        }
    };

    let subject = |stage: &str| {
        let sa = plan
            .stages
            .iter()
            .find(|s| s.name == stage)
            .map(|s| s.service_account.as_str())
            .unwrap_or_default();
        format!("system:serviceaccount:{namespace}:{sa}")
    };

    // 1. Work out what must change (reads only).
    let owner = owner_reference(&pipeline)?;
    let applier = Applier {
        client: &ctx.client,
        stores: &ctx.children,
        applied: &ctx.applied,
    };
    let changes = applier
        .intents(&namespace, &plan.objects, &owner)
        .await
        .map_err(Error::Kube)?;

    // 2. Record the decisions (once per distinct set: re-reconciling an unchanged pipeline does
    //    not log the same grants again) and the changes, durably, in one append.
    let digest = decisions_digest(&plan);
    let already_recorded = old_status.and_then(|s| s.recorded_decisions.as_deref())
        == Some(digest.as_str())
        || ctx.recorded.lock().expect("recorded lock").get(&uid) == Some(&digest);
    let mut entries: Vec<Entry> = Vec::new();
    if !already_recorded {
        entries.extend(
            plan.decisions.iter().map(|d| {
                Entry::from_decision(&namespace, &name, generation, &subject(&d.stage), d)
            }),
        );
    }
    entries.extend(
        changes
            .iter()
            .map(|c| change_entry(c, &namespace, &name, generation, &subject(&c.stage))),
    );
    ctx.record(entries).await?;
    if !already_recorded {
        ctx.recorded
            .lock()
            .expect("recorded lock")
            .insert(uid.clone(), digest.clone());
        for d in &plan.decisions {
            ctx.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    verdict: d.verdict.as_str().into(),
                    reason: d.reason.as_str().into(),
                })
                .inc();
        }
        let denied: Vec<String> = plan
            .decisions
            .iter()
            .filter(|d| !d.is_allowed())
            .map(|d| format!("{} {} [{}]", d.stage, d.item, d.reason))
            .collect();
        if !denied.is_empty() {
            let note = format!(
                "{} requested items denied: {}",
                denied.len(),
                denied.join("; ")
            );
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                "AccessDenied",
                "Plan",
                note,
            )
            .await;
        }
    }

    // 3. Make the changes.
    let results = applier.execute(&changes).await;

    let mut outcome = Outcome::default();
    for (change, error) in changes.iter().zip(&results) {
        match (&change.intent, error) {
            (Intent::RefuseAdoption { reason }, _) => {
                Metrics::kind(&ctx.metrics.adoptions_refused, change.kind.as_str());
                outcome
                    .refused
                    .push((change.stage.clone(), change.object()));
                publish(
                    &recorder,
                    &reference,
                    EventType::Warning,
                    "AdoptionRefused",
                    "Apply",
                    reason.clone(),
                )
                .await;
            }
            (intent, Some(error)) => {
                warn!(object = %change.object(), action = intent.action(), %error, "applying a managed object failed");
                outcome
                    .errors
                    .push(format!("{} {}: {error}", intent.action(), change.object()));
            }
            (Intent::Prune { .. }, None) => {
                Metrics::kind(&ctx.metrics.pruned, change.kind.as_str())
            }
            (Intent::RevertDrift, None) => {
                Metrics::kind(&ctx.metrics.drift_reverts, change.kind.as_str());
                Metrics::kind(&ctx.metrics.applied, change.kind.as_str());
                info!(object = %change.object(), "reverted a change made outside Portcullis");
                publish(
                    &recorder,
                    &reference,
                    EventType::Warning,
                    "DriftReverted",
                    "Apply",
                    format!(
                        "{} was changed or deleted outside Portcullis and was put back",
                        change.object()
                    ),
                )
                .await;
            }
            (_, None) => Metrics::kind(&ctx.metrics.applied, change.kind.as_str()),
        }
    }

    // 4. Vault: policies, roles and credentials, for the stages that got their identity.
    let mut wake = None;
    if vault::involved(&plan, &pipeline) {
        // Only the Vault side of the plan, for the stages whose identity was applied.
        let granted_to = |stage: &str| !outcome.refused.iter().any(|(s, _)| s == stage);
        let granted = Plan {
            stages: plan.stages.clone(),
            vault_policies: plan
                .vault_policies
                .iter()
                .filter(|p| granted_to(&p.stage))
                .cloned()
                .collect(),
            vault_roles: plan
                .vault_roles
                .iter()
                .filter(|r| granted_to(&r.stage))
                .cloned()
                .collect(),
            credentials: plan
                .credentials
                .iter()
                .filter(|c| granted_to(&c.stage))
                .cloned()
                .collect(),
            ..Plan::default()
        };
        let v = vault::reconcile(&ctx, ctx.vault.as_ref(), &pipeline, &granted, &owner).await?;
        wake = v.wake;
        outcome.vault = Some(v);
    }

    // 5. Status.
    let mut new = status::for_plan(&plan, &outcome, generation, old_status, now());
    new.recorded_decisions = Some(digest);
    write_status(&ctx, &namespace, &name, &uid, old_status, new).await?;

    if !outcome.errors.is_empty() {
        return Err(Error::Apply(outcome.errors.join("; ")));
    }
    if let Some(problem) = outcome
        .vault
        .as_ref()
        .and_then(|v| v.error.as_ref())
        .filter(|p| p.reason != "VaultNotConfigured")
    {
        // Retried with backoff; the Secrets already delivered stay until their leases end.
        return Err(Error::Vault(problem.message.clone()));
    }
    ctx.failures.lock().expect("failures lock").remove(&uid);
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
                .max(std::time::Duration::from_millis(500)),
        ),
        None => Action::await_change(),
    })
}

/// What `error_policy` does: count, log, and retry with a delay that depends on the error.
pub fn error_policy(pipeline: Arc<AIPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
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
    warn!(pipeline = %pipeline.name_any(), namespace = pipeline.namespace().unwrap_or_default(), %error, "reconcile failed");
    Action::requeue(error.retry_after(failures))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// SHA-256 over the decisions, as recorded: the key that stops the same grants being logged
/// twice.
pub fn decisions_digest(plan: &Plan) -> String {
    let mut h = Sha256::new();
    for d in &plan.decisions {
        h.update(format!(
            "{}\0{}\0{}\0{}\0{}\n",
            d.stage,
            d.field,
            d.item,
            d.verdict.as_str(),
            d.reason.as_str()
        ));
    }
    hex::encode(&h.finalize()[..16])
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

fn change_entry(
    change: &Change,
    namespace: &str,
    pipeline: &str,
    generation: Option<i64>,
    subject: &str,
) -> Entry {
    let (action, message) = match &change.intent {
        Intent::Create => (AuditAction::Create, format!("creating {}", change.object())),
        Intent::Update => (
            AuditAction::Update,
            format!("updating {} to the current plan", change.object()),
        ),
        Intent::RevertDrift => (
            AuditAction::DriftReverted,
            format!(
                "{} was changed or deleted outside Portcullis; putting it back",
                change.object()
            ),
        ),
        Intent::Prune { .. } => (
            AuditAction::Prune,
            format!("deleting {}: no longer planned", change.object()),
        ),
        Intent::RefuseAdoption { reason } => (AuditAction::AdoptionRefused, reason.clone()),
    };
    Entry {
        action,
        namespace: namespace.into(),
        pipeline: pipeline.into(),
        stage: (!change.stage.is_empty()).then(|| change.stage.clone()),
        subject: Some(subject.into()),
        object: Some(change.object()),
        verdict: None,
        reason: None,
        message,
        generation,
    }
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
    if old == Some(&new) {
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
    .await
    .map_err(Error::Kube)?;
    ctx.statuses
        .lock()
        .expect("status lock")
        .insert(uid.to_string(), new);
    Ok(())
}

async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let mut note = note;
    if note.len() > 1000 {
        note.truncate(note.floor_char_boundary(990));
        note.push_str(" ...");
    }
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, reference).await {
        warn!(%error, reason, "publishing an event failed");
    }
}
