//! Events on the AIPipeline.

use tracing::warn;

use crate::k8s::{Event, EventType, ObjectReference, Recorder};

/// Publishes an Event about the pipeline at `reference`; a failure is logged, not returned.
pub async fn publish(
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
