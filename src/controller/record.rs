//! The record step: the plan's decisions and the changes about to be made go to the decision
//! log, durably and in one append, before anything changes.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::apply::{Change, Intent};
use super::events::{self, EventReason};
use super::metrics::DecisionLabels;
use super::reconcile::Target;
use super::{Context, Result};
use crate::api::AIPipeline;
use crate::audit::{Action as AuditAction, Entry};
use crate::k8s::ResourceExt;
use crate::plan::Plan;
use crate::plan::names::RECONCILE_ANNOTATION;

/// Failures already in the log for one pipeline, so that a failure that persists is recorded
/// once per change of outcome (with how often it repeated), not at every retry.
#[derive(Debug, Default)]
pub(crate) struct Repeats {
    /// The changes recorded by the last reconcile whose apply failed, and how many reconciles
    /// since tried the same changes again.
    changes: Option<(String, u32)>,
    /// Per Vault operation and object, the error last recorded and how often it repeated.
    vault: HashMap<String, (String, u32)>,
    /// The value of the `portcullis.dev/reconcile` annotation last recorded.
    reconcile_request: Option<String>,
    /// Per Vault intent (such as issuing one credential) whose last attempt failed, how many
    /// attempts failed: the intent is in the log from its first attempt, and its retries are
    /// counted, not recorded again.
    intents: HashMap<String, u32>,
}

/// Records a reconcile asked for with the [`RECONCILE_ANNOTATION`], once per value of the
/// annotation (and once more after a restart of the operator), and announces it in an Event.
/// Whether one was asked for.
pub(crate) async fn requested(
    ctx: &Context,
    pipeline: &AIPipeline,
    target: &Target,
) -> Result<bool> {
    let Some(value) = pipeline.annotations().get(RECONCILE_ANNOTATION) else {
        return Ok(false);
    };
    let seen = ctx
        .repeats
        .lock()
        .expect("repeats lock")
        .get(&target.uid)
        .and_then(|r| r.reconcile_request.clone());
    if seen.as_deref() == Some(value.as_str()) {
        return Ok(false);
    }
    let message =
        format!("a reconcile was asked for with the {RECONCILE_ANNOTATION} annotation ({value:?})");
    let mut entry = Entry::new(
        AuditAction::ReconcileRequested,
        &target.namespace,
        &target.name,
        message.clone(),
    );
    entry.pipeline_uid = Some(target.uid.clone());
    entry.generation = target.generation;
    entry.object = Some(format!("AIPipeline {}/{}", target.namespace, target.name));
    ctx.record(vec![entry]).await?;
    ctx.repeats
        .lock()
        .expect("repeats lock")
        .entry(target.uid.clone())
        .or_default()
        .reconcile_request = Some(value.clone());
    events::normal(
        &target.recorder,
        &target.reference,
        EventReason::ReconcileRequested,
        message,
    )
    .await;
    Ok(true)
}

/// What to record of a failed Vault call: `None` when the same call failed the same way last
/// time (it is counted instead); otherwise the message, with how often the failure it replaces
/// repeated.
pub(crate) fn vault_failure(ctx: &Context, uid: &str, call: &str, error: &str) -> Option<String> {
    let mut repeats = ctx.repeats.lock().expect("repeats lock");
    let seen = repeats.entry(uid.to_string()).or_default();
    match seen.vault.get_mut(call) {
        Some((last, count)) if last == error => {
            *count += 1;
            None
        }
        Some((last, count)) => {
            let message = format!(
                "{error} (it failed differently before, {} time{}: {last})",
                count,
                if *count == 1 { "" } else { "s" }
            );
            *last = error.to_string();
            *count = 1;
            Some(message)
        }
        None => {
            seen.vault.insert(call.to_string(), (error.to_string(), 1));
            Some(error.to_string())
        }
    }
}

/// A Vault call succeeded: its next failure is recorded again. How often the last failure
/// repeated, if it was recorded.
pub(crate) fn vault_success(ctx: &Context, uid: &str, call: &str) -> Option<u32> {
    let mut repeats = ctx.repeats.lock().expect("repeats lock");
    repeats
        .get_mut(uid)
        .and_then(|seen| seen.vault.remove(call))
        .map(|(_, count)| count)
}

/// Whether the Vault intent `intent` (such as `renew <lease id>`)
/// of pipeline `uid` is a retry of one whose last attempt failed: it is in the log already and
/// is not recorded again.
pub(crate) fn intent_retried(ctx: &Context, uid: &str, intent: &str) -> bool {
    ctx.repeats
        .lock()
        .expect("repeats lock")
        .get(uid)
        .is_some_and(|seen| seen.intents.contains_key(intent))
}

/// An attempt at the Vault intent `intent` failed: its retries are not recorded again.
pub(crate) fn intent_failed(ctx: &Context, uid: &str, intent: &str) {
    *ctx.repeats
        .lock()
        .expect("repeats lock")
        .entry(uid.to_string())
        .or_default()
        .intents
        .entry(intent.to_string())
        .or_default() += 1;
}

/// An attempt at the Vault intent `intent` succeeded: how many attempts failed before it (0:
/// none). Its next attempt, if any, is recorded again.
pub(crate) fn intent_done(ctx: &Context, uid: &str, intent: &str) -> u32 {
    ctx.repeats
        .lock()
        .expect("repeats lock")
        .get_mut(uid)
        .and_then(|seen| seen.intents.remove(intent))
        .unwrap_or_default()
}

/// The message of the record that closes a Vault intent retried after failures: the intent
/// was recorded once, at its first attempt, and the attempts in between were counted.
pub(crate) fn retried_message(done: &str, failed: u32) -> String {
    format!(
        "{done} at attempt {}: the intent was recorded at the first attempt, and the {failed} attempt{} after it failed (the failure recorded once, when it first happened)",
        failed + 1,
        if failed == 1 { "" } else { "s" }
    )
}

/// After the apply step: whether `changes` failed, so that retrying the same changes is not
/// recorded again.
pub(crate) fn applied(ctx: &Context, uid: &str, changes: &[Change], failed: bool) {
    let mut repeats = ctx.repeats.lock().expect("repeats lock");
    let seen = repeats.entry(uid.to_string()).or_default();
    if failed {
        let digest = changes_digest(changes);
        match &mut seen.changes {
            Some((last, count)) if *last == digest => *count += 1,
            _ => seen.changes = Some((digest, 1)),
        }
    } else {
        seen.changes = None;
    }
}

fn changes_digest(changes: &[Change]) -> String {
    let mut h = Sha256::new();
    for c in changes {
        h.update(format!("{}\0{}\n", c.intent.action(), c.object()));
    }
    hex::encode(&h.finalize()[..16])
}

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
    // The same changes as a reconcile whose apply failed: they are in the log already, and
    // trying them again adds nothing to it.
    let retrying = ctx
        .repeats
        .lock()
        .expect("repeats lock")
        .get(&target.uid)
        .and_then(|r| r.changes.as_ref())
        .is_some_and(|(digest, _)| *digest == changes_digest(changes));
    if !retrying {
        entries.extend(
            changes
                .iter()
                .map(|c| change_entry(c, target, &subject(&c.stage))),
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_intent_closes_with_the_attempt_it_succeeded_at() {
        assert_eq!(
            retried_message("issued credentials from database/creds/x", 1),
            "issued credentials from database/creds/x at attempt 2: the intent was recorded at the first attempt, and the 1 attempt after it failed (the failure recorded once, when it first happened)"
        );
        assert!(retried_message("issued", 4).contains("at attempt 5: "));
        assert!(retried_message("issued", 4).contains("the 4 attempts after it failed"));
    }
}
