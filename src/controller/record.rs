//! The record step: the plan's decisions and the changes about to be made go to the decision
//! log, durably and in one append, before anything changes.

use sha2::{Digest, Sha256};

use super::apply::{Change, Intent};
use super::events::{self, EventReason};
use super::metrics::DecisionLabels;
use super::reconcile::Target;
use super::{Context, Result};
use crate::audit::{Action as AuditAction, Entry};
use crate::plan::Plan;

/// What the record step came to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recorded {
    /// The digest of the decisions now in the log (kept in the status).
    pub digest: String,
}

/// Records the decisions (once per distinct set: re-reconciling an unchanged pipeline does not
/// log the same grants again) and the changes, durably, in one append. The first time a set of
/// decisions is recorded, it is counted, and denied items are announced in an Event.
pub(crate) async fn record(
    ctx: &Context,
    target: &Target,
    plan: &Plan,
    changes: &[Change],
) -> Result<Recorded> {
    let subject = |stage: &str| {
        let sa = plan
            .stages
            .iter()
            .find(|s| s.name == stage)
            .map(|s| s.service_account.as_str())
            .unwrap_or_default();
        format!("system:serviceaccount:{}:{sa}", target.namespace)
    };
    let digest = decisions_digest(plan);
    let already_recorded = target
        .old_status
        .as_ref()
        .and_then(|s| s.recorded_decisions.as_deref())
        == Some(digest.as_str())
        || ctx.recorded.lock().expect("recorded lock").get(&target.uid) == Some(&digest);
    let mut entries: Vec<Entry> = Vec::new();
    if !already_recorded {
        entries.extend(plan.decisions.iter().map(|d| {
            let mut e = Entry::from_decision(
                &target.namespace,
                &target.name,
                target.generation,
                &subject(&d.stage),
                d,
            );
            e.pipeline_uid = Some(target.uid.clone());
            e
        }));
    }
    entries.extend(
        changes
            .iter()
            .map(|c| change_entry(c, target, &subject(&c.stage))),
    );
    ctx.record(entries).await?;
    if !already_recorded {
        ctx.recorded
            .lock()
            .expect("recorded lock")
            .insert(target.uid.clone(), digest.clone());
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
            events::warn(
                &target.recorder,
                &target.reference,
                EventReason::AccessDenied,
                note,
            )
            .await;
        }
    }
    Ok(Recorded { digest })
}

/// SHA-256 over the decisions, as recorded: the key that stops the same grants being logged
/// twice.
pub(crate) fn decisions_digest(plan: &Plan) -> String {
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

fn change_entry(change: &Change, target: &Target, subject: &str) -> Entry {
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
        Intent::RefuseAdoption => (AuditAction::AdoptionRefused, change.refusal()),
    };
    Entry {
        action,
        namespace: target.namespace.clone(),
        pipeline: target.name.clone(),
        stage: (!change.stage.is_empty()).then(|| change.stage.clone()),
        subject: Some(subject.into()),
        object: Some(change.object()),
        verdict: None,
        reason: None,
        message,
        generation: target.generation,
        pipeline_uid: Some(target.uid.clone()),
        guardrail: None,
        item: None,
    }
}
