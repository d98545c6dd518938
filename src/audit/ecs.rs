//! Decision-log records as Elastic Common Schema documents (`portcullis audit export --format
//! ecs`), for SIEMs that index ECS (Elastic Security, OpenSearch, and the many that accept it).
//!
//! A pure mapping of one [`Record`] to one JSON document: the ECS fields a SIEM's rules and
//! dashboards already understand (`@timestamp`, `event.*`, `user.name`, `rule.*`,
//! `orchestrator.*`, `source.ip`, `user_agent.original`, `message`), and the whole record, hash
//! chain included, under `portcullis.*` so that nothing is lost and `audit verify` can still be
//! run on the original log. docs/decision-log.md has the table, and the OCSF classes.

use serde_json::{Map, Value, json};

use super::{Action, Record};

/// The ECS version the documents follow.
pub const ECS_VERSION: &str = "8.11.0";

/// `event.kind`, `event.category` and `event.type` of an action (`verdict` for those whose type
/// depends on it).
fn classify(action: Action, verdict: Option<&str>) -> (&'static str, &'static str, &'static str) {
    let allowed_or_denied = if verdict == Some("Deny") {
        "denied"
    } else {
        "allowed"
    };
    match action {
        Action::Grant => ("event", "iam", "allowed"),
        Action::Deny | Action::AdoptionRefused | Action::AdmissionDenied => {
            ("event", "iam", "denied")
        }
        Action::Create | Action::CredentialIssued => ("event", "configuration", "creation"),
        Action::Update
        | Action::DriftReverted
        | Action::CredentialRenewed
        | Action::CredentialRotated
        | Action::PolicyWritten
        | Action::RoleWritten => ("event", "configuration", "change"),
        Action::Prune | Action::CredentialRevoked => ("event", "configuration", "deletion"),
        Action::VaultFailed => ("event", "configuration", "error"),
        Action::ReconcileRequested => ("event", "configuration", "info"),
        Action::Access => ("event", "iam", allowed_or_denied),
        Action::ForeignGrant | Action::Anomaly => ("alert", "intrusion_detection", "indicator"),
    }
}

/// `event.outcome`: what the record says of the result. Most records precede the change they
/// describe ("decided, about to be made"), so their outcome is `unknown`.
fn outcome(action: Action, verdict: Option<&str>) -> &'static str {
    match (action, verdict) {
        (_, Some("Allow")) => "success",
        (_, Some("Deny")) => "failure",
        (Action::VaultFailed | Action::AdoptionRefused | Action::AdmissionDenied, _) => "failure",
        _ => "unknown",
    }
}

/// Inserts `value` at the dotted `path` of `doc`, unless it is null.
fn put(doc: &mut Map<String, Value>, path: &str, value: Value) {
    if value.is_null() {
        return;
    }
    let mut parts = path.split('.').peekable();
    let mut at = doc;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            at.insert(part.to_string(), value);
            return;
        }
        at = at
            .entry(part)
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("ECS paths do not overlap a value");
    }
}

/// The ECS document of one decision-log record.
pub fn to_ecs(record: &Record) -> Value {
    let verdict = record.verdict.as_deref();
    let (kind, category, type_) = classify(record.action, verdict);
    let mut doc = Map::new();
    put(
        &mut doc,
        "@timestamp",
        json!(
            record
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
    );
    put(&mut doc, "ecs.version", json!(ECS_VERSION));
    put(&mut doc, "message", json!(record.message));
    put(&mut doc, "event.kind", json!(kind));
    put(&mut doc, "event.category", json!([category]));
    put(&mut doc, "event.type", json!([type_]));
    put(&mut doc, "event.action", json!(record.action.as_str()));
    put(
        &mut doc,
        "event.outcome",
        json!(outcome(record.action, verdict)),
    );
    put(&mut doc, "event.reason", json!(record.reason));
    put(&mut doc, "event.sequence", json!(record.seq));
    put(&mut doc, "event.id", json!(record.hash));
    put(&mut doc, "event.provider", json!("portcullis"));
    put(&mut doc, "event.module", json!("portcullis"));
    put(&mut doc, "event.dataset", json!("portcullis.decisions"));
    put(&mut doc, "observer.vendor", json!("Portcullis"));
    put(&mut doc, "observer.product", json!("Portcullis"));
    put(&mut doc, "observer.name", json!(record.writer));
    put(&mut doc, "orchestrator.type", json!("kubernetes"));
    put(&mut doc, "orchestrator.namespace", json!(record.namespace));
    put(&mut doc, "orchestrator.resource.type", json!("aipipeline"));
    put(
        &mut doc,
        "orchestrator.resource.name",
        json!(record.pipeline),
    );
    put(
        &mut doc,
        "orchestrator.resource.id",
        json!(record.pipeline_uid),
    );
    put(&mut doc, "user.name", json!(record.subject));
    if record.reason.is_some() {
        put(&mut doc, "rule.name", json!(record.reason));
        put(
            &mut doc,
            "rule.ruleset",
            json!(record.guardrail.as_deref().unwrap_or("portcullis-floor")),
        );
    }
    if let Some(item) = &record.item {
        let first_ip = item
            .get("sourceIPs")
            .and_then(|ips| ips.get(0))
            .or_else(|| item.get("sourceIP"));
        if let Some(ip) = first_ip.filter(|ip| ip.is_string()) {
            put(&mut doc, "source.ip", ip.clone());
        }
        if let Some(agent) = item.get("userAgent").filter(|a| a.is_string()) {
            put(&mut doc, "user_agent.original", agent.clone());
        }
    }
    put(
        &mut doc,
        "portcullis",
        json!({
            "schemaVersion": record.schema_version,
            "seq": record.seq,
            "writer": record.writer,
            "action": record.action.as_str(),
            "namespace": record.namespace,
            "pipeline": record.pipeline,
            "pipelineUid": record.pipeline_uid,
            "stage": record.stage,
            "subject": record.subject,
            "object": record.object,
            "item": record.item,
            "verdict": record.verdict,
            "reason": record.reason,
            "guardrail": record.guardrail,
            "generation": record.generation,
            "keyId": record.key_id,
            "prev": record.prev,
            "hash": record.hash,
        }),
    );
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_an_ecs_classification_from_the_allowed_values() {
        // ECS 8.11's allowed values of event.kind, event.category and event.type.
        let kinds = ["alert", "event"];
        let categories = ["configuration", "iam", "intrusion_detection"];
        let types = [
            "allowed",
            "denied",
            "creation",
            "change",
            "deletion",
            "error",
            "info",
            "indicator",
        ];
        for action in Action::ALL {
            for verdict in [None, Some("Allow"), Some("Deny")] {
                let (kind, category, type_) = classify(action, verdict);
                assert!(kinds.contains(&kind), "{action:?}: {kind}");
                assert!(categories.contains(&category), "{action:?}: {category}");
                assert!(types.contains(&type_), "{action:?}: {type_}");
            }
        }
        assert_eq!(classify(Action::Access, Some("Deny")).2, "denied");
        assert_eq!(classify(Action::Access, Some("Allow")).2, "allowed");
        assert_eq!(outcome(Action::Deny, Some("Deny")), "failure");
        assert_eq!(outcome(Action::Create, None), "unknown");
    }
}
