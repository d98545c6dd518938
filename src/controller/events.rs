//! Events on the AIPipeline.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::k8s::{Event, EventType, ObjectReference, Recorder};

/// Why an Event is published (its `reason`): warnings, but for credentials issued and rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventReason {
    /// Requested items were denied (step: Plan).
    AccessDenied,
    /// The spec cannot be planned (step: Plan).
    InvalidSpec,
    /// An object of a stage's name exists and is not Portcullis's (step: Apply).
    AdoptionRefused,
    /// A managed object changed or deleted outside Portcullis was put back (step: Apply).
    DriftReverted,
    /// The `portcullis.dev/reconcile` annotation asked for a reconcile (step: Plan).
    ReconcileRequested,
    /// A binding Portcullis does not manage reaches a stage's ServiceAccount (the watchdog).
    ForeignGrant,
    /// Credentials were issued into a stage's Secret (normal; step: Vault).
    CredentialsIssued,
    /// A stage's credentials were replaced by new ones (normal; step: Vault).
    CredentialsRotated,
    /// A Vault call failed; a failure that repeats is published once (warning; step: Vault).
    VaultFailed,
}

impl EventReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventReason::AccessDenied => "AccessDenied",
            EventReason::InvalidSpec => "InvalidSpec",
            EventReason::AdoptionRefused => "AdoptionRefused",
            EventReason::DriftReverted => "DriftReverted",
            EventReason::ReconcileRequested => "ReconcileRequested",
            EventReason::ForeignGrant => "ForeignGrant",
            EventReason::CredentialsIssued => "CredentialsIssued",
            EventReason::CredentialsRotated => "CredentialsRotated",
            EventReason::VaultFailed => "VaultFailed",
        }
    }

    /// The step that publishes it (the Event's `action`).
    fn action(self) -> &'static str {
        match self {
            EventReason::AccessDenied
            | EventReason::InvalidSpec
            | EventReason::ReconcileRequested => "Plan",
            EventReason::AdoptionRefused | EventReason::DriftReverted => "Apply",
            EventReason::ForeignGrant => "Watch",
            EventReason::CredentialsIssued
            | EventReason::CredentialsRotated
            | EventReason::VaultFailed => "Vault",
        }
    }
}

/// Publishes a warning Event about the pipeline at `reference`; a failure is logged, not
/// returned.
pub(crate) async fn warn(
    recorder: &Recorder,
    reference: &ObjectReference,
    reason: EventReason,
    note: String,
) {
    publish(recorder, reference, reason, note, EventType::Warning).await;
}

/// Publishes a normal Event (something the user asked for, or expected, happened).
pub(crate) async fn normal(
    recorder: &Recorder,
    reference: &ObjectReference,
    reason: EventReason,
    note: String,
) {
    publish(recorder, reference, reason, note, EventType::Normal).await;
}

/// Events published at once at most; the others wait their turn in the background.
const PUBLISHING_AT_ONCE: usize = 8;
/// Events waiting to be published at most; beyond it (a storm at a cold start with many
/// denials, an API server refusing them) new ones are dropped, and the log says so. Events are
/// advisory: the decision log and the status hold the same.
const MAX_PENDING: usize = 1_000;

static PUBLISHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PUBLISHING_AT_ONCE);
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Hands the Event to the background: a reconcile never waits for an Event's round trip.
async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    reason: EventReason,
    note: String,
    type_: EventType,
) {
    let mut note = note;
    if note.len() > 1000 {
        note.truncate(note.floor_char_boundary(990));
        note.push_str(" ...");
    }
    let event = Event {
        type_,
        reason: reason.as_str().into(),
        note: Some(note),
        action: reason.action().into(),
        secondary: None,
    };
    if PENDING.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
        PENDING.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(
            reason = reason.as_str(),
            "an event was dropped: {MAX_PENDING} are already waiting to be published"
        );
        return;
    }
    let (recorder, reference) = (recorder.clone(), reference.clone());
    tokio::spawn(async move {
        let permit = PUBLISHING.acquire().await;
        if let Err(error) = recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = reason.as_str(), "publishing an event failed");
        }
        drop(permit);
        PENDING.fetch_sub(1, Ordering::Relaxed);
    });
}
